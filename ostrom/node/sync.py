"""`/ostrom/sync/1.0.0`: bringing two replicas of a project's records into step.

One session covers one project. The initiator names it; both sides reconcile their sets of
the project's record ids (`ostrom.protocol.reconcile`, whose cost grows with the difference,
not with the size of the sets). A project's set holds its records and everything their
history reaches in other projects (`ostrom.protocol.syncset`), so a fork's upstream history
comes with it, however deep. Then the initiator pulls what it lacks and pushes what the
responder lacks, and pulls the missing parents of what it received that its peer holds
outside its set, for a bounded number of rounds. A node runs a session as initiator with
each peer it shares a project with, on connect and periodically, so each side pulls for
itself.

    initiator                                 responder
    hello {project, v}                   ->
                                         <-   welcome {} | refuse {reason}
    rec {m} ...                          <->  rec {m} ... | rec-end {}
    want {cids} / records {items} ...    ->
                                         <-   records {items} (answers to wants, in order)
    done {}                              ->
                                         <-   done {}

Everything a peer controls is bounded: frame size, CIDs per want, records per frame, rounds
of reconciliation and of ancestor chasing, and the time it may stay silent. A responder
answers only for records it has; an initiator keeps only records it asked for, and a
responder only pushed records it learned it lacks or that belong to the project. Records
that fail verification, and ids a peer offered and then says it lacks, are strikes against
the peer.

The initiator pulls as a pipeline of three stages joined by bounded channels, so that on a
catch-up the network, the verification workers and the store all stay busy: one task reads
answers, each answer is verified as soon as it is read (in worker processes, several answers
queued at once), and one task stores the verified answers in the order they arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError, OstromError, Refused
from ostrom.node.framed import IDLE_TIMEOUT_S, ByteStream, FramedStream
from ostrom.node.ingest import ROW_CID, ROW_FORK_OF, ROW_PROJECT, RecordRow
from ostrom.protocol.reconcile import ReconcileIndex, Reconciler, decode_message, encode_message

log = logging.getLogger(__name__)

PROTOCOL: Final = "/ostrom/sync/1.0.0"
VERSION: Final = 1
# One frame holds a reconciliation message (at most 64 KiB) or a batch of records: a full
# 64 KiB record always fits, with room for the map around it.
MAX_FRAME: Final = 1024 * 1024 + 4096
# Bytes of records per `records` frame before a new frame starts.
RECORDS_FRAME_BYTES: Final = 1024 * 1024
# CIDs per `want` frame: 36 KiB of ids, answered by at most a few frames of records.
MAX_WANT: Final = 1024
# Wants sent ahead of their answers: the responder always has the next want to answer while
# this side verifies and stores earlier answers; each is bounded by MAX_WANT records.
WANTS_IN_FLIGHT: Final = 3
# Answers read and being verified ahead of the one being stored (each at most one frame):
# with two, the verification workers always have the next answer queued when they finish
# one, while the store writes the answer before it.
VERIFY_AHEAD: Final = 2
# Rounds of fetching missing parents after the first transfer. The reconciled set already
# holds what the project's history reaches, so this only completes what a peer holds outside
# its set (a set that lags behind its store); each round may fetch many records, and a
# parent is asked for once per session, so a record naming parents nobody has costs one
# round.
MAX_ANCESTOR_ROUNDS: Final = 16
# Records one session may take in: a very large project, and still a bound.
MAX_SESSION_RECORDS: Final = 5_000_000
# Records failing verification before the peer is dropped: one could be a bug in a peer's
# version; several are a peer sending forgeries.
MAX_STRIKES: Final = 3


class SyncHost(Protocol):
    """What a sync session needs from the node; `NodeService` provides it."""

    async def sync_index(self, project: CID) -> ReconcileIndex | None:
        """The project's record-id index, or None if this node does not host the project."""

    async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
        """The bytes of those of `cids` this node has (the others are absent)."""

    async def sync_prepare(self, count: int) -> None:
        """The session will fetch at least `count` records: get ready to verify them (the
        node starts its verification workers). Runs beside the reconciliation."""

    async def sync_verify(self, items: Sequence[bytes]) -> Verified:
        """Decode and verify records from a peer, storing nothing. Several calls may run at
        once."""

    async def sync_store(
        self, rows: Sequence[RecordRow], expected: Collection[bytes] = ()
    ) -> IngestResult:
        """Store records `sync_verify` accepted. The parents of new records that are neither
        stored nor in `expected` (binary CIDs the session fetches anyway) come back as
        missing. Calls are made one at a time, in the order the records arrived."""


