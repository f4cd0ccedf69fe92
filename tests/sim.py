"""A deterministic, in-process simulation of many Ostrom nodes (DESIGN.md, "Architecture").

One `random.Random(seed)` drives everything: the topology, link latencies, losses, the phase
of every node's timers and every random choice a node makes. Simulated time is an integer
number of milliseconds held by the `Simulator` and passed to whatever needs it; nothing reads
a clock, so a run is a pure function of its seed and its script, and runs in a fraction of
the simulated time.

What is real: every record is built by `records.sign` with an ed25519 key and travels as its
own bytes; every receiver decodes it with `decode_record` (signature included) before it keeps
or relays it. Sync sessions run `ostrom.protocol.reconcile` (`Reconciler`, `ReconcileIndex`,
`encode_message`, `decode_message`) inside the `/ostrom/sync/1.0.0` frames of
`ostrom.protocol.frames`, so every byte counted is a byte the real protocol sends (less the
libp2p framing under it). Acceptance (`acceptance.evaluate`) and trees (`tree.replay`) are
computed by the real functions over each node's own replica. Changesets are real DAG-CBOR
blocks fetched with `/ostrom/blocks/1.0.0` frames and checked against their CID.

What each node mirrors from `ostrom/node/` (replication.py, sync.py, service.py), with the
node's own constants imported from there:
- gossip: a record is published on the topic of each of its `sync_projects`; a receiver
  validates it (decode, signature, topic) before storing and relaying it, relays a message
  once (the gossipsub seen-cache), and disconnects a peer after `MAX_GOSSIP_STRIKES` invalid
  messages. A record whose parents are missing is stored (acceptance keeps it pending) and a
  sync with the sender is requested, which fetches the parents;
- sync: the initiator/responder state machines of sync.py frame by frame (hello, rec,
  want/records with `WANTS_IN_FLIGHT` wants in flight, ancestor chasing, push, done), their
  bounds and strikes, over each project's sync set as `ostrom.protocol.syncset` keeps it
  (its records, its forks' genesis, and what their history reaches), the idle timeout, sync
  on connect and every `SYNC_INTERVAL_S` with two peers known to share the project, at most
  `MAX_CONCURRENT_SYNCS` sessions at once, repeats merged, plus one peer not known to share
  the project (`explore=False` turns that off, to show why the node does it); a responder
  that sends `done` with wants unanswered is cut off;
- blocks: after a sync or a gossiped contribution, the missing changesets of the project's
  history are fetched from the peer, retried with backoff.

What it does not model: libp2p itself (Noise, Yamux, gossipsub's mesh degree, IHAVE/IWANT
and scoring: gossip floods every subscribed neighbour), peer discovery and the DHT (the
topology is given; a link cut by a partition comes back when it heals), CPU time (handling a
message takes no simulated time), file blocks and manifests (contributions carry changesets
whose files are stand-in manifest CIDs, which tree replay never opens), the store's crash
safety, and rate limits. A lost message of a sync session models a broken connection: the
rest of that session is lost too and both sides give up after the idle timeout. A peer
dropped for misbehaving stays disconnected for the rest of the run.

Checks: `converged` (every node holds exactly the records created, and the changesets its
trees need), `SimNode.snapshot` (records, statuses, policy, accepted heads, tree, conflicts:
what a user sees) and `check_local_agreement`, which compares nodes while their replicas
still differ: two nodes holding the same ancestry and validations of a record must judge it
alike. Every run is bounded by `Simulator.max_events` and by a deadline in simulated time;
either raises `SimulationLimit`, an AssertionError that says which.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import BlockMismatch, DecodeError, NotFound, OstromError, Refused
from ostrom.node import replication, sync
from ostrom.node.framed import IDLE_TIMEOUT_S
from ostrom.node.service import sync_projects
from ostrom.protocol import blockwire, dagcbor
from ostrom.protocol.acceptance import ProjectState, RecordStatus, evaluate
from ostrom.protocol.changesets import Changeset
from ostrom.protocol.frames import FrameReader, encode_frame
from ostrom.protocol.reconcile import ReconcileIndex, Reconciler, decode_message, encode_message
from ostrom.protocol.records import (
    Body,
    Contribution,
    ForkOf,
    Governance,
    GovernanceAction,
    Need,
    Policy,
    Project,
    SignedRecord,
    Validation,
    Verdict,
    decode_record,
    sign,
    signing_payload,
)
from ostrom.protocol.syncset import SyncSet
from ostrom.protocol.tree import Conflict, FileEntry, replay
from tests.dagfactory import Content, make_change

# --- time and bounds -----------------------------------------------------------------------------

# Simulated time is in milliseconds; the node's constants are in seconds.
SECOND: Final = 1000
SYNC_INTERVAL: Final = int(replication.SYNC_INTERVAL_S * SECOND)
IDLE_TIMEOUT: Final = int(IDLE_TIMEOUT_S * SECOND)
BLOCK_RETRY_FIRST: Final = int(replication.BLOCK_RETRY_FIRST_S * SECOND)
# Record timestamps: simulated time 0 is this instant (2023-11-14 in ms, as in dagfactory).
EPOCH_MS: Final = 1_700_000_000_000
# A run that handles more events than this has lost its way (a message loop, a timer storm);
# the busiest scenario in tests/test_simulation.py uses well under a tenth of it.
DEFAULT_MAX_EVENTS: Final = 2_000_000
# Gossip topic of a project, as replication.topic_of names it.
topic_of = replication.topic_of


@dataclass(slots=True)
class SimIngest:
    """What taking in one batch from a peer did (sync.Verified and sync.IngestResult in one)."""

    stored: list[CID] = field(default_factory=list)
    known: list[CID] = field(default_factory=list)
    refused: int = 0
    missing_parents: set[CID] = field(default_factory=set)


class SimulationLimit(AssertionError):
    """A bounded run went past its bound: too many events, or no convergence by a deadline."""


# --- the event loop ------------------------------------------------------------------------------


class Simulator:
    """A discrete-event loop: actions ordered by (time, order of scheduling)."""

    def __init__(self, seed: int, *, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.rng = random.Random(seed)
        self.now = 0
        self.events = 0
        self.max_events = max_events
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._order = 0

    def at(self, time: int, action: Callable[[], None]) -> None:
        """Run `action` at simulated time `time` (now, if that has passed)."""
        heapq.heappush(self._queue, (max(time, self.now), self._order, action))
        self._order += 1

    def after(self, delay: int, action: Callable[[], None]) -> None:
        self.at(self.now + delay, action)

    def run_until(self, time: int) -> None:
        """Handle every event due up to `time`; the clock then reads `time`."""
        queue = self._queue
        while queue and queue[0][0] <= time:
            when, _, action = heapq.heappop(queue)
            self.events += 1
            if self.events > self.max_events:
                raise SimulationLimit(f"more than {self.max_events} events by t={when} ms")
            self.now = when
            action()
        self.now = max(self.now, time)

    def run_until_true(
        self, done: Callable[[], bool], *, deadline: int, check_every: int = 5 * SECOND
    ) -> int:
        """Run until `done()` holds (checked every `check_every` ms); return the time it did.

        SimulationLimit if it still does not hold at `deadline`.
        """
        while not done():
            if self.now >= deadline:
                raise SimulationLimit(f"not done by t={deadline} ms ({self.events} events)")
            self.run_until(min(self.now + check_every, deadline))
        return self.now


# --- the network ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on a link. `data` is exactly the bytes the real protocol would send."""

    kind: str  # "gossip", "sync", "blocks-want" or "blocks"
    data: bytes
    topic: str = ""  # gossip only
    session: tuple[str, int] = ("", 0)  # sync only: (initiator, its session number)
    to_initiator: bool = False  # sync only: which side the frames are for


