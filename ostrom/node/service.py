"""The node's service object: one identity, one store, one event bus, and what they answer.

`NodeService` owns the acceptance state cache, name resolution, tree replay and the rules
for storing new records (events, status changes). The RPC methods that use it live in
`ostrom.node.methods`; the store is used from worker threads under one lock, so the event
loop never waits on SQLite or on replaying a large project.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, overload

import trio

from ostrom.crypto.cid import CID, CID_LENGTH
from ostrom.crypto.keys import Identity, public_key_of_peer_id
from ostrom.datadir import DataDir
from ostrom.errors import (
    DecodeError,
    InvalidInput,
    NotFound,
    QuotaExceeded,
)
from ostrom.node.bandwidth import Bandwidth
from ostrom.node.blockcache import RecentBlocks
from ostrom.node.blockdb import PutResult, Quota
from ostrom.node.events import EventBus
from ostrom.node.gilswitch import switch_interval
from ostrom.node.ingest import (
    ROW_CID,
    ROW_FORK_OF,
    ROW_PARENTS,
    ROW_PROJECT,
    ROW_TYPE,
    RecordRow,
    Refusal,
    decode_row,
    record_row,
)
from ostrom.node.limits import Limits
from ostrom.node.meshes import MeshRegistry
from ostrom.node.quicklock import QuickLock
from ostrom.node.store import Store
from ostrom.node.sync import IngestResult, Verified
from ostrom.node.transfers import ProgressListener, Transfer, Transfers
from ostrom.node.verifier import PROCESS_THRESHOLD, VerifierPool
from ostrom.node.views import key_view, record_view, status_view
from ostrom.protocol.acceptance import ProjectState, StatusChange, advance, evaluate
from ostrom.protocol.changesets import (
    Changeset,
)
from ostrom.protocol.reconcile import ReconcileIndex
from ostrom.protocol.records import (
    Body,
    Project,
    SignedRecord,
    Validation,
    sign,
)
from ostrom.protocol.syncset import SyncSet
from ostrom.protocol.tree import Tree, replay

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

# The record types the acceptance rule judges or counts (ostrom.protocol.acceptance); it
# ignores needs and comments except as parents, present or missing, of judged records.
_JUDGED_TYPES: Final = frozenset({"project", "contribution", "governance", "validation"})
# Record statuses the cached acceptance states may hold in all, beyond the most recently
# used state (always kept, whatever its size): a status costs about 480 bytes with what
# `advance` keeps beside it (measured on a 5,000-record chain), so this caps the cache near
# 9 MiB however many projects are read, while a node busy with a few
# projects of some thousands of records keeps them all. An evicted state is evaluated
# again from the store when next asked for.
_STATE_CACHE_STATUSES: Final = 20_000
# Fetched block bytes stored since the last sync, or by the fetch that ends, at which its end
# syncs at once: a large fetch (an artifact) is on disk when it is reported done, while the
# few KiB of a gossiped contribution's blocks do not each cost a checkpoint and two disk
# syncs.
BLOCK_SYNC_NOW_BYTES: Final = 4 * 1024 * 1024
# Fetched block bytes stored since the last sync at which `serve_syncs` syncs the block
# file's log while the fetch goes on. Without it the disk took a whole artifact in the
# fetch's final sync: 0.45 s of 3.1 s for 256 MiB on this machine, with both cores idle. A
# sync of the log costs almost no CPU (0.02 s per 256 MiB), so syncing as the blocks come
# leaves the fetch's end one sync of at most this much: in paired runs of `bench.artifact`
# the fetch went from 82.8 to 107.2 MB/s on average (docs/BENCHMARKS.md, artifacts, ninth
# round; 32 MiB gave 95.1). It also bounds what a power loss can take of a fetch under way.
BLOCK_WRITEBACK_BYTES: Final = 16 * 1024 * 1024
# How soon, at most, records from peers and the blocks of smaller fetches are synced
# (`serve_syncs`): what a power loss can take is then a few seconds' worth of them, which
# peers send again.
SYNC_DELAY_S: Final = 5.0
# How often the record log's size is looked at (`serve_checkpoints`): gossip grows the log by
# a few hundred KB a second, so it is copied well before a commit would. A catch-up writes
# megabytes a second and may reach the commit's own threshold between two looks; that
# commit then makes the copy, as every commit did before.
CHECKPOINT_POLL_S: Final = 1.0
# Gossiped records stored by one call on the event loop at most (`db_brief`); a larger
# batch (a backlog) goes to the worker thread. Each is about a kilobyte with its index
# entries, so this stays far under `BRIEF_COMMIT_BYTES`.
BRIEF_GOSSIP_ROWS: Final = 64
# Fetched or uploaded block bytes stored by one call on the event loop at most
# (`db_brief`): a pass's changesets, manifests and small files, or a small contribution's
# upload; an artifact's 256 KiB blocks go to the thread.
BRIEF_PUT_BYTES: Final = 128 * 1024
# Block bytes a peer's want reads on the event loop at most (`db_read`): reading and
# checking 128 KiB costs about 0.3 ms here (a block not here: 15 microseconds), less than
# handing the read to the worker thread; an artifact's 256 KiB blocks are read there.
BRIEF_READ_BYTES: Final = 128 * 1024
# Records a read on the event loop takes at most (`db_read_rows`): the records a sync with
# a peer that keeps up sends or asks for are a few; 64 are read and checked in a third of a
# millisecond here (records of 320 bytes). A catch-up's batches go to the worker thread.
BRIEF_READ_RECORDS: Final = 64
# Where records come from that a peer sent, and any peer holding them can send again: stored
# without a disk sync of their own (`Store.put_rows(..., durable=False)`).
_PEER_ORIGINS: Final = frozenset({"gossip", "sync"})
# Where records come from that this node signs: committed without a sync of their own, told
# to the record listeners (the replicator queues them for gossip), then synced before the
# call that made them returns, so that their gossip goes out while the disk syncs instead
# of after. A power loss in between can take only the local copy of a record that peers
# may already hold, which the next sync with them brings back.
_OWN_ORIGIN: Final = "local"
# Project genesis records `resolve_project` keeps by CID: far more projects than a scripted
# session names, and a few hundred KiB at most.
KNOWN_PROJECTS: Final = 256
# Small public blocks kept in memory for peers that ask for them (`ostrom.node.blockcache`):
# a gossiped contribution's blocks are a few hundred bytes to a few KiB, so 1 MiB holds
# those of the last several hundred contributions, far more than followers ask for at once.
RECENT_BLOCKS_BYTES: Final = 1024 * 1024
# The largest block kept there: larger ones (an artifact's chunks) are read from the store,
# as a cache of a few of them would hold little else and serve few repeats.
RECENT_BLOCK_MAX: Final = 16 * 1024


# Blocks read from the store, and the projects each is attributed to (when asked for).
_BlocksRead = tuple[dict[CID, bytes], dict[CID, set[bytes]]]


def _read_blocks(store: Store, cids: Sequence[CID], attributions: bool) -> _BlocksRead:
    """The stored ones of `cids`, checked against their CIDs, with (if `attributions`) the
    projects each was stored for."""
    found = {}
    for cid in cids:
        data = store.get_block(cid)
        if data is not None:
            found[cid] = data
    return found, store.blocks.projects_of(found) if attributions else {}


def _named_projects(rows: Iterable[RecordRow]) -> set[CID]:
    """The projects whose records (or validations) are among `rows`: the acceptance states
    they can change, besides those that lack one of them."""
    return {CID(row[ROW_PROJECT]) for row in rows if row[ROW_TYPE] in _JUDGED_TYPES}


def _trusted_changeset(store: Store, cid: CID) -> Changeset:
    data = store.get_block(cid)
    if data is None:
        raise NotFound(f"changeset {cid} is not in the store")
    return Changeset.decode(data)


def sync_projects(record: SignedRecord) -> tuple[CID, ...]:
    """The projects whose sync and gossip carry `record`: its own, and for a fork's genesis
    also the project it forks, so that the parent's followers learn of the fork (unless
    the fork belongs to a private mesh: then it travels only to that mesh's members)."""
    body = record.body
    if isinstance(body, Project) and body.fork_of is not None and body.mesh is None:
        return (record.project, body.fork_of.project)
    return (record.project,)


