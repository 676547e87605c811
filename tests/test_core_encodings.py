"""Token counting loads its vocabularies with no network access (SPEC §2, §3)."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers.servers import clean_env, run_python

from easybackend.chat.tokens import (
    FALLBACK_ENCODING,
    TokenCounter,
    UnknownEncoding,
    encoding_name_for,
    load_encoding,
)

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access is disabled in this test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    from easybackend.chat.tokens import TokenCounter, load_encoding

    result = {}
    for name in sys.argv[1:]:
        encoding = load_encoding(name)
        result[name] = {
            "hello world": encoding.encode("hello world"),
            "readme": encoding.encode("tiktoken is great!"),
            "chinese": TokenCounter(encoding).text("你好，世界"),
            "roundtrip": encoding.decode(encoding.encode("naïve café 🎉\\n\\n$x")),
        }
    result["attempts"] = attempts
    print(json.dumps(result))
    """
)


async def run_offline(tmp_path, *names: str, cache_dir: str | None = None):
    env = clean_env()
    env.pop("DATA_GYM_CACHE_DIR", None)
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "tiktoken-cache") if cache_dir is None else cache_dir
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(variable, None)
    return await run_python(tmp_path, env, ["-c", OFFLINE_SCRIPT, *names])


async def test_bundled_encodings_load_with_the_network_disabled_and_an_empty_cache(tmp_path):
    (tmp_path / "tiktoken-cache").mkdir()
    result = await run_offline(tmp_path, "o200k_base", "cl100k_base")
    assert result.returncode == 0, result.stderr.decode()
    counts = json.loads(result.stdout)
    assert counts["attempts"] == []
    assert counts["cl100k_base"]["hello world"] == [15339, 1917]
    assert counts["o200k_base"]["hello world"] == [24912, 2375]
    assert counts["cl100k_base"]["readme"] == [83, 1609, 5963, 374, 2294, 0]
    assert len(counts["o200k_base"]["readme"]) == 6
    for name in ("o200k_base", "cl100k_base"):
        assert counts[name]["roundtrip"] == "naïve café 🎉\n\n$x"
        assert 2 <= counts[name]["chinese"] <= 6
    # the vocabularies were placed in the configured cache, where tiktoken reads them
    assert len(list((tmp_path / "tiktoken-cache").iterdir())) == 2


async def test_cache_directory_that_does_not_exist_yet_is_created(tmp_path):
    result = await run_offline(tmp_path, "cl100k_base", cache_dir=str(tmp_path / "new" / "dir"))
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["cl100k_base"]["hello world"] == [15339, 1917]


async def test_second_load_reads_the_cache_without_the_package(tmp_path):
    first = await run_offline(tmp_path, "o200k_base")
    assert first.returncode == 0, first.stderr.decode()
    again = await run_offline(tmp_path, "o200k_base")
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads(again.stdout)["o200k_base"]["hello world"] == [24912, 2375]


async def test_unknown_encoding_name_is_a_clear_error():
    with pytest.raises(UnknownEncoding, match="unknown encoding 'nope'.*o200k_base"):
        load_encoding("nope")


@pytest.mark.parametrize(
    "model, expected",
    [
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("deepseek-chat", FALLBACK_ENCODING),
        ("qwen-plus", FALLBACK_ENCODING),
        ("", FALLBACK_ENCODING),
    ],
)
async def test_encoding_is_picked_from_the_model_name(model, expected):
    assert encoding_name_for(model) == expected
    assert FALLBACK_ENCODING == "o200k_base"


async def test_configured_encoding_wins_over_the_model():
    assert encoding_name_for("gpt-4o", "cl100k_base") == "cl100k_base"
    assert encoding_name_for("unknown-model", "cl100k_base") == "cl100k_base"


async def test_counter_counts_special_token_text_as_plain_text():
    counter = TokenCounter(load_encoding("o200k_base"))
    assert counter.text("<|endoftext|>") > 1
    assert counter.message("hello world") == 2 + 4


async def test_model_name_changes_what_fits_the_budget(start_server):
    # Chinese text costs different amounts under the two encodings; a prompt sized between
    # the two counts fits with one model's encoding and not with the other's.
    text = "你好，世界！今天天气很好。" * 6
    cl100k = TokenCounter(load_encoding("cl100k_base")).message(text) + 3
    o200k = TokenCounter(load_encoding("o200k_base")).message(text) + 3
    assert o200k < cl100k
    budget = str((o200k + cl100k) // 2)
    new = await start_server(MAX_CONTEXT_TOKENS=budget, GPT_ENGINE="gpt-4o")
    old = await start_server(MAX_CONTEXT_TOKENS=budget, GPT_ENGINE="gpt-3.5-turbo")
    async with new.client() as client:
        assert (await client.post("/ask/enc", json={"prompt": text})).status_code == 200
    async with old.client() as client:
        assert (await client.post("/ask/enc", json={"prompt": text})).status_code == 413
