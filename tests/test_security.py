"""API keys on every protocol, per-key conversations, TLS, CORS and limits."""

from __future__ import annotations

import json
import ssl

import httpx2
import pytest
import trio
import trustme
from helpers.http import bearer
from helpers.servers import Server, free_port
from helpers.websocket import original_pieces
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

KEYS = "alice:alice-SECRET-1111,bob:bob-SECRET-2222"
ALICE, BOB = "alice-SECRET-1111", "bob-SECRET-2222"


@pytest.fixture
async def keyed(start_server) -> Server:
    return await start_server(API_KEYS=KEYS, WS_PORT=str(free_port()))


# --- HTTP -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "status"),
    [(None, 401), ("wrong-key", 401), (ALICE, 200)],
    ids=["none", "wrong", "right"],
)
async def test_http_auth_matrix(keyed, secret, status):
    async with keyed.client(headers=bearer(secret)) as client:
        ask = await client.post("/ask/1", json={"prompt": "hi"})
        listing = await client.get("/conversations")
        stream = await client.post("/ask/1/stream", json={"prompt": "hi"})
    assert (ask.status_code, listing.status_code, stream.status_code) == (status, status, status)
    if status == 401:
        assert ask.json()["error"]["code"] == "unauthenticated"
        assert ask.headers["WWW-Authenticate"].startswith("Bearer")
        assert not keyed.fake.requests  # nothing reached the model


async def test_health_and_docs_stay_open_without_a_key(keyed):
    async with keyed.client() as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/docs")).status_code == 200


async def test_docs_can_be_closed(start_server):
    server = await start_server(API_KEYS=KEYS, PUBLIC_DOCS="false")
    async with server.client() as client:
        assert (await client.get("/openapi.json")).status_code == 401
        assert (await client.get("/openapi.json", headers=bearer(BOB))).status_code == 200


async def test_two_keys_on_one_conversation_id_get_two_conversations(keyed):
    async with (
        keyed.client(headers=bearer(ALICE)) as alice,
        keyed.client(headers=bearer(BOB)) as bob,
    ):
        await alice.post("/ask/1", json={"prompt": "alice speaks"})
        reply = await bob.post("/ask/1", json={"prompt": "bob speaks"})
        assert reply.json()["response"] == "echo(1): bob speaks"  # bob does not see alice's turn
        alice_view = (await alice.get("/conversations/1")).json()
        bob_view = (await bob.get("/conversations/1")).json()
        assert [t["messages"][0]["text"] for t in alice_view["history"]] == ["alice speaks"]
        assert [t["messages"][0]["text"] for t in bob_view["history"]] == ["bob speaks"]
        assert [
            c["conversation_id"] for c in (await bob.get("/conversations")).json()["conversations"]
        ] == ["1"]
        assert (await bob.delete("/conversations/1")).status_code == 204
        assert (await alice.get("/conversations/1")).status_code == 200


