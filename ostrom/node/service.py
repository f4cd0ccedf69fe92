"""The node's RPC methods: what a participant does with their own replica.

`NodeService` turns calls (`project.create`, `contribution.create`, ...) into signed records
in the store, and answers questions about projects (log, tree, forks, needs) from the
acceptance rule and tree replay of `ostrom.protocol`. The store is used from worker threads
under one lock, so the event loop never waits on SQLite or on replaying a large project.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import trio

from ostrom import __version__
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity, parse_public_key, peer_id_of
from ostrom.datadir import DataDir
from ostrom.errors import (
    DecodeError,
    InvalidInput,
    InvalidRecord,
    MethodNotFound,
    NotFound,
    Refused,
    TooLarge,
)
from ostrom.node.events import EventBus
from ostrom.node.ingest import Block, Refusal
from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection
from ostrom.node.store import Store
from ostrom.node.verifier import VerifierPool
from ostrom.node.views import key_view, record_view, status_view
from ostrom.protocol.acceptance import ProjectState, evaluate
from ostrom.protocol.changesets import (
    MAX_BLOCK_SIZE,
    Change,
    Changeset,
    Delete,
    FileManifest,
    Put,
    split_changes,
)
from ostrom.protocol.records import (
    Body,
    Comment,
    Contribution,
    ForkOf,
    Governance,
    Need,
    Policy,
    Project,
    SignedRecord,
    Validation,
    check_license_known,
    sign,
)
from ostrom.protocol.tree import Tree, replay

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes of blocks one `block.get` or `content.get` answer may carry: well under the RPC
# frame limit, large enough that a checkout moves tens of blocks per round trip.
MAX_GET_BYTES: Final = 8 * 1024 * 1024
# Records one `record.put` / `car.import` call may carry: a batch big enough to keep both
# verification threads busy, small enough to answer within a second on a Raspberry Pi.
MAX_IMPORT_BATCH: Final = 4096
# Deepest fork lineage `project.forks` walks; a longer chain is cut, not followed forever.
MAX_FORK_DEPTH: Final = 64
# Most log entries one `project.log` answer carries unless the caller asks for fewer.
DEFAULT_LOG_LIMIT: Final = 1000
_DAG_TYPES: Final = ("contribution", "governance")

Handler = Callable[["NodeService", Params, RpcConnection], Awaitable[Any]]
METHODS: dict[str, Handler] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        METHODS[name] = fn
        return fn

    return register


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

    async def handle(self, name: str, params: list[Any], connection: RpcConnection) -> Any:
        handler = METHODS.get(name)
        if handler is None:
            raise MethodNotFound(f"no method {name!r} (see docs/RPC.md)")
        return await handler(self, Params(name, params), connection)

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

    async def _sign_and_store(self, body: Body) -> SignedRecord:
        record = sign(body, self.identity)
        await self._store_new([record], "local")
        return record

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


# --- node --------------------------------------------------------------------------------------


@method("node.id")
async def node_id(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    return {"peer_id": node.identity.peer_id, "public_key": node.identity.public_key.hex()}


@method("node.status")
async def node_status(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    stats = await node.db(lambda store: store.stats())
    return {
        "version": __version__,
        "peer_id": node.identity.peer_id,
        "public_key": node.identity.public_key.hex(),
        "data_dir": str(node.data_dir.root),
        "pid": os.getpid(),
        "uptime_s": round(time.time() - node._started, 3),
        "store": {
            "projects": stats.projects,
            "records": stats.records,
            "records_by_type": dict(stats.records_by_type),
            "blocks": stats.blocks,
            "block_bytes": stats.block_bytes,
            "db_bytes": stats.db_bytes,
        },
        "subscribers": node.events.subscriber_count,
    }


# --- projects ----------------------------------------------------------------------------------


async def _check_name_free(node: NodeService, name: str) -> None:
    existing = await node.db(lambda store: store.projects_named(name))
    if existing:
        raise Refused(
            f"a project named {name!r} already exists here ({existing[0].cid}); choose another name"
        )


@method("project.create")
async def project_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    name = params.text("name").strip()
    license_expr = params.text("license")
    description = params.text("description", "")
    quorum = params.integer("quorum", 1, minimum=1, maximum=256)
    extra = [parse_public_key(key) for key in params.texts("maintainers", [])]
    params.done()
    license_normal = check_license_known(license_expr)
    maintainers = tuple(sorted({node.identity.public_key, *extra}))
    if quorum > len(maintainers):
        raise Refused(
            f"quorum {quorum} needs at least {quorum} maintainers; this project would have "
            f"{len(maintainers)} (add some with --maintainer)"
        )
    await _check_name_free(node, name)
    try:
        body = Project(
            author=node.identity.public_key,
            ts=node._now(),
            name=name,
            license=license_normal,
            description=description,
            policy=Policy(maintainers=maintainers, quorum=quorum),
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    record = await node._sign_and_store(body)
    node.events.publish({"type": "project.created", "project": str(record.cid), "name": name})
    return await node.project_view(record)


@method("project.list")
async def project_list(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    params.done()
    projects = await node.db(lambda store: store.projects())
    return [await node.project_view(genesis) for genesis in projects]


@method("project.show")
async def project_show(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)
    return await node.project_view(genesis, detail=True)


@method("project.fork")
async def project_fork(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    parent_text = params.text("project")
    name = params.text("name").strip()
    at = params.texts("at", [])
    description = params.text("description", None)
    params.done()
    parent = await node.resolve_project(parent_text)
    assert isinstance(parent.body, Project)
    if at:
        heads_list = []
        for text in at:
            record = await node.resolve_record(text, ("project", *_DAG_TYPES))
            heads_list.append(record.cid)
        heads = tuple(sorted(set(heads_list)))
    else:
        heads = (await node.state(parent.cid)).accepted_heads
    await _check_name_free(node, name)
    try:
        body = Project(
            author=node.identity.public_key,
            ts=node._now(),
            name=name,
            license=parent.body.license,
            description=parent.body.description if description is None else description,
            policy=Policy(maintainers=(node.identity.public_key,), quorum=1),
            fork_of=ForkOf(project=parent.cid, heads=heads),
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    record = await node._sign_and_store(body)
    node.events.publish(
        {
            "type": "project.created",
            "project": str(record.cid),
            "name": name,
            "fork_of": str(parent.cid),
        }
    )
    return await node.project_view(record)


@method("project.forks")
async def project_forks(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)

    def lineage(store: Store) -> dict[str, Any]:
        upstream: list[dict[str, Any]] = []
        current = genesis
        seen = {genesis.cid}
        while isinstance(current.body, Project) and current.body.fork_of is not None:
            parent_cid = current.body.fork_of.project
            if parent_cid in seen or len(upstream) >= MAX_FORK_DEPTH:
                break
            seen.add(parent_cid)
            parent = store.get_record(parent_cid)
            entry: dict[str, Any] = {
                "project": str(parent_cid),
                "at": [str(cid) for cid in current.body.fork_of.heads],
                "present": parent is not None,
            }
            if parent is None or not isinstance(parent.body, Project):
                upstream.append(entry)
                break
            entry["name"] = parent.body.name
            upstream.append(entry)
            current = parent

        def down(project: SignedRecord, depth: int) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            if depth >= MAX_FORK_DEPTH:
                return out
            for fork in store.forks_of(project.cid):
                if fork.cid in seen:
                    continue
                seen.add(fork.cid)
                assert isinstance(fork.body, Project) and fork.body.fork_of is not None
                out.append(
                    {
                        "project": str(fork.cid),
                        "name": fork.body.name,
                        "author_peer_id": peer_id_of(fork.author),
                        "ts": fork.ts,
                        "at": [str(cid) for cid in fork.body.fork_of.heads],
                        "forks": down(fork, depth + 1),
                    }
                )
            return out

        assert isinstance(genesis.body, Project)
        return {
            "project": str(genesis.cid),
            "name": genesis.body.name,
            "upstream": upstream,
            "forks": down(genesis, 0),
        }

    return await node.db(lineage)


# --- blocks ------------------------------------------------------------------------------------


def _blocks_param(params: Params) -> list[tuple[CID, bytes]]:
    raw = params.array("blocks", max_length=4096)
    out: list[tuple[CID, bytes]] = []
    total = 0
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], bytes)
        ):
            raise InvalidInput("block.put: each block is [cid, bytes]")
        try:
            cid = CID.parse(item[0])
        except DecodeError as exc:
            raise InvalidInput(f"block.put: {exc.message}") from None
        total += len(item[1])
        out.append((cid, item[1]))
    if total > 64 * MAX_BLOCK_SIZE:
        raise TooLarge("block.put: too many bytes in one call")
    return out


@method("block.put")
async def block_put(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    blocks = _blocks_param(params)
    params.done()
    stored = await node.db(lambda store: store.put_blocks(blocks))
    return {"stored": stored, "received": len(blocks)}


@method("block.missing")
async def block_missing(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    cids = params.cids("cids")
    params.done()
    present = await node.db(lambda store: store.has_blocks(cids))
    return [str(cid) for cid in cids if cid not in present]


@method("block.get")
async def block_get(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    cids = params.cids("cids")
    params.done()

    def read(store: Store) -> list[list[Any]]:
        out: list[list[Any]] = []
        total = 0
        for cid in cids:
            data = store.get_block(cid)
            if data is None:
                raise NotFound(f"block {cid} is not in the store")
            total += len(data)
            if out and total > MAX_GET_BYTES:
                break
            out.append([str(cid), data])
        return out

    return await node.db(read)


# --- contributions -----------------------------------------------------------------------------


def _changes_param(params: Params) -> list[Change]:
    changes: list[Change] = []
    for item in params.array("changes", []):
        if not isinstance(item, dict):
            raise InvalidInput("contribution.create: each change is a map")
        op = item.get("op")
        try:
            if op == "put" and set(item) <= {"op", "path", "file", "size", "exec"}:
                file = CID.parse(str(item.get("file")))
                changes.append(
                    Put(
                        path=item["path"],
                        file=file,
                        size=item["size"],
                        exec=bool(item.get("exec", False)),
                    )
                )
            elif op == "delete" and set(item) == {"op", "path"}:
                changes.append(Delete(path=item["path"]))
            else:
                raise InvalidInput(f"contribution.create: not a change: {sorted(item)}")
        except (InvalidRecord, DecodeError) as exc:
            raise InvalidInput(f"contribution.create: {exc.message}") from None
        except KeyError as exc:
            raise InvalidInput(f"contribution.create: a change lacks {exc}") from None
    return changes


def _check_puts(store: Store, puts: list[Put]) -> None:
    """Every put's manifest is stored, decodes, has the declared size, and its blocks are here."""
    for put in puts:
        data = store.get_block(put.file)
        if data is None:
            raise NotFound(f"{put.path}: manifest {put.file} was not uploaded (block.put first)")
        manifest = FileManifest.decode(data)
        if manifest.size != put.size:
            raise InvalidInput(f"{put.path}: size {put.size} but its manifest says {manifest.size}")
        blocks = [ref.cid for ref in manifest.blocks]
        present = store.has_blocks(blocks)
        missing = [cid for cid in blocks if cid not in present]
        if missing:
            raise NotFound(f"{put.path}: {len(missing)} block(s) not uploaded, e.g. {missing[0]}")


