"""The node's service object: one identity, one store, one event bus, and what they answer.

`NodeService` owns the acceptance state cache, name resolution, tree replay and the rules
for storing new records (events, status changes). The RPC methods that use it live in
`ostrom.node.methods`; the store is used from worker threads under one lock, so the event
loop never waits on SQLite or on replaying a large project.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import trio

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.datadir import DataDir
from ostrom.errors import (
    DecodeError,
    NotFound,
)
from ostrom.node.events import EventBus
from ostrom.node.store import Store
from ostrom.node.sync import IngestResult
from ostrom.node.verifier import VerifierPool
from ostrom.node.views import key_view, record_view, status_view
from ostrom.protocol.acceptance import ProjectState, evaluate
from ostrom.protocol.changesets import (
    Changeset,
)
from ostrom.protocol.reconcile import ReconcileIndex
from ostrom.protocol.records import (
    Body,
    Project,
    SignedRecord,
    sign,
)
from ostrom.protocol.tree import Tree, replay

log = logging.getLogger(__name__)

T = TypeVar("T")

# The record types the acceptance rule judges or counts (ostrom.protocol.acceptance); it
# ignores needs and comments except as parents, present or missing, of judged records.
_JUDGED_TYPES: Final = frozenset({"project", "contribution", "governance", "validation"})


def _trusted_changeset(store: Store, cid: CID) -> Changeset:
    data = store.get_block(cid)
    if data is None:
        raise NotFound(f"changeset {cid} is not in the store")
    return Changeset.decode(data)


def sync_projects(record: SignedRecord) -> tuple[CID, ...]:
    """The projects whose sync and gossip carry `record`: its own, and for a fork's genesis
    also the project it forks, so that the parent's followers learn of the fork."""
    body = record.body
    if isinstance(body, Project) and body.fork_of is not None:
        return (record.project, body.fork_of.project)
    return (record.project,)


class Network(Protocol):
    """What the RPC methods may ask of the mesh; `replication.MeshNetwork` provides it."""

    def addresses(self) -> list[str]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    async def connect(self, addr: str) -> dict[str, Any]: ...

    async def follow(self, project: CID) -> None: ...

    async def unfollow(self, project: CID) -> None: ...


