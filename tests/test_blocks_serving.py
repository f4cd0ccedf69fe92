"""Which blocks a node gives a peer: a block kept only for a private mesh's project goes to
that mesh's members and nobody else, even to a peer that knows its CID."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.datadir import DataDir
from ostrom.errors import InvalidInput
from ostrom.node.methods.records import contribution_create
from ostrom.node.methods.transfer import car_import
from ostrom.node.params import Params
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.protocol.changesets import BlockRef, FileManifest
from ostrom.protocol.records import Policy, Project, SignedRecord, sign

STEWARD = Identity.from_seed(bytes([1]) * 32)
MEMBER = Identity.from_seed(bytes([2]) * 32)
STRANGER = Identity.from_seed(bytes([3]) * 32)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[NodeService]:
    store = Store.open(tmp_path / "store.sqlite")
    try:
        yield NodeService(STEWARD, store, DataDir(tmp_path))
    finally:
        store.close()


def genesis(name: str, mesh: CID | None) -> SignedRecord:
    body = Project(
        author=STEWARD.public_key,
        ts=1_000,
        name=name,
        license="MIT",
        policy=Policy(maintainers=(STEWARD.public_key,)),
        mesh=mesh,
    )
    return sign(body, STEWARD)


async def private_and_public(service: NodeService) -> tuple[SignedRecord, SignedRecord]:
    """The geneses of a project of a private mesh MEMBER is in, and of a public project."""
    mesh = await service.meshes.create("makers", "private")
    await service.meshes.set_membership(mesh.cid, MEMBER.public_key, "admit")
    private, public = genesis("secret", mesh.cid), genesis("open", None)
    await service.db(lambda store: store.put_records([private, public]))
    return private, public


def count_store_calls(service: NodeService) -> list[object]:
    """From now on, each call `service` makes to its store is appended to the list returned."""
    calls: list[object] = []
    store_call, brief_call, read_call = service.db, service.db_brief, service.db_read

    async def counted(fn: object, *args: object) -> object:
        calls.append(fn)
        return await store_call(fn, *args)  # type: ignore[arg-type]

    async def counted_brief(fn: object, *args: object) -> object:
        calls.append(fn)
        return await brief_call(fn, *args)  # type: ignore[arg-type]

    async def counted_read(fn: object, *args: object) -> object:
        calls.append(fn)
        return await read_call(fn, *args)  # type: ignore[arg-type]

    service.db = counted  # type: ignore[assignment]
    service.db_brief = counted_brief  # type: ignore[assignment]
    service.db_read = counted_read  # type: ignore[assignment]
    return calls


def block(text: str) -> tuple[CID, bytes]:
    data = text.encode() * 100
    return CID.of_raw(data), data


async def test_a_private_project_s_blocks_go_only_to_members_of_its_mesh(
    service: NodeService,
) -> None:
    private, public = await private_and_public(service)
    only_private, shared, only_public, own = (block(t) for t in ("p", "s", "o", "mine"))
    await service.blocks_put([only_private, shared], private.cid, pinned=False)
    await service.blocks_put([only_public, shared], public.cid, pinned=False)
    await service.db(lambda store: store.put_blocks([own]))
    cids = [b[0] for b in (only_private, shared, only_public, own)]

    to_stranger = await service.blocks_get(cids, STRANGER.peer_id)
    assert set(to_stranger) == {shared[0], only_public[0], own[0]}
    to_member = await service.blocks_get(cids, MEMBER.peer_id)
    assert set(to_member) == set(cids)
    # The owner reads everything.
    assert set(await service.blocks_get(cids)) == set(cids)


async def test_blocks_imported_with_their_private_project_go_only_to_members(
    service: NodeService,
) -> None:
    mesh = await service.meshes.create("makers", "private")
    private = genesis("secret", mesh.cid)
    imported, loose = block("in the car"), block("no project named")
    sections = [[private.cid.raw, private.data], [imported[0].raw, imported[1]]]
    await car_import(
        service,
        Params("car.import", [{"sections": sections, "projects": [str(private.cid)]}]),
        None,  # type: ignore[arg-type]
    )
    await car_import(
        service,
        Params("car.import", [{"sections": [[loose[0].raw, loose[1]]]}]),
        None,  # type: ignore[arg-type]
    )
    cids = [imported[0], loose[0]]
    assert set(await service.blocks_get(cids, STRANGER.peer_id)) == {loose[0]}
    assert set(await service.blocks_get(cids)) == set(cids)
    with pytest.raises(InvalidInput, match="at most 16 projects"):
        too_many = [str(CID.of_raw(bytes([i]))) for i in range(17)]
        await car_import(
            service,
            Params("car.import", [{"sections": [], "projects": too_many}]),
            None,  # type: ignore[arg-type]
        )


async def test_public_blocks_are_answered_from_memory_and_no_others_ever(
    service: NodeService,
) -> None:
    private, public = await private_and_public(service)
    only_private, only_public, own = block("p"), block("o"), block("mine")
    await service.blocks_put([only_private], private.cid, pinned=False)
    await service.blocks_put([only_public], public.cid, pinned=False)
    # An upload that a private project's contribution then claimed.
    await service.db(lambda store: store.put_blocks([own]))
    await service.db(lambda store: store.blocks.claim(private.cid.raw, [own[0]]))
    cids = [only_private[0], only_public[0], own[0]]
    assert set(await service.blocks_get(cids, MEMBER.peer_id)) == set(cids)

    reads = count_store_calls(service)
    assert set(await service.blocks_get([only_public[0]], STRANGER.peer_id)) == {only_public[0]}
    assert reads == []  # from memory
    # What memory does not hold is read and checked as before: nothing private leaks.
    assert set(await service.blocks_get(cids, STRANGER.peer_id)) == {only_public[0]}
    assert len(reads) == 1
    # Blocks fetched for a project known to be public are held from the start.
    fetched = block("fetched later")
    await service.blocks_put([fetched], public.cid, pinned=False)
    reads.clear()
    assert set(await service.blocks_get([fetched[0]], STRANGER.peer_id)) == {fetched[0]}
    assert reads == []


async def contribute_file(service: NodeService, project: SignedRecord, text: str) -> list[CID]:
    """Upload a one-block file, as `block.put` does, and contribute it; its blocks' CIDs."""
    data = text.encode()
    raw = CID.of_raw(data)
    manifest = FileManifest(len(data), (BlockRef(raw, len(data)),)).encode()
    file = CID.of_dag_cbor(manifest)
    await service.blocks_upload([(raw, data), (file, manifest)])
    change = {"op": "put", "path": "page.md", "file": str(file), "size": len(data)}
    params = {"project": str(project.cid), "changes": [change], "message": "a page"}
    view = await contribution_create(
        service,
        Params("contribution.create", [params]),
        None,  # type: ignore[arg-type]
    )
    record = await service.db(lambda store: store.get_record(CID.parse(view["cid"])))
    return [*record.body.changes, file, raw]