async def test_cors_follows_the_origin_list(start_server):
    server = await start_server(CORS_ORIGINS="https://app.example")
    async with server.client() as client:
        allowed = await client.options(
            "/ask/1",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        other = await client.post(
            "/ask/1", json={"prompt": "x"}, headers={"Origin": "https://evil.example"}
        )
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_answers_in_progress_per_key_are_capped(start_server):
    server = await start_server(API_KEYS=KEYS, MAX_STREAMS_PER_KEY="2")
    statuses: list[int] = []

    async def ask(client: httpx2.AsyncClient, i: int) -> None:
        reply = await client.post(
            f"/ask/cap-{i}", json={"prompt": "[[fake:delay=0.05]][[fake:tokens=10]] x"}
        )
        statuses.append(reply.status_code)

    async with (
        server.client(headers=bearer(ALICE)) as alice,
        server.client(headers=bearer(BOB)) as bob,
    ):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(ask, alice, i)
            nursery.start_soon(ask, bob, 99)
        busy = await alice.post("/ask/z", json={"prompt": "after"})
    assert sorted(statuses) == [200, 200, 200, 429, 429]
    assert busy.status_code == 200


async def test_prompt_longer_than_the_limit_is_refused(start_server):
    server = await start_server(MAX_PROMPT_CHARS="100")
    async with server.client() as client:
        reply = await client.post("/ask/1", json={"prompt": "x" * 101})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "prompt_too_long"
    assert "100" in reply.json()["error"]["message"]


# --- WebSocket ---------------------------------------------------------------------------------


async def ws_original_ask(url: str, *, headers=None) -> str:
    async with open_websocket_url(url, extra_headers=headers or []) as ws:
        await ws.send_message("<|ask|>$1$hello")
        pieces = await original_pieces(ws)
        return "".join(pieces)


@pytest.mark.parametrize("secret", [None, "wrong-key"], ids=["none", "wrong"])
async def test_websocket_handshake_refused_without_the_right_key(keyed, secret):
    url = f"ws://127.0.0.1:{keyed.running.ws_port}"
    headers = [("Authorization", f"Bearer {secret}")] if secret else []
    with pytest.raises(HandshakeError) as refused:
        await ws_original_ask(url, headers=headers)
    assert refused.value.status_code == 401
    assert json.loads(refused.value.body)["error"]["code"] == "unauthenticated"
    assert not keyed.fake.requests


async def test_websocket_accepts_the_key_as_header_or_query(keyed):
    base = f"ws://127.0.0.1:{keyed.running.ws_port}"
    assert (
        await ws_original_ask(base, headers=[("Authorization", f"Bearer {ALICE}")])
        == "echo(1): hello"
    )
    assert (
        await ws_original_ask(f"{base}/?api_key={ALICE}") == "echo(3): hello"
    )  # alice's conversation 1
    assert (
        await ws_original_ask(f"{base}/?api_key={BOB}") == "echo(1): hello"
    )  # bob's own conversation 1


async def test_websocket_idle_socket_is_closed(start_server):
    server = await start_server(WS_PORT=str(free_port()), WS_IDLE_TIMEOUT="0.3")
    async with open_websocket_url(f"ws://127.0.0.1:{server.running.ws_port}") as ws:
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
            await ws.get_message()
    assert closed.value.reason.code == 1001 and "idle" in closed.value.reason.reason


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    authority = trustme.CA()
    leaf = authority.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    return cert, key, client_context, authority


async def test_https_and_wss_from_one_pair_and_plain_is_not_served(start_server, certificate):
    cert, key, client_context, _ = certificate
    server = await start_server(
        TLS_CERTFILE=str(cert),
        TLS_KEYFILE=str(key),
        WS_PORT=str(free_port()),
        WS_HANDSHAKE_TIMEOUT="1",
    )
    https = f"https://127.0.0.1:{server.running.http_port}"
    async with httpx2.AsyncClient(verify=client_context, timeout=10) as client:
        reply = await client.post(f"{https}/ask/tls", json={"prompt": "secure"})
    assert reply.json()["response"] == "echo(1): secure"
    async with httpx2.AsyncClient(timeout=5) as plain:
        with pytest.raises(httpx2.TransportError):
            await plain.post(
                f"http://127.0.0.1:{server.running.http_port}/ask/tls", json={"prompt": "x"}
            )

    wss = f"wss://127.0.0.1:{server.running.ws_port}"
    async with open_websocket_url(wss, ssl_context=client_context) as ws:
        await ws.send_message("<|ask|>$tls$over wss")
        pieces = await original_pieces(ws)
    assert "".join(pieces) == "echo(3): over wss"
    # a plaintext WebSocket handshake on the WSS port gets no answer and the connection is closed
    assert await plaintext_reply(server.running.ws_port, UPGRADE) == b""


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def plaintext_reply(port: int, request: bytes) -> bytes:
    """Everything a server sends back to ``request`` in plain text until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    with trio.fail_after(5):
        await stream.send_all(request)
        while chunk := await stream.receive_some():
            received += chunk
    return received


async def test_bad_tls_files_stop_start_up_with_one_line(tmp_path, certificate):
    cert, key, _, authority = certificate
    other_key = tmp_path / "other.pem"
    authority.issue_cert("example.org").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    cases = [
        ({"TLS_CERTFILE": str(cert)}, "must be set together"),
        (
            {"TLS_CERTFILE": str(tmp_path / "missing.pem"), "TLS_KEYFILE": str(key)},
            "file not found",
        ),
        ({"TLS_CERTFILE": str(cert), "TLS_KEYFILE": str(other_key)}, "does not match"),
        ({"TLS_CERTFILE": str(garbage), "TLS_KEYFILE": str(key)}, "cannot be used"),
    ]
    import os
    import sys

    for env, expected in cases:
        result = await trio.run_process(
            [sys.executable, "-m", "easybackend.cli", "--demo"],
            env={
                **os.environ,
                "HTTP_PORT": str(free_port()),
                "GRPC_PORT": "off",
                "WS_PORT": "off",
                **env,
            },
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2, (env, lines)
        assert (
            len(lines) == 1 and lines[0].startswith("easybackend: error:") and expected in lines[0]
        ), lines