@dataclass(slots=True)
class Traffic:
    """What the network carried, by envelope kind."""

    sent: dict[str, int] = field(default_factory=dict)  # bytes handed to the network
    delivered: dict[str, int] = field(default_factory=dict)  # bytes that arrived
    lost: int = 0  # messages lost at random
    cut: int = 0  # messages dropped by a partition or a disconnection


Link = tuple[str, str]


def _link(a: str, b: str) -> Link:
    return (a, b) if a < b else (b, a)


class Network:
    """Nodes joined by links with a latency each, random loss, partitions and disconnections.

    Each link is one connection: messages on it arrive in the order sent (as on one libp2p
    connection). A link's base latency is drawn once from `latency_ms`; each message adds a
    jitter from `jitter_ms`. Every message is lost with probability `loss`; a lost sync
    message breaks its whole session. A partition takes down the links between its groups
    from `start` to `end`, each side being told of the disconnection and the reconnection.
    """

    def __init__(
        self,
        sim: Simulator,
        *,
        latency_ms: tuple[int, int] = (5, 120),
        jitter_ms: tuple[int, int] = (0, 20),
        loss: float = 0.0,
    ) -> None:
        self.sim = sim
        self.rng = random.Random(sim.rng.getrandbits(64))
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.loss = loss
        self.nodes: dict[str, SimNode] = {}
        self.traffic = Traffic()
        # Everything delivered, hashed in order: equal digests mean equal runs.
        self.trace = hashlib.sha256()
        # Every record created through a node's API: what every replica should end up with.
        self.created: dict[CID, SignedRecord] = {}
        self.drops: list[tuple[int, str, str, str]] = []  # (time, by, peer, reason)
        self._latency: dict[Link, int] = {}
        self._epoch: dict[Link, int] = {}  # bumped at every disconnection and reconnection
        self._down: dict[Link, int] = {}  # links down, with how many partitions hold them down
        self._cut: set[Link] = set()  # links closed for good (a peer dropped for misbehaving)
        self._arrival: dict[tuple[str, str], int] = {}  # the last arrival on each direction
        self._broken: set[tuple[str, int]] = set()  # sync sessions that lost a message
        self._link_loss: dict[Link, float] = {}  # links whose loss rate differs from `loss`

    # -- building ------------------------------------------------------------------------------

    def add(self, node: SimNode) -> None:
        self.nodes[node.name] = node

    def connect(self, a: str, b: str) -> None:
        link = _link(a, b)
        if a == b or link in self._latency:
            return
        self._latency[link] = self.rng.randint(*self.latency_ms)
        self._epoch[link] = 0

    def set_loss(self, a: str, b: str, loss: float | None) -> None:
        """Give one link its own loss rate (None: back to the network's)."""
        if loss is None:
            self._link_loss.pop(_link(a, b), None)
        else:
            self._link_loss[_link(a, b)] = loss

    def start(self) -> None:
        """Bring every link up at time 0 and start every node's timers."""
        for node in self.nodes.values():
            node.start()
        for a, b in sorted(self._latency):
            self._notify_up(a, b)

    # -- state ---------------------------------------------------------------------------------

    def is_up(self, a: str, b: str) -> bool:
        link = _link(a, b)
        return link in self._latency and link not in self._down and link not in self._cut

    def peers(self, name: str) -> list[str]:
        """The neighbours `name` is connected to now, by name."""
        return [
            other
            for link in sorted(self._latency)
            if name in link and self.is_up(*link)
            for other in link
            if other != name
        ]

    def links(self) -> list[Link]:
        return sorted(self._latency)

    # -- carrying messages ---------------------------------------------------------------------

    def send(self, src: str, dst: str, envelope: Envelope) -> None:
        kind = envelope.kind
        traffic = self.traffic
        traffic.sent[kind] = traffic.sent.get(kind, 0) + len(envelope.data)
        link = _link(src, dst)
        if not self.is_up(src, dst) or (kind == "sync" and envelope.session in self._broken):
            traffic.cut += 1
            return
        if self.rng.random() < self._link_loss.get(link, self.loss):
            traffic.lost += 1
            if kind == "sync":
                self._broken.add(envelope.session)
            return
        jitter = self.rng.randint(*self.jitter_ms)
        arrival = max(self.sim.now + self._latency[link] + jitter, self._arrival.get((src, dst), 0))
        self._arrival[(src, dst)] = arrival
        epoch = self._epoch[link]
        self.sim.at(arrival, lambda: self._deliver(src, dst, envelope, epoch))

    def _deliver(self, src: str, dst: str, envelope: Envelope, epoch: int) -> None:
        link = _link(src, dst)
        if not self.is_up(src, dst) or self._epoch[link] != epoch:
            self.traffic.cut += 1
            return
        kind = envelope.kind
        self.traffic.delivered[kind] = self.traffic.delivered.get(kind, 0) + len(envelope.data)
        self.trace.update(f"{self.sim.now} {src} {dst} {kind} {envelope.topic} ".encode())
        self.trace.update(envelope.data)
        self.nodes[dst].receive(src, envelope)

    # -- partitions and disconnections ---------------------------------------------------------

    def partition(self, groups: Sequence[Iterable[str]], start: int, end: int) -> None:
        """Cut every link between different `groups` from `start` until `end` (ms)."""
        side = {name: i for i, group in enumerate(groups) for name in group}
        if set(side) != set(self.nodes):
            raise ValueError("a partition's groups must hold every node once")
        cut = [link for link in self.links() if side[link[0]] != side[link[1]]]
        self.sim.at(start, lambda: self._take_down(cut))
        self.sim.at(end, lambda: self._bring_up(cut))

    def _take_down(self, links: list[Link]) -> None:
        for link in links:
            self._down[link] = self._down.get(link, 0) + 1
            if self._down[link] == 1 and link not in self._cut:
                self._epoch[link] += 1
                self._notify_down(*link)

    def _bring_up(self, links: list[Link]) -> None:
        for link in links:
            self._down[link] -= 1
            if not self._down[link]:
                del self._down[link]
                if link not in self._cut:
                    self._epoch[link] += 1
                    self._notify_up(*link)

    def disconnect(self, by: str, peer: str, reason: str) -> None:
        """`by` drops `peer`: their link closes for the rest of the run."""
        link = _link(by, peer)
        if link in self._cut or link not in self._latency:
            return
        self.drops.append((self.sim.now, by, peer, reason))
        up = self.is_up(by, peer)
        self._cut.add(link)
        self._epoch[link] += 1
        if up:
            self._notify_down(by, peer)

    def _notify_up(self, a: str, b: str) -> None:
        self.nodes[a].peer_connected(b)
        self.nodes[b].peer_connected(a)

    def _notify_down(self, a: str, b: str) -> None:
        self.nodes[a].peer_disconnected(b)
        self.nodes[b].peer_disconnected(a)