@dataclass(slots=True)
class Verified:
    """What verifying one batch from a peer gave: the good records as store rows
    (`ostrom.node.ingest.RecordRow`), and how many records were refused."""

    rows: list[RecordRow] = field(default_factory=list)
    refused: int = 0


@dataclass(slots=True)
class IngestResult:
    """What storing one verified batch did; CIDs in binary form."""

    stored: list[bytes] = field(default_factory=list)
    missing_parents: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class SyncResult:
    """What one session did, for logs, events and benchmarks."""

    project: CID
    peer_id: str
    received: int = 0
    sent: int = 0
    refused: int = 0
    reconcile_rounds: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class PeerMisbehaving(DecodeError):
    """A peer broke the sync protocol or sent forged records; it should be disconnected."""

    code = "peer_misbehaving"


def _expect(frame: Any, *kinds: str) -> dict[str, Any]:
    if not isinstance(frame, dict) or frame.get("t") not in kinds:
        raise PeerMisbehaving(f"expected {' or '.join(kinds)}, got {_describe(frame)}")
    return frame


def _describe(frame: Any) -> str:
    if frame is None:
        return "the end of the stream"
    if isinstance(frame, dict):
        return f"a {frame.get('t')!r} frame"
    return f"a {type(frame).__name__}"


def _cids(value: Any, limit: int) -> list[CID]:
    if not isinstance(value, list) or len(value) > limit:
        raise PeerMisbehaving(f"a CID list of at most {limit} items was expected")
    if not all(isinstance(item, bytes) for item in value):
        raise PeerMisbehaving("CIDs travel as bytes")
    try:
        return [CID(item) for item in value]
    except DecodeError as exc:
        raise PeerMisbehaving(f"malformed CID: {exc.message}") from None


def _record_items(frame: dict[str, Any]) -> list[bytes]:
    items = frame.get("items")
    if not isinstance(items, list) or not all(isinstance(item, bytes) for item in items):
        raise PeerMisbehaving("records frame without a list of record bytes")
    return items


def record_frames(items: Iterable[bytes], missing: Sequence[CID] = ()) -> Iterator[dict[str, Any]]:
    """`records` frames holding `items`, each with at most RECORDS_FRAME_BYTES of records;
    the last frame lists `missing` (wanted CIDs this node lacks), so the asker can count
    every CID as answered."""
    batch: list[bytes] = []
    size = 0
    for item in items:
        if batch and size + len(item) > RECORDS_FRAME_BYTES:
            yield {"t": "records", "items": batch}
            batch, size = [], 0
        batch.append(item)
        size += len(item)
    if batch or missing:
        frame: dict[str, Any] = {"t": "records", "items": batch}
        if missing:
            frame["missing"] = [cid.raw for cid in missing]
        yield frame


async def _send_records(
    framed: FramedStream, items: Iterable[bytes], missing: Sequence[CID] = ()
) -> int:
    """Send `record_frames(items, missing)`; returns the records sent."""
    sent = 0
    for frame in record_frames(items, missing):
        sent += len(frame["items"])
        await framed.send(frame)
    return sent