async def test_a_new_contribution_s_blocks_wait_in_memory_only_for_a_public_project(
    service: NodeService,
) -> None:
    private, public = await private_and_public(service)
    public_blocks = await contribute_file(service, public, "open work")
    private_blocks = await contribute_file(service, private, "secret work")

    reads = count_store_calls(service)
    got = await service.blocks_get(public_blocks, STRANGER.peer_id)
    assert set(got) == set(public_blocks)
    assert reads == []  # the first peer to ask is answered from memory
    assert await service.blocks_get(private_blocks, STRANGER.peer_id) == {}
    assert len(reads) == 1
    assert set(await service.blocks_get(private_blocks, MEMBER.peer_id)) == set(private_blocks)


async def test_a_contribution_s_blocks_and_record_go_to_the_store_in_one_hand_off(
    service: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each call to the store's thread waits for that thread to get a processor; on a busy
    # machine the author's record reached its peers two such waits after the call.
    _, public = await private_and_public(service)
    await contribute_file(service, public, "first")  # what is read once is read now
    handed: list[str] = []
    db = service.db

    async def counted(fn: Callable[..., Any], *args: Any) -> Any:
        handed.append(fn.__qualname__)
        return await db(fn, *args)

    monkeypatch.setattr(service, "db", counted)
    before_publishing: list[list[str]] = []
    service.record_listeners.append(lambda records, origin: before_publishing.append(handed[:]))
    stored = await contribute_file(service, public, "second")
    assert before_publishing == [["NodeService._store.<locals>.write"]]
    assert set(await service.blocks_have(stored)) == set(stored)
