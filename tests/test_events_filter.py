"""Subscribing to some event types only: the others never arrive, and the node skips the
work behind `status.changed` while nobody asks for it."""

from __future__ import annotations

import pytest
import trio

from ostrom.errors import InvalidInput
from ostrom.node.events import EventBus, Subscription
from ostrom.node.service import NodeService
from tests.dagfactory import World, identity


def drained(subscription: Subscription) -> list[str]:
    kinds = []
    while True:
        try:
            kinds.append(subscription._receive.receive_nowait()["type"])
        except trio.WouldBlock:
            return kinds


def test_a_subscriber_gets_only_the_types_it_named() -> None:
    bus = EventBus()
    some, every = bus.subscribe(["record.added", "blocks.done"]), bus.subscribe()
    for kind in ("record.added", "status.changed", "blocks.done"):
        bus.publish({"type": kind})
    assert drained(some) == ["record.added", "blocks.done"]
    assert drained(every) == ["record.added", "status.changed", "blocks.done"]
    assert bus.wants("status.changed")
    every.close()
    assert not bus.wants("status.changed") and bus.wants("record.added")


def test_an_unknown_type_is_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match=r"unknown event type record\.adeed.*record\.added"):
        EventBus().subscribe(["record.adeed"])


async def test_records_are_not_judged_for_a_subscriber_of_record_added_only(
    service: NodeService,
) -> None:
    world = World()
    alice = identity("alice")
    genesis = world.genesis(alice, name="quiet")
    head = world.contribute(alice, genesis, [genesis], {"f": "one"})
    subscription = service.events.subscribe(["record.added"])
    await service.store_new([genesis, head], "gossip")
    assert drained(subscription) == ["record.added", "record.added"]
    assert genesis.cid not in service._states  # no evaluation made for nobody

    everything = service.events.subscribe()
    newer = world.contribute(alice, genesis, [head], {"f": "two"})
    await service.store_new([newer], "gossip")
    assert "status.changed" in drained(everything)
    assert drained(subscription) == ["record.added"]
