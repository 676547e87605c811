"""The web console at / and Swagger UI at /docs, in a real browser (Chromium via Playwright).

Every request to another host is aborted and fails the test (helpers.browser). The fake
upstream answers ``echo(n): <prompt>``, n the number of messages it was sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import trio
from helpers.browser import in_browser, skip_without_browser
from helpers.logs import metric, scrape
from helpers.servers import Server, StartServer
from helpers.upstream import full_answer

from easybackend.settings import DEFAULT_MODEL
from easybackend.transports.http_console import CSP

DOCS = Path(__file__).resolve().parent.parent / "docs"


async def stored(server: Server, conversation_id: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with server.client(headers=headers) as client:
        response = await client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return response.json()


MARKDOWN = "apples and *pears*\n\n| fruit | count |\n|---|---|\n| apple | 3 |\n\n- **red**\n- `green`\n\n```\nprint('hi')\n```"


def screenshot(page, name: str) -> None:
    """With UPDATE_SCREENSHOTS=1, save the page as docs/<name> (the READMEs show them)."""
    if os.environ.get("UPDATE_SCREENSHOTS"):
        page.screenshot(path=str(DOCS / name))


def conversation_id(page) -> str:
    return page.evaluate("decodeURIComponent(location.hash.slice(1))")


async def test_console_is_served_with_a_strict_policy_and_can_be_turned_off(
    start_server: StartServer,
):
    on = await start_server()
    async with on.client() as client:
        page = await client.get("/")
        script = await client.get("/console/app.js")
        outside = await client.get("/console/../settings.py")
    assert page.status_code == 200 and "<textarea" in page.text
    assert page.headers["Content-Security-Policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert outside.status_code == 404
    off = await start_server(CONSOLE="false")
    async with off.client() as client:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/console/app.js")).status_code == 404
        assert (await client.get("/docs")).status_code == 200


async def test_chat_streams_continues_stops_and_shows_html_as_text(server: Server):
    skip_without_browser()

    def scenario(page):
        page.goto("/")
        page.fill("#prompt", "hello there")
        page.press("#prompt", "Enter")
        page.locator(".msg.assistant").first.get_by_text("echo(1): hello there").wait_for()
        page.wait_for_selector("#send:not([hidden])")
        page.fill("#prompt", "<img src=x onerror=alert(1)>")
        page.press("#prompt", "Enter")
        # the second prompt is sent with the first turn: 3 messages
        page.get_by_text("echo(3): <img src=x onerror=alert(1)>").wait_for()
        assert page.locator("#messages img").count() == 0
        page.wait_for_selector("#send:not([hidden])")
        # Shift+Enter adds a line; a stalled answer is stopped
        page.fill("#prompt", "wait for it [[fake:stall_after=2]]")
        page.press("#prompt", "Shift+Enter")
        assert page.input_value("#prompt").endswith("\n")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#stop:not([hidden])")
        page.locator(".msg.streaming").get_by_text("echo(5)").wait_for()
        page.click("#stop")
        stopped = page.locator(".msg.assistant[data-finish=cancelled] .stopped")
        assert stopped.inner_text() == "stopped"
        screenshot(page, "console.png")
        return conversation_id(page)

    cid = await in_browser(server.http_url, scenario)
    conversation = await stored(server, cid)
    assert [turn["finish_reason"] for turn in conversation["history"]] == [
        "stop",
        "stop",
        "cancelled",
    ]


class HeldUpstream:
    """An upstream whose answer begins at once with one piece and ends only after ``finish``:
    an answer that nothing cancelled is then stored whole. ``outcome``: ``completed``, or
    ``disconnected`` when the server gave the call up first. It answers one call."""

    PIECES = ("partial", " and the rest of it")

    def __init__(self) -> None:
        self.finish = trio.Event()
        self.outcome: str | None = None
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._answer, listeners)

    async def _answer(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
        try:
            await stream.send_all(head + b"Transfer-Encoding: chunked\r\n\r\n")
            await stream.send_all(_chunk({"role": "assistant", "content": self.PIECES[0]}))
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some():
                            pass
                    self.outcome = "disconnected"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await self.finish.wait()
                if self.outcome is None:
                    await stream.send_all(_chunk({"content": self.PIECES[1]}))
                    await stream.send_all(_chunk({}, "stop") + _chunk(None) + b"0\r\n\r\n")
                    self.outcome = "completed"
                nursery.cancel_scope.cancel()
        except trio.BrokenResourceError:
            self.outcome = "disconnected"
        await stream.aclose()


def _chunk(delta: dict[str, str] | None, finish: str | None = None) -> bytes:
    """One HTTP chunk holding one server-sent event of a chat completion (None: ``[DONE]``)."""
    if delta is None:
        event = b"data: [DONE]\n\n"
    else:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model"}
        event = b"data: " + json.dumps({**body, "choices": [choice]}).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class SlowLink:
    """A loopback forwarder between the browser and the server that holds what the server
    sends on the connection of an ask (``POST /ask/``) until ``release``: the answer has begun
    on the server (its ``start`` is sent) and the page has not seen it, as over a slow network.
    ``answering`` (a threading.Event) says the server sent the start and the first piece."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.answering = threading.Event()
        self.release = trio.Event()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, browser: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        asked = False  # this connection carries an ask

        async def up(done: trio.CancelScope) -> None:
            nonlocal asked
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await browser.receive_some():
                    asked = asked or data.startswith(b"POST /ask/")
                    await server.send_all(data)
            done.cancel()

        async def down(done: trio.CancelScope) -> None:
            held = b""
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await server.receive_some():
                    if asked and not self.release.is_set():
                        held += data
                        if b"event: delta" not in held:
                            continue  # held until the answer's first piece is written too
                        self.answering.set()
                        await self.release.wait()
                        data, held = held, b""
                    await browser.send_all(data)
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(up, nursery.cancel_scope)
            nursery.start_soon(down, nursery.cancel_scope)
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(browser)