class _StoredRecords(Sequence[SignedRecord]):
    """The records of newly stored rows, as the record listeners see them: those the caller
    had as records are handed over, the others decoded from their rows when first read."""

    def __init__(self, rows: Sequence[RecordRow], records: dict[bytes, SignedRecord]) -> None:
        self._rows = rows
        self._records = records

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> SignedRecord: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SignedRecord]: ...

    def __getitem__(self, index: int | slice) -> SignedRecord | Sequence[SignedRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._rows[index]
        record = self._records.get(row[ROW_CID])
        if record is None:
            record = self._records[row[ROW_CID]] = decode_row(row)
        return record


class Network(Protocol):
    """What the RPC methods may ask of the mesh; `replication.MeshNetwork` provides it."""

    def addresses(self) -> list[str]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def peer_count(self) -> int:
        """How many peers `peers` would list, without building their views."""

    async def connect(self, addr: str) -> dict[str, Any]: ...

    async def follow(self, project: CID) -> None: ...

    async def unfollow(self, project: CID) -> None: ...

    async def fetch_blocks(
        self, project: CID, cids: Sequence[CID], listener: ProgressListener | None = None
    ) -> Transfer:
        """Fetch those of `cids` this node lacks from peers that share `project`."""

    def set_max_peers(self, max_peers: int) -> None:
        """Keep at most `max_peers` connected peers from now on."""


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
        self.transfers = Transfers(self.events)
        # What the owner grants the node (`set_limits`), and the meter of our protocols'
        # bytes that holds them to the upload and download rates.
        self.limits = Limits()
        self.bandwidth = Bandwidth(self.events)
        # The community meshes this node is in; the daemon loads them at start.
        self.meshes = MeshRegistry(identity, self.db, self.events, clock)
        # The private mesh each project's genesis names (None: public), read once per project.
        self._project_mesh: dict[CID, CID | None] = {}
        # Project genesis records by their CID's text, as RPC callers name them (oldest first).
        self._projects_by_cid: dict[str, SignedRecord] = {}
        # Without a pool from the daemon, batches are decoded on a thread (tests, tools).
        self.verifier = verifier or VerifierPool(workers=1)
        self._clock = clock
        self._lock = trio.Lock()
        # Acceptance states, least recently used first (bounded: `_STATE_CACHE_STATUSES`).
        self._states: dict[CID, ProjectState] = {}
        # Record writes so far, counted on the database thread: an evaluation that a write
        # followed before it was cached is not cached (the write's records are not in it).
        self._writes = 0
        # Per project, the set of record ids that sync reconciles; built on first use, then
        # grown as records arrive, under `_sets_lock` (a walk on a worker thread reads it).
        # Taken for every batch stored, nearly always free: a `QuickLock` does not yield then.
        self._sync_sets: dict[CID, SyncSet] = {}
        self._sets_lock = QuickLock()
        # Called with every batch of newly stored records and their origin (local, import,
        # sync, gossip); the replicator publishes local records this way. A listener must not
        # block.
        self.record_listeners: list[Callable[[Sequence[SignedRecord], str], None]] = []
        # The mesh, once the daemon has started it; None in tests and tools without one.
        self.network: Network | None = None
        self._last_ts = 0
        self._started = clock()
        # Fetched block bytes stored since the last sync, and whether `serve_syncs` runs
        # (without it, records from peers and every `blocks_sync` sync at once) and has a
        # sync due.
        self._unsynced_bytes = 0
        self._defer_syncs = False
        self._sync_due = trio.Event()
        # Fetched block bytes stored since the last sync, or since `serve_syncs` last began a
        # sync of them while a fetch went on (`BLOCK_WRITEBACK_BYTES`), and its signal.
        self._unwritten_bytes = 0
        self._writeback_due = trio.Event()
        # Small public blocks answered to peers without the store (`blocks_get`).
        self._recent_blocks = RecentBlocks(
            max_bytes=RECENT_BLOCKS_BYTES, max_block=RECENT_BLOCK_MAX
        )

    # --- plumbing --------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(store, *args)` on a worker thread, one at a time, with Python's switch
        interval shortened meanwhile (`ostrom.node.gilswitch`): on a busy node the thread
        otherwise waits for the network thread to yield after each SQLite statement."""
        async with self._lock:
            with switch_interval.shortened():
                return await trio.to_thread.run_sync(fn, self.store, *args)

    async def db_brief(self, fn: Callable[..., T], *args: Any) -> T:
        """`db` for a call known to be brief: a write with no disk sync of its own (what a
        peer sent, or an upload) of a few rows or small blocks, `BRIEF_COMMIT_BYTES` at
        most. It runs on the event loop itself, unless a log is so near its checkpoint that
        this commit could start one (`Store.logs_have_room`). On a busy machine, handing a
        call to the worker thread costs more than such a call: waking the thread, then
        waiting, holding Python's lock, for the processor back (docs/BENCHMARKS.md, gossip
        step 14)."""
        async with self._lock:
            if self.store.logs_have_room():
                return fn(self.store, *args)
            with switch_interval.shortened():
                return await trio.to_thread.run_sync(fn, self.store, *args)

    async def db_read(self, fn: Callable[..., T], *args: Any) -> T:
        """`db` for a read known to be brief: a few index lookups and small blocks. It runs
        on the event loop: a read commits nothing, so it never waits on a disk sync or a
        checkpoint."""
        async with self._lock:
            return fn(self.store, *args)

    async def db_read_rows(self, rows: int, fn: Callable[..., T], *args: Any) -> T:
        """`db_read` for a read of `rows` records, up to `BRIEF_READ_RECORDS`; `db` for more."""
        if rows <= BRIEF_READ_RECORDS:
            return await self.db_read(fn, *args)
        return await self.db(fn, *args)

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
        new, _ = await self.store_new_seeing_parents(records, origin, ())
        return new

    async def store_new_seeing_parents(
        self, records: Sequence[SignedRecord], origin: str, parents: Collection[CID]
    ) -> tuple[list[CID], dict[CID, CID]]:
        """`store_new`, and the project of each of `parents` stored here once the records
        are: read in the same call to the store, for what needs both (a gossiped batch,
        whose records lacking parents are synced)."""
        by_cid = {record.cid.raw: record for record in records}
        new, projects = await self._store(
            [record_row(record) for record in records], origin, by_cid, parents
        )
        return [by_cid[raw].cid for raw in new], projects

    async def store_rows(self, rows: Sequence[RecordRow], origin: str) -> list[bytes]:
        """`store_new` for records verified in worker processes and sent back as rows
        (`ostrom.node.ingest`); returns the binary CIDs of the new ones. Listeners and
        events get the records decoded again from the rows, only if they look at them."""
        new, _ = await self._store(rows, origin, {}, ())
        return new

    async def _store(
        self,
        rows: Sequence[RecordRow],
        origin: str,
        records: dict[bytes, SignedRecord],
        parents: Collection[CID],
        first: Callable[[Store], object] | None = None,
    ) -> tuple[list[bytes], dict[CID, CID]]:
        if not rows:
            return [], {}
        # Status changes are reported against the state before these records. A cached state
        # is moved forward by them (`acceptance.advance`); a project they name that has no
        # state cached gets one first, only when someone listens.
        named = _named_projects(rows)
        if self.events.wants("status.changed"):
            for project in named:
                if project not in self._states:
                    # A project whose genesis is not here yet has no state to report from.
                    with contextlib.suppress(NotFound):
                        await self.state(project)

        durable = origin not in _PEER_ORIGINS and origin != _OWN_ORIGIN

        def write(store: Store) -> tuple[list[bytes], dict[CID, CID]]:
            if first is not None:
                first(store)
            stored = store.put_rows(rows, durable=durable)
            if stored:
                self._writes += 1
            return stored, store.record_projects(parents) if stored and parents else {}

        if origin == "gossip" and len(rows) <= BRIEF_GOSSIP_ROWS and first is None:
            new, projects = await self.db_brief(write)
        else:
            new, projects = await self.db(write)
        if not new:
            return new, projects
        if origin in _PEER_ORIGINS:
            await self._sync_soon()
        if len(new) == len(rows):  # the usual case: every row was new (and none repeated)
            fresh = rows
        else:
            new_set = set(new)
            fresh = list({row[ROW_CID]: row for row in rows if row[ROW_CID] in new_set}.values())
        stored = _StoredRecords(fresh, records)
        if self._sync_sets:
            await self._grow_sync_sets(stored, fresh)
        for listener in self.record_listeners:
            listener(stored, origin)
        if origin == _OWN_ORIGIN:
            await trio.to_thread.run_sync(self.store.sync)
        if self.events.wants("record.added"):
            for record in stored:
                self.events.publish(
                    {"type": "record.added", "origin": origin, "record": record_view(record)}
                )
        await self._advance_states(stored, fresh)
        return new, projects

    async def _advance_states(self, stored: _StoredRecords, fresh: Sequence[RecordRow]) -> None:
        """Move the cached acceptance states forward by newly stored records, publishing the
        status changes; a state that only a new evaluation can tell is evaluated again if
        someone listens for `status.changed`, dropped otherwise."""
        raws = [row[ROW_CID] for row in fresh]
        named = _named_projects(fresh)
        for project, state in list(self._states.items()):
            lacked = state.lacks_any(raws)
            if project not in named and not lacked:
                continue  # nothing here can change this project's state
            mine = [stored[i] for i, row in enumerate(fresh) if row[ROW_PROJECT] == project.raw]
            advanced = None
            if not lacked:
                targets = await self._validated(state, mine)
                if self._states.get(project) is state:  # not changed while they were read
                    advanced = advance(state, mine, targets)
            if advanced is not None:
                new, changes = advanced
                self._states[project] = new
                if self.events.wants("status.changed"):
                    for change in changes:
                        self._publish_status_change(project, change)
                continue
            self._forget_state(project)
            if self.events.wants("status.changed"):
                await self._publish_status_changes(project, state)

    async def _validated(
        self, state: ProjectState, records: Sequence[SignedRecord]
    ) -> dict[CID, SignedRecord]:
        """The records with a status in `state` that `records` validate, from the store
        (`advance` needs their author, time and parents)."""
        batch = {record.cid for record in records}
        wanted = [
            body.target
            for record in records
            if isinstance(body := record.body, Validation)
            and body.target in state.statuses
            and body.target not in batch
        ]
        if not wanted:
            return {}
        return await self.db(lambda store: store.get_records(wanted))

    def _publish_status_change(self, project: CID, change: StatusChange) -> None:
        self.events.publish(
            {
                "type": "status.changed",
                "project": str(project),
                "record": str(change.cid),
                "status": change.status,
                "was": change.was,
            }
        )

    async def _publish_status_changes(self, project: CID, old: ProjectState) -> None:
        """Publish what a new evaluation of `project` changed from `old`."""
        if not self.events.wants("status.changed"):
            return
        try:
            new = await self.state(project)
        except NotFound:
            return
        for cid, status in new.statuses.items():
            was = old.statuses.get(cid)
            if was is None or was.status != status.status:
                self._publish_status_change(
                    project, StatusChange(cid, status.status, None if was is None else was.status)
                )

    async def sign_and_store(
        self, body: Body, first: Callable[[Store], object] | None = None
    ) -> SignedRecord:
        """Sign `body` with this node's key and store it (events and status changes follow).

        `first(store)` runs in the same call to the store's thread, just before the record is
        written: what the record needs stored first (a contribution's blocks, synced to disk
        before any peer hears of the record). One hand-off instead of two before the record
        is published: on a busy machine each hand-off waits for the thread to get a
        processor. If `first` raises, nothing of the record is written."""
        record = sign(body, self.identity)
        await self._store([record_row(record)], _OWN_ORIGIN, {record.cid.raw: record}, (), first)
        return record

    # --- what a sync session needs (ostrom.node.sync.SyncHost) -----------------------------

    async def sync_index(self, project: CID) -> ReconcileIndex | None:
        """The project's record-id index, if this node follows the project or holds it."""

        def hosted(store: Store) -> bool:
            return store.follow_mode(project) is not None or store.get_record(project) is not None

        if not await self.db_read(hosted):
            return None
        async with self._sets_lock:
            found = self._sync_sets.get(project)
            if found is None or found.overflowed:

                def build(store: Store) -> SyncSet:
                    # A project's forks travel with it, so its followers see them (`ostrom
                    # forks`); what the history reaches travels too (`ostrom.protocol.syncset`).
                    forks = [
                        (f.cid.raw, b"".join(p.raw for p in f.parents))
                        for f in store.forks_of(project)
                        if project in sync_projects(f)
                    ]
                    return SyncSet.build([*store.project_links(project), *forks], store.reach)

                found = self._sync_sets[project] = await self.db(build)
        return found.index

    async def _grow_sync_sets(self, stored: _StoredRecords, rows: Sequence[RecordRow]) -> None:
        """Add newly stored records to the sync sets they belong to: a project's own
        records and its public forks' genesis, and whatever its members now reach."""
        parents: dict[bytes, bytes] = {}
        seeds: dict[bytes, list[bytes]] = {}
        for i, row in enumerate(rows):
            raw = row[ROW_CID]
            parents[raw] = row[ROW_PARENTS]
            seeds.setdefault(row[ROW_PROJECT], []).append(raw)
            fork_of = row[ROW_FORK_OF]
            # A fork's genesis, unless a private mesh keeps the fork (rare: decoded).
            if fork_of is not None and len(sync_projects(stored[i])) > 1:
                seeds.setdefault(fork_of, []).append(raw)
        async with self._sets_lock:
            for project, sync_set in list(self._sync_sets.items()):
                lookup = sync_set.admit(parents, seeds.get(project.raw, ()))
                if lookup:
                    inside = sync_set.__contains__
                    found, absent = await self.db(Store.reach, lookup, inside)
                    sync_set.extend(found, absent)

    def set_limits(self, limits: Limits) -> None:
        """Apply new limits at once: rates to transfers under way, peers to new connections
        (the mesh reads `limits.max_peers` through `Network`)."""
        self.limits = limits
        self.bandwidth.set_rates(upload_rate=limits.upload_rate, download_rate=limits.download_rate)
        if self.network is not None:
            self.network.set_max_peers(limits.max_peers)

    async def project_mesh(self, project: CID) -> CID | None:
        """The private mesh `project`'s genesis names (None: a public project); `NotFound`
        until the genesis is here. The genesis is read once per project."""
        if project not in self._project_mesh:
            genesis = await self.db_read(lambda store: store.get_record(project))
            if genesis is None or not isinstance(genesis.body, Project):
                raise NotFound(f"project {project} is not here")
            self._project_mesh[project] = genesis.body.mesh
        return self._project_mesh[project]

    async def may_serve(self, project: CID, peer_id: str) -> bool:
        """Whether `project` may be served to `peer_id`: any project to anyone, except the
        project of a private mesh, served only to the members this node knows of (none, if
        this node is not in that mesh). Until its genesis is here a project is not known to
        be private: this node can then only ask for it (a pull) and has nothing to give."""
        try:
            mesh = await self.project_mesh(project)
        except NotFound:
            return True
        return mesh is None or self.mesh_admits(mesh, peer_id)

    def mesh_admits(self, mesh: CID, peer_id: str) -> bool:
        """Whether this node knows `peer_id` as a member of `mesh` (a mesh it is in)."""
        joined = self.meshes.get(mesh)
        try:
            key = public_key_of_peer_id(peer_id)
        except (InvalidInput, DecodeError):
            return False
        return joined is not None and joined.members.admits(key)

    async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
        return await self.db_read_rows(len(cids), lambda store: store.get_record_bytes(cids))

    async def sync_prepare(self, count: int) -> None:
        if count >= PROCESS_THRESHOLD:
            await self.verifier.warm()

    async def sync_verify(self, items: Sequence[bytes]) -> Verified:
        """Decode and verify records a peer sent."""
        result = Verified()
        for item in await self.verifier.decode_rows(items):
            if isinstance(item, Refusal):
                result.refused += 1
            else:
                result.rows.append(item)
        return result

    async def sync_store(
        self, rows: Sequence[RecordRow], expected: Collection[bytes] = ()
    ) -> IngestResult:
        """Store rows verified by `sync_verify`; see `SyncHost.sync_store`."""
        result = IngestResult(stored=await self.store_rows(rows, "sync"))
        # In a catch-up nearly every parent is a record the session fetches anyway: only the
        # others are looked up.
        new = set(result.stored)
        parents = {
            parent
            for row in rows
            if row[ROW_CID] in new and (edges := row[ROW_PARENTS])
            for i in range(0, len(edges), CID_LENGTH)
            if (parent := edges[i : i + CID_LENGTH]) not in expected
        }
        if parents:
            cids = [CID(raw) for raw in parents]
            present = await self.db(lambda store: store.has_records(cids))
            result.missing_parents = parents - {cid.raw for cid in present}
        return result

    # --- what the blocks protocol needs (ostrom.node.blocks.BlockStore) --------------------

    async def blocks_get(self, cids: Sequence[CID], peer: str | None = None) -> dict[CID, bytes]:
        """The stored ones of `cids`. For a `peer`, without the blocks it may not have: those
        kept only for projects of private meshes it is not a member of (see `_withheld`).
        A peer's wants are answered from `_recent_blocks` where they can be; small public
        blocks read for a peer are kept there for the next."""
        if peer is None:
            found, _ = await self.db(_read_blocks, cids, False)
            return found
        cached = self._recent_blocks.get(cids)
        wanted = [cid for cid in cids if cid not in cached] if cached else cids
        if not wanted:
            return cached

        def read_if_small(store: Store) -> tuple[_BlocksRead | None, list[CID]]:
            sizes = store.blocks.sizes(wanted)
            if sum(sizes.values()) <= BRIEF_READ_BYTES:
                return _read_blocks(store, list(sizes), True), []
            return None, list(sizes)

        # Which blocks are here, and their size, is an index lookup made on the event loop,
        # as is the read of small ones: a peer often asks for blocks this node has not
        # fetched yet itself, and handing each such want to the worker thread cost more
        # than answering it (docs/BENCHMARKS.md, gossip step 15).
        small, large = await self.db_read(read_if_small)
        if small is None:
            small = await self.db(_read_blocks, large, True)
        found, attributed = small
        for cid in await self._withheld(attributed, peer):
            del found[cid]
        self._recent_blocks.add(
            (cid, data) for cid, data in found.items() if self._public(attributed[cid])
        )
        found.update(cached)
        return found

    async def offer_new_blocks(self, project: CID, blocks: Iterable[tuple[CID, bytes]]) -> None:
        """Blocks of a contribution this node just made to `project`: kept in memory for the
        followers about to ask for them if the project is public, so that their first wants,
        which arrive together, do not each read the store."""
        if await self.project_mesh(project) is None:
            self._recent_blocks.add(blocks)

    def _public(self, projects: Iterable[bytes]) -> bool:
        """Whether one of `projects` (a block's attributions) is known to be public: the
        block may be served to anyone, now and from now on."""
        for raw in projects:
            if raw:  # not this node's own attribution
                project = CID(raw)
                if project in self._project_mesh and self._project_mesh[project] is None:
                    return True
        return False

    async def _withheld(self, attributed: dict[CID, set[bytes]], peer: str) -> set[CID]:
        """Those of the blocks in `attributed` (with the projects each was stored for) that
        were stored for no project `peer` may be served (`may_serve`).

        A block stored for a public project, or for no project this node knows of (its own
        uploads and imports), is served to anyone; a block stored only for private meshes'
        projects, only to their members. (A block shared by a public and a private project
        is public: anyone holding the public project's records may ask for it. Work a
        public project merged from a private one is attributed to the public project too,
        by the replicator: docs/PROTOCOL.md 11.5.)
        """
        withheld: set[CID] = set()
        verdicts: dict[bytes, bool] = {}
        for cid, projects in attributed.items():
            real = [p for p in projects if p]
            if not real:
                continue
            for raw in real:
                if raw not in verdicts:
                    verdicts[raw] = await self.may_serve(CID(raw), peer)
                if verdicts[raw]:
                    break
            else:
                withheld.add(cid)
        return withheld

    async def blocks_have(self, cids: Sequence[CID]) -> set[CID]:
        return await self.db(lambda store: store.has_blocks(cids))

    def block_sink(self, project: CID, *, pinned: bool | None = None) -> BlockSink:
        """Where a fetch for `project` stores its blocks: attributed to the project, kept
        (`pinned`) or, if None, kept only when the project is followed in full."""
        return BlockSink(self, project, pinned)

    async def blocks_put(
        self,
        blocks: Sequence[tuple[CID, bytes]],
        project: CID | None = None,
        pinned: bool | None = None,
        protect_from: int | None = None,
    ) -> int:
        """Store blocks fetched from peers for `project`, within the owner's limits: room
        under the storage limit is made by evicting blocks fetched on demand, least recently
        used first (`blocks.evicted` event), never those of `protect_from` or later (the
        fetch's own). A batch that still does not fit, or that would pass the per-project
        limit, is refused whole (`QuotaExceeded`) and a `limit.reached` event says so. (The
        owner's own contributions and imports are not held to the limits: `Store.put_blocks`.)
        They reach the disk at the next `blocks_sync` (a peer can send them again; see
        `ostrom.node.blockdb`). Returns how many blocks were new."""
        limits = self.limits

        def put(store: Store) -> PutResult:
            keep = pinned
            if keep is None:
                keep = project is not None and store.follow_mode(project) == "full"
            quota = None
            if limits.storage or limits.project_storage:
                quota = Quota(
                    storage=limits.storage,
                    project_storage=limits.project_storage,
                    other_bytes=store.record_bytes() if limits.storage else 0,
                    protect_from=protect_from,
                )
            return store.blocks.put(
                blocks,
                project=b"" if project is None else project.raw,
                pinned=keep,
                quota=quota,
                durable=False,
            )

        try:
            result = await self._put_unsynced(put, blocks)
            if project is not None and self._public([project.raw]):
                self._recent_blocks.add(blocks)  # the followers this node relays to ask next
        except QuotaExceeded as exc:
            self.events.publish(
                {
                    "type": "limit.reached",
                    "limit": exc.limit,
                    "value": getattr(limits, exc.limit),
                    "project": None if project is None else str(project),
                    "message": exc.message,
                }
            )
            raise
        if result.evicted:
            self.events.publish(
                {
                    "type": "blocks.evicted",
                    "count": result.evicted,
                    "bytes": result.evicted_bytes,
                    "for": None if project is None else str(project),
                }
            )
        return result.new

    async def blocks_upload(self, blocks: Sequence[tuple[CID, bytes]]) -> int:
        """Store blocks the owner uploads (`block.put`), this node's own, ahead of the
        contribution that will name them; returns how many were new.

        Committed without a disk sync of their own: the contribution's commit syncs the block
        file's log, and so every upload before it, before it is signed; uploads that no
        contribution follows reach the disk like fetched blocks (`blocks_sync`). A small
        contribution so costs one sync of the block file, not two.
        """

        def put(store: Store) -> PutResult:
            return store.blocks.put(blocks, durable=False)

        result = await self._put_unsynced(put, blocks)
        await self.blocks_sync()
        return result.new

    async def _put_unsynced(
        self, put: Callable[[Store], PutResult], blocks: Sequence[tuple[CID, bytes]]
    ) -> PutResult:
        """Run `put`, a write of `blocks` with no disk sync of its own: on the event loop if
        they are small (`BRIEF_PUT_BYTES`), else on the worker thread. Their bytes count
        towards the next `blocks_sync`."""
        size = sum(len(data) for _, data in blocks)
        result = await (self.db_brief if size <= BRIEF_PUT_BYTES else self.db)(put)
        self._unsynced_bytes += size
        self._unwritten_bytes += size
        if self._defer_syncs:
            # On disk within `SYNC_DELAY_S` however long the fetch goes on, and every
            # `BLOCK_WRITEBACK_BYTES` if it brings them faster.
            self._sync_due.set()
            if self._unwritten_bytes >= BLOCK_WRITEBACK_BYTES:
                self._unwritten_bytes = 0
                self._writeback_due.set()
        return result

    async def blocks_sync(self, fetched: int = 0) -> None:
        """Put the fetched blocks stored so far on disk (`BlockDB.sync`): at once when
        `BLOCK_SYNC_NOW_BYTES` or more wait, or the fetch that ends stored that much
        (`fetched`: a slow one's blocks may have been synced as it went, all but the last),
        else within `SYNC_DELAY_S` (by `serve_syncs`, if it runs). Not under the store's
        lock: the block file syncs on a connection of its own while fetches go on storing,
        and the copy it makes holds up no other call."""
        if max(fetched, self._unsynced_bytes) < BLOCK_SYNC_NOW_BYTES:
            await self._sync_soon()
        else:
            await self._sync_files()

    async def _sync_soon(self) -> None:
        """Sync within `SYNC_DELAY_S` if `serve_syncs` runs, else now."""
        if self._defer_syncs:
            self._sync_due.set()
        else:
            await self._sync_files()

    async def _sync_files(self) -> None:
        """Sync both files' logs: records from peers and fetched blocks."""
        # What is stored during the sync counts towards the next.
        self._unsynced_bytes = self._unwritten_bytes = 0

        def sync() -> None:
            self.store.sync()
            self.store.blocks.sync()

        await trio.to_thread.run_sync(sync)

    async def serve_syncs(
        self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sync records from peers and fetched blocks `SYNC_DELAY_S` after the first asks:
        the gossip of a busy project, and its contributions' fetches, share one sync of each
        file, and a long fetch's blocks are synced every few seconds as it goes. And while a
        large fetch stores its blocks fast, sync the block file's log every
        `BLOCK_WRITEBACK_BYTES` too, so that its end waits for the disk only for the last of
        them."""

        async def deferred() -> None:
            while True:
                await self._sync_due.wait()
                await trio.sleep(SYNC_DELAY_S)
                self._sync_due = trio.Event()
                await self._sync_files()

        async def writeback() -> None:
            while True:
                await self._writeback_due.wait()
                self._writeback_due = trio.Event()
                # Blocks only, on a thread of its own: the fetch goes on storing meanwhile.
                await trio.to_thread.run_sync(self.store.blocks.sync)

        self._defer_syncs = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deferred)
                nursery.start_soon(writeback)
                task_status.started()
        finally:
            self._defer_syncs = False

    async def serve_checkpoints(
        self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Copy the record log into the database whenever it is due (`Store.checkpoint_log`),
        every `CHECKPOINT_POLL_S`, on a worker thread and without the store's lock: store
        calls go on meanwhile, and no commit of theirs has to make the copy."""
        task_status.started()
        while True:
            await trio.sleep(CHECKPOINT_POLL_S)
            if self.store.log_checkpoint_due():
                await trio.to_thread.run_sync(self.store.checkpoint_log)

    async def follow(self, project: CID, mode: str) -> None:
        since = int(self._clock() * 1000)

        def follow(store: Store) -> None:
            was = store.follow_mode(project)
            store.follow(project, mode, since)
            if was == "full" and mode != "full":
                # No longer kept in full: its completion pins again what a records-only
                # follow keeps (changesets and manifests); file blocks may be evicted.
                store.blocks.unpin_project(project.raw)

        await self.db(follow)
        if self.network is not None:
            await self.network.follow(project)
        self.events.publish({"type": "follow.changed", "project": str(project), "mode": mode})

    async def unfollow(self, project: CID) -> bool:
        def unfollow(store: Store) -> bool:
            removed = store.unfollow(project)
            if removed:
                store.blocks.unpin_project(project.raw)
            return removed

        removed: bool = await self.db(unfollow)
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
        cached = self._states.pop(project, None)
        if cached is not None:
            self._states[project] = cached  # now the most recently used
            return cached

        def compute(store: Store) -> tuple[ProjectState, int]:
            genesis = store.get_record(project)
            if genesis is None or not isinstance(genesis.body, Project):
                raise NotFound(f"no project {project}")
            return evaluate(genesis, store.project_history(project).values()), self._writes

        state, writes = await self.db(compute)
        if writes != self._writes:
            # Records were stored after this evaluation read the project; the states they
            # moved forward did not include this one, so it is not kept.
            return state
        self._forget_state(project)
        self._states[project] = state
        held = sum(len(s.statuses) for s in self._states.values())
        while held > _STATE_CACHE_STATUSES and len(self._states) > 1:
            oldest = next(iter(self._states))
            held -= len(self._states[oldest].statuses)
            self._forget_state(oldest)
        return state

    def _forget_state(self, project: CID) -> None:
        self._states.pop(project, None)

    async def resolve_project(self, text: str) -> SignedRecord:
        """A project named by full CID, unique CID prefix, or unique name.

        A project named by its full CID is looked up in the store once: records are never
        removed, so its genesis stays what it was (a prefix or a name may come to mean
        another project, or several, as projects arrive)."""
        known = self._projects_by_cid.get(text)
        if known is not None:
            return known

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

        found = await self.db(find)
        if str(found.cid) == text:
            if len(self._projects_by_cid) >= KNOWN_PROJECTS:
                del self._projects_by_cid[next(iter(self._projects_by_cid))]
            self._projects_by_cid[text] = found
        return found

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


class BlockSink:
    """The blocks protocol's store for one fetch (`ostrom.node.blocks.BlockStore`): what it
    stores is attributed to one project, and the limits may evict older blocks to make room
    for it but never the blocks this fetch stored itself."""

    def __init__(self, service: NodeService, project: CID, pinned: bool | None) -> None:
        self._service = service
        self._project = project
        self._pinned = pinned
        # Blocks used from now on are this fetch's (or read during it): not evicted for it.
        self._since = service.store.blocks.tick + 1

    async def blocks_get(self, cids: Sequence[CID], peer: str | None = None) -> dict[CID, bytes]:
        return await self._service.blocks_get(cids, peer)

    async def blocks_have(self, cids: Sequence[CID]) -> set[CID]:
        return await self._service.blocks_have(cids)

    async def blocks_put(self, blocks: Sequence[tuple[CID, bytes]]) -> int:
        return await self._service.blocks_put(blocks, self._project, self._pinned, self._since)

    async def blocks_sync(self, fetched: int) -> None:
        await self._service.blocks_sync(fetched)
