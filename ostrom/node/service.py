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
from typing import Any, TypeVar

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
from ostrom.node.verifier import VerifierPool
from ostrom.node.views import key_view, record_view, status_view
from ostrom.protocol.acceptance import ProjectState, evaluate
from ostrom.protocol.changesets import (
    Changeset,
)
from ostrom.protocol.records import (
    Body,
    Project,
    SignedRecord,
    sign,
)
from ostrom.protocol.tree import Tree, replay

log = logging.getLogger(__name__)

T = TypeVar("T")


def _trusted_changeset(store: Store, cid: CID) -> Changeset:
    data = store.get_block(cid)
    if data is None:
        raise NotFound(f"changeset {cid} is not in the store")
    return Changeset.decode(data)


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

    async def _store_new(self, records: Sequence[SignedRecord], origin: str) -> list[CID]:
        if not records:
            return []
        projects = {record.project for record in records}
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
        # A record can complete the ancestry of any project (a missing parent arriving), so
        # imported records drop every cached state; local ones only their project's.
        if origin == "local":
            for project in projects:
                self._states.pop(project, None)
        else:
            self._states.clear()
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
        await self._store_new([record], "local")
        return record

    async def follow(self, project: CID, mode: str) -> None:
        since = int(self._clock() * 1000)
        await self.db(lambda store: store.follow(project, mode, since))
        self.events.publish({"type": "follow.changed", "project": str(project), "mode": mode})

    async def unfollow(self, project: CID) -> bool:
        removed: bool = await self.db(lambda store: store.unfollow(project))
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
            records = store.project_records(project)
            edges = {parent for record in records for parent in record.parents}
            edges.update(genesis.parents)
            ancestors = store.ancestors(edges)
            return evaluate(genesis, [*records, *ancestors.values()])

        state = await self.db(compute)
        self._states[project] = state
        return state

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