async def test_stop_before_the_page_sees_the_answer_start_cancels_it(
    start_server: StartServer, nursery
):
    """Stop before the answer's first event reached the page (its turn not known yet): the
    answer is cancelled as soon as its start names the turn. It runs in the background on the
    server, so giving the request up alone would let it finish and be stored whole."""
    skip_without_browser()
    upstream = HeldUpstream()
    await nursery.start(upstream.serve)
    server = await start_server(OPENAI_BASE_URL=f"http://127.0.0.1:{upstream.port}/v1")
    link = SlowLink(server.running.http_port)
    await nursery.start(link.serve)

    def scenario(page):
        page.goto("/")
        page.fill("#prompt", "stop me early")
        page.press("#prompt", "Enter")
        assert link.answering.wait(10)  # the server has begun the answer and written a piece
        assert page.locator(".msg.streaming .body").inner_text() == ""
        page.click("#stop")
        stopping = page.locator("#stop")
        assert (stopping.inner_text(), stopping.is_disabled()) == ("Stopping…", True)
        trio.from_thread.run_sync(link.release.set)  # the page sees the start now
        page.wait_for_selector("#send:not([hidden])")  # the console is done with the answer
        trio.from_thread.run_sync(upstream.finish.set)  # an answer still running would end
        return conversation_id(page)

    cid = await in_browser(f"http://127.0.0.1:{link.port}", scenario)
    async with server.client() as client:
        with trio.fail_after(10):  # the answer's end, whichever it is
            while True:
                text = await scrape(client)
                asks = sum(
                    metric(text, "easybackend_asks_total", protocol="sse", outcome=outcome)
                    for outcome in ("ok", "cancelled")
                )
                if asks and not metric(text, "easybackend_active_streams", protocol="sse"):
                    break
                await trio.sleep(0.01)
        response = await client.get(f"/conversations/{cid}")
    assert response.status_code == 200, response.text
    history = response.json()["history"]
    assert [turn["finish_reason"] for turn in history] == ["cancelled"]
    assert history[0]["messages"][1]["text"] == HeldUpstream.PIECES[0]
    assert upstream.outcome == "disconnected"


async def test_a_reload_during_an_answer_picks_it_up_where_it_is(server: Server):
    skip_without_browser()
    prompt = "a long one [[fake:tokens=150]] [[fake:delay=0.03]]"
    last_word = full_answer(1, "a long one", 150).split()[-1]

    def scenario(page):
        page.goto("/")
        page.fill("#prompt", prompt)
        page.press("#prompt", "Enter")
        page.locator(".msg.streaming").get_by_text("echo(1): a long one").wait_for()
        page.reload()  # the tab's request is gone; the answer goes on in the background
        page.locator(".msg.streaming").get_by_text("echo(1): a long one").wait_for()  # followed
        page.locator(".msg.assistant").get_by_text(last_word).wait_for()
        page.wait_for_selector("#send:not([hidden])")
        page.wait_for_selector(".msg.assistant[data-finish=stop]")
        return conversation_id(page), page.locator(".msg.assistant").count()

    cid, answers = await in_browser(server.http_url, scenario)
    conversation = await stored(server, cid)
    (turn,) = conversation["history"]
    assert answers == 1 and turn["finish_reason"] == "stop"
    assert turn["messages"][1]["text"] == full_answer(1, "a long one", 150)
    assert [e["event"] for e in server.fake.events][-1] == "completed"  # never cancelled


