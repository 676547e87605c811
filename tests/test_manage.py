"""Conversation management over HTTP, per-ask overrides, import of the original's files, export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio
from helpers.upstream import ALLOW_OTHER_MODEL, roles_and_contents, upstream_messages


async def ask(client, conversation_id: str, prompt: str, **extra) -> dict:
    reply = await client.post(f"/ask/{conversation_id}", json={"prompt": prompt, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_get_conversation_shows_turns_system_prompt_and_usage(start_server):
    server = await start_server(**ALLOW_OTHER_MODEL)
    async with server.client() as client:
        first = await ask(client, "g1", "hello")
        await ask(client, "g1", "again", model="other-model", max_tokens=1)
        reply = await client.get("/conversations/g1")
    assert reply.status_code == 200
    body = reply.json()
    assert body["conversation_id"] == "g1" and body["turns"] == 2 and body["system_prompt"] is None
    one, two = body["history"]
    assert one["turn"] == 1 and [m["role"] for m in one["messages"]] == ["user", "assistant"]
    assert [m["text"] for m in one["messages"]] == ["hello", "echo(1): hello"]
    assert one["messages"][0]["tokens"] == 1 and one["messages"][1]["tokens"] > 1
    assert one["finish_reason"] == "stop" and one["usage"] == first["usage"]
    assert one["created_at"].endswith("Z") and one["finished_at"] >= one["created_at"]
    assert two["model"] == "other-model" and two["finish_reason"] == "length"
    assert two["messages"][1]["text"] == "echo(3):"
    total = one["usage"]["total_tokens"] + two["usage"]["total_tokens"]
    assert body["usage"]["total_tokens"] == total


async def test_list_is_paginated_newest_first(server):
    async with server.client() as client:
        for name in ("l1", "l2", "l3", "l4", "l5"):
            await ask(client, name, f"hi {name}")
        await ask(client, "l2", "l2 is active again")
        seen, cursor = [], None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await client.get("/conversations", params=params)).json()
            seen += [(c["conversation_id"], c["turns"]) for c in page["conversations"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        bad = await client.get("/conversations", params={"cursor": "garbage!"})
        too_many = await client.get("/conversations", params={"limit": 1000})
    assert seen == [("l2", 2), ("l5", 1), ("l4", 1), ("l3", 1), ("l1", 1)]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"
    assert too_many.status_code == 400


async def test_rollback_is_seen_by_the_next_ask(server):
    async with server.client() as client:
        first, *_ = [await ask(client, "rb", prompt) for prompt in ("one", "two", "three")]
        reply = await client.post("/conversations/rb/rollback", json={"turns": 2})
        assert reply.json() == {
            "conversation_id": "rb",
            "removed": 2,
            "turns": 1,
            "head": first["turn_id"],
        }
        await ask(client, "rb", "four")
        assert roles_and_contents(upstream_messages(server.fake)) == [
            ("user", "one"),
            ("assistant", "echo(1): one"),
            ("user", "four"),
        ]
        reply = await client.post("/conversations/rb/rollback", json={"turns": 10})
        assert reply.json() == {"conversation_id": "rb", "removed": 2, "turns": 0, "head": None}
        for bad in ({"turns": 0}, {"turns": "x"}, {}):
            reply = await client.post("/conversations/rb/rollback", json=bad)
            assert reply.status_code == 400, bad
        assert (
            await client.post("/conversations/nope/rollback", json={"turns": 1})
        ).status_code == 404


async def test_system_prompt_per_conversation_and_per_ask(start_server):
    server = await start_server(FIRST_PROMPT="global persona")
    async with server.client() as client:
        reply = await client.put("/conversations/sp/system", json={"prompt": "pirate persona"})
        assert reply.json() == {"conversation_id": "sp", "system_prompt": "pirate persona"}
        await ask(client, "sp", "ahoy")
        assert roles_and_contents(upstream_messages(server.fake))[0] == ("system", "pirate persona")
        await ask(client, "sp", "once", system="just this turn")
        assert roles_and_contents(upstream_messages(server.fake))[0] == ("system", "just this turn")
        await ask(client, "other", "hi")
        assert roles_and_contents(upstream_messages(server.fake))[0] == ("system", "global persona")
        assert (await client.get("/conversations/sp")).json()["system_prompt"] == "pirate persona"
        for cleared in ("", None):
            await client.put("/conversations/sp/system", json={"prompt": cleared})
            await ask(client, "sp", "back to global")
            assert roles_and_contents(upstream_messages(server.fake))[0] == (
                "system",
                "global persona",
            )
        assert (await client.put("/conversations/sp/system", json={"prompt": 5})).status_code == 400


async def test_delete_then_404_everywhere(server):
    async with server.client() as client:
        await ask(client, "del", "remember me")
        assert (await client.delete("/conversations/del")).status_code == 204
        for method, path, body in (
            ("GET", "/conversations/del", None),
            ("DELETE", "/conversations/del", None),
            ("POST", "/conversations/del/rollback", {"turns": 1}),
        ):
            reply = await client.request(method, path, json=body)
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
        await ask(client, "del", "fresh start")
        assert roles_and_contents(upstream_messages(server.fake)) == [("user", "fresh start")]
        invalid = await client.get("/conversations/bad%20id")
        assert invalid.status_code == 400


async def test_openapi_documents_management_with_schemas(server):
    async with server.client() as client:
        spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert {"get"} <= set(paths["/conversations"])
    assert {"get", "delete"} <= set(paths["/conversations/{conversation_id}"])
    assert "post" in paths["/conversations/{conversation_id}/rollback"]
    assert "put" in paths["/conversations/{conversation_id}/system"]
    detail = paths["/conversations/{conversation_id}"]["get"]["responses"]["200"]
    schema = detail["content"]["application/json"]["schema"]
    assert schema["examples"] and "history" in schema["properties"]
    assert "TurnBody" in spec["components"]["schemas"]


def write_legacy(directory: Path) -> None:
    directory.mkdir()
    entries = [
        "User: 你好\n\n\nChatGPT: 你好！有什么可以帮你的吗？<|im_end|>\n",
        "User: line one\nline two $x\n\n\nChatGPT: answer two<|im_end|>\n",
    ]
    (directory / "111222333.json").write_text(
        json.dumps(entries, ensure_ascii=False), encoding="utf-8"
    )
    (directory / "broken.json").write_text("[not json", encoding="utf-8")
    (directory / "wrong-shape.json").write_text(json.dumps(["hello"]), encoding="utf-8")


async def run_command(*args: str, env_dir: Path) -> trio.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["CONVERSATIONS_DIR"] = str(env_dir)
    return await trio.run_process(
        [sys.executable, "-m", "easybackend.cli", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_import_json_then_ask_sees_the_imported_turns(start_server, tmp_path):
    legacy = tmp_path / "legacy"
    write_legacy(legacy)
    data = tmp_path / "conversations"
    first = await run_command("import-json", str(legacy), env_dir=data)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().strip() == (
        "imported 2 turns into 1 conversations from 1 files (0 had nothing new); skipped 2 malformed files"
    )
    stderr = first.stderr.decode()
    assert "broken.json" in stderr and "wrong-shape.json" in stderr and "Traceback" not in stderr

    again = await run_command("import-json", str(legacy), env_dir=data)
    assert again.stdout.decode().startswith("imported 0 turns into 0 conversations")

    server = await start_server(CONVERSATIONS_DIR=str(data))
    async with server.client() as client:
        await ask(client, "111222333", "and now?")
        history = (await client.get("/conversations/111222333")).json()
    assert roles_and_contents(upstream_messages(server.fake)) == [
        ("user", "你好"),
        ("assistant", "你好！有什么可以帮你的吗？"),
        ("user", "line one\nline two $x"),
        ("assistant", "answer two"),
        ("user", "and now?"),
    ]
    assert history["turns"] == 3 and history["history"][0]["model"] == "imported"


async def test_import_adds_only_new_entries_and_export_writes_json(tmp_path):
    legacy = tmp_path / "legacy"
    write_legacy(legacy)
    data = tmp_path / "conversations"
    await run_command("import-json", str(legacy), env_dir=data)
    path = legacy / "111222333.json"
    entries = json.loads(path.read_text(encoding="utf-8")) + [
        "User: third\n\n\nChatGPT: 3<|im_end|>\n"
    ]
    path.write_text(json.dumps(entries), encoding="utf-8")
    result = await run_command("import-json", str(legacy), env_dir=data)
    assert result.stdout.decode().startswith("imported 1 turns into 1 conversations")

    exported = await run_command("export", "111222333", env_dir=data)
    body = json.loads(exported.stdout)
    assert [turn["messages"][0]["text"] for turn in body["history"]] == [
        "你好",
        "line one\nline two $x",
        "third",
    ]
    # the tree view: every turn with its id and its parent's; imported entries form a chain
    ids = [turn["id"] for turn in body["tree"]]
    assert [turn["parent_id"] for turn in body["tree"]] == [None, *ids[:-1]]
    assert [turn["id"] for turn in body["history"]] == ids and body["head"] == ids[-1]
    missing = await run_command("export", "nope", env_dir=data)
    assert missing.returncode == 1 and missing.stderr.decode().startswith(
        "easybackend: error: no conversation"
    )
    not_a_dir = await run_command("import-json", str(tmp_path / "nowhere"), env_dir=data)
    assert not_a_dir.returncode == 1 and "not a directory" in not_a_dir.stderr.decode()
