"""Background responses of the Responses API (SPEC §18) through the official ``openai`` SDK:
``background=True``, polling ``retrieve``, reattaching with ``retrieve(stream=True,
starting_after=n)``, replays of finished responses, several followers, ``cancel``, and
another key's responses, over the fake upstream's slow answers."""

from __future__ import annotations

import openai
import pytest
import trio
from helpers.js_sdk import NODE, run_script
from helpers.openai_sdk import async_client, base_url
from helpers.postgres import pg_url
from helpers.upstream import events_of, full_answer
from helpers.waiting import wait_until

from easybackend.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
SLOW = "tell me a long story [[fake:tokens=60]] [[fake:delay=0.02]]"  # 1.2 seconds
SLOW_ANSWER = full_answer(1, "tell me a long story", 60)
# Six seconds: what a cancel reaching another instance (a poll of half a second) must outlast.
LONG = "tell me a longer story [[fake:tokens=300]] [[fake:delay=0.02]]"
LONG_ANSWER = full_answer(1, "tell me a longer story", 300)
LONG = "a very long story [[fake:tokens=400]] [[fake:delay=0.02]]"  # 8 seconds
LONG_ANSWER = full_answer(1, "a very long story", 400)
KEY_A, KEY_B = "sk-resume-alice-SECRET-0123", "sk-resume-bob-SECRET-01234"
OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def seen(event) -> tuple:
    """What a test compares of a streamed event: its number, type and text."""
    return (event.sequence_number, event.type, getattr(event, "delta", None))