def random_topology(
    rng: random.Random, names: Sequence[str], extra: int, *, cut: Sequence[set[str]] = ()
) -> list[Link]:
    """A connected graph: a random spanning tree over `names` plus `extra` random edges.

    With `cut` (groups covering `names`), each group's own subgraph is connected as well, so
    that it stays connected when a partition separates the groups.
    """
    groups = [sorted(g) for g in cut] or [list(names)]
    edges: set[Link] = set()
    trees = []
    for group in groups:
        order = list(group)
        rng.shuffle(order)
        for i in range(1, len(order)):
            edges.add(_link(order[i], order[rng.randrange(i)]))
        trees.append(order)
    for left, right in itertools.pairwise(trees):  # join the groups into one graph
        edges.add(_link(rng.choice(left), rng.choice(right)))
    attempts = 0
    target = len(edges) + extra
    while len(edges) < target and attempts < 100 * (extra + 1):
        attempts += 1
        a, b = rng.sample(list(names), 2)
        edges.add(_link(a, b))
    return sorted(edges)


# --- sync sessions -------------------------------------------------------------------------------


def _expect(frame: Any, *kinds: str) -> dict[str, Any]:
    """As sync._expect: the frame, if it is one of `kinds`."""
    if not isinstance(frame, dict) or frame.get("t") not in kinds:
        got = "the end of the stream" if frame is None else f"{frame!r:.40}"
        raise sync.PeerMisbehaving(f"expected {' or '.join(kinds)}, got {got}")
    return frame


def _cids(value: Any, limit: int) -> list[CID]:
    if not isinstance(value, list) or len(value) > limit:
        raise sync.PeerMisbehaving(f"a CID list of at most {limit} items was expected")
    if not all(isinstance(item, bytes) for item in value):
        raise sync.PeerMisbehaving("CIDs travel as bytes")
    try:
        return [CID(item) for item in value]
    except DecodeError as exc:
        raise sync.PeerMisbehaving(f"malformed CID: {exc.message}") from None


def _record_items(frame: dict[str, Any]) -> list[bytes]:
    items = frame.get("items")
    if not isinstance(items, list) or not all(isinstance(item, bytes) for item in items):
        raise sync.PeerMisbehaving("records frame without a list of record bytes")
    return items


# A responder's result names no project until the hello has named one.
_NO_PROJECT: Final = CID.of_dag_cbor(b"")


def _raw(cid: CID) -> bytes:
    return cid.raw


class _Session:
    """One end of a sync stream: frames out through the network, frames in through a reader,
    an idle timer, and the outcome."""

    def __init__(
        self, node: SimNode, peer: str, key: tuple[str, int], initiator: bool, project: CID | None
    ) -> None:
        self.node = node
        self.peer = peer
        self.key = key
        self.initiator = initiator
        self.result = sync.SyncResult(project=project or _NO_PROJECT, peer_id=peer)
        self.reader = FrameReader(max_frame=sync.MAX_FRAME)
        self.reconciler: Reconciler | None = None  # once the hello is answered
        self.rec_bytes = 0  # bytes of reconciliation messages, both ways (inside `rec` frames)
        self.closed = False
        self.outcome = ""  # "ok", "refused", or why it failed
        self._heard = 0  # frames received, for the idle timer

    def send(self, value: Any) -> None:
        data = encode_frame(value, max_frame=sync.MAX_FRAME)
        self.result.bytes_out += len(data)
        envelope = Envelope("sync", data, session=self.key, to_initiator=not self.initiator)
        self.node.net.send(self.node.name, self.peer, envelope)

    def send_rec(self, message: Any) -> None:
        data = encode_message(message)
        self.rec_bytes += len(data)
        self.send({"t": "rec", "m": data})

    def reconcile_step(self, frame: Any) -> bool:
        """One step of sync._reconcile; True once reconciliation is over (the peer sent
        `rec-end`, or this side has nothing left to say and sent it)."""
        frame = _expect(frame, "rec", "rec-end")
        # sync._reconcile: the reconciler bounds what it takes (PROTOCOL.md 11.4.5).
        self.result.reconcile_rounds += 1
        if frame["t"] == "rec-end":
            return True
        message = frame.get("m")
        if not isinstance(message, bytes):
            raise sync.PeerMisbehaving("rec frame without a message")
        self.rec_bytes += len(message)
        assert self.reconciler is not None
        outgoing = self.reconciler.receive(decode_message(message))
        if outgoing is None:
            self.send({"t": "rec-end"})
            return True
        self.send_rec(outgoing)
        return False

    def send_records(self, items: Iterable[bytes], missing: Sequence[CID] = ()) -> int:
        """sync._send_records: the same frames, from sync.record_frames."""
        sent = 0
        for frame in sync.record_frames(items, missing):
            sent += len(frame["items"])
            self.send(frame)
        return sent

    def wait(self) -> None:
        """This side now waits for a frame: give up if none comes within the idle timeout."""
        heard = self._heard
        self.node.sim.after(IDLE_TIMEOUT, lambda: self._idle(heard))

    def _idle(self, heard: int) -> None:
        if not self.closed and self._heard == heard:
            self.fail("the peer was silent for the idle timeout")

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        self.result.bytes_in += len(data)
        try:
            for value in self.reader.feed(data):
                if self.closed:
                    return
                self._heard += 1
                self.on_frame(value)
        except sync.PeerMisbehaving as exc:
            self.fail(exc.message)
            self.node.drop(self.peer, exc.message)
        except Refused as exc:
            self.close("refused: " + exc.message)
        except OstromError as exc:
            self.fail(exc.message)

    def on_frame(self, frame: Any) -> None:
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        self.close("failed: " + reason)

    def close(self, outcome: str) -> None:
        if not self.closed:
            self.closed = True
            self.outcome = outcome
            self.node.session_closed(self)