async def test_branches_edit_regenerate_and_switch(server: Server):
    skip_without_browser()

    def scenario(page):
        page.goto("/")
        page.fill("#prompt", "first")
        page.press("#prompt", "Enter")
        page.get_by_text("echo(1): first").wait_for()
        page.wait_for_selector("#send:not([hidden])")
        page.click(".msg.assistant .regenerate")
        page.get_by_text("2/2").wait_for()
        page.click(".msg.user .edit")
        page.fill(".edit-box textarea", "edited")
        page.click(".edit-send")
        page.get_by_text("echo(1): edited").wait_for()
        page.get_by_text("3/3").wait_for()
        page.click(".siblings .prev")
        page.get_by_text("2/3").wait_for()
        assert page.get_by_text("echo(1): first").count() == 1
        assert page.locator(".siblings .next").is_enabled()
        page.click(".siblings .prev")
        page.get_by_text("1/3").wait_for()
        assert page.locator(".siblings .prev").is_disabled()
        page.click(".siblings .next")
        page.get_by_text("2/3").wait_for()
        return conversation_id(page)

    cid = await in_browser(server.http_url, scenario)
    conversation = await stored(server, cid)
    assert conversation["stored_turns"] == 3
    turn = conversation["history"][0]
    assert turn["id"] == turn["siblings"][1] and conversation["head"] == turn["id"]


async def test_rollback_rename_export_and_delete(server: Server):
    skip_without_browser()
    async with server.client() as client:
        response = await client.post("/ask/kept", json={"prompt": "keep me"})
    assert response.status_code == 200

    def scenario(page):
        page.goto("/#kept")
        page.get_by_text("echo(1): keep me").wait_for()
        page.fill("#prompt", "and then")
        page.press("#prompt", "Enter")
        page.get_by_text("echo(3): and then").wait_for()
        page.wait_for_selector("#send:not([hidden])")
        page.click("#rollback")
        page.get_by_text("echo(3): and then").wait_for(state="detached")
        page.once("dialog", lambda dialog: dialog.accept("Renamed"))
        page.click("#rename")
        page.locator("#conversations li").get_by_text("Renamed").wait_for()
        with page.expect_download() as download:
            page.click("#export")
        exported = json.loads(Path(download.value.path()).read_text())
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete")
        page.wait_for_selector("#conversations li", state="detached")
        return exported

    exported = await in_browser(server.http_url, scenario, accept_downloads=True)
    assert exported["conversation_id"] == "kept" and exported["title"] == "Renamed"
    assert exported["turns"] == 1 and exported["stored_turns"] == 2  # the rolled-back turn kept
    assert [turn["messages"][0]["text"] for turn in exported["tree"]] == ["keep me", "and then"]
    async with server.client() as client:
        assert (await client.get("/conversations/kept")).status_code == 404