async def _reconcile(
    framed: FramedStream,
    reconciler: Reconciler,
    result: SyncResult,
    first: Any | None,
    learned: Callable[[], None] = lambda: None,
) -> None:
    """Exchange reconciliation messages until one side has nothing left to say; `learned`
    is called after each message taken in."""
    outgoing = first
    while True:
        if outgoing is not None:
            await framed.send({"t": "rec", "m": encode_message(outgoing)})
        frame = _expect(await framed.receive(), "rec", "rec-end")
        result.reconcile_rounds += 1
        if frame["t"] == "rec-end":
            return
        message = frame.get("m")
        if not isinstance(message, bytes):
            raise PeerMisbehaving("rec frame without a message")
        try:
            # The reconciler bounds the messages it takes by what it has learned (PROTOCOL.md
            # 11.4.5): a replica starting from nothing receives the peer's ids in 64 KiB
            # messages, about 28 per 50,000 ids, so no fixed count would do.
            outgoing = reconciler.receive(decode_message(message))
        except DecodeError as exc:  # TooLarge too: past the bound
            raise PeerMisbehaving(f"reconciliation: {exc.message}") from None
        learned()
        if outgoing is None:
            await framed.send({"t": "rec-end"})
            return


# --- initiator ---------------------------------------------------------------------------------


