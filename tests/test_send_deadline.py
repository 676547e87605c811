"""The send deadline on trio's virtual clock: time is the subject, so no test waits on the wall."""

from __future__ import annotations

import math
import ssl

import pytest
import trio
import trio.testing
import trustme

from easybackend.transports.send_deadline import (
    ClientTooSlow,
    SendBoundedStream,
    SendWatchdog,
    Watched,
)


class Sender(Watched):
    """A sender whose blocked sends the watchdog ends by cancelling them; records when it did."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: set[trio.CancelScope] = set()  # of the sends in progress
        self.expired_at: list[float] = []

    async def send(self, seconds: float) -> None:
        """A send that takes ``seconds`` unless the client is found too slow first."""
        self.begin()
        try:
            with trio.CancelScope() as scope:
                self.sends.add(scope)
                await trio.sleep(seconds)
        finally:
            self.sends.discard(scope)
            self.end()
        if self.too_slow is not None:
            raise self.too_slow

    async def expire(self, error: ClientTooSlow) -> None:
        self.expired_at.append(trio.current_time())
        for scope in self.sends:
            scope.cancel()


async def test_a_send_that_never_completes_is_ended_at_the_deadline(autojump_clock):
    sender, watchdog = Sender(), SendWatchdog(30)
    async with watchdog.running():
        with watchdog.watching(sender):
            start = trio.current_time()
            with pytest.raises(ClientTooSlow, match="read nothing for 30 seconds"):
                await sender.send(math.inf)  # a client that never reads
    assert sender.expired_at == [pytest.approx(start + 30)]


async def test_a_send_that_keeps_making_progress_is_never_ended(autojump_clock):
    sender, watchdog = Sender(), SendWatchdog(30)
    async with watchdog.running():
        with watchdog.watching(sender):
            for _ in range(20):  # 10 minutes of sends, each one within the bound
                await sender.send(29.9)
            await trio.sleep(100)  # and idle for longer than the bound: nothing is in progress
    assert sender.expired_at == []


async def test_overlapping_sends_are_timed_from_the_last_progress(autojump_clock):
    sender, watchdog = Sender(), SendWatchdog(30)
    async with watchdog.running(), trio.open_nursery() as nursery:
        with watchdog.watching(sender):
            start = trio.current_time()
            nursery.start_soon(sender.send, 20)  # completes: progress at 20 s
            with pytest.raises(ClientTooSlow):
                await sender.send(math.inf)  # waits from 0 s, but its clock restarts at 20 s
    assert sender.expired_at == [pytest.approx(start + 50)]


async def test_one_watchdog_ends_only_the_sender_that_is_too_slow(autojump_clock):
    """One watchdog serves every connection of a server; each sender is timed on its own."""
    stuck, reading, watchdog = Sender(), Sender(), SendWatchdog(30)
    async with watchdog.running(), trio.open_nursery() as nursery:

        async def keep_reading() -> None:
            with watchdog.watching(reading):
                for _ in range(100):
                    await reading.send(7)

        nursery.start_soon(keep_reading)
        with watchdog.watching(stuck):
            await trio.sleep(12)
            start = trio.current_time()
            with pytest.raises(ClientTooSlow):
                await stuck.send(math.inf)
    assert stuck.expired_at == [pytest.approx(start + 30)]
    assert reading.expired_at == []


async def test_a_sender_no_longer_watched_is_left_alone(autojump_clock):
    sender, watchdog = Sender(), SendWatchdog(30)
    async with watchdog.running():
        with watchdog.watching(sender):
            pass
        with trio.move_on_after(100) as outer:
            await sender.send(math.inf)
    assert outer.cancelled_caught
    assert sender.expired_at == []


async def test_outer_cancellation_passes_through(autojump_clock):
    sender, watchdog = Sender(), SendWatchdog(30)
    with trio.move_on_after(5) as outer:
        async with watchdog.running():
            with watchdog.watching(sender):
                await sender.send(math.inf)
    assert outer.cancelled_caught  # a shutdown or a client gone is not "too slow"
    assert sender.too_slow is None


async def test_a_write_into_a_full_buffer_closes_the_connection_at_the_deadline(autojump_clock):
    client, server = trio.testing.lockstep_stream_pair()  # no buffer: a write waits for a reader
    bounded, watchdog = SendBoundedStream(server), SendWatchdog(30)
    async with watchdog.running():
        with watchdog.watching(bounded):
            start = trio.current_time()
            with pytest.raises(trio.BrokenResourceError, match="read nothing for 30 seconds"):
                await bounded.send_all(b"a piece nobody reads")
            assert trio.current_time() - start == pytest.approx(30)
    assert bounded.broken
    with pytest.raises(trio.ClosedResourceError):  # the connection was closed at once
        await server.send_all(b"more")
    await client.aclose()


async def test_a_write_over_tls_into_a_full_buffer_closes_the_connection(autojump_clock):
    """Over TLS the watchdog closes the TLS stream while its write waits: the write still raises."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_raw, server_raw = trio.testing.lockstep_stream_pair()
    client = trio.SSLStream(client_raw, client_context, server_hostname="localhost")
    server = trio.SSLStream(server_raw, server_context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        await server.do_handshake()
    bounded, watchdog = SendBoundedStream(server), SendWatchdog(30)
    async with watchdog.running():
        with watchdog.watching(bounded):
            start = trio.current_time()
            with pytest.raises(trio.BrokenResourceError, match="read nothing for 30 seconds"):
                await bounded.send_all(b"a piece nobody reads")
            assert trio.current_time() - start == pytest.approx(30)
    assert bounded.broken
    await trio.aclose_forcefully(client)


async def test_a_shielded_write_is_still_bounded_once_the_server_is_cancelled(autojump_clock):
    """hypercorn writes in a shielded scope: the watchdog goes on when the server is cancelled."""
    client, server = trio.testing.lockstep_stream_pair()
    bounded, watchdog = SendBoundedStream(server), SendWatchdog(30)
    with trio.CancelScope() as serving:
        async with watchdog.running():
            with watchdog.watching(bounded):
                serving.cancel()  # the server is stopped at once
                start = trio.current_time()
                with trio.CancelScope(shield=True), pytest.raises(trio.BrokenResourceError):
                    await bounded.send_all(b"a goodbye nobody reads")
                assert trio.current_time() - start == pytest.approx(30)
    assert bounded.broken
    await client.aclose()


async def test_writes_that_complete_leave_the_connection_usable(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    bounded, watchdog = SendBoundedStream(server), SendWatchdog(30)
    async with watchdog.running():
        with watchdog.watching(bounded):
            await bounded.send_all(b"hello")
            assert await client.receive_some() == b"hello"
            await trio.sleep(100)  # idle for longer than the bound: nothing is in progress
    assert not bounded.broken
    assert bounded.too_slow is None


async def test_many_writes_in_a_row_enter_no_cancel_scope(autojump_clock, monkeypatch):
    """The bound costs a write no cancel scope: the watchdog's one task does the timing."""
    client, server = trio.testing.memory_stream_pair()
    bounded, watchdog = SendBoundedStream(server), SendWatchdog(30)
    entered: list[trio.lowlevel.Task] = []
    enter = trio.CancelScope.__enter__

    def counting_enter(scope: trio.CancelScope) -> trio.CancelScope:
        entered.append(trio.lowlevel.current_task())
        return enter(scope)

    async def read_all() -> None:
        while await client.receive_some():
            pass

    async with watchdog.running(), trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        with watchdog.watching(bounded):
            monkeypatch.setattr(trio.CancelScope, "__enter__", counting_enter)
            for _ in range(10_000):
                await bounded.send_all(b"a piece")
            monkeypatch.undo()
        await bounded.aclose()
    assert trio.lowlevel.current_task() not in entered
    assert not bounded.broken
