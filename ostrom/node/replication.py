"""Keeping followed projects in step across the mesh.

For every project this node follows, the replicator:
- subscribes to the project's gossip topic, validating each record before it is relayed;
- publishes the records this node creates there;
- provides the project on the DHT, and looks for providers of projects it lacks;
- syncs with each peer on connect and every `SYNC_INTERVAL_S`, then fetches the blocks the
  new records need: changesets and manifests always, file blocks when following in full;
- makes the blocks of a private mesh's work that a project merges (made here or gossiped)
  the project's too, so that they go wherever the project goes (docs/PROTOCOL.md 11.5).

A peer whose gossip fails verification `MAX_GOSSIP_STRIKES` times, or that breaks the sync
or blocks protocol, is disconnected with the reason.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import peer_id_of
from ostrom.errors import (
    BlockMismatch,
    DecodeError,
    NotFound,
    OstromError,
    QuotaExceeded,
    Refused,
)
from ostrom.node import blocks, sync
from ostrom.node.bandwidth import MeteredStream
from ostrom.node.blockplan import (
    BlockWants,
    claim_merged_files,
    claim_merged_work,
    merges_other_projects,
)
from ostrom.node.framed import ByteStream
from ostrom.node.ingest import RecordRow
from ostrom.node.mesh import Mesh, MeshStream
from ostrom.node.service import BRIEF_READ_BYTES, NodeService, sync_projects
from ostrom.node.store import Store
from ostrom.node.streampool import StreamPool
from ostrom.node.transfers import ProgressListener, Purpose, Transfer
from ostrom.protocol import blockwire
from ostrom.protocol.catalogue import announceable_addrs
from ostrom.protocol.reconcile import ReconcileIndex
from ostrom.protocol.records import Contribution, Project, SignedRecord, decode_record

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ostrom.node.meshsync import MeshReplicator

log = logging.getLogger(__name__)

TOPIC_PREFIX: Final = "ostrom/1/project/"
# Gossip records failing verification before the sender is disconnected: one may be a bug
# in a peer's version, several are an attack.
MAX_GOSSIP_STRIKES: Final = 3
# How often every followed project is synced with a connected peer even without news:
# gossip may drop messages, and this bounds how long a gap can last.
SYNC_INTERVAL_S: Final = 30.0
# Sync sessions running at once (each holds a stream and verification work).
MAX_CONCURRENT_SYNCS: Final = 4
# How often followed projects are provided again on the DHT (records there expire).
PROVIDE_INTERVAL_S: Final = 600.0
# Queued sync requests; past this, requests are dropped (the periodic sync covers them).
SYNC_QUEUE: Final = 1024
# Attempts to complete a project's blocks when peers lacked some, and the first wait between
# them (doubling): a relay usually has them within a second or two of the record.
BLOCK_RETRIES: Final = 5
BLOCK_RETRY_FIRST_S: Final = 1.0
# How long a follow of an unseen project keeps looking for providers before giving up.
FIND_TIMEOUT_S: Final = 20.0
# Hosts of a followed project, as mesh catalogues list it, dialled at once when none is
# connected: one that answers is enough to sync with; a few allow for some being offline.
MAX_HOST_DIALS: Final = 3
# How long those dials may take together: a reachable host answers within a second; an
# unreachable address may take the mesh's dial timeout (10 s) before the next is tried.
HOST_DIAL_TIMEOUT_S: Final = 30.0
# How long a project whose catalogue hosts were dialled waits before the periodic sync dials
# them again (an explicit follow does not wait): hosts that were offline may be back, while an
# offline host costs a dial attempt per project this often, not every sync round.
HOST_REDIAL_S: Final = 300.0
# Gossiped records up to this size are decoded and verified on the event loop: handing a
# small record to a thread and back costs more than its decoding (about 0.1 ms for a 1 KiB
# record). Larger ones, up to the 64 KiB record limit, are decoded on a thread.
GOSSIP_INLINE_BYTES: Final = 8192
# Verified gossip waiting to be stored. Each was already relayed; one that does not fit is
# left to the periodic sync (`SYNC_INTERVAL_S`).
GOSSIP_STORE_QUEUE: Final = 1024
# Project topics `topic_of` remembers: more than the projects a node follows, and a few
# hundred bytes each.
TOPICS_REMEMBERED: Final = 1024
# Authors' peer ids `author_peer` remembers: the active authors of a node's projects, at
# about a hundred bytes each.
AUTHORS_REMEMBERED: Final = 1024
# Gossiped records stored in one transaction at most: a burst costs one write, not one each.
GOSSIP_STORE_BATCH: Final = 256
# How long a completion started by gossiped contributions of a busy project waits before it
# looks for their blocks: the contributions gossiped meanwhile join it, so followers fetch
# the blocks of many in one pass (three calls to the store and a want or two per peer)
# instead of one pass each. Their blocks then arrive this much later; the records do not
# wait. A project is busy when its last gossip completion started less than
# `GOSSIP_BUSY_S` before: a lone contribution's blocks are fetched at once. Three seconds:
# at 20 daemons and 20 contributions a second (`bench.gossip`, docs/BENCHMARKS.md step 14),
# relays spent 5.2-5.6 ms of CPU per record against 6.5-6.6 ms with one second (5.4-5.9 ms
# with two), and the node the contributions came from 10-11 ms per contribution against
# 13-14 ms, since it answers a third as many wants. The busy window stays above a pass's
# longest gather (`GOSSIP_GATHER_SPREAD`) and its fetch.
GOSSIP_BLOCKS_GATHER_S: Final = 3.0
GOSSIP_BUSY_S: Final = 5.0
# Each pass gathers for `GOSSIP_BLOCKS_GATHER_S` times a factor drawn between 1 minus and 1
# plus this. The followers of a project get its gossip within milliseconds of each other, so
# with one fixed gathering they all ask the author's node for blocks at the same moment, and
# every node fetches and stores while the others do: at 20 daemons on 2 cores each such
# moment held up the gossip behind it by 200-400 ms (docs/BENCHMARKS.md, gossip step 14).
# Spread over half a gathering either way, the passes no longer fall together.
GOSSIP_GATHER_SPREAD: Final = 0.5
# How long a blocks stream stays open, idle, for the next fetch from the same peer: a busy
# project's contributions arrive seconds apart at most; a server ends a stream idle for
# 30 s (`ostrom.node.framed.IDLE_TIMEOUT_S`), which this stays well below.
BLOCK_STREAM_IDLE_S: Final = 10.0
# Idle blocks streams kept per peer: fetches for two or three projects may overlap.
BLOCK_STREAMS_PER_PEER: Final = 3


class _Completion:
    """One project's block completion under way, and the peers it fetches from."""

    def __init__(
        self,
        peers: Iterable[str],
        records: Iterable[CID] | None,
        known: Mapping[CID, tuple[CID, ...]] | None = None,
    ) -> None:
        self.sources: list[str] = []
        self.fetch: blocks.BlockFetch | None = None
        # Set when a peer joins: the lists of missing blocks may be out of date.
        self.joined = False
        self._joined_event = trio.Event()
        # The records whose blocks the next pass looks for; None: the whole project's.
        self.scope: set[CID] | None = None if records is None else set(records)
        # The changesets that gossiped contributions of the scope name, decoded as they
        # arrived: the pass does not read those records back from the store.
        self.known: dict[CID, tuple[CID, ...]] = dict(known or {})
        self.add_sources(peers)

    def add_sources(self, peers: Iterable[str]) -> None:
        """Fetch from `peers` too, from now on and in the fetch under way."""
        for peer in peers:
            if peer not in self.sources:
                self.sources.append(peer)
            if self.fetch is not None:
                self.fetch.add_peer(peer)

    def join(
        self,
        peers: Iterable[str],
        records: Iterable[CID] | None,
        known: Mapping[CID, tuple[CID, ...]] | None = None,
    ) -> None:
        """`peers` have news for this project: `records` gossiped, or (None) a sync."""
        self.add_sources(peers)
        self.widen(records, known)
        self.joined = True
        self._joined_event.set()
        self._joined_event = trio.Event()

    async def wait_joined(self) -> None:
        await self._joined_event.wait()

    def widen(
        self, records: Iterable[CID] | None, known: Mapping[CID, tuple[CID, ...]] | None = None
    ) -> None:
        """Look at `records` too in the next pass (None: at the whole project)."""
        if records is None:
            self.scope = None
            self.known = {}
        elif self.scope is not None:
            self.scope.update(records)
            if known:
                self.known.update(known)

    def take_scope(self) -> tuple[set[CID] | None, dict[CID, tuple[CID, ...]]]:
        """The scope of the pass about to run, and the changesets known of its records;
        what joins during it widens the next one."""
        scope, self.scope = self.scope, set()
        known, self.known = self.known, {}
        return scope, known


