"""The send deadline on trio's virtual clock: time is the subject, so no test waits on the wall."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from easybackend.transports.send_deadline import ClientTooSlow, SendBoundedStream, send_deadline


async def test_a_send_that_never_completes_gives_up_at_the_deadline(autojump_clock):
    start = trio.current_time()
    with pytest.raises(ClientTooSlow, match="read nothing for 30 seconds"):
        with send_deadline(30):
            await trio.sleep_forever()  # a client that never reads
    assert trio.current_time() - start == pytest.approx(30)


async def test_a_send_that_completes_in_time_is_left_alone(autojump_clock):
    with send_deadline(30):
        await trio.sleep(29.9)
    with send_deadline(30):  # each send has its own deadline
        await trio.sleep(29.9)


async def test_outer_cancellation_passes_through(autojump_clock):
    with trio.move_on_after(5) as outer:
        with send_deadline(30):
            await trio.sleep_forever()
    assert outer.cancelled_caught  # a shutdown or a client gone is not "too slow"


async def test_a_write_into_a_full_buffer_closes_the_connection_at_the_deadline(autojump_clock):
    client, server = trio.testing.lockstep_stream_pair()  # no buffer: a write waits for a reader
    bounded = SendBoundedStream(server, 30)
    start = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):
        await bounded.send_all(b"a piece nobody reads")
    assert trio.current_time() - start == pytest.approx(30)
    assert bounded.broken
    with pytest.raises(trio.ClosedResourceError):  # the connection was closed at once
        await server.send_all(b"more")
    await client.aclose()


async def test_writes_that_complete_leave_the_connection_usable(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    bounded = SendBoundedStream(server, 30)
    await bounded.send_all(b"hello")
    assert await client.receive_some() == b"hello"
    assert not bounded.broken
