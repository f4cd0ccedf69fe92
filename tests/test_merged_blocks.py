"""Work of a private mesh's project merged into a public project is the public project's:
its records and blocks go to whoever may have the public project, while the private
project's work that nothing public merged still goes to the mesh's members only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.datadir import DataDir
from ostrom.node.methods.records import contribution_create
from ostrom.node.params import Params
from ostrom.node.replication import Replicator, _Completion, _ServedTo, topic_of
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.protocol.changesets import BlockRef, FileManifest, Put
from ostrom.protocol.records import Contribution, Policy, Project, SignedRecord, sign
from tests.dagfactory import World, identity

STEWARD, MEMBER, STRANGER = identity("steward"), identity("member"), identity("stranger")


class _Mesh:
    """The replicator's mesh, as far as these tests reach: what it publishes is dropped."""

    async def publish(self, topic: str, data: bytes) -> None:
        pass


@dataclass
class Merge:
    """A public project that merged one contribution of a private project but not the next."""

    replicator: Replicator
    public: SignedRecord
    private: SignedRecord
    merged: SignedRecord  # the private contribution the merge names
    unmerged: SignedRecord  # its child, which nothing public names
    merge: SignedRecord  # the public project's contribution naming `merged` as a parent

    @property
    def service(self) -> NodeService:
        return self.replicator.service

    def changeset(self, record: SignedRecord) -> CID:
        assert isinstance(record.body, Contribution)
        (link,) = record.body.changes
        return link


def private_genesis(world: World, founder: Identity, mesh: CID) -> SignedRecord:
    """The genesis of a project kept to `mesh`, founded by `founder`."""
    body = Project(
        author=founder.public_key,
        ts=world.tick(),
        name="jigs",
        license="MIT",
        policy=Policy(maintainers=(founder.public_key,)),
        mesh=mesh,
    )
    return sign(body, founder)


@pytest.fixture
async def merge(tmp_path: Path) -> AsyncIterator[Merge]:
    with Store.open(tmp_path / "store.sqlite") as store:
        service = NodeService(STEWARD, store, DataDir(tmp_path))
        mesh = await service.meshes.create("workshop", "private")
        await service.meshes.set_membership(mesh.cid, MEMBER.public_key, "admit")
        world = World()
        public = world.genesis(STEWARD, name="benches")
        head = world.contribute(STEWARD, public, [public], {"README": "benches"})
        private = private_genesis(world, STEWARD, mesh.cid)
        merged = world.contribute(STEWARD, private, [private], {"jig.txt": "a jig"})
        unmerged = world.contribute(STEWARD, private, [merged], {"secret.txt": "not yet"})
        merge = world.contribute(STEWARD, public, [head, merged], {"NOTES": "merged a jig"})
        await service.store_new([public, head, private, merged, unmerged], "sync")
        # Each project's changesets, fetched for it (the private ones for the private one).
        for project, records in ((public, [head, merge]), (private, [merged, unmerged])):
            links = [link for r in records for link in r.body.changes]  # type: ignore[union-attr]
            blocks = [(link, world.changeset(link).encode()) for link in links]
            await service.blocks_put(blocks, project.cid, pinned=True)
        yield Merge(
            Replicator(service, _Mesh()),  # type: ignore[arg-type]
            public,
            private,
            merged,
            unmerged,
            merge,
        )


async def _given(merge: Merge, peer: str) -> set[CID]:
    """Which of the private project's changesets the node gives `peer`."""
    cids = [merge.changeset(merge.merged), merge.changeset(merge.unmerged)]
    return set(await merge.service.blocks_get(cids, peer))


async def test_a_gossiped_merge_makes_the_merged_work_s_blocks_public(merge: Merge) -> None:
    assert await _given(merge, STRANGER.peer_id) == set()
    await merge.replicator._gossip_received(
        topic_of(merge.public.cid), merge.merge.data, MEMBER.peer_id
    )
    await merge.replicator._store_gossip([merge.replicator._gossip_queue.receive_nowait()])
    assert await _given(merge, STRANGER.peer_id) == {merge.changeset(merge.merged)}
    assert await _given(merge, MEMBER.peer_id) == {
        merge.changeset(merge.merged),
        merge.changeset(merge.unmerged),
    }