def texts(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def read_all(stream) -> list:
    with trio.fail_after(20):
        return [event async for event in stream]


async def wait_for_events(server, response_id: str, count: int) -> None:
    """Wait until the core's log of the response's answer holds more than ``count`` events, or
    the answer has ended (its log is gone)."""
    turn_id = response_id.removeprefix("resp_")
    logs = server.running.service.answer_logs._running

    def enough() -> bool:
        log = next((log for log in logs.values() if log.turn_id == turn_id), None)
        return log is None or len(log.events) > count

    with trio.fail_after(10):
        await wait_until(enough, timeout=10)


async def deltas_of(stream, count: int) -> list:
    """Read a stream's events up to its ``count``-th delta."""
    events = []
    with trio.fail_after(10):
        async for event in stream:
            events.append(event)
            if len([e for e in events if e.type == "response.output_text.delta"]) == count:
                break
    return events


def assert_whole_stream(events, answer: str, final: str = "response.completed") -> None:
    """``events`` are one response's stream, whole: numbered from 0 without gap, OpenAI's
    sequence of event types, and the deltas making ``answer``."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = len(kinds) - len(OPENING) - len(CLOSING) - 1
    assert kinds == [*OPENING, *["response.output_text.delta"] * deltas, *CLOSING, final]
    assert texts(events) == answer
    assert events[-4].text == answer  # output_text.done


async def test_a_dropped_background_stream_is_reattached_after_its_last_event(server):
    async with async_client(server) as client:
        stream = await client.responses.create(
            model=MODEL, input=SLOW, background=True, stream=True
        )
        before = []
        with trio.fail_after(10):
            async for event in stream:
                before.append(event)
                if len(before) == 9:  # the opening events and five pieces
                    break
        await stream.close()  # the client is gone (a tunnel)
        response_id = before[0].response.id
        assert before[0].response.background is True
        last = before[-1].sequence_number
        await wait_for_events(server, response_id, 15)  # the answer goes on without its client
        after = await read_all(
            await client.responses.retrieve(response_id, stream=True, starting_after=last)
        )
        whole = await read_all(await client.responses.retrieve(response_id, stream=True))
        final = await client.responses.retrieve(response_id)
    assert after[0].sequence_number == last + 1  # no event lost or repeated
    assert_whole_stream(before + after, SLOW_ANSWER)
    assert [seen(e) for e in before + after] == [seen(e) for e in whole]
    assert (
        after[-1].response.status == "completed" and after[-1].response.output_text == SLOW_ANSWER
    )
    assert (final.status, final.background, final.output_text) == ("completed", True, SLOW_ANSWER)
    assert events_of(server.fake, "chatcmpl-1")[-1] == "completed"  # never cancelled


async def test_a_finished_response_replays_its_stream_from_any_event(server):
    async with async_client(server) as client:
        original = await read_all(
            await client.responses.create(model=MODEL, input="go [[fake:tokens=8]]", stream=True)
        )
        response_id = original[0].response.id
        replay = await read_all(await client.responses.retrieve(response_id, stream=True))
        from_five = await read_all(
            await client.responses.retrieve(response_id, stream=True, starting_after=5)
        )
        from_end = await read_all(
            await client.responses.retrieve(
                response_id, stream=True, starting_after=original[-1].sequence_number
            )
        )
        with pytest.raises(openai.BadRequestError) as bad:
            await client.responses.retrieve(
                response_id, stream=True, extra_query={"starting_after": "five"}
            )
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(
                "resp_0123456789abcdef01234567", stream=True, starting_after=1
            )
    assert_whole_stream(original, full_answer(1, "go", 8))
    assert [seen(e) for e in replay] == [seen(e) for e in original]
    assert [seen(e) for e in from_five] == [seen(e) for e in original[6:]]
    assert from_end == []
    assert replay[-1].response.output_text == original[-1].response.output_text
    assert bad.value.body["param"] == "starting_after"


async def test_two_followers_of_one_background_response_get_the_same_events(server):
    async with async_client(server) as client, async_client(server) as other:
        created = await client.responses.create(model=MODEL, input=SLOW, background=True)
        assert (created.status, created.background) == ("in_progress", True)
        got: dict[str, list] = {}

        async def follow(name: str, sdk: openai.AsyncOpenAI) -> None:
            stream = await sdk.responses.retrieve(created.id, stream=True, starting_after=3)
            got[name] = await read_all(stream)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow, "one", client)
                nursery.start_soon(follow, "two", other)
    assert [seen(e) for e in got["one"]] == [seen(e) for e in got["two"]]
    assert got["one"][0].sequence_number == 4  # the first delta
    assert texts(got["one"]) == SLOW_ANSWER
    assert got["one"][-1].type == "response.completed"


async def test_polling_shows_in_progress_with_the_text_so_far_then_completed(server):
    async with async_client(server) as client:
        created = await client.responses.create(
            model=MODEL, input=SLOW, background=True, metadata={"job": "poll"}
        )
        assert created.status == "in_progress" and created.output_text == ""
        follower = await client.responses.retrieve(created.id, stream=True)
        await deltas_of(follower, 5)
        polled = await client.responses.retrieve(created.id)
        assert polled.status == "in_progress" and polled.background is True
        assert polled.output_text and SLOW_ANSWER.startswith(polled.output_text)
        assert polled.output_text != SLOW_ANSWER and polled.output[0].status == "in_progress"
        states = [polled.status]
        with trio.fail_after(10):
            while polled.status == "in_progress":  # ends: the fake answers in 1.2 s
                await deltas_of(follower, 10)  # ten more pieces, or the end
                polled = await client.responses.retrieve(created.id)
                states.append(polled.status)
    assert set(states) == {"in_progress", "completed"}
    assert polled.output_text == SLOW_ANSWER and polled.usage.output_tokens == 60
    assert polled.metadata == {"job": "poll"} and polled.completed_at is not None
    assert polled.background is True


async def test_background_responses_that_fail_or_are_cut_poll_as_failed_and_incomplete(server):
    async with async_client(server) as client:
        broken = await client.responses.create(
            model=MODEL,
            input="[[fake:tokens=20]] [[fake:delay=0.02]] [[fake:disconnect_after=3]] x",
            background=True,
        )
        cut = await client.responses.create(
            model=MODEL, input="short [[fake:tokens=20]]", background=True, max_output_tokens=3
        )
        followed = await read_all(await client.responses.retrieve(broken.id, stream=True))
        await read_all(await client.responses.retrieve(cut.id, stream=True))  # to its end
        failed = await client.responses.retrieve(broken.id)
        incomplete = await client.responses.retrieve(cut.id)
        replayed = await read_all(await client.responses.retrieve(broken.id, stream=True))
        with pytest.raises(openai.BadRequestError) as stored_false:
            await client.responses.create(model=MODEL, input="x", background=True, store=False)
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert replayed[-1].type == "response.failed" and texts(replayed) == texts(followed)
    assert [seen(e) for e in replayed] == [seen(e) for e in followed]
    assert [e.sequence_number for e in replayed] == list(range(len(replayed)))
    assert incomplete.status == "incomplete"
    assert incomplete.incomplete_details.reason == "max_output_tokens"
    assert stored_false.value.status_code == 400
    assert stored_false.value.body["param"] == "background"


async def test_cancel_stops_a_background_response_and_keeps_what_it_had(server):
    async with async_client(server) as client:
        created = await client.responses.create(model=MODEL, input=LONG, background=True)
        follower = await client.responses.retrieve(created.id, stream=True, starting_after=0)
        followed = await deltas_of(follower, 5)
        cancelled = await client.responses.cancel(created.id)
        followed += await read_all(follower)
        kept = await client.responses.retrieve(created.id)
        again = await client.responses.cancel(created.id)  # cancelled already: as it is
        done = await client.responses.create(
            model=MODEL, input="quick [[fake:tokens=3]]", background=True
        )
        await read_all(await client.responses.retrieve(done.id, stream=True))  # to its end
        assert (await client.responses.retrieve(done.id)).status == "completed"
        with pytest.raises(openai.BadRequestError):
            await client.responses.cancel(done.id)
    assert (cancelled.status, cancelled.background) == ("cancelled", True)
    assert cancelled.output_text and LONG_ANSWER.startswith(cancelled.output_text)
    assert cancelled.output_text != LONG_ANSWER
    assert (kept.status, kept.output_text) == ("cancelled", cancelled.output_text)
    assert kept.output[0].status == "incomplete" and kept.usage.output_tokens > 0
    assert again.status == "cancelled" and again.output_text == kept.output_text
    assert [e.type for e in followed[-4:]] == [*CLOSING, "response.incomplete"]
    assert followed[-1].response.status == "cancelled"
    assert [e.sequence_number for e in followed] == list(range(1, len(followed) + 1))
    assert texts(followed) == cancelled.output_text
    with trio.fail_after(5):
        await wait_until(lambda: "disconnected" in events_of(server.fake, "chatcmpl-1"))


async def test_another_keys_background_response_is_not_found(start_server):
    server = await start_server(API_KEYS=f"alice:{KEY_A},bob:{KEY_B}")
    async with async_client(server, KEY_A) as alice, async_client(server, KEY_B) as bob:
        mine = await alice.responses.create(model=MODEL, input=LONG, background=True)
        for attempt in (
            bob.responses.retrieve(mine.id),
            bob.responses.retrieve(mine.id, stream=True, starting_after=2),
            bob.responses.cancel(mine.id),
            bob.responses.delete(mine.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await attempt
        assert (await alice.responses.retrieve(mine.id)).status == "in_progress"
        assert (await alice.responses.cancel(mine.id)).status == "cancelled"
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(mine.id, stream=True)  # stored now: still not bob's


async def test_the_javascript_sdk_reattaches_to_a_background_stream(start_server):
    """``tests/js/background.mjs``: a background stream left after three deltas, reattached
    with ``starting_after``; then a background response created and cancelled."""
    if NODE is None:
        pytest.skip("Node.js (node) is not installed: the JavaScript SDK tests need it")
    server = await start_server(API_KEYS=f"js:{KEY_A}")
    got = await run_script(
        "background.mjs",
        {
            "EASYBACKEND_BASE_URL": base_url(server),
            "EASYBACKEND_KEY": KEY_A,
            "EASYBACKEND_MODEL": server.settings.model,
            "EASYBACKEND_PROMPT": SLOW,
        },
    )
    stream = got["stream"]
    events = stream["before"] + stream["after"]
    assert [e["seq"] for e in events] == list(range(len(events)))  # no gap, no repeat
    assert stream["after"][0]["seq"] == stream["before"][-1]["seq"] + 1
    assert [e["type"] for e in events[:4]] == OPENING
    assert [e["type"] for e in events[-4:]] == [*CLOSING, "response.completed"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == SLOW_ANSWER == stream["text"]
    assert stream["background"] is True
    assert got["cancel"] == {"created": "in_progress", "cancelled": "cancelled"}


@pytest.fixture
async def two_instances(start_server, pg_schema):
    """Two servers on one PostgreSQL database, with the keys of alice and bob."""
    url = pg_url(pg_schema)
    keys = f"alice:{KEY_A},bob:{KEY_B}"
    return (
        await start_server(DATABASE_URL=url, API_KEYS=keys),
        await start_server(DATABASE_URL=url, API_KEYS=keys),
    )


async def test_another_instance_shows_a_background_response_and_replays_it_once_stored(
    two_instances,
):
    """Two servers on one PostgreSQL database: the one that does not generate the response
    polls it as in progress, and its reattach gets the events after ``starting_after`` once
    the turn is stored, numbered as the generator's."""
    generator, other = two_instances
    async with (
        async_client(generator, KEY_A) as on_generator,
        async_client(other, KEY_A) as elsewhere,
        async_client(other, KEY_B) as bob,
    ):
        created = await on_generator.responses.create(
            model=MODEL, input=SLOW, background=True, metadata={"from": "generator"}
        )
        polled = await elsewhere.responses.retrieve(created.id)
        assert (polled.status, polled.output_text, polled.background) == ("in_progress", "", True)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(created.id)
        followed = await read_all(
            await elsewhere.responses.retrieve(created.id, stream=True, starting_after=5)
        )
        whole = await read_all(await on_generator.responses.retrieve(created.id, stream=True))
        finished = await elsewhere.responses.retrieve(created.id)
    assert [seen(e) for e in followed] == [seen(e) for e in whole[6:]]
    assert_whole_stream(whole, SLOW_ANSWER)
    assert followed[-1].response.metadata == {"from": "generator"}
    assert (finished.status, finished.output_text) == ("completed", SLOW_ANSWER)


async def test_a_cancel_on_another_instance_stops_a_background_response(two_instances):
    """Two servers on one PostgreSQL database: ``responses.cancel`` on the one that does not
    generate the response reaches the generator through the database; the answer stops,
    what it had is kept, and both instances then show it ``cancelled``."""
    generator, other = two_instances
    async with (
        async_client(generator, KEY_A) as on_generator,
        async_client(other, KEY_A) as elsewhere,
        async_client(other, KEY_B) as bob,
    ):
        created = await on_generator.responses.create(model=MODEL, input=LONG, background=True)
        stream = await on_generator.responses.retrieve(created.id, stream=True)
        begun = await deltas_of(stream, 2)  # it is under way on the generator
        with pytest.raises(openai.NotFoundError):
            await bob.responses.cancel(created.id)  # another key's: not found
        cancelled = await elsewhere.responses.cancel(created.id)
        rest = await read_all(stream)
        on_the_generator = await on_generator.responses.retrieve(created.id)
    assert (cancelled.status, cancelled.background) == ("cancelled", True)
    assert rest[-1].type == "response.incomplete" and rest[-1].response.status == "cancelled"
    kept = on_the_generator.output_text
    assert on_the_generator.status == "cancelled" and kept == cancelled.output_text
    assert begun and 0 < len(kept) < len(LONG_ANSWER) and LONG_ANSWER.startswith(kept)


async def test_a_response_streamed_without_background_can_be_followed_while_it_runs(server):
    """Any response in progress here can be followed (not only background ones); its own
    client going away still cancels it, as without ``background``."""
    async with async_client(server) as client, async_client(server) as watcher:
        stream = await client.responses.create(model=MODEL, input=SLOW, stream=True)
        mine = await deltas_of(stream, 2)
        response_id = mine[0].response.id
        assert mine[0].response.background is False
        followed = await read_all(
            await watcher.responses.retrieve(response_id, stream=True, starting_after=2)
        )
        mine += await read_all(stream)
    assert_whole_stream(mine, SLOW_ANSWER)
    assert [seen(e) for e in followed] == [seen(e) for e in mine[3:]]