async def _resolve_many(
    node: NodeService, texts: Iterable[str], types: Sequence[str]
) -> tuple[CID, ...]:
    out = []
    for text in texts:
        out.append((await node.resolve_record(text, types)).cid)
    return tuple(sorted(set(out)))


@method("contribution.create")
async def contribution_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    project_text = params.text("project")
    changes = _changes_param(params)
    message = params.text("message")
    resolves_text = params.texts("resolves", [])
    parents_text = params.texts("parents", [])
    params.done()
    if not message.strip():
        raise InvalidInput("a contribution needs a message (-m)")
    genesis = await node.resolve_project(project_text)
    project = genesis.cid
    resolves = await _resolve_many(node, resolves_text, ("need",))
    if parents_text:
        parents = await _resolve_many(node, parents_text, ("project", *_DAG_TYPES))
    else:
        parents = await node.default_parents(project)
    try:
        changesets = split_changes(changes)
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    puts = [c for c in changes if isinstance(c, Put)]
    await node.db(_check_puts, puts)
    deletes = [c.path for c in changes if isinstance(c, Delete)]
    if deletes:
        tree = await node.tree(parents)
        absent = [path for path in deletes if path not in tree.files]
        if absent:
            raise InvalidInput(f"cannot delete, not in the tree: {', '.join(absent[:5])}")
    if not changes and len(parents) < 2:
        raise InvalidInput("a contribution changes at least one path (or merges several heads)")
    encoded = [
        (CID.of_dag_cbor(data), data) for data in (cs.encode() for cs in changesets if cs.changes)
    ]
    await node.db(lambda store: store.put_blocks(encoded))
    try:
        body = Contribution(
            author=node.identity.public_key,
            ts=node._now(),
            project=project,
            parents=parents,
            changes=tuple(cid for cid, _ in encoded),
            message=message,
            resolves=resolves,
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    record = await node._sign_and_store(body)
    view = record_view(record)
    state = await node.state(project)
    status = state.statuses.get(record.cid)
    if status is not None:
        view.update(status_view(status))
    view["paths"] = len(changes)
    return view


# --- reading a project's history ---------------------------------------------------------------


async def _changes_of(node: NodeService, record: SignedRecord) -> list[dict[str, Any]]:
    if not isinstance(record.body, Contribution):
        return []
    links = record.body.changes

    def read(store: Store) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for link in links:
            data = store.get_block(link)
            if data is None:
                continue
            for change in Changeset.decode(data).changes:
                if isinstance(change, Put):
                    out.append(
                        {
                            "op": "put",
                            "path": change.path,
                            "size": change.size,
                            "file": str(change.file),
                            "exec": change.exec,
                        }
                    )
                else:
                    out.append({"op": "delete", "path": change.path})
        return out

    return await node.db(read)


@method("project.log")
async def project_log(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    limit = params.integer("limit", DEFAULT_LOG_LIMIT, minimum=1, maximum=1_000_000)
    params.done()
    genesis = await node.resolve_project(text)
    state = await node.state(genesis.cid)

    def read(store: Store) -> list[dict[str, Any]]:
        records = store.project_records(genesis.cid, (*_DAG_TYPES, "validation", "comment"))
        dag = [r for r in records if r.type in _DAG_TYPES]
        by_target: dict[CID, list[SignedRecord]] = {}
        comments: dict[CID, int] = {}
        for r in records:
            if isinstance(r.body, Validation):
                by_target.setdefault(r.body.target, []).append(r)
            elif isinstance(r.body, Comment):
                comments[r.body.target] = comments.get(r.body.target, 0) + 1
        dag.sort(key=lambda r: (r.ts, r.cid.raw), reverse=True)
        out = []
        for record in [*dag[:limit], genesis][: limit + 1]:
            view = record_view(record)
            status = state.statuses.get(record.cid)
            if status is not None:
                view.update(status_view(status))
            counted = {v.validation for v in (status.votes if status else ()) if v.validation}
            view["validations"] = [
                {**record_view(v), "counted": v.cid in counted}
                for v in sorted(by_target.get(record.cid, []), key=lambda r: (r.ts, r.cid.raw))
            ]
            view["comments"] = comments.get(record.cid, 0)
            out.append(view)
        return out

    return await node.db(read)


@method("record.show")
async def record_show(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("record")
    params.done()
    record = await node.resolve_record(text)
    view = record_view(record)
    try:
        state = await node.state(record.project)
    except NotFound:
        state = None
    if state is not None and record.cid in state.statuses:
        view.update(status_view(state.statuses[record.cid]))
    related = await node.db(lambda store: store.records_by_target(record.cid))
    view["validations"] = [record_view(r) for r in related if r.type == "validation"]
    view["comments"] = [record_view(r) for r in related if r.type == "comment"]
    view["changes"] = await _changes_of(node, record)
    return view


@method("project.tree")
async def project_tree(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    at_text = params.text("at", None)
    params.done()
    genesis = await node.resolve_project(text)
    if at_text is not None:
        heads: tuple[CID, ...] = (
            (await node.resolve_record(at_text, ("project", *_DAG_TYPES))).cid,
        )
    else:
        heads = (await node.state(genesis.cid)).accepted_heads
    tree = await node.tree(heads)
    return {
        "project": str(genesis.cid),
        "heads": [str(cid) for cid in heads],
        "files": [
            {
                "path": entry.path,
                "size": entry.size,
                "file": str(entry.file),
                "exec": entry.exec,
                "record": str(entry.record),
            }
            for entry in tree.files.values()
        ],
        "conflicts": [
            {
                "path": c.path,
                "candidates": [str(cid) for cid in c.candidates],
                "chosen": str(c.chosen),
            }
            for c in tree.conflicts
        ],
    }


# --- validations, governance, needs, comments --------------------------------------------------


@method("validation.create")
async def validation_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    target_text = params.text("target")
    verdict = params.text("verdict")
    note = params.text("note", "")
    project_text = params.text("project", None)
    params.done()
    if verdict not in ("accept", "reject"):
        raise InvalidInput("verdict must be accept or reject")
    target = await node.resolve_record(target_text)
    if target.type not in _DAG_TYPES:
        raise Refused(
            f"only contributions and governance records are validated, not a {target.type}"
        )
    project = (await node.resolve_project(project_text)).cid if project_text else target.project
    try:
        body = Validation(
            author=node.identity.public_key,
            ts=node._now(),
            project=project,
            target=target.cid,
            verdict=verdict,
            note=note,
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    record = await node._sign_and_store(body)
    view = record_view(record)
    state = await node.state(project)
    status = state.statuses.get(target.cid)
    if status is not None:
        view["target_status"] = status_view(status)
        if node.identity.public_key not in state.policy.maintainers:
            view["warning"] = (
                "you are not a maintainer of this project: your verdict is not counted"
            )
    return view


@method("governance.create")
async def governance_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    action = params.text("action")
    key_text = params.text("key", None)
    quorum = params.integer("quorum", None, minimum=1, maximum=256)
    note = params.text("note", "")
    params.done()
    genesis = await node.resolve_project(text)
    state = await node.state(genesis.cid)
    policy = state.policy
    key = parse_public_key(key_text) if key_text is not None else None
    if action in ("add-maintainer", "remove-maintainer") and (key is None or quorum is not None):
        raise InvalidInput(f"{action} takes a key (hex or peer id) and no quorum")
    if action == "set-quorum" and (quorum is None or key is not None):
        raise InvalidInput("set-quorum takes a quorum and no key")
    if action == "add-maintainer" and key in policy.maintainers:
        raise Refused(f"{peer_id_of(key)} is already a maintainer")
    if action == "remove-maintainer":
        assert key is not None
        if key not in policy.maintainers:
            raise Refused(f"{peer_id_of(key)} is not a maintainer")
        if len(policy.maintainers) - 1 < policy.quorum:
            raise Refused(
                f"removing a maintainer would leave {len(policy.maintainers) - 1} for a quorum of "
                f"{policy.quorum}: lower the quorum first"
            )
    if action == "set-quorum":
        assert quorum is not None
        if quorum > len(policy.maintainers):
            raise Refused(
                f"quorum {quorum} is more than the {len(policy.maintainers)} maintainer(s): "
                "no contribution could ever be accepted"
            )
    parents = await node.default_parents(genesis.cid)
    try:
        body = Governance(
            author=node.identity.public_key,
            ts=node._now(),
            project=genesis.cid,
            parents=parents,
            action=action,
            key=key,
            quorum=quorum,
            note=note,
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    record = await node._sign_and_store(body)
    view = record_view(record)
    status = (await node.state(genesis.cid)).statuses.get(record.cid)
    if status is not None:
        view.update(status_view(status))
    return view


@method("need.create")
async def need_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    title = params.text("title")
    body_text = params.text("body", "")
    params.done()
    genesis = await node.resolve_project(text)
    try:
        body = Need(
            author=node.identity.public_key,
            ts=node._now(),
            project=genesis.cid,
            title=title.strip(),
            body=body_text,
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    return record_view(await node._sign_and_store(body))


@method("need.list")
async def need_list(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)
    state = await node.state(genesis.cid)

    def read(store: Store) -> list[dict[str, Any]]:
        records = store.project_records(genesis.cid, ("need", "contribution"))
        resolved_by: dict[CID, list[tuple[CID, str]]] = {}
        for r in records:
            if isinstance(r.body, Contribution):
                status = state.statuses.get(r.cid)
                for need in r.body.resolves:
                    resolved_by.setdefault(need, []).append(
                        (r.cid, status.status if status else "pending")
                    )
        out = []
        for r in sorted((r for r in records if r.type == "need"), key=lambda r: (r.ts, r.cid.raw)):
            claims = resolved_by.get(r.cid, [])
            view = record_view(r)
            view["status"] = "resolved" if any(s == "accepted" for _, s in claims) else "open"
            view["resolved_by"] = [{"record": str(cid), "status": s} for cid, s in claims]
            out.append(view)
        return out

    return await node.db(read)


@method("comment.create")
async def comment_create(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    target_text = params.text("target")
    text = params.text("text")
    params.done()
    target = await node.resolve_record(target_text)
    try:
        body = Comment(
            author=node.identity.public_key,
            ts=node._now(),
            project=target.project,
            target=target.cid,
            text=text,
        )
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
    return record_view(await node._sign_and_store(body))


# --- import and export -------------------------------------------------------------------------


@method("record.put")
async def record_put(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Take in records signed by anyone: each is verified; bad ones are refused with a reason."""
    items = params.array("records", max_length=MAX_IMPORT_BATCH)
    params.done()
    if not all(isinstance(item, bytes) for item in items):
        raise InvalidInput("record.put: records are byte strings")
    return await _ingest(node, items)


async def _ingest(node: NodeService, items: Sequence[bytes]) -> dict[str, Any]:
    decoded = await node.verifier.decode_records(items)
    good = [item for item in decoded if isinstance(item, SignedRecord)]
    refused = [item for item in decoded if isinstance(item, Refusal)]
    new = await node._store_new(good, "import")
    return {
        "stored": [str(cid) for cid in new],
        "known": len(good) - len(new),
        "refused": [{"index": r.index, "code": r.code, "message": r.message} for r in refused],
    }


@method("car.import")
async def car_import(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Sections of a CAR file: records are verified and stored, blocks checked against CIDs.

    Each bad section is refused with its reason; every good one is kept.
    """
    sections = params.array("sections", max_length=MAX_IMPORT_BATCH)
    params.done()
    if not all(isinstance(item, list) and len(item) == 2 for item in sections):
        raise InvalidInput("car.import: each section is [cid, bytes]")
    decoded = await node.verifier.decode_sections(sections)
    records = [item for item in decoded if isinstance(item, SignedRecord)]
    blocks = [(item.cid, item.data) for item in decoded if isinstance(item, Block)]
    refused = [item for item in decoded if isinstance(item, Refusal)]
    stored_blocks = await node.db(lambda store: store.put_blocks(blocks)) if blocks else 0
    new = await node._store_new(records, "import")
    return {
        "stored": [str(cid) for cid in new],
        "known": len(records) - len(new),
        "blocks_stored": stored_blocks,
        "blocks_known": len(blocks) - stored_blocks,
        "refused": [
            {
                "index": r.index,
                "cid": None if r.cid is None else str(r.cid),
                "code": r.code,
                "message": r.message,
            }
            for r in refused
        ],
    }


@method("car.export")
async def car_export(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """What a CAR file of a project holds, in order: the client fetches and writes it."""
    text = params.text("project")
    params.done()
    genesis = await node.resolve_project(text)

    def plan(store: Store) -> dict[str, Any]:
        own = store.project_records(genesis.cid)
        edges = {parent for record in own for parent in record.parents} | set(genesis.parents)
        ancestors = store.ancestors(edges)
        records: dict[CID, SignedRecord] = {r.cid: r for r in ancestors.values()}
        records.update((r.cid, r) for r in own)
        # Upstream genesis records, so a fork's lineage can be shown after import.
        current = genesis
        for _ in range(MAX_FORK_DEPTH):
            if not isinstance(current.body, Project) or current.body.fork_of is None:
                break
            parent = store.get_record(current.body.fork_of.project)
            if parent is None:
                break
            records[parent.cid] = parent
            current = parent
        ordered = sorted(records.values(), key=lambda r: (r.type != "project", r.ts, r.cid.raw))
        blocks: list[CID] = []
        seen: set[CID] = set()
        for record in ordered:
            if not isinstance(record.body, Contribution):
                continue
            for link in record.body.changes:
                data = store.get_block(link)
                if data is None or link in seen:
                    continue
                seen.add(link)
                blocks.append(link)
                for change in Changeset.decode(data).changes:
                    if not isinstance(change, Put) or change.file in seen:
                        continue
                    manifest_data = store.get_block(change.file)
                    if manifest_data is None:
                        continue
                    seen.add(change.file)
                    blocks.append(change.file)
                    for ref in FileManifest.decode(manifest_data).blocks:
                        if ref.cid not in seen:
                            seen.add(ref.cid)
                            blocks.append(ref.cid)
        present = store.has_blocks(blocks)
        return {
            "roots": [str(genesis.cid)],
            "records": [str(r.cid) for r in ordered],
            "blocks": [str(cid) for cid in blocks if cid in present],
        }

    return await node.db(plan)


@method("record.get")
async def record_get(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    cids = params.cids("cids")
    params.done()

    def read(store: Store) -> list[list[Any]]:
        found = store.get_records(cids)
        out: list[list[Any]] = []
        total = 0
        for cid in cids:
            record = found.get(cid)
            if record is None:
                raise NotFound(f"record {cid} is not in the store")
            total += len(record.data)
            if out and total > MAX_GET_BYTES:
                break
            out.append([str(cid), record.data])
        return out

    return await node.db(read)


# --- events ------------------------------------------------------------------------------------


@method("events.subscribe")
async def events_subscribe(node: NodeService, params: Params, conn: RpcConnection) -> Any:
    """Stream events as `[2, "event", [event]]` notifications on this connection."""
    params.done()
    subscription = node.events.subscribe()
    conn.on_close(subscription.close)

    async def forward() -> None:
        async for event in subscription:
            await conn.notify("event", [event])

    conn.start_soon(forward)
    return {"subscribed": True}