async def test_a_merge_made_here_makes_the_merged_work_s_blocks_public(merge: Merge) -> None:
    merge.service.record_listeners.append(merge.replicator._records_stored)
    await merge.service.store_new([merge.merge], "local")
    merge.replicator._send_publish.close()
    await merge.replicator._run_publishing()
    assert await _given(merge, STRANGER.peer_id) == {merge.changeset(merge.merged)}


async def test_a_merge_made_over_rpc_makes_the_merged_work_public_before_it_is_published(
    merge: Merge,
) -> None:
    (head,) = (parent for parent in merge.merge.parents if parent != merge.merged.cid)
    params = {
        "project": str(merge.public.cid),
        "parents": [str(head), str(merge.merged.cid)],
        "message": "take in the jig",
    }
    await contribution_create(merge.service, Params("contribution.create", [params]), None)  # type: ignore[arg-type]
    # Nothing has run the replicator's publishing: contribution.create attributed it.
    assert await _given(merge, STRANGER.peer_id) == {merge.changeset(merge.merged)}


async def test_a_merge_is_served_with_the_public_project_and_the_rest_is_not(
    merge: Merge,
) -> None:
    await merge.service.store_new([merge.merge], "sync")
    stranger = _ServedTo(merge.service, STRANGER.peer_id)
    assert await stranger.sync_index(merge.private.cid) is None
    index = await stranger.sync_index(merge.public.cid)
    assert index is not None
    # The public project's set holds the merged work, and only that of the private project.
    assert merge.merged.cid.raw in index and merge.private.cid.raw in index
    assert merge.unmerged.cid.raw not in index
    wanted = [merge.merge.cid, merge.merged.cid, merge.unmerged.cid]
    assert set(await stranger.sync_records(wanted)) == {merge.merge.cid, merge.merged.cid}
    member = _ServedTo(merge.service, MEMBER.peer_id)
    await member.sync_index(merge.public.cid)
    assert set(await member.sync_records(wanted)) == set(wanted)


def _real_file(content: bytes) -> tuple[Put, list[tuple[CID, bytes]]]:
    """A change putting `content` at a path, and its manifest and file block."""
    raw = CID.of_raw(content)
    manifest = FileManifest(len(content), (BlockRef(raw, len(content)),)).encode()
    link = CID.of_dag_cbor(manifest)
    return Put(path="jig.step", file=link, size=len(content)), [(link, manifest), (raw, content)]


async def test_a_synced_merge_makes_merged_file_blocks_public_on_a_records_only_follower(
    tmp_path: Path,
) -> None:
    """A member following the public project for its records only, and the private one in
    full, holds the merged work's file block for the private project; once the merge
    arrives by sync, the block is the public project's too, and a stranger may have it."""
    with Store.open(tmp_path / "store.sqlite") as store:
        service = NodeService(MEMBER, store, DataDir(tmp_path))
        mesh = await service.meshes.create("workshop", "private")
        world = World()
        public = world.genesis(STEWARD, name="benches")
        private = private_genesis(world, MEMBER, mesh.cid)
        put, jig_blocks = _real_file(b"a jig, drawn in full")
        secret, secret_blocks = _real_file(b"not merged yet")
        merged = world.contribute(MEMBER, private, [private], {"jig.step": put})
        unmerged = world.contribute(MEMBER, private, [merged], {"jig.step": secret})
        merge = world.contribute(STEWARD, public, [public, merged], {})
        await service.store_new([public, private, merged, unmerged, merge], "sync")
        await service.db(lambda s: s.follow(public.cid, "records", 0))
        await service.db(lambda s: s.follow(private.cid, "full", 0))
        links = [link for r in (merged, unmerged) for link in r.body.changes]  # type: ignore[union-attr]
        held = [(link, world.changeset(link).encode()) for link in links]
        await service.blocks_put(held + jig_blocks + secret_blocks, private.cid, pinned=True)
        merge_links = merge.body.changes  # type: ignore[union-attr]
        await service.blocks_put([(link, world.changeset(link).encode()) for link in merge_links])
        jig_raw, secret_raw = jig_blocks[1][0], secret_blocks[1][0]
        assert await service.blocks_get([jig_raw], STRANGER.peer_id) == {}

        replicator = Replicator(service, _Mesh())  # type: ignore[arg-type]
        assert not await replicator._fetch_missing_blocks(public.cid, _Completion([], None), None)
        given = await service.blocks_get([jig_raw, secret_raw], STRANGER.peer_id)
        assert set(given) == {jig_raw}