# A verified gossiped record, the peer it came from, and the project of its topic.
_Gossiped = tuple[SignedRecord, str, CID]


def gather_time() -> float:
    """How long a busy project's next block pass gathers gossip (`GOSSIP_GATHER_SPREAD`)."""
    spread = random.uniform(-GOSSIP_GATHER_SPREAD, GOSSIP_GATHER_SPREAD)
    return GOSSIP_BLOCKS_GATHER_S * (1 + spread)


@functools.lru_cache(maxsize=AUTHORS_REMEMBERED)
def author_peer(public_key: bytes) -> str:
    """The peer id of the node whose key signs an author's records; remembered, since a
    busy project's contributions come from few authors and base58 costs a few microseconds."""
    return peer_id_of(public_key)


@functools.lru_cache(maxsize=TOPICS_REMEMBERED)
def topic_of(project: CID) -> str:
    """The gossip topic of `project`; remembered, since every gossiped record checks its
    topic and a CID's base32 text costs more than decoding the record's CBOR."""
    return f"{TOPIC_PREFIX}{project}"


class Replicator:
    def __init__(self, service: NodeService, mesh: Mesh) -> None:
        self.service = service
        self.mesh = mesh
        self._strikes: dict[str, int] = {}
        self._shared: dict[str, set[CID]] = {}  # peer -> projects it synced with us
        self._following: set[CID] = set()
        # Followed projects whose genesis has been read for a private mesh (`_keep_to_mesh`).
        self._access_known: set[CID] = set()
        self._send_sync, self._sync_requests = trio.open_memory_channel[tuple[str, CID]](SYNC_QUEUE)
        self._send_publish, self._publish_queue = trio.open_memory_channel[SignedRecord](SYNC_QUEUE)
        # Verified gossip: the record, the peer it came from, and the project of the topic it
        # came on (its own, or for a fork's genesis the parent project).
        self._send_gossip, self._gossip_queue = trio.open_memory_channel[_Gossiped](
            GOSSIP_STORE_QUEUE
        )
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_SYNCS)
        self._pending: set[tuple[str, CID]] = set()
        self._completions: dict[CID, _Completion] = {}  # block completions under way
        # Followed projects whose last whole-project block completion found nothing missing:
        # a sync that brings nothing new skips the history walk for them. Emptied of a
        # project when a completion leaves blocks missing, or its follow mode changes.
        self._blocks_complete: set[CID] = set()
        # When the catalogue hosts of each followed project were last dialled (trio time):
        # as large as the follows at most, pruned as entries age past `HOST_REDIAL_S`.
        self._hosts_dialled: dict[CID, float] = {}
        # When each project's last gossip completion started (trio time): whether the
        # project is busy (`GOSSIP_BUSY_S`). Entries older than that go every sync round.
        self._gossip_completed: dict[CID, float] = {}
        # Blocks streams kept open between fetches (`ostrom.node.streampool`).
        self._block_streams = StreamPool(
            self._new_blocks_stream, idle_s=BLOCK_STREAM_IDLE_S, per_peer=BLOCK_STREAMS_PER_PEER
        )
        self._nursery: trio.Nursery | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.mesh.set_stream_handler(sync.PROTOCOL, self._serve_sync)
        self.mesh.set_stream_handler(blockwire.PROTOCOL, self._serve_blocks)
        self.mesh.on_peer_connected(self._peer_connected)
        self.mesh.on_peer_disconnected(self._peer_disconnected)
        self.service.record_listeners.append(self._records_stored)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            follows = await self.service.db(lambda store: store.follows())
            for project in follows:
                await self._start_following(project)
            nursery.start_soon(self._run_syncs)
            nursery.start_soon(self._run_publishing)
            nursery.start_soon(self._run_gossip_store)
            nursery.start_soon(self._run_periodic)
            nursery.start_soon(self._block_streams.run_pruning)
            task_status.started()

    def shared_projects(self, peer_id: str) -> list[str]:
        return sorted(str(p) for p in self._shared.get(peer_id, ()))

    async def follow(self, project: CID) -> None:
        """Start replicating a project just followed; find it on the DHT if it is not here."""
        self._blocks_complete.discard(project)  # the mode may have changed to full
        await self._start_following(project)
        for peer in self.mesh.peers():
            self._request_sync(peer.peer_id, project)
        if self._nursery is not None:
            # A project found in a mesh catalogue: its hosts there, if none is connected.
            self._nursery.start_soon(self._reach_hosts, project)
        present = await self.service.db(lambda store: store.get_record(project) is not None)
        if not present and self._nursery is not None:
            self._nursery.start_soon(self._find_and_fetch, project)

    async def unfollow(self, project: CID) -> None:
        self._blocks_complete.discard(project)
        self._hosts_dialled.pop(project, None)
        self._gossip_completed.pop(project, None)
        if project in self._following:
            self._following.discard(project)
            await self.mesh.unsubscribe(topic_of(project))

    async def _start_following(self, project: CID) -> None:
        if project in self._following:
            return
        self._following.add(project)
        await self._keep_to_mesh(project)
        await self.mesh.subscribe(topic_of(project), self._gossip_received)
        if self._nursery is not None:
            self._nursery.start_soon(self._provide, project)

    # --- peers ---------------------------------------------------------------------------------

    def _peer_connected(self, peer_id: str) -> None:
        for project in self._following:
            self._request_sync(peer_id, project)

    def _peer_disconnected(self, peer_id: str) -> None:
        self._shared.pop(peer_id, None)
        self._strikes.pop(peer_id, None)
        self._block_streams.forget(peer_id)

    def _request_sync(self, peer_id: str, project: CID) -> None:
        try:
            self._send_sync.send_nowait((peer_id, project))
        except trio.WouldBlock:
            log.debug("sync queue full; %s with %s waits for the periodic sync", project, peer_id)

    async def _drop(self, peer_id: str, reason: str) -> None:
        log.warning("disconnecting %s: %s", peer_id, reason)
        self.service.events.publish({"type": "peer.dropped", "peer": peer_id, "reason": reason})
        await self.mesh.disconnect(peer_id, reason)

    # --- gossip --------------------------------------------------------------------------------

    async def _keep_to_mesh(self, project: CID) -> None:
        """Gossip a private mesh's project only with that mesh's members. Known once the
        genesis is here: a project followed by CID is checked again after each sync."""
        if project in self._access_known:
            return
        try:
            mesh = await self.service.project_mesh(project)
        except NotFound:
            return
        self._learn_access(project, mesh)

    def _learn_access(self, project: CID, mesh: CID | None) -> None:
        if project in self._access_known:
            return
        self._access_known.add(project)
        if mesh is not None:
            self.mesh.set_topic_access(
                topic_of(project), lambda peer: self.service.mesh_admits(mesh, peer)
            )

    def _records_stored(self, records: Sequence[SignedRecord], origin: str) -> None:
        if origin != "local":
            return
        for record in records:
            try:
                self._send_publish.send_nowait(record)
            except trio.WouldBlock:
                log.debug("publish queue full; %s reaches peers by sync", record.cid)

    async def _run_publishing(self) -> None:
        async for record in self._publish_queue:
            for project in sync_projects(record):
                log.debug("publishing %s %s on %s", record.type, record.cid, project)
                await self.mesh.publish(topic_of(project), record.data)
            if isinstance(record.body, Contribution) and await self.service.db_read(
                merges_other_projects, record.project, record.parents
            ):
                # This node's own merge: the work it takes in is the project's from now on
                # (`contribution.create` attributed what is here before signing it), and a
                # completion fetches what of it is missing. (Nearly every contribution names
                # only its own project's records, which the index lookup tells at once.)
                try:
                    merged = await self._claim_merged(record)
                except OstromError as exc:
                    log.warning("merged work of %s not claimed: %s", record.cid, exc.message)
                    merged = []
                if merged and self._nursery is not None:
                    self._nursery.start_soon(
                        self._complete_blocks, record.project, [], [record.cid, *merged]
                    )

    async def _gossip_received(self, topic: str, data: bytes, from_peer: str) -> bool:
        """Verify a gossiped record and queue it to be stored. False stops its relay.

        The answer needs only the record's own validity, so it does not wait for the store:
        relaying goes on while the record waits for its batch's write.
        """
        log.debug("gossip on %s from %s (%d bytes)", topic, from_peer, len(data))
        try:
            if len(data) <= GOSSIP_INLINE_BYTES:
                record = decode_record(data)
            else:
                record = await trio.to_thread.run_sync(decode_record, data)
            on = [project for project in sync_projects(record) if topic_of(project) == topic]
            if not on:
                raise DecodeError(f"a record of {record.project} on the topic {topic}")
        except OstromError as exc:
            strikes = self._strikes.get(from_peer, 0) + 1
            self._strikes[from_peer] = strikes
            log.info("invalid gossip from %s (%d): %s", from_peer, strikes, exc.message)
            if strikes >= MAX_GOSSIP_STRIKES and self._nursery is not None:
                self._nursery.start_soon(
                    self._drop, from_peer, f"{strikes} gossiped records failed verification"
                )
            return False
        try:
            self._send_gossip.send_nowait((record, from_peer, on[0]))
        except trio.WouldBlock:
            log.debug("gossip store queue full; %s arrives by sync", record.cid)
        # Relayed only once this node knows who may have the project (its genesis says
        # whether a private mesh keeps it): records of a project followed by CID and not
        # here yet are kept but not passed on. Sync completes the others' replicas.
        if isinstance(record.body, Project) and record.cid == record.project:
            self._learn_access(record.project, record.body.mesh)
        else:
            await self._keep_to_mesh(record.project)
        return record.project in self._access_known

    async def _run_gossip_store(self) -> None:
        """Store verified gossip in batches: what arrived while the last write ran."""
        async for first in self._gossip_queue:
            batch = [first]
            while len(batch) < GOSSIP_STORE_BATCH:
                try:
                    batch.append(self._gossip_queue.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._store_gossip(batch)
            except OstromError as exc:
                log.warning("storing %d gossiped record(s) failed: %s", len(batch), exc.message)

    async def _store_gossip(self, batch: Sequence[_Gossiped]) -> None:
        """Store gossiped records; sync what lacks parents, fetch blocks of contributions."""
        arrived = [record for record, _, _ in batch]
        parents = {parent for record in arrived for parent in record.parents}
        stored, present = await self.service.store_new_seeing_parents(arrived, "gossip", parents)
        if not stored:
            return
        new = set(stored)
        fresh: dict[CID, _Gossiped] = {}
        for gossiped in batch:
            if gossiped[0].cid in new:
                fresh.setdefault(gossiped[0].cid, gossiped)
        blocks_from: dict[CID, tuple[list[str], list[CID], dict[CID, tuple[CID, ...]]]] = {}
        merges: list[SignedRecord] = []
        for record, peer, topic_project in fresh.values():
            if any(parent not in present for parent in record.parents):
                # The project of the topic: the one this node follows. A fork's genesis on its
                # parent's topic lacks parent records, which that project's set holds; the
                # fork itself this node may not follow at all.
                self._request_sync(peer, topic_project)
            elif isinstance(record.body, Contribution):
                peers, records, known = blocks_from.setdefault(record.project, ([], [], {}))
                records.append(record.cid)
                known[record.cid] = record.body.changes
                # Asked first: the node that made the contribution, which holds its blocks,
                # where the relay it came from may still be fetching them (and answer
                # `missing`). Then the relay, then the project's other peers.
                author = author_peer(record.author)
                if author not in peers and record.project in self._shared.get(author, ()):
                    peers.insert(0, author)
                if peer not in peers:
                    peers.append(peer)
                if any(present[parent] != record.project for parent in record.parents):
                    merges.append(record)
        for record in merges:
            _, records, _ = blocks_from[record.project]
            records.extend(await self._claim_merged(record))
        if self._nursery is not None:
            # Only these contributions' blocks (and the work they merge from other projects):
            # the rest of the project was looked at before.
            for project, (peers, records, known) in blocks_from.items():
                self._nursery.start_soon(self._complete_blocks, project, peers, records, known)

    async def _claim_merged(self, record: SignedRecord) -> list[CID]:
        """Attribute to `record`'s project the blocks, held here, of the private meshes' work
        it merges from other projects (`merged_work`), so that they are served to whoever
        may have the project; returns that work's records, whose missing blocks a
        completion of the project then fetches."""

        return await self.service.db(claim_merged_work, record.project, record.parents)

    # --- sync ----------------------------------------------------------------------------------

    async def _run_syncs(self) -> None:
        async with trio.open_nursery() as nursery:
            async for request in self._sync_requests:
                # A request already queued or running covers a repeat of it.
                if request not in self._pending:
                    self._pending.add(request)
                    nursery.start_soon(self._sync_with, *request)

    async def _sync_with(self, peer_id: str, project: CID) -> None:
        try:
            await self._sync_once(peer_id, project)
        finally:
            self._pending.discard((peer_id, project))

    async def _sync_once(self, peer_id: str, project: CID) -> None:
        if not await self.service.may_serve(project, peer_id):
            return  # a private mesh's project, and the peer is not a member: never offer it
        async with self._limiter:
            try:
                stream = await self.mesh.open_stream(peer_id, sync.PROTOCOL)
            except OstromError as exc:
                log.debug("no sync stream to %s: %s", peer_id, exc.message)
                return
            try:
                # Leaving `async with` finishes the stream: both sides close, then it is
                # released (a stream only closed stays allocated in py-libp2p).
                async with stream:
                    result = await sync.pull(self._metered(stream), self.service, project, peer_id)
            except Refused:
                return  # the peer does not host this project
            except sync.PeerMisbehaving as exc:
                await self._drop(peer_id, exc.message)
                return
            except OstromError as exc:
                log.info("sync of %s with %s failed: %s", project, peer_id, exc.message)
                return
        self._shared.setdefault(peer_id, set()).add(project)
        await self._keep_to_mesh(project)
        if result.received or result.sent:
            self.service.events.publish(
                {
                    "type": "sync.completed",
                    "project": str(project),
                    "peer": peer_id,
                    "received": result.received,
                    "sent": result.sent,
                }
            )
        if result.received or project not in self._blocks_complete:
            await self._complete_blocks(project, [peer_id])

    async def _serve_sync(self, stream: MeshStream) -> None:
        try:
            result = await sync.serve(
                self._metered(stream), _ServedTo(self.service, stream.peer_id), stream.peer_id
            )
        except sync.PeerMisbehaving as exc:
            await self._drop(stream.peer_id, exc.message)
            return
        except OstromError as exc:
            log.info("sync served to %s failed: %s", stream.peer_id, exc.message)
            return
        # The mesh finishes a handler's stream when the handler returns.
        if result is not None:
            self._shared.setdefault(stream.peer_id, set()).add(result.project)
            if result.received:
                await self._complete_blocks(result.project, [stream.peer_id])

    async def _run_periodic(self) -> None:
        while True:
            await trio.sleep(SYNC_INTERVAL_S)
            busy_since = trio.current_time() - GOSSIP_BUSY_S
            self._gossip_completed = {
                p: t for p, t in self._gossip_completed.items() if t >= busy_since
            }
            peers = [p.peer_id for p in self.mesh.peers()]
            for project in list(self._following):
                sharing = [p for p in peers if project in self._shared.get(p, ())]
                chosen = random.sample(sharing or peers, min(2, len(sharing or peers)))
                # Also one peer not known to share the project: followers that first synced
                # only with each other (the holder unreachable then) would otherwise never
                # try anyone else while the project is quiet.
                others = [p for p in peers if p not in sharing]
                if sharing and others:
                    chosen.append(random.choice(others))
                for peer in chosen:
                    self._request_sync(peer, project)
                # No peer here has synced it: its hosts in mesh catalogues may be reachable
                # though not connected (after a restart, say), now or since the last try.
                if not sharing and self._nursery is not None:
                    last = self._hosts_dialled.get(project)
                    if last is None or trio.current_time() - last >= HOST_REDIAL_S:
                        self._nursery.start_soon(self._reach_hosts, project)

    # --- blocks --------------------------------------------------------------------------------

    async def _serve_blocks(self, stream: MeshStream) -> None:
        try:
            await blocks.serve(self._metered(stream), self.service, stream.peer_id)
        except (DecodeError, BlockMismatch) as exc:
            await self._drop(stream.peer_id, exc.message)
        except OstromError as exc:
            log.info("serving blocks to %s stopped: %s", stream.peer_id, exc.message)

    async def _complete_blocks(
        self,
        project: CID,
        peers: Sequence[str],
        records: Sequence[CID] | None = None,
        known: Mapping[CID, tuple[CID, ...]] | None = None,
    ) -> None:
        """Fetch what `project` lacks, once per project whatever the number of peers.

        `records` limits the search to the blocks those records name (gossiped
        contributions, whose parents are here and were looked at before); None looks at the
        whole project, which walks its history. `known`: the changesets some of `records`
        name, decoded already (`BlockWants`).

        The first call runs the completion (for gossiped records of a busy project, after
        `gather_time`); a call while it runs adds its peers to it (to the fetch
        under way, too) and returns. Since such a peer may have just brought
        records naming more blocks, the completion then looks again for what is missing
        once its fetch ends (if only gossiped records joined, once `gather_time`
        has passed since its last pass began: what is gossiped meanwhile joins it). When
        peers lacked some blocks (a relay that has the record but is still fetching its
        blocks), it tries again a few times with backoff.
        """
        running = self._completions.get(project)
        if running is not None:
            running.join(peers, records, known)
            return
        completion = _Completion(peers, records, known)
        self._completions[project] = completion
        # When the last pass began: a pass that looks only at gossiped records starts
        # `gather_time()` after it, so that what is gossiped during one pass, and
        # joins it, gathers for the next instead of making a small pass of its own.
        last_pass: float | None = None
        try:
            if records is not None:
                now = trio.current_time()
                last = self._gossip_completed.get(project)
                self._gossip_completed[project] = now
                if last is not None and now - last < GOSSIP_BUSY_S:
                    # A busy project: what else arrives meanwhile joins the first pass too.
                    last_pass = now
            delay = BLOCK_RETRY_FIRST_S
            failures = 0
            while failures < BLOCK_RETRIES:
                if last_pass is not None:
                    # Until a sync or a follow asks for the whole project, which goes at once.
                    with trio.move_on_at(last_pass + gather_time()):
                        while completion.scope is not None:
                            await completion.wait_joined()
                last_pass = trio.current_time()
                completion.joined = False
                scope, known = completion.take_scope()
                if not await self._fetch_missing_blocks(project, completion, scope, known):
                    if scope is None:
                        self._blocks_complete.add(project)
                    if not completion.joined:
                        return
                    continue
                # Look again at what is still missing in the next pass.
                self._blocks_complete.discard(project)
                completion.widen(scope, known)
                failures += 1
                if not completion.joined:
                    with trio.move_on_after(delay):
                        await completion.wait_joined()
                delay *= 2
        finally:
            del self._completions[project]

    async def _fetch_missing_blocks(
        self,
        project: CID,
        completion: _Completion,
        scope: Collection[CID] | None,
        known: Mapping[CID, tuple[CID, ...]] | None = None,
    ) -> bool:
        """Fetch the changesets, manifests and (following in full) file blocks `project` lacks,
        or only those the records in `scope` name (`known`: see `BlockWants`).

        Returns True if some are still missing."""

        plan = BlockWants(project, scope, known)

        async def wanted_in(phase: Purpose) -> list[CID]:
            # For gossiped contributions (a scope) finding a phase's blocks reads a few
            # records and small blocks: done on the event loop, as the gossip's own store
            # is (`db_brief`). Handed to the worker thread, each such call held the store's
            # lock for 50 ms or more on a busy machine while the thread waited for a
            # processor, and the gossip stored behind it waited as long (docs/BENCHMARKS.md,
            # gossip session 18). A walk of the history, or larger reads, go to the thread.
            if scope is not None:
                found = await self.service.db_brief(plan.wanted_briefly, phase, BRIEF_READ_BYTES)
                if found is not None:
                    return found
            return await self.service.db(plan.wanted, phase)

        mode = await self.service.db_read(lambda store: store.follow_mode(project))
        if mode is None:
            return False
        completion.add_sources(self._sources(project))
        phases: tuple[Purpose, ...] = ("changesets", "manifests", "files")
        for phase in phases:
            if phase == "files" and mode != "full":
                if scope is None:
                    # No file blocks fetched for a records-only follow; those of private
                    # work the project merged that are here become its own all the same,
                    # as when the merge is gossiped (`_claim_merged`) rather than synced.
                    await self.service.db(claim_merged_files, project)
                break
            wanted = await wanted_in(phase)
            if not wanted:
                continue
            with self.service.transfers.track(project, phase, len(wanted)) as transfer:
                fetch = blocks.BlockFetch(
                    self._open_blocks_stream,
                    self.service.block_sink(project, pinned=True),
                    wanted,
                    self._drop,
                    transfer.add,
                )
                completion.fetch = fetch
                try:
                    result = await fetch.run(completion.sources)
                finally:
                    completion.fetch = None
                transfer.missing = result.missing
            if result.missing:
                return True
        return False

    async def fetch_blocks(
        self, project: CID, cids: Sequence[CID], listener: ProgressListener | None = None
    ) -> Transfer:
        """Fetch those of `cids` this node lacks, from the peers sharing `project` (or, when
        none is known to, from every connected peer): the blocks a checkout of a records-only
        project needs. What arrives is stored even if the rest cannot be found."""
        present = await self.service.blocks_have(cids)
        wanted = sorted(set(cids) - present)
        sources = self._sources(project) or [p.peer_id for p in self.mesh.peers()]
        with self.service.transfers.track(project, "on-demand", len(wanted), listener) as transfer:
            if wanted:
                result = await blocks.fetch(
                    self._open_blocks_stream,
                    sources,
                    self.service.block_sink(project),
                    wanted,
                    self._drop,
                    transfer.add,
                )
                transfer.missing = result.missing
        if wanted and result.stopped is not None:
            raise QuotaExceeded(result.stopped)
        return transfer

    def _sources(self, project: CID) -> list[str]:
        """The connected peers known to share `project`."""
        return [p for p, projects in self._shared.items() if project in projects]

    def _metered(self, stream: MeshStream) -> MeteredStream:
        """`stream` counted against the owner's upload and download limits."""
        return MeteredStream(stream, self.service.bandwidth)

    @asynccontextmanager
    async def _open_blocks_stream(self, peer: str) -> AsyncIterator[ByteStream]:
        """A blocks stream to `peer` for one fetch: one left open by an earlier fetch if
        there is one (the server answers wants until the stream closes), kept open after
        for the next."""
        async with self._block_streams.lend(peer) as stream:
            yield self._metered(stream)

    async def _new_blocks_stream(self, peer: str) -> MeshStream:
        return await self.mesh.open_stream(peer, blockwire.PROTOCOL, bulk_receive=True)

    # --- DHT -----------------------------------------------------------------------------------

    async def _provide(self, project: CID) -> None:
        while project in self._following:
            # The project of a private mesh is not announced on the DHT: members find it in
            # their mesh, and nobody else should learn it exists. (Checked each time: a
            # project followed by CID shows what it is once its genesis arrives.)
            if await self._is_private(project):
                return
            try:
                await self.mesh.provide(project.raw)
            except OstromError as exc:
                log.debug("providing %s failed: %s", project, exc.message)
            await trio.sleep(PROVIDE_INTERVAL_S)

    async def _is_private(self, project: CID) -> bool:
        """Whether a private mesh keeps `project`; not known (False) before its genesis is
        here, when announcing that this node looks for it reveals nothing of it."""
        try:
            return await self.service.project_mesh(project) is not None
        except NotFound:
            return False

    # --- mesh catalogues ------------------------------------------------------------------------

    async def _reach_hosts(self, project: CID) -> None:
        """Dial the hosts that members' catalogues list for `project`, if none of them is
        connected, and sync with those that answer: a private mesh's project is announced
        nowhere else, so a member connected only to others would never reach it.

        At most `MAX_HOST_DIALS` hosts (the newest catalogues first), each at the addresses
        its catalogue gives, all within `HOST_DIAL_TIMEOUT_S`."""
        hosts = {peer_id_of(key): addrs for key, addrs in self.service.meshes.hosts_of(project)}
        connected = {p.peer_id for p in self.mesh.peers()}
        if not hosts or connected & hosts.keys():
            return  # the sync with connected peers reaches it
        now = trio.current_time()
        self._hosts_dialled = {
            p: t for p, t in self._hosts_dialled.items() if now - t < HOST_REDIAL_S
        }
        self._hosts_dialled[project] = now
        chosen = list(hosts.items())[:MAX_HOST_DIALS]
        with trio.move_on_after(HOST_DIAL_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for peer, addrs in chosen:
                    nursery.start_soon(self._dial_host, project, peer, addrs)

    async def _dial_host(self, project: CID, peer: str, addrs: Sequence[str]) -> None:
        """Connect to `peer` at the first of `addrs` that answers, then sync `project`."""
        for addr in announceable_addrs(addrs):
            try:
                await self.mesh.connect(f"{addr}/p2p/{peer}")
            except OstromError as exc:
                log.info("catalogue host %s of %s at %s: %s", peer, project, addr, exc.message)
                continue
            log.info("connected to %s, which hosts %s", peer, project)
            self._request_sync(peer, project)
            return

    async def _find_and_fetch(self, project: CID) -> None:
        try:
            providers = await self.mesh.find_providers(project.raw, timeout=FIND_TIMEOUT_S)
        except OstromError as exc:
            log.info("looking for providers of %s failed: %s", project, exc.message)
            return
        connected = {p.peer_id for p in self.mesh.peers()}
        for provider in providers:
            if provider.peer_id == self.mesh.peer_id:
                continue
            if provider.peer_id not in connected:
                for addr in provider.addrs:
                    try:
                        await self.mesh.connect(f"{addr}/p2p/{provider.peer_id}")
                        break
                    except OstromError as exc:
                        log.debug("provider %s at %s: %s", provider.peer_id, addr, exc.message)
            self._request_sync(provider.peer_id, project)


class _ServedTo:
    """The node as one peer's sync responder sees it: a project this node may not serve that
    peer (a private mesh's, the peer not a member) is not hosted here, and neither are that
    project's records, unless the session's project reaches them (work it merged)."""

    def __init__(self, service: NodeService, peer_id: str) -> None:
        self._service = service
        self._peer_id = peer_id
        # The session's project (binary CID) and set, once the peer has named a project
        # this node serves it.
        self._project = b""
        self._index: ReconcileIndex | None = None
        # Whether each project (binary CID) met in the session may be served to the peer:
        # one entry per project the wanted records belong to, a handful.
        self._verdicts: dict[bytes, bool] = {}

    async def sync_index(self, project: CID) -> ReconcileIndex | None:
        if not await self._service.may_serve(project, self._peer_id):
            return None
        self._index = await self._service.sync_index(project)
        self._project = project.raw
        return self._index

    async def sync_records(self, cids: Sequence[CID]) -> dict[CID, bytes]:
        """The wanted records this node holds, but not a record of a project the peer may
        not be served (a private mesh's) outside the session's set: a record's CID is no
        key to a private mesh's work. Inside the set, such a record is work the session's
        project merged, which it publishes. Only records of other projects than the
        session's are looked at, which the store tells apart: a catch-up pays next to nothing."""

        def read(store: Store) -> tuple[dict[CID, bytes], dict[CID, bytes]]:
            return store.get_record_bytes_in(cids, self._project)

        found, others = await self._service.db_read_rows(len(cids), read)
        for cid, owner in others.items():
            verdict = self._verdicts.get(owner)
            if verdict is None:
                verdict = await self._service.may_serve(CID(owner), self._peer_id)
                self._verdicts[owner] = verdict
            if not verdict and (self._index is None or cid.raw not in self._index):
                del found[cid]
        return found

    async def sync_prepare(self, count: int) -> None:
        await self._service.sync_prepare(count)

    async def sync_verify(self, items: Sequence[bytes]) -> sync.Verified:
        return await self._service.sync_verify(items)

    async def sync_store(
        self, rows: Sequence[RecordRow], expected: Collection[bytes] = ()
    ) -> sync.IngestResult:
        return await self._service.sync_store(rows, expected)


class MeshNetwork:
    """The mesh as the RPC methods see it (`ostrom.node.service.Network`)."""

    def __init__(
        self, mesh: Mesh, replicator: Replicator, meshes: MeshReplicator | None = None
    ) -> None:
        self._mesh = mesh
        self._replicator = replicator
        self._meshes = meshes

    def addresses(self) -> list[str]:
        suffix = f"/p2p/{self._mesh.peer_id}"
        return [
            addr if addr.endswith(suffix) else addr + suffix for addr in self._mesh.advertised_addrs
        ]

    def peers(self) -> list[dict[str, object]]:
        return [
            {
                "peer_id": p.peer_id,
                "addrs": list(p.addrs),
                "projects": self._replicator.shared_projects(p.peer_id),
                "meshes": [] if self._meshes is None else self._meshes.shared_meshes(p.peer_id),
            }
            for p in self._mesh.peers()
        ]

    def peer_count(self) -> int:
        return self._mesh.peer_count()

    async def connect(self, addr: str) -> dict[str, object]:
        peer = await self._mesh.connect(addr)
        return {"peer_id": peer.peer_id, "addrs": list(peer.addrs)}

    async def follow(self, project: CID) -> None:
        await self._replicator.follow(project)

    async def unfollow(self, project: CID) -> None:
        await self._replicator.unfollow(project)

    async def fetch_blocks(
        self, project: CID, cids: Sequence[CID], listener: ProgressListener | None = None
    ) -> Transfer:
        return await self._replicator.fetch_blocks(project, cids, listener)

    def set_max_peers(self, max_peers: int) -> None:
        self._mesh.set_max_peers(max_peers)