class _Pull(_Session):
    """The initiator (sync.pull and sync._Puller)."""

    def __init__(self, node: SimNode, peer: str, key: tuple[str, int], project: CID) -> None:
        super().__init__(node, peer, key, True, project)
        self.project = project
        self.state = "hello"
        self.index: ReconcileIndex | None = None
        self.have: list[CID] = []
        self.wanted: set[CID] = set()
        self.chasing: set[CID] = set()
        self.queue: deque[list[CID]] = deque()
        self.outstanding = 0
        self.chase_rounds = 0
        self.offered: set[bytes] = set()  # the reconciler's `need`: ids the peer offered
        self.denied = 0  # offered ids the peer then answered `missing`

    def begin(self) -> bool:
        """Send hello; False if this node does not host the project (sync.pull's Refused)."""
        self.index = self.node.sync_index(self.project)
        if self.index is None:
            return False
        self.send({"t": "hello", "v": sync.VERSION, "project": self.project.raw})
        self.wait()
        return True

    def on_frame(self, frame: Any) -> None:
        if self.state == "hello":
            reply = _expect(frame, "welcome", "refuse")
            if reply["t"] == "refuse":
                raise Refused(f"peer refused to sync: {reply.get('reason')!r}")
            assert self.index is not None
            self.reconciler = Reconciler(self.index, initiator=True)
            self.state = "reconcile"
            self.send_rec(self.reconciler.start())
            self.wait()
        elif self.state == "reconcile":
            self._reconcile(frame)
        else:
            self._answer(frame)

    def _reconcile(self, frame: Any) -> None:
        if self.reconcile_step(frame):
            self._pull()
        else:
            self.wait()

    def _pull(self) -> None:
        assert self.reconciler is not None
        self.state = "pull"
        self.have = sorted(CID(raw) for raw in self.reconciler.have)
        self.offered = self.reconciler.need
        self._ask(sorted(CID(raw) for raw in self.reconciler.need))
        self._pump()

    def _ask(self, cids: list[CID]) -> None:
        if len(self.wanted) + len(cids) > sync.MAX_SESSION_RECORDS:
            raise sync.PeerMisbehaving("the session asked for more records than any project holds")
        for start in range(0, len(cids), sync.MAX_WANT):
            self.queue.append(cids[start : start + sync.MAX_WANT])

    def _pump(self) -> None:
        """Send wants while fewer than WANTS_IN_FLIGHT are unanswered; when all are answered,
        chase the missing parents of what came, then push and close (sync._Puller.run)."""
        while self.queue and self.outstanding <= (sync.WANTS_IN_FLIGHT - 1) * sync.MAX_WANT:
            chunk = self.queue.popleft()
            self.wanted.update(chunk)
            self.outstanding += len(chunk)
            self.send({"t": "want", "cids": [cid.raw for cid in chunk]})
        if self.queue or self.outstanding:
            self.wait()
            return
        if self.chasing and self.chase_rounds < sync.MAX_ANCESTOR_ROUNDS:
            self.chase_rounds += 1
            batch, self.chasing = sorted(self.chasing), set()
            self._ask(batch)
            self._pump()
            return
        pushed = self.node.sync_records(self.have)
        self.result.sent = self.send_records(pushed)
        self.send({"t": "done"})
        self.state = "closing"
        # sync._Puller.run waits at most the idle timeout for the peer's `done`, then ends
        # the session as a success either way.
        self.node.sim.after(IDLE_TIMEOUT, lambda: self.close("ok"))

    def _answer(self, frame: Any) -> None:
        """sync._Puller.read_answers, for one frame."""
        frame = _expect(frame, "records", "done")
        if frame["t"] == "done":
            if self.state == "pull":
                # A peer that ends the session with wants unanswered breaks the order of
                # PROTOCOL.md 11.3, and sync._Puller cuts it off.
                raise sync.PeerMisbehaving("peer ended the session with wants unanswered")
            self.close("ok")
            return
        items = _record_items(frame)
        missing = _cids(frame.get("missing", []), sync.MAX_WANT)
        if len(items) + len(missing) > self.outstanding:
            raise sync.PeerMisbehaving("peer answered more CIDs than were asked for")
        self.denied += sum(1 for cid in missing if cid.raw in self.offered)
        if self.denied >= sync.MAX_STRIKES:
            raise sync.PeerMisbehaving(
                f"peer offered {self.denied} records in the reconciliation, then lacked them"
            )
        self.outstanding -= len(items) + len(missing)
        if items:
            self._take_in(items)
        if self.state == "pull":
            self._pump()

    def _take_in(self, items: list[bytes]) -> None:
        unwanted = [item for item in items if CID.of_dag_cbor(item) not in self.wanted]
        if unwanted:
            raise sync.PeerMisbehaving(
                f"peer sent {len(unwanted)} record(s) that were not asked for"
            )
        ingest = self.node.sync_ingest(items, self.peer)
        self.result.received += len(ingest.stored)
        self.result.refused += ingest.refused
        if self.result.refused >= sync.MAX_STRIKES:
            raise sync.PeerMisbehaving(
                f"peer sent {self.result.refused} records that failed verification"
            )
        self.chasing.update(ingest.missing_parents - self.wanted)


class _Serve(_Session):
    """The responder (sync.serve)."""

    def __init__(self, node: SimNode, peer: str, key: tuple[str, int]) -> None:
        super().__init__(node, peer, key, False, None)
        self.state = "hello"
        self.project: CID | None = None

    def on_frame(self, frame: Any) -> None:
        if self.state == "hello":
            self._hello(frame)
        elif self.state == "reconcile":
            self._reconcile(frame)
        else:
            self._serve(frame)

    def _hello(self, frame: Any) -> None:
        hello = _expect(frame, "hello")
        raw = hello.get("project")
        if hello.get("v") != sync.VERSION or not isinstance(raw, bytes):
            self.send({"t": "refuse", "reason": f"unsupported hello (version {sync.VERSION})"})
            self.close("refused: unsupported hello")
            return
        try:
            project = CID(raw)
        except DecodeError:
            raise sync.PeerMisbehaving("hello names no valid project CID") from None
        index = self.node.sync_index(project)
        if index is None:
            self.send({"t": "refuse", "reason": "this node does not host that project"})
            self.close("refused: not hosted")
            return
        self.project = self.result.project = project
        self.send({"t": "welcome"})
        self.reconciler = Reconciler(index, initiator=False)
        self.state = "reconcile"
        self.wait()

    def _reconcile(self, frame: Any) -> None:
        if self.reconcile_step(frame):
            self.state = "serve"
        self.wait()

    def _serve(self, frame: Any) -> None:
        frame = _expect(frame, "want", "records", "done")
        if frame["t"] == "done":
            self.send({"t": "done"})
            self.close("ok")
            return
        if frame["t"] == "want":
            cids = _cids(frame.get("cids"), sync.MAX_WANT)
            if not cids:
                raise sync.PeerMisbehaving("an empty want")
            found = self.node.sync_records(cids)
            present = {CID.of_dag_cbor(item) for item in found}
            missing = [cid for cid in cids if cid not in present]
            self.result.sent += self.send_records(found, missing)
        else:
            assert self.project is not None and self.reconciler is not None
            ingest = self.node.sync_ingest(
                _record_items(frame), self.peer, self.project, self.reconciler.need
            )
            self.result.received += len(ingest.stored)
            self.result.refused += ingest.refused
            if self.result.refused >= sync.MAX_STRIKES:
                raise sync.PeerMisbehaving(
                    f"peer pushed {self.result.refused} records that failed verification"
                )
        self.wait()