class NodeService:
    """Every RPC method, over one identity, one store and one event bus."""

    def __init__(
        self,
        identity: Identity,
        store: Store,
        data_dir: DataDir,
        *,
        events: EventBus | None = None,
        verifier: VerifierPool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.store = store
        self.data_dir = data_dir
        self.events = events or EventBus()
        # Without a pool from the daemon, batches are decoded on a thread (tests, tools).
        self.verifier = verifier or VerifierPool(workers=1)
        self._clock = clock
        self._lock = trio.Lock()
        self._states: dict[CID, ProjectState] = {}
        # Per cached state, the parents its records lack: a need or comment among them is
        # the only kind that can change the state.
        self._missing: dict[CID, frozenset[CID]] = {}
        # Per project, the set of record ids that sync reconciles; built on first use.
        self._indexes: dict[CID, ReconcileIndex] = {}
        # Called with every batch of newly stored records and their origin (local, import,
        # sync, gossip); the replicator publishes local records this way. A listener must not
        # block.
        self.record_listeners: list[Callable[[list[SignedRecord], str], None]] = []
        # The mesh, once the daemon has started it; None in tests and tools without one.
        self.network: Network | None = None
        self._last_ts = 0
        self._started = clock()

    # --- plumbing --------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(store, *args)` on a worker thread, one at a time."""
        async with self._lock:
            return await trio.to_thread.run_sync(fn, self.store, *args)

    def _now(self) -> int:
        """Milliseconds for a new record's `ts`, strictly increasing for this node's records.

        Strictness matters: a validator's latest validation is the one that counts, so
        changing a verdict within one millisecond must still order the two.
        """
        self._last_ts = max(int(self._clock() * 1000), self._last_ts + 1)
        return self._last_ts

    async def store_new(self, records: Sequence[SignedRecord], origin: str) -> list[CID]:
        """Store verified records; returns those that were new, after updating the sync
        indexes, telling the record listeners, and publishing events and status changes.
        `origin` says where they came from: local, import, sync or gossip."""
        if not records:
            return []
        # The projects whose acceptance state these records may change; needs and comments
        # change none, unless a record names one as a parent it lacks, so a busy topic of
        # needs does not re-evaluate its project on every record.
        judged = [r for r in records if r.type in _JUDGED_TYPES]
        lacked = {
            project
            for r in records
            if r.type not in _JUDGED_TYPES
            for project, missing in self._missing.items()
            if r.cid in missing
        }
        projects = {record.project for record in judged} | lacked
        # Status changes are reported against the state before these records; it is worked
        # out only when someone listens (a cached one costs nothing).
        before: dict[CID, ProjectState | None] = {}
        for project in projects:
            before[project] = self._states.get(project)
            if before[project] is None and self.events.subscriber_count:
                try:
                    before[project] = await self.state(project)
                except NotFound:
                    before[project] = None

        def write(store: Store) -> list[CID]:
            return store.put_records(records)

        new = await self.db(write)
        if not new:
            return new
        new_set = set(new)
        for record in records:
            if record.cid in new_set:
                for project in sync_projects(record):
                    index = self._indexes.get(project)
                    if index is not None:
                        index.add(record.cid.raw)
        for listener in self.record_listeners:
            listener([r for r in records if r.cid in new_set], origin)
        # A record can complete the ancestry of any project (an upstream record a fork merged,
        # arriving by import or sync), so those drop every cached state. Local and gossiped
        # records belong to the projects they name (a fork's genesis also to its parent), so
        # only those states go: a busy topic must not re-evaluate every project per record.
        if origin in ("local", "gossip") or not judged:
            for project in lacked | {p for r in judged for p in sync_projects(r)}:
                self._forget_state(project)
        else:
            self._states.clear()
            self._missing.clear()
        if self.events.subscriber_count:
            for record in records:
                if record.cid in new_set:
                    self.events.publish(
                        {"type": "record.added", "origin": origin, "record": record_view(record)}
                    )
        for project, old in before.items():
            if old is not None:
                await self._publish_status_changes(project, old)
        return new

    async def _publish_status_changes(self, project: CID, old: ProjectState) -> None:
        if not self.events.subscriber_count:
            return
        try:
            new = await self.state(project)
        except NotFound:
            return
        for cid, status in new.statuses.items():
            was = old.statuses.get(cid)
            if was is None or was.status != status.status:
                self.events.publish(
                    {
                        "type": "status.changed",
                        "project": str(project),
                        "record": str(cid),
                        "status": status.status,
                        "was": None if was is None else was.status,
                    }
                )

    async def sign_and_store(self, body: Body) -> SignedRecord:
        """Sign `body` with this node's key and store it (events and status changes follow)."""
        record = sign(body, self.identity)
        await self.store_new([record], "local")
        return record

    # --- what a sync session needs (ostrom.node.sync.SyncHost) -----------------------------

    async def sync_index(self, project: CID) -> ReconcileIndex | None:
        """The project's record-id index, if this node follows the project or holds it."""

        def hosted(store: Store) -> bool:
            return store.follow_mode(project) is not None or store.get_record(project) is not None

        if not await self.db(hosted):
            return None
        index = self._indexes.get(project)
        if index is None:

            def ids(store: Store) -> list[CID]:
                # A project's forks travel with it, so its followers see them (`ostrom forks`).
                return store.project_cids(project) + [f.cid for f in store.forks_of(project)]

            cids = await self.db(ids)
            index = self._indexes.setdefault(project, ReconcileIndex.build(c.raw for c in cids))
        return index

    async def sync_records(self, cids: Sequence[CID]) -> list[bytes]:
        found = await self.db(lambda store: store.get_record_bytes(cids))
        return [found[cid] for cid in cids if cid in found]

    async def sync_ingest(
        self, items: Sequence[bytes], peer_id: str, project: CID | None = None
    ) -> IngestResult:
        """Verify and store records a peer sent; with `project`, refuse other projects'."""
        result = IngestResult()
        decoded = await self.verifier.decode_records(items)
        good: list[SignedRecord] = []
        for item in decoded:
            if not isinstance(item, SignedRecord) or (
                project is not None and project not in sync_projects(item)
            ):
                result.refused += 1
                continue
            good.append(item)
        if result.refused:
            log.info("peer %s sent %d record(s) that were refused", peer_id, result.refused)
        new = set(await self.store_new(good, "sync"))
        result.stored = [r.cid for r in good if r.cid in new]
        result.known = [r.cid for r in good if r.cid not in new]
        parents = {p for r in good if r.cid in new for p in r.parents}
        if parents:
            present = await self.db(lambda store: store.has_records(parents))
            result.missing_parents = parents - present
        return result

    # --- what the blocks protocol needs (ostrom.node.blocks.BlockStore) --------------------

    async def blocks_get(self, cids: Sequence[CID]) -> dict[CID, bytes]:
        def read(store: Store) -> dict[CID, bytes]:
            out = {}
            for cid in cids:
                data = store.get_block(cid)
                if data is not None:
                    out[cid] = data
            return out

        return await self.db(read)

    async def blocks_have(self, cids: Sequence[CID]) -> set[CID]:
        return await self.db(lambda store: store.has_blocks(cids))

    async def blocks_put(self, blocks: Sequence[tuple[CID, bytes]]) -> int:
        return await self.db(lambda store: store.put_blocks(blocks))

    async def follow(self, project: CID, mode: str) -> None:
        since = int(self._clock() * 1000)
        await self.db(lambda store: store.follow(project, mode, since))
        if self.network is not None:
            await self.network.follow(project)
        self.events.publish({"type": "follow.changed", "project": str(project), "mode": mode})

    async def unfollow(self, project: CID) -> bool:
        removed: bool = await self.db(lambda store: store.unfollow(project))
        if removed and self.network is not None:
            await self.network.unfollow(project)
        if removed:
            self.events.publish({"type": "follow.changed", "project": str(project), "mode": None})
        return removed

    async def view_with_status(self, record: SignedRecord) -> dict[str, Any]:
        """The record's view, with its status when it is a node of its project's DAG."""
        view = record_view(record)
        status = (await self.state(record.project)).statuses.get(record.cid)
        if status is not None:
            view.update(status_view(status))
        return view

    # --- reading projects ------------------------------------------------------------------

    async def state(self, project: CID) -> ProjectState:
        """The acceptance state of `project`, cached until a record of it arrives."""
        cached = self._states.get(project)
        if cached is not None:
            return cached

        def compute(store: Store) -> ProjectState:
            genesis = store.get_record(project)
            if genesis is None or not isinstance(genesis.body, Project):
                raise NotFound(f"no project {project}")
            return evaluate(genesis, store.project_history(project).values())

        state = await self.db(compute)
        self._states[project] = state
        self._missing[project] = frozenset(c for st in state.statuses.values() for c in st.missing)
        return state

    def _forget_state(self, project: CID) -> None:
        self._states.pop(project, None)
        self._missing.pop(project, None)

    async def resolve_project(self, text: str) -> SignedRecord:
        """A project named by full CID, unique CID prefix, or unique name."""

        def find(store: Store) -> SignedRecord:
            named = store.projects_named(text)
            if len(named) == 1:
                return named[0]
            if len(named) > 1:
                from ostrom.errors import Ambiguous

                listed = ", ".join(str(record.cid) for record in named[:5])
                raise Ambiguous(f"{len(named)} projects are named {text!r}: {listed}; use a CID")
            try:
                cid = store.resolve(text, types=("project",))
            except DecodeError:
                raise NotFound(f"no project named {text!r}") from None
            except NotFound:
                raise NotFound(f"no project named or identified by {text!r}") from None
            record = store.get_record(cid)
            if record is None:
                raise NotFound(f"no project {text!r}")
            return record

        return await self.db(find)

    async def resolve_record(self, text: str, types: Sequence[str] | None = None) -> SignedRecord:
        def find(store: Store) -> SignedRecord:
            try:
                cid = store.resolve(text, types=types)
            except DecodeError:
                raise NotFound(f"no record {text!r}") from None
            record = store.get_record(cid)
            if record is None:
                raise NotFound(f"no record {text!r}")
            return record

        return await self.db(find)

    async def tree(self, heads: Sequence[CID]) -> Tree:
        def compute(store: Store) -> Tree:
            records = store.ancestors(heads)
            return replay(heads, records, lambda cid: _trusted_changeset(store, cid))

        return await self.db(compute)

    async def default_parents(self, project: CID) -> tuple[CID, ...]:
        """Where this node's next record in `project` goes: the accepted heads, plus this
        node's own records still pending, so that an author builds on their own work."""
        state = await self.state(project)
        mine = {
            cid
            for cid, status in state.statuses.items()
            if status.status == "pending" and not status.missing
        }
        if mine:

            def own(store: Store) -> set[CID]:
                found = store.get_records(mine)
                return {cid for cid, rec in found.items() if rec.author == self.identity.public_key}

            mine = await self.db(own)
        nodes = set(state.accepted) | mine
        if not mine:
            return tuple(sorted(state.accepted_heads))

        def heads(store: Store) -> tuple[CID, ...]:
            records = store.get_records(nodes)
            has_child = {p for rec in records.values() for p in rec.parents}
            return tuple(sorted(cid for cid in nodes if cid not in has_child))

        return await self.db(heads)

    async def project_view(self, genesis: SignedRecord, *, detail: bool = False) -> dict[str, Any]:
        state = await self.state(genesis.cid)
        view = record_view(genesis)
        counts = {"accepted": 0, "pending": 0, "rejected": 0}
        for cid, status in state.statuses.items():
            if cid != genesis.cid:
                counts[status.status] += 1
        view.update(
            current_policy={
                "maintainers": [key_view(key) for key in state.policy.maintainers],
                "quorum": state.policy.quorum,
            },
            heads=[str(cid) for cid in state.accepted_heads],
            records=counts,
            following=await self.db(lambda store: store.follow_mode(genesis.cid)),
            mine=genesis.author == self.identity.public_key,
        )
        if detail:

            def extra(store: Store) -> dict[str, Any]:
                return {
                    "record_count": store.record_count(genesis.cid),
                    "forks": len(store.forks_of(genesis.cid)),
                    "needs": len(store.project_records(genesis.cid, ("need",))),
                }

            view.update(await self.db(extra))
        return view
