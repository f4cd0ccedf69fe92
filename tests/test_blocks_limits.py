"""The node's limits on blocks fetched from peers, as the service applies them: events say
what was evicted or refused, and a follow decides what is kept."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ostrom.crypto.cid import CID
from ostrom.errors import QuotaExceeded
from ostrom.node.limits import Limits
from ostrom.node.service import NodeService

KIB = 1024
P1, P2 = CID.of_raw(b"one"), CID.of_raw(b"two")


def blk(size: int = 64 * KIB) -> tuple[CID, bytes]:
    data = os.urandom(size)
    return CID.of_raw(data), data


def published(service: NodeService) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    service.events.publish = seen.append  # type: ignore[method-assign]
    return seen


async def test_a_project_past_its_limit_is_refused_and_others_go_on(service: NodeService) -> None:
    events = published(service)
    service.set_limits(Limits(project_storage=100 * KIB))
    await service.block_sink(P1).blocks_put([blk()])
    with pytest.raises(QuotaExceeded, match="per-project"):
        await service.block_sink(P1).blocks_put([blk()])
    assert events[-1]["type"] == "limit.reached"
    assert events[-1]["limit"] == "project_storage" and events[-1]["project"] == str(P1)
    assert await service.block_sink(P2).blocks_put([blk()]) == 1


async def test_eviction_is_reported_and_a_full_follow_keeps_its_blocks(
    service: NodeService,
) -> None:
    events = published(service)
    followed, on_demand = blk(), blk()
    await service.follow(P1, "full")
    await service.block_sink(P1).blocks_put([followed])  # kept: P1 is followed in full
    await service.block_sink(P2).blocks_put([on_demand])  # P2 is not followed
    used = await service.db(lambda store: store.size_bytes())
    service.set_limits(Limits(storage=used + 16 * KIB))
    assert await service.block_sink(P2).blocks_put([blk(32 * KIB)]) == 1
    evicted = [e for e in events if e["type"] == "blocks.evicted"]
    assert evicted == [{"type": "blocks.evicted", "count": 1, "bytes": 64 * KIB, "for": str(P2)}]
    have = await service.blocks_have([followed[0], on_demand[0]])
    assert have == {followed[0]}
    # Unfollowed, its blocks make room like any other (and they are the least recently used).
    await service.unfollow(P1)
    assert await service.block_sink(P2).blocks_put([blk()]) == 1
    assert await service.blocks_have([followed[0]]) == set()