# --- nodes ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class NodeStats:
    gossip_refused: int = 0  # gossip messages that failed validation
    sync_refused: int = 0  # records from sync sessions that failed verification
    sessions: dict[str, int] = field(default_factory=dict)  # initiated sessions by outcome
    blocks_fetched: int = 0


class SimNode:
    """One honest node: a replica of the projects it follows, and the replication logic of
    ostrom/node/ over the simulated network (see the module docstring)."""

    def __init__(
        self,
        name: str,
        net: Network,
        identity: Identity,
        *,
        periodic: bool = True,
        explore: bool = True,
    ) -> None:
        self.name = name
        self.net = net
        self.sim = net.sim
        self.identity = identity
        self.periodic = periodic
        self.explore = explore
        self.rng = random.Random(net.sim.rng.getrandbits(64))
        self.records: dict[CID, SignedRecord] = {}
        self.blocks: dict[CID, bytes] = {}
        self.following: dict[CID, None] = {}  # ordered, for deterministic iteration
        self._topics: set[str] = set()
        self.stats = NodeStats()
        self.completed: list[_Pull] = []  # initiated sessions that ended, in order
        # project -> the seeds of its sync set: its records and its public forks' genesis
        self._members: dict[CID, list[CID]] = {}
        self._own: dict[CID, list[CID]] = {}  # project -> records naming it as `project`
        self._sync_sets: dict[CID, SyncSet] = {}  # built on first use, then grown
        self._strikes: dict[str, int] = {}
        self._shared: dict[str, set[CID]] = {}
        self._seen: set[bytes] = set()
        self._sessions: dict[tuple[tuple[str, int], bool], _Session] = {}
        self._pending: set[tuple[str, CID]] = set()
        self._waiting: deque[tuple[str, CID]] = deque()
        self._active = 0
        self._next_session = 0
        self._last_ts = 0
        net.add(self)

    # --- lifecycle and peers ----------------------------------------------------------------

    def start(self) -> None:
        if self.periodic:
            self.sim.at(self.rng.randrange(SYNC_INTERVAL), self._periodic)

    def peers(self) -> list[str]:
        return self.net.peers(self.name)

    def peer_connected(self, peer: str) -> None:
        for project in self.following:
            self.request_sync(peer, project)

    def peer_disconnected(self, peer: str) -> None:
        self._shared.pop(peer, None)
        self._strikes.pop(peer, None)
        for session in [s for s in self._sessions.values() if s.peer == peer]:
            session.fail("the connection closed")

    def drop(self, peer: str, reason: str) -> None:
        self.net.disconnect(self.name, peer, reason)

    def follow(self, project: CID, *, sync_now: bool = True) -> None:
        """Follow a project (Replicator.follow): subscribe and sync with every peer."""
        if project in self.following:
            return
        self.following[project] = None
        self._topics.add(topic_of(project))
        if sync_now:
            for peer in self.peers():
                self.request_sync(peer, project)

    def subscribed(self, topic: str) -> bool:
        return topic in self._topics

    # --- the store --------------------------------------------------------------------------

    def store_new(self, records: Sequence[SignedRecord], origin: str) -> list[CID]:
        """Keep verified records; grow the sync sets (NodeService._grow_sync_sets); publish
        this node's own."""
        new: list[SignedRecord] = []
        seeds: dict[bytes, list[bytes]] = {}
        for record in records:
            if record.cid in self.records:
                continue
            self.records[record.cid] = record
            self._own.setdefault(record.project, []).append(record.cid)
            for project in sync_projects(record):
                self._members.setdefault(project, []).append(record.cid)
                seeds.setdefault(project.raw, []).append(record.cid.raw)
            new.append(record)
        if new and self._sync_sets:
            parents = {r.cid.raw: b"".join(p.raw for p in r.parents) for r in new}
            for project, sync_set in self._sync_sets.items():
                lookup = sync_set.admit(parents, seeds.get(project.raw, ()))
                if lookup:
                    sync_set.extend(*self.reach(lookup, sync_set.__contains__))
        if origin == "local":
            for record in new:
                self.publish(record)
        return [r.cid for r in new]

    def history(self, project: CID) -> dict[CID, SignedRecord]:
        """Store.project_history: the project's records and every stored record their
        parents (and a fork genesis's heads) reach."""
        out = {cid: self.records[cid] for cid in self._own.get(project, ())}
        stack = [p for record in out.values() for p in record.parents]
        genesis = self.records.get(project)
        if genesis is not None:
            stack.extend(genesis.parents)
        seen: set[CID] = set()
        while stack:
            cid = stack.pop()
            if cid in seen:
                continue
            seen.add(cid)
            record = self.records.get(cid)
            if record is not None:
                out[cid] = record
                stack.extend(record.parents)
        return out

    def changeset(self, cid: CID) -> Changeset:
        data = self.blocks.get(cid)
        if data is None:
            raise NotFound(f"changeset {cid} is not here")
        return Changeset.decode(data)

    def missing_changesets(self, project: CID) -> list[CID]:
        links = {
            link
            for record in self.history(project).values()
            if isinstance(record.body, Contribution)
            for link in record.body.changes
        }
        return sorted(link for link in links if link not in self.blocks)

    def state(self, project: CID) -> ProjectState:
        genesis = self.records.get(project)
        if genesis is None:
            raise NotFound(f"no project {project} on {self.name}")
        return evaluate(genesis, self.history(project).values())

    def snapshot(self, project: CID) -> Snapshot:
        """What a user of this node sees of `project`: its records, statuses and tree."""
        history = self.history(project)
        state = self.state(project)
        tree = replay(state.accepted_heads, history, self.changeset)
        return Snapshot(
            records=frozenset(history),
            statuses=dict(state.statuses),
            policy=state.policy,
            heads=state.accepted_heads,
            accepted=state.accepted,
            files=dict(tree.files),
            conflicts=tree.conflicts,
        )

    # --- making records (what the RPC methods do) -------------------------------------------

    def next_ts(self) -> int:
        """NodeService._now on the simulated clock: strictly increasing per node."""
        self._last_ts = max(EPOCH_MS + self.sim.now, self._last_ts + 1)
        return self._last_ts

    def _create(self, body: Body) -> SignedRecord:
        record = sign(body, self.identity)
        self.net.created[record.cid] = record
        self.store_new([record], "local")
        return record

    def create_project(
        self,
        name: str,
        maintainers: Iterable[bytes] = (),
        quorum: int = 1,
        fork_of: tuple[CID, Sequence[CID]] | None = None,
    ) -> SignedRecord:
        keys = tuple(sorted({self.identity.public_key, *maintainers}))
        fork = None
        if fork_of is not None:
            fork = ForkOf(project=fork_of[0], heads=tuple(sorted(set(fork_of[1]), key=_raw)))
        record = self._create(
            Project(
                author=self.identity.public_key,
                ts=self.next_ts(),
                name=name,
                license="MIT",
                policy=Policy(maintainers=keys, quorum=quorum),
                fork_of=fork,
            )
        )
        self.follow(record.cid)
        return record

    def fork(self, project: CID, name: str) -> SignedRecord:
        """Fork `project` at its accepted heads here."""
        return self.create_project(name, fork_of=(project, self.state(project).accepted_heads))

    def default_parents(self, project: CID) -> tuple[CID, ...]:
        """NodeService.default_parents: the accepted heads, plus this node's own records that
        are pending with every parent present."""
        state = self.state(project)
        mine = {
            cid
            for cid, status in state.statuses.items()
            if status.status == "pending"
            and not status.missing
            and self.records[cid].author == self.identity.public_key
        }
        if not mine:
            return tuple(sorted(state.accepted_heads))
        nodes = set(state.accepted) | mine
        has_child = {p for cid in nodes for p in self.records[cid].parents}
        return tuple(sorted(cid for cid in nodes if cid not in has_child))

    def contribute(
        self,
        project: CID,
        changes: Mapping[str, Content],
        message: str = "a change",
        *,
        merge: Iterable[CID] = (),
    ) -> SignedRecord:
        """A contribution on the default parents, and on `merge` too (say, upstream heads)."""
        parents = tuple(sorted({*self.default_parents(project), *merge}, key=_raw))
        changeset = Changeset(tuple(make_change(p, changes[p]) for p in sorted(changes)))
        data = changeset.encode()
        link = CID.of_dag_cbor(data)
        self.blocks[link] = data
        return self._create(
            Contribution(
                author=self.identity.public_key,
                ts=self.next_ts(),
                project=project,
                parents=parents,
                changes=(link,),
                message=message,
            )
        )

    def validate(self, target: SignedRecord, verdict: Verdict = "accept") -> SignedRecord:
        return self._create(
            Validation(
                author=self.identity.public_key,
                ts=self.next_ts(),
                project=target.project,
                target=target.cid,
                verdict=verdict,
            )
        )

    def govern(
        self,
        project: CID,
        action: GovernanceAction,
        *,
        key: bytes | None = None,
        quorum: int | None = None,
    ) -> SignedRecord:
        return self._create(
            Governance(
                author=self.identity.public_key,
                ts=self.next_ts(),
                project=project,
                parents=self.default_parents(project),
                action=action,
                key=key,
                quorum=quorum,
            )
        )

    def need(self, project: CID, title: str) -> SignedRecord:
        return self._create(
            Need(author=self.identity.public_key, ts=self.next_ts(), project=project, title=title)
        )

    # --- gossip -----------------------------------------------------------------------------

    def publish(self, record: SignedRecord) -> None:
        for project in sync_projects(record):
            topic = topic_of(project)
            self._seen.add(_message_id(topic, record.data))
            self.gossip(topic, record.data, exclude="")

    def gossip(self, topic: str, data: bytes, *, exclude: str) -> None:
        """Send a message to every connected neighbour subscribed to `topic`."""
        for peer in self.peers():
            if peer != exclude and self.net.nodes[peer].subscribed(topic):
                self.net.send(self.name, peer, Envelope("gossip", data, topic=topic))

    def _gossip_received(self, peer: str, topic: str, data: bytes) -> None:
        """Replicator._gossip_received, behind gossipsub's seen-cache and relay."""
        message_id = _message_id(topic, data)
        if message_id in self._seen or not self.subscribed(topic):
            return
        try:
            record = decode_record(data)
            if topic not in _topics_of(record):
                raise DecodeError(f"a record of {record.project} on the topic {topic}")
        except OstromError:
            self.stats.gossip_refused += 1
            strikes = self._strikes.get(peer, 0) + 1
            self._strikes[peer] = strikes
            if strikes >= replication.MAX_GOSSIP_STRIKES:
                self.drop(peer, f"{strikes} gossiped records failed verification")
            return
        self._seen.add(message_id)
        if self.store_new([record], "gossip"):
            if any(parent not in self.records for parent in record.parents):
                # The project of the topic, which this node follows (for a fork's genesis on
                # its parent's topic, the parent project).
                on = next(p for p in sync_projects(record) if topic_of(p) == topic)
                self.request_sync(peer, on)
            elif isinstance(record.body, Contribution):
                self.complete_blocks(record.project, [peer])
        self.gossip(topic, data, exclude=peer)

    # --- sync -------------------------------------------------------------------------------

    def reach(
        self, start: Iterable[bytes], inside: Callable[[bytes], bool]
    ) -> tuple[list[bytes], set[bytes]]:
        """Store.reach over this node's records."""
        stack = [raw for raw in set(start) if not inside(raw)]
        seen = set(stack)
        found: list[bytes] = []
        absent: set[bytes] = set()
        while stack:
            raw = stack.pop()
            record = self.records.get(CID(raw))
            if record is None:
                absent.add(raw)
                continue
            found.append(raw)
            for parent in record.parents:
                if parent.raw not in seen and not inside(parent.raw):
                    seen.add(parent.raw)
                    stack.append(parent.raw)
        return found, absent

    def sync_index(self, project: CID) -> ReconcileIndex | None:
        """NodeService.sync_index: the project's sync set (`ostrom.protocol.syncset`)."""
        if project not in self.following and project not in self.records:
            return None
        sync_set = self._sync_sets.get(project)
        if sync_set is None or sync_set.overflowed:
            seeds = [
                (cid.raw, b"".join(p.raw for p in self.records[cid].parents))
                for cid in self._members.get(project, ())
            ]
            sync_set = self._sync_sets[project] = SyncSet.build(seeds, self.reach)
        return sync_set.index

    def sync_records(self, cids: Sequence[CID]) -> list[bytes]:
        return [self.records[cid].data for cid in cids if cid in self.records]

    def sync_ingest(
        self,
        items: Sequence[bytes],
        peer: str,
        project: CID | None = None,
        learned: Collection[bytes] = (),
    ) -> SimIngest:
        """NodeService.sync_verify then sync_store: verify, keep the records, report missing
        parents. With `project` (a push, sync._take_push), a record is refused unless it is
        `learned` (the responder's `need`), of the project, or already held."""
        result = SimIngest()
        good: list[SignedRecord] = []
        for item in items:
            try:
                record = decode_record(item)
            except OstromError:
                result.refused += 1
                continue
            if (
                project is not None
                and record.cid.raw not in learned
                and project not in sync_projects(record)
            ):
                if record.cid not in self.records:
                    result.refused += 1
                continue
            good.append(record)
        self.stats.sync_refused += result.refused
        new = set(self.store_new(good, "sync"))
        result.stored = [r.cid for r in good if r.cid in new]
        result.known = [r.cid for r in good if r.cid not in new]
        parents = {p for r in good if r.cid in new for p in r.parents}
        result.missing_parents = {p for p in parents if p not in self.records}
        return result

    def request_sync(self, peer: str, project: CID) -> None:
        """Replicator._request_sync and _run_syncs: a repeat of a queued or running request
        is merged into it; at most MAX_CONCURRENT_SYNCS sessions run at once."""
        request = (peer, project)
        if request in self._pending or len(self._waiting) >= replication.SYNC_QUEUE:
            return
        self._pending.add(request)
        self._waiting.append(request)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and self._active < replication.MAX_CONCURRENT_SYNCS:
            peer, project = self._waiting.popleft()
            if not self.net.is_up(self.name, peer):
                self._pending.discard((peer, project))
                continue
            self._next_session += 1
            key = (self.name, self._next_session)
            session = _Pull(self, peer, key, project)
            self._sessions[(key, True)] = session
            self._active += 1
            if not session.begin():
                session.close("refused: not hosted here")

    def session_closed(self, session: _Session) -> None:
        del self._sessions[(session.key, session.initiator)]
        ok = session.outcome == "ok"
        if isinstance(session, _Pull):
            self._active -= 1
            self._pending.discard((session.peer, session.project))
            kind = session.outcome.split(":")[0]
            self.stats.sessions[kind] = self.stats.sessions.get(kind, 0) + 1
            self.completed.append(session)
            if ok:
                self._shared.setdefault(session.peer, set()).add(session.project)
                self.complete_blocks(session.project, [session.peer])
            self._start_waiting()
        elif ok and isinstance(session, _Serve) and session.project is not None:
            self._shared.setdefault(session.peer, set()).add(session.project)
            if session.result.received:
                self.complete_blocks(session.project, [session.peer])

    def _periodic(self) -> None:
        """Replicator._run_periodic: every project with two peers known to share it (or any
        two, when none is known to), and one connected peer not known to share it.

        Without that third peer (`explore=False`) the choice can starve a project: two
        followers that synced with each other first (and not with the node holding the
        records, a connection lost at start) know each other as sharing it and never try
        anyone else until new gossip or a reconnection; see
        test_simulation.py::test_followers_that_only_know_each_other.
        """
        peers = self.peers()
        for project in list(self.following):
            sharing = [p for p in peers if project in self._shared.get(p, ())]
            chosen = self.rng.sample(sharing or peers, min(2, len(sharing or peers)))
            others = [p for p in peers if p not in sharing]
            if self.explore and sharing and others:
                chosen.append(self.rng.choice(others))
            for peer in chosen:
                self.request_sync(peer, project)
        self.sim.after(SYNC_INTERVAL, self._periodic)

    # --- blocks -----------------------------------------------------------------------------

    def complete_blocks(self, project: CID, peers: Sequence[str], attempt: int = 0) -> None:
        """Replicator._complete_blocks for changesets: ask the peer, then the peers known to
        share the project, and look again after a doubling delay while some are missing."""
        if project not in self.following:
            return
        wanted = self.missing_changesets(project)
        if not wanted:
            return
        sources = [p for p in peers if self.net.is_up(self.name, p)]
        sources += [
            p for p in self.peers() if project in self._shared.get(p, ()) and p not in sources
        ]
        if sources:
            source = sources[attempt % len(sources)]
            for start in range(0, len(wanted), blockwire.MAX_WANT):
                chunk = wanted[start : start + blockwire.MAX_WANT]
                frame = encode_frame(
                    {"t": "want", "cids": [c.raw for c in chunk]}, max_frame=blockwire.MAX_FRAME
                )
                self.net.send(self.name, source, Envelope("blocks-want", frame))
        if attempt + 1 < replication.BLOCK_RETRIES:
            delay = BLOCK_RETRY_FIRST << attempt
            self.sim.after(delay, lambda: self.complete_blocks(project, peers, attempt + 1))

    def _blocks_wanted(self, peer: str, data: bytes) -> None:
        reader = FrameReader(max_frame=blockwire.MAX_FRAME)
        out = bytearray()
        try:
            for frame in reader.feed(data):
                want = _expect(frame, "want")
                for cid in _cids(want.get("cids"), blockwire.MAX_WANT):
                    block = self.blocks.get(cid)
                    answer: dict[str, Any] = (
                        {"t": "missing", "cid": cid.raw}
                        if block is None
                        else {"t": "block", "cid": cid.raw, "data": block}
                    )
                    out += encode_frame(answer, max_frame=blockwire.MAX_FRAME)
        except OstromError as exc:
            self.drop(peer, exc.message)
            return
        if out:
            self.net.send(self.name, peer, Envelope("blocks", bytes(out)))

    def _blocks_received(self, peer: str, data: bytes) -> None:
        reader = FrameReader(max_frame=blockwire.MAX_FRAME)
        try:
            for frame in reader.feed(data):
                answer = _expect(frame, "block", "missing")
                if answer["t"] == "missing":
                    continue
                cid, block = CID(answer["cid"]), answer["data"]
                if not isinstance(block, bytes) or not cid.matches(block):
                    raise BlockMismatch(f"{cid}: the bytes do not hash to this CID")
                Changeset.decode(block)
                if cid not in self.blocks:
                    self.blocks[cid] = block
                    self.stats.blocks_fetched += 1
        except OstromError as exc:
            self.drop(peer, exc.message)

    # --- the wire ---------------------------------------------------------------------------

    def receive(self, peer: str, envelope: Envelope) -> None:
        kind = envelope.kind
        if kind == "gossip":
            self._gossip_received(peer, envelope.topic, envelope.data)
        elif kind == "sync":
            initiator = envelope.to_initiator
            session = self._sessions.get((envelope.session, initiator))
            if session is None:
                if initiator or envelope.session[0] != peer:
                    return  # a frame for a session that has ended here
                session = _Serve(self, peer, envelope.session)
                self._sessions[(envelope.session, False)] = session
            session.feed(envelope.data)
        elif kind == "blocks-want":
            self._blocks_wanted(peer, envelope.data)
        elif kind == "blocks":
            self._blocks_received(peer, envelope.data)