@contextmanager
def unwrap_single_error() -> Iterator[None]:
    """Let one error from a nursery's tasks out as itself, not inside an ExceptionGroup.

    A session's tasks fail for one reason (the peer misbehaved, the stream broke); callers
    catch that reason, as they would from a function without inner tasks. When both tasks
    fail with Ostrom errors (a reset seen by the reader closes the stream under the writer),
    the first is let out: the others follow from it.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 or (leaves and all(isinstance(e, OstromError) for e in leaves)):
            raise leaves[0] from None
        raise


async def _take_push(
    host: SyncHost, items: list[bytes], result: SyncResult, learned: Collection[bytes]
) -> IngestResult:
    """Verify and store one pushed batch. A record counts as a strike if it fails
    verification, or if it is neither one the reconciliation said this side lacks
    (`learned`, binary CIDs), nor a record of the session's project, nor one held here
    already (it may have come another way since the reconciliation). Strikes are counted
    first."""
    verified = await host.sync_verify(items)
    rows: list[RecordRow] = []
    others: list[CID] = []
    project = result.project.raw
    for row in verified.rows:
        if row[ROW_CID] in learned:
            rows.append(row)
        elif project in (row[ROW_PROJECT], row[ROW_FORK_OF]):
            rows.append(row)  # the project's own records are always welcome
        else:
            others.append(CID(row[ROW_CID]))
    held = await host.sync_records(others) if others else {}
    _strike(result, verified.refused + sum(1 for cid in others if cid not in held))
    return await host.sync_store(rows)


def _strike(result: SyncResult, refused: int) -> None:
    """Count `refused` records against the peer; past MAX_STRIKES it is cut off."""
    if not refused:
        return
    result.refused += refused
    log.info("peer %s sent %d record(s) that were refused", result.peer_id, refused)
    if result.refused >= MAX_STRIKES:
        raise PeerMisbehaving(f"peer sent {result.refused} records that failed verification")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        elif not isinstance(exc, trio.Cancelled):
            out.append(exc)
    return out


@dataclass(slots=True, eq=False)
class _Answer:
    """One `records` frame of an answer, on its way from the stream to the store."""

    items: list[bytes]
    verified: Verified | None = None
    ready: trio.Event = field(default_factory=trio.Event)


class _Puller:
    """The initiator's side after reconciliation: ask, receive, chase ancestors, push.

    Three tasks share the work: `ask` sends wants, `read_answers` reads answers and starts
    verifying each at once, `store_answers` stores them in order. At most WANTS_IN_FLIGHT
    wants are unanswered and VERIFY_AHEAD answers wait for the store, so memory stays
    bounded, and a slow store holds back the reading, which holds back the responder.
    """

    def __init__(self, framed: FramedStream, host: SyncHost, result: SyncResult) -> None:
        self.framed = framed
        self.host = host
        self.result = result
        # Binary CIDs: hashing bytes is cheaper than hashing CID objects, per record.
        self.wanted: set[bytes] = set()
        # The ids the peer said it holds during the reconciliation (this side's `need`).
        self.offered: Collection[bytes] = ()
        self.denied = 0  # offered ids the peer then answered `missing`
        self.chasing: set[bytes] = set()
        self.outstanding = 0  # CIDs wanted and not yet answered
        self.unstored = 0  # answers read and not yet stored
        self.progress = trio.Event()  # set when either count goes down
        self.sent_done = False
        self.peer_done = trio.Event()
        self.to_store, self.answers = trio.open_memory_channel[_Answer](VERIFY_AHEAD)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.progress = trio.Event()
            await self.progress.wait()

    async def read_answers(self, verifying: trio.Nursery) -> None:
        while True:
            frame = _expect(await self.framed.receive(), "records", "done")
            if frame["t"] == "done":
                if not self.sent_done:
                    # This side would otherwise wait for answers that will never come.
                    raise PeerMisbehaving("peer ended the session before this side did")
                self.peer_done.set()
                return
            items = _record_items(frame)
            missing = _cids(frame.get("missing", []), MAX_WANT)
            if len(items) + len(missing) > self.outstanding:
                raise PeerMisbehaving("peer answered more CIDs than were asked for")
            # The peer offered these in the reconciliation; records are never deleted, so
            # lacking them now is a lie (answering `missing` to a chased parent is not).
            self.denied += sum(1 for cid in missing if cid.raw in self.offered)
            if self.denied >= MAX_STRIKES:
                raise PeerMisbehaving(
                    f"peer offered {self.denied} records in the reconciliation, then lacked them"
                )
            if items:
                answer = _Answer(items)
                self.unstored += 1
                # Waits while VERIFY_AHEAD answers are queued: the store sets the pace.
                await self.to_store.send(answer)
                verifying.start_soon(self.verify, answer)
            self.outstanding -= len(items) + len(missing)
            self.progress.set()

    async def verify(self, answer: _Answer) -> None:
        answer.verified = await self.host.sync_verify(answer.items)
        answer.items = []
        answer.ready.set()

    async def store_answers(self) -> None:
        async for answer in self.answers:
            await answer.ready.wait()
            verified = answer.verified
            assert verified is not None  # set before `ready`
            unwanted = sum(1 for row in verified.rows if row[ROW_CID] not in self.wanted)
            if unwanted:
                raise PeerMisbehaving(f"peer sent {unwanted} record(s) that were not asked for")
            _strike(self.result, verified.refused)
            ingest = await self.host.sync_store(verified.rows, self.wanted)
            self.result.received += len(ingest.stored)
            self.chasing.update(ingest.missing_parents)
            self.unstored -= 1
            self.progress.set()

    async def ask(self, cids: Sequence[bytes]) -> None:
        """Send wants for `cids` (binary), keeping up to WANTS_IN_FLIGHT unanswered, then wait until
        every answer is stored (so that its missing parents are known)."""
        if len(self.wanted) + len(cids) > MAX_SESSION_RECORDS:
            raise PeerMisbehaving("the session asked for more records than any project holds")
        for start in range(0, len(cids), MAX_WANT):
            chunk = cids[start : start + MAX_WANT]
            await self.wait_until(lambda: self.outstanding <= (WANTS_IN_FLIGHT - 1) * MAX_WANT)
            self.wanted.update(chunk)
            self.outstanding += len(chunk)
            await self.framed.send({"t": "want", "cids": chunk})
        await self.wait_until(lambda: not self.outstanding and not self.unstored)

    async def run(self, need: Collection[bytes], have: list[CID]) -> None:
        """Pull `need` (binary CIDs the peer offered, sorted or a set) and push `have`."""
        self.offered = need
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.read_answers, nursery)
            nursery.start_soon(self.store_answers)
            await self.ask(sorted(need))
            rounds = 0
            while rounds < MAX_ANCESTOR_ROUNDS:
                # Parents found missing early in a round may have been asked for later in it.
                batch = sorted(self.chasing - self.wanted)
                self.chasing = set()
                if not batch:
                    break
                rounds += 1
                await self.ask(batch)
            pushed = await self.host.sync_records(have)
            self.result.sent = await _send_records(
                self.framed, [pushed[c] for c in have if c in pushed]
            )
            self.sent_done = True
            await self.framed.send({"t": "done"})
            with trio.move_on_after(IDLE_TIMEOUT_S):
                await self.peer_done.wait()
            nursery.cancel_scope.cancel()


async def pull(stream: ByteStream, host: SyncHost, project: CID, peer_id: str) -> SyncResult:
    """Run a session as initiator over `stream`: afterwards this node has what the peer had,
    and the peer what this node had. Raises `Refused`, `PeerMisbehaving` or a stream error."""
    framed = FramedStream(stream, max_frame=MAX_FRAME)
    result = SyncResult(project=project, peer_id=peer_id)
    index = await host.sync_index(project)
    if index is None:
        raise Refused(f"this node does not host {project}")
    await framed.send({"t": "hello", "v": VERSION, "project": project.raw})
    reply = _expect(await framed.receive(), "welcome", "refuse")
    if reply["t"] == "refuse":
        raise Refused(f"peer {peer_id} refused to sync {project}: {reply.get('reason')!r}")
    reconciler = Reconciler(index, initiator=True)
    with unwrap_single_error():
        async with trio.open_nursery() as nursery:
            preparing = False

            def learned() -> None:
                # Once a full want is needed, the node gets its verification workers going
                # while the reconciliation goes on (starting them takes a few tenths of a
                # second, as long as verifying a few answers).
                nonlocal preparing
                if not preparing and len(reconciler.need) >= MAX_WANT:
                    preparing = True
                    nursery.start_soon(host.sync_prepare, len(reconciler.need))

            await _reconcile(framed, reconciler, result, reconciler.start(), learned)
            # The reconciler has checked every id it took in; those wanted travel in binary.
            have = sorted(CID(raw) for raw in reconciler.have)
            await _Puller(framed, host, result).run(reconciler.need, have)
    result.bytes_in, result.bytes_out = framed.bytes_in, framed.bytes_out
    return result


# --- responder ---------------------------------------------------------------------------------


async def serve(stream: ByteStream, host: SyncHost, peer_id: str) -> SyncResult | None:
    """Answer one session opened by a peer."""
    framed = FramedStream(stream, max_frame=MAX_FRAME)
    hello = _expect(await framed.receive(), "hello")
    raw = hello.get("project")
    if hello.get("v") != VERSION or not isinstance(raw, bytes):
        await framed.send({"t": "refuse", "reason": f"unsupported hello (version {VERSION})"})
        return None
    try:
        project = CID(raw)
    except DecodeError:
        raise PeerMisbehaving("hello names no valid project CID") from None
    index = await host.sync_index(project)
    if index is None:
        await framed.send({"t": "refuse", "reason": "this node does not host that project"})
        return None
    await framed.send({"t": "welcome"})
    result = SyncResult(project=project, peer_id=peer_id)
    reconciler = Reconciler(index, initiator=False)
    await _reconcile(framed, reconciler, result, None)
    while True:
        frame = _expect(await framed.receive(), "want", "records", "done")
        if frame["t"] == "done":
            await framed.send({"t": "done"})
            break
        if frame["t"] == "want":
            cids = _cids(frame.get("cids"), MAX_WANT)
            if not cids:
                raise PeerMisbehaving("an empty want")
            found = await host.sync_records(cids)
            items = [found[cid] for cid in cids if cid in found]
            missing = [cid for cid in cids if cid not in found]
            result.sent += await _send_records(framed, items, missing)
        else:
            # A push: the records of the project's set this node lacked (the initiator's
            # `have`, this side's `need`), upstream records a fork's history reaches included.
            ingest = await _take_push(host, _record_items(frame), result, reconciler.need)
            result.received += len(ingest.stored)
    result.bytes_in, result.bytes_out = framed.bytes_in, framed.bytes_out
    return result
