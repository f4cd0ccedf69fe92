"""The node's cache of acceptance states is bounded, and a state it let go of is still right."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ostrom.datadir import DataDir
from ostrom.node import service as service_module
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.protocol.records import SignedRecord
from tests.dagfactory import World, identity


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeService]:
    with Store.open(tmp_path / "store.sqlite") as store:
        yield NodeService(identity("node"), store, DataDir(tmp_path))


def project(world: World, name: str, contributions: int) -> SignedRecord:
    alice = identity("alice")
    genesis = world.genesis(alice, name=name)
    head = genesis
    for i in range(contributions):
        head = world.contribute(alice, genesis, [head], {"f": f"{name} {i}"})
    return genesis


async def test_states_past_the_bound_are_evaluated_again_and_stay_right(
    node: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for about two of the three projects' states.
    monkeypatch.setattr(service_module, "_STATE_CACHE_STATUSES", 25)
    world = World()
    geneses = [project(world, f"p{i}", 10) for i in range(3)]
    await node.store_new(list(world.records.values()), "import")

    for genesis in geneses:
        state = await node.state(genesis.cid)
        assert state == world.evaluate(genesis)
    # The first project's state was let go (the memory the cache holds is what the bound
    # is for); asking again evaluates it from the store.
    assert geneses[0].cid not in node._states
    again = await node.state(geneses[0].cid)
    assert again == world.evaluate(geneses[0])

    # A record arriving for a project whose state is no longer cached is seen.
    head = max(
        (r for r in world.records.values() if r.project == geneses[1].cid),
        key=lambda r: r.ts,
    )
    newer = world.contribute(identity("alice"), geneses[1], [head], {"f": "newer"})
    await node.store_new([newer], "gossip")
    assert newer.cid in (await node.state(geneses[1].cid)).accepted_heads


async def test_one_state_larger_than_the_bound_is_still_cached(
    node: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "_STATE_CACHE_STATUSES", 5)
    world = World()
    genesis = project(world, "large", 20)
    await node.store_new(list(world.records.values()), "import")
    first = await node.state(genesis.cid)
    assert await node.state(genesis.cid) is first