def _topics_of(record: SignedRecord) -> set[str]:
    return {topic_of(project) for project in sync_projects(record)}


def _message_id(topic: str, data: bytes) -> bytes:
    """PROTOCOL.md 11.2: sha256(topic || 0x00 || data)."""
    return hashlib.sha256(topic.encode() + b"\x00" + data).digest()


# --- a hostile node ------------------------------------------------------------------------------


class HostileNode(SimNode):
    """A node that lies. It follows projects and keeps the genuine records it receives, as
    material for its forgeries, but creates nothing genuine.

    With `flood`, every `interval` it sends each neighbour, on each topic it follows, a
    round of bad gossip: a genuine record with a flipped signature bit, one re-signed by this
    node's key under its genuine author, random bytes, a truncated record, a well-formed
    DAG-CBOR map that is no record, and a genuine record on another project's topic.
    With `lie`, its sync index also holds ids of records that do not exist, so honest peers
    want them and it pushes them; it answers every want and push with forgeries, or, with
    `deny`, sends its genuine records and answers the wants of its invented ids `missing`.
    """

    def __init__(
        self,
        name: str,
        net: Network,
        identity: Identity,
        *,
        flood: bool = True,
        lie: bool = False,
        deny: bool = False,
        interval: int = 2 * SECOND,
    ) -> None:
        super().__init__(name, net, identity)
        self.flood = flood
        self.lie = lie
        self.deny = deny
        self.interval = interval
        self.sent_forgeries = 0

    def start(self) -> None:
        super().start()
        if self.flood:
            self.sim.at(self.interval // 2, self._flood)

    def forge(self, record: SignedRecord) -> list[bytes]:
        """Bad versions of a genuine record, each failing verification in a different way."""
        flipped = bytes([record.sig[0] ^ 1]) + record.sig[1:]
        resigned = signing.sign(self.identity, signing.RECORD_DOMAIN, signing_payload(record.body))
        return [
            record.data.replace(record.sig, flipped),
            record.data.replace(record.sig, resigned),
            record.data[: len(record.data) // 2],
        ]

    def _flood(self) -> None:
        genuine = list(self.records.values())
        for topic in sorted(self._topics):
            bad: list[tuple[str, bytes]] = [
                (topic, self.rng.randbytes(self.rng.randrange(1, 300))),
                (topic, dagcbor.encode({"type": "contribution", "v": 1})),
            ]
            if genuine:
                record = self.rng.choice(genuine)
                bad += [(topic, data) for data in self.forge(record)]
                elsewhere = [
                    r for r in genuine if topic_of(r.project) != topic and r.type != "project"
                ]
                if elsewhere:
                    bad.append((topic, self.rng.choice(elsewhere).data))
            for peer in self.peers():
                for on, data in bad:
                    self.sent_forgeries += 1
                    self.net.send(self.name, peer, Envelope("gossip", data, topic=on))
        self.sim.after(self.interval, self._flood)

    def sync_index(self, project: CID) -> ReconcileIndex | None:
        index = super().sync_index(project)
        if index is not None and self.lie:
            lies = ReconcileIndex.build(index)
            for _ in range(3):
                lies.add(CID.of_dag_cbor(self.rng.randbytes(40)).raw)
            return lies
        return index

    def sync_records(self, cids: Sequence[CID]) -> list[bytes]:
        if not self.lie or self.deny:  # a denier sends what it has, and lacks what it invented
            return super().sync_records(cids)
        out: list[bytes] = []
        for cid in cids:
            record = self.records.get(cid)
            if record is None:  # one of its invented ids: invent its bytes too
                out.append(dagcbor.encode({"type": "need", "v": 1, "sig": bytes(64)}))
            else:
                out.append(self.forge(record)[0])
            self.sent_forgeries += 1
        return out


# --- what a user sees ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A replica of one project as its node's user sees it; equal snapshots, equal views."""

    records: frozenset[CID]
    statuses: dict[CID, RecordStatus]
    policy: Policy
    heads: tuple[CID, ...]
    accepted: frozenset[CID]
    files: dict[str, FileEntry]
    conflicts: tuple[Conflict, ...]


def complete(node: SimNode, projects: Iterable[CID], expected: Mapping[CID, SignedRecord]) -> bool:
    """True once `node` holds every expected record and every changeset the projects need."""
    if any(cid not in node.records for cid in expected):
        return False
    return all(p in node.records and not node.missing_changesets(p) for p in projects)


def converged(
    nodes: Sequence[SimNode], projects: Sequence[CID], expected: Mapping[CID, SignedRecord]
) -> bool:
    """Every node holds every expected record, no other, and the blocks the projects need."""
    keys = set(expected)
    return all(complete(node, projects, expected) and set(node.records) == keys for node in nodes)


def _closure_key(cids: Iterable[CID]) -> bytes:
    return hashlib.sha256(b"".join(sorted(c.raw for c in cids))).digest()


def local_judgements(node: SimNode, project: CID) -> dict[tuple[CID, bytes], tuple[Any, ...]]:
    """What `node` says about each record of `project`, keyed by what the verdict may depend
    on: the record, its present ancestors and every validation of the project aimed at them.

    acceptance.evaluate promises that a record's status depends on nothing else (not on the
    order records came in, nor on unrelated records a node also holds), so two nodes with the
    same key must give the same judgement, however different their replicas are otherwise.
    The tree at the accepted heads is keyed the same way by the heads' ancestry, once that
    ancestry and its changesets are all here.
    """
    if project not in node.records:
        return {}
    history = node.history(project)
    state = node.state(project)
    ballots: dict[CID, list[CID]] = {}
    for cid, record in history.items():
        body = record.body
        if isinstance(body, Validation) and body.project == project:
            ballots.setdefault(body.target, []).append(cid)
    closures: dict[CID, frozenset[CID]] = {}

    def closure(start: CID) -> frozenset[CID]:
        found = closures.get(start)
        if found is not None:
            return found
        seen: set[CID] = set()
        stack = [start]
        while stack:
            cid = stack.pop()
            if cid not in seen and cid in node.records:
                seen.add(cid)
                stack.extend(node.records[cid].parents)
        closures[start] = frozenset(seen)
        return closures[start]

    def key(members: frozenset[CID]) -> bytes:
        votes = [v for cid in members for v in ballots.get(cid, ())]
        return _closure_key(members) + _closure_key(votes)

    out: dict[tuple[CID, bytes], tuple[Any, ...]] = {}
    for cid, status in state.statuses.items():
        out[(cid, key(closure(cid)))] = (status.status, status.votes, status.quorum)
    heads = state.accepted_heads
    members = frozenset(c for h in heads for c in closure(h))
    # The tree needs the heads' whole ancestry and its changesets; a fork's genesis can be
    # here before the upstream records it descends from (it travels with its parent project).
    whole = all(p in node.records for c in members for p in node.records[c].parents)
    if whole and not node.missing_changesets(project):
        tree = replay(heads, history, node.changeset)
        out[(project, b"tree" + key(members))] = (dict(tree.files), tree.conflicts)
    return out


def check_local_agreement(nodes: Sequence[SimNode], projects: Sequence[CID]) -> int:
    """Assert that nodes judging a record from the same inputs agree; return how many
    (record, inputs) pairs were held by two nodes or more."""
    shared = 0
    for project in projects:
        seen: dict[tuple[CID, bytes], tuple[str, tuple[Any, ...]]] = {}
        counted: set[tuple[CID, bytes]] = set()
        for node in nodes:
            for key, judgement in local_judgements(node, project).items():
                first = seen.setdefault(key, (node.name, judgement))
                if first[0] != node.name:
                    assert judgement == first[1], (
                        f"{node.name} and {first[0]} judge {key[0]} differently "
                        f"from the same records: {judgement} != {first[1]}"
                    )
                    counted.add(key)
        shared += len(counted)
    return shared
