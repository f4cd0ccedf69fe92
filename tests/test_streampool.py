"""Streams kept open between fetches from the same peer (ostrom.node.streampool)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ostrom.errors import PeerUnreachable
from ostrom.node.streampool import StreamPool

IDLE_S = 10.0


class FakeStream:
    def __init__(self, peer: str, number: int) -> None:
        self.peer = peer
        self.number = number
        self.closed_by_peer = False
        self.finished = False

    @property
    def reusable(self) -> bool:
        return not (self.closed_by_peer or self.finished)

    async def finish(self) -> None:
        await trio.lowlevel.checkpoint()
        self.finished = True


class Opener:
    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    async def __call__(self, peer: str) -> FakeStream:
        await trio.lowlevel.checkpoint()
        stream = FakeStream(peer, len(self.streams))
        self.streams.append(stream)
        return stream


def make_pool(per_peer: int = 2) -> tuple[StreamPool[FakeStream], Opener]:
    opener = Opener()
    return StreamPool(opener, idle_s=IDLE_S, per_peer=per_peer), opener


async def test_exchanges_one_after_another_share_one_stream() -> None:
    pool, opener = make_pool()
    for _ in range(3):
        async with pool.lend("a") as stream:
            assert stream.peer == "a"
    async with pool.lend("b"):
        pass
    assert [s.peer for s in opener.streams] == ["a", "b"]  # four exchanges, two streams
    assert not any(s.finished for s in opener.streams)


async def test_an_exchange_that_fails_finishes_its_stream() -> None:
    pool, opener = make_pool()
    with pytest.raises(PeerUnreachable):
        async with pool.lend("a"):
            raise PeerUnreachable("reset")
    assert opener.streams[0].finished
    async with pool.lend("a") as stream:
        assert stream is opener.streams[1]


async def test_a_stream_the_peer_closed_is_not_lent_again() -> None:
    pool, _ = make_pool()
    async with pool.lend("a") as stream:
        stream.closed_by_peer = True
    assert stream.finished and pool.idle_count() == 0
    async with pool.lend("a") as again:
        assert again is not stream


async def test_overlapping_exchanges_get_streams_of_their_own_and_few_stay() -> None:
    pool, opener = make_pool(per_peer=2)
    lent: list[FakeStream] = []

    async def exchange(release: trio.Event) -> None:
        async with pool.lend("a") as stream:
            lent.append(stream)
            await release.wait()

    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(exchange, release)
        await trio.testing.wait_all_tasks_blocked()
        assert len({id(s) for s in lent}) == 3
        release.set()
    assert pool.idle_count() == 2
    assert sum(s.finished for s in opener.streams) == 1


async def test_idle_streams_are_finished_after_the_idle_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, opener = make_pool()
    async with pool.lend("a"):
        pass
    await trio.sleep(IDLE_S + 1)
    async with pool.lend("a") as stream:
        assert stream is opener.streams[1]  # the old one was not lent
    await pool.prune()
    assert opener.streams[0].finished
    assert not opener.streams[1].finished and pool.idle_count() == 1


async def test_pruning_runs_by_itself(autojump_clock: trio.testing.MockClock) -> None:
    pool, opener = make_pool()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run_pruning)
        async with pool.lend("a"):
            pass
        await trio.sleep(2 * IDLE_S)
        assert opener.streams[0].finished and pool.idle_count() == 0
        nursery.cancel_scope.cancel()


async def test_a_disconnected_peer_is_forgotten() -> None:
    pool, opener = make_pool()
    async with pool.lend("a"):
        pass
    pool.forget("a")
    assert pool.idle_count() == 0
    async with pool.lend("a") as stream:
        assert stream is opener.streams[1]