async def test_settings_sidebar_search_and_language(start_server: StartServer):
    """The settings panel shows the stored settings and the summary the server has, and saves
    them: the model chosen from the allowed list is the one the next ask sends upstream."""
    skip_without_browser()
    from playwright.sync_api import expect

    server = await start_server(MODELS=f"{DEFAULT_MODEL},fast=gpt-4o-mini", MEMORY="summarize")
    async with server.client() as client:
        response = await client.post("/ask/fruit", json={"prompt": MARKDOWN})
        assert response.status_code == 200, response.text
        summary = {"summary": "The user likes apples."}
        response = await client.put("/conversations/fruit/summary", json=summary)
        assert response.status_code == 200, response.text

    def scenario(page):
        page.goto("/#fruit")
        page.get_by_text("echo(1): apples").wait_for()
        answer = page.locator(".msg.assistant").first
        assert answer.locator("table td").first.inner_text() == "apple"
        assert answer.locator("li strong").inner_text() == "red"
        assert answer.locator("pre code").inner_text() == "print('hi')"
        page.click("#settings-toggle")
        page.wait_for_selector("#settings-form:not([disabled])")
        assert page.input_value("#summary") == "The user likes apples."  # the server's
        options = page.locator("#set-model option").evaluate_all("(os) => os.map((o) => o.value)")
        assert options == ["", DEFAULT_MODEL, "fast"]
        page.fill("#set-title", "Fruit talk")
        page.fill("#set-system", "You are terse.")
        page.select_option("#set-model", "fast")
        page.fill("#set-temperature", "0.3")
        page.select_option("#set-memory", "summarize")
        page.click("#save-settings")
        page.wait_for_selector("#settings-status:text('Saved')")
        page.locator("#conversations li").get_by_text("Fruit talk").wait_for()
        page.fill("#summary", "The user likes apples and pears.")
        page.evaluate("document.getElementById('settings-status').textContent = ''")
        page.click("#save-summary")
        page.wait_for_selector("#settings-status:text('Saved')")
        screenshot(page, "console-settings.png")
        page.fill("#prompt", "and now")
        page.press("#prompt", "Enter")
        page.get_by_text("echo(3): and now").wait_for()  # the system prompt, the summary, it
        page.wait_for_selector("#send:not([hidden])")
        page.click("#new-chat")
        page.fill("#search", "nothing-like-this")
        expect(page.locator("#conversations li")).to_have_count(0)
        page.fill("#search", "apples")
        page.locator("#conversations li").get_by_text("Fruit talk").click()
        page.get_by_text("echo(1): apples").wait_for()
        page.select_option("#lang", "zh")
        page.get_by_role("button", name="发送").wait_for()

    await in_browser(server.http_url, scenario, locale="en-US")
    conversation = await stored(server, "fruit")
    settings = conversation["settings"]
    assert conversation["title"] == "Fruit talk"
    assert settings["system"] == "You are terse." and settings["model"] == "fast"
    assert settings["temperature"] == 0.3 and settings["memory"] == "summarize"
    async with server.client() as client:
        summary = (await client.get("/conversations/fruit/summary")).json()
    assert summary["summary"] == "The user likes apples and pears."
    last = server.fake.requests[-1]["body"]
    assert last["model"] == "gpt-4o-mini" and last["temperature"] == 0.3
    system, summary_message, _ = last["messages"]
    assert system == {"role": "system", "content": "You are terse."}
    assert summary_message["content"].endswith("The user likes apples and pears.")


async def test_chinese_from_the_browser_and_the_key_asked_for_until_one_is_accepted(
    start_server: StartServer,
):
    """The key is asked for once and kept in sessionStorage; a refused one is asked for again,
    and after the prompt was closed without one, the notice says why and can open it again."""
    skip_without_browser()
    server = await start_server(API_KEYS="console:sk-console-test")

    def scenario(page):
        page.goto("/")
        assert page.evaluate("document.documentElement.lang") == "zh-CN"
        page.wait_for_selector("#keybox[open]")
        assert page.inner_text("#key-why") == "此服务器需要 API 密钥。"
        page.fill("#key", "sk-wrong")
        page.click("#key-ok")
        page.locator("#key-why").get_by_text("该密钥被拒绝").wait_for()  # asked again
        assert page.evaluate("sessionStorage.getItem('easybackend.key')") is None
        page.fill("#key", "sk-console-test")
        page.click("#key-ok")
        page.fill("#prompt", "你好")
        page.press("#prompt", "Enter")
        page.get_by_text("echo(1): 你好").wait_for()
        assert page.evaluate("sessionStorage.getItem('easybackend.key')") == "sk-console-test"
        assert page.evaluate("localStorage.getItem('easybackend.key')") is None
        # a new tab without a key, the prompt dismissed: the page says why requests fail
        page.evaluate("sessionStorage.clear()")
        page.reload()
        page.wait_for_selector("#keybox[open]")
        page.keyboard.press("Escape")
        page.locator("#notice").get_by_text("401").wait_for()
        assert page.locator("#messages .msg").count() == 0
        page.click("#notice .notice-action")  # 输入密钥: the prompt again, no reload
        page.fill("#key", "sk-console-test")
        page.click("#key-ok")
        page.get_by_text("echo(1): 你好").wait_for()  # the conversation, read with the key
        page.wait_for_selector("#notice", state="hidden")
        return conversation_id(page)

    cid = await in_browser(server.http_url, scenario, locale="zh-CN")
    conversation = await stored(server, cid, key="sk-console-test")
    assert conversation["turns"] == 1


async def test_docs_render_offline_from_the_installed_package(server: Server):
    skip_without_browser()

    def scenario(page):
        page.goto("/docs")
        page.locator(".opblock-summary-path", has_text="/ask/{conversation_id}/stream").wait_for()
        page.locator(".opblock-summary-path", has_text="/v1/chat/completions").wait_for()
        screenshot(page, "docs-swagger.png")

    await in_browser(server.http_url, scenario)
