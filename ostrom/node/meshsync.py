"""Mesh records between members, and who may stay connected: `/ostrom/mesh/1.0.0`.

On every new connection the two nodes exchange the membership records and the catalogues of
the meshes they share (`exchange`); a steward's new admission or revocation, and a node's new
catalogue, travel at once by gossip on the mesh's topic. A node in private meshes only keeps
peers those meshes admit, and re-checks its connections whenever membership changes, so a
revocation takes effect without a restart.

    each side, at once                    the other side
    hello {meshes}                  <->   hello {meshes}
    records {mesh, records}         <->   records {mesh, records} ...
    catalogues {mesh, catalogues}   <->   catalogues {mesh, catalogues} ...
    done {}                         <->   done {}

A side lists only the meshes it may reveal to this peer: its open meshes, and the private
ones the peer belongs to. Records and catalogues then flow for the meshes both listed, and
a private mesh's topic is kept to its members, so an outsider learns neither who is in it
nor what it hosts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import public_key_of_peer_id
from ostrom.errors import DecodeError, InvalidInput, InvalidRecord, OstromError
from ostrom.node.bandwidth import Bandwidth, MeteredStream
from ostrom.node.framed import ByteStream, FramedStream, PeerSilent
from ostrom.node.mesh import Mesh, MeshStream
from ostrom.node.meshes import MeshRegistry
from ostrom.node.sync import unwrap_single_error
from ostrom.protocol.catalogue import (
    MAX_CATALOGUE_SIZE,
    SignedCatalogue,
    decode_catalogue,
    is_catalogue,
)
from ostrom.protocol.meshes import (
    MAX_BOOTSTRAP,
    MAX_MESH_RECORD_SIZE,
    SignedMeshRecord,
    decode_mesh_record,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PROTOCOL: Final = "/ostrom/mesh/1.0.0"
# Frames carry at most this many bytes of records or catalogues (one more may cross it),
# plus the map around them.
RECORDS_FRAME_BYTES: Final = 512 * 1024
MAX_FRAME: Final = RECORDS_FRAME_BYTES + max(MAX_MESH_RECORD_SIZE, MAX_CATALOGUE_SIZE) + 4096
# Meshes one hello may list: far more than anyone joins, and a bound.
MAX_HELLO_MESHES: Final = 256
# Frames one exchange may receive: 20,000 membership records of a full-size mesh in 512 KiB
# frames is under 400, its catalogues (2 MiB at most) 5 more; this leaves room for several
# meshes and still ends a flood.
MAX_EXCHANGE_FRAMES: Final = 2048
# A whole exchange must end within this: a few frames either way on a slow link.
EXCHANGE_TIMEOUT_S: Final = 60.0
# Connection checks and exchanges waiting to run; beyond it the next change or connection
# repeats them anyway.
QUEUE: Final = 256
TOPIC_PREFIX: Final = "ostrom/1/mesh/"
# Seconds a peer whose membership was revoked stays connected: time for the gossiped
# revocation to reach it, so its own node knows why it was cut off.
REVOCATION_GRACE_S: Final = 2.0
# Bootstrap peers of the joined meshes dialled at once when the node starts: all of one mesh
# (it lists at most 16), as joining it does.
BOOTSTRAP_PARALLEL_DIALS: Final = MAX_BOOTSTRAP
# How often this node looks again at what it follows, to re-sign its catalogues when that
# changed (and drops others' catalogues that aged out): a newly followed project is announced
# within this, and the check is one small read of the store.
CATALOGUE_CHECK_S: Final = 5.0


def topic_of(mesh: CID) -> str:
    return f"{TOPIC_PREFIX}{mesh}"


def _peer_key(peer_id: str) -> bytes | None:
    try:
        return public_key_of_peer_id(peer_id)
    except (InvalidInput, DecodeError):
        return None  # not an ed25519 peer id: no mesh can list it


class MeshReplicator:
    """Runs the mesh protocol for one node: exchanges, gossip, and the connection gate."""

    def __init__(self, registry: MeshRegistry, mesh: Mesh, bandwidth: Bandwidth) -> None:
        self.registry = registry
        self.mesh = mesh
        self.bandwidth = bandwidth
        # The meshes each connected peer shares with this node, as their exchange found.
        self._shared: dict[str, set[CID]] = {}
        self._subscribed: set[CID] = set()
        # One refresh of this node's catalogues at a time (the periodic check, exchanges).
        self._refreshing = trio.Lock()
        # One queue, in order: a revocation is published before the revoked peer is cut off.
        self._send, self._receive = trio.open_memory_channel[tuple[str, Any]](QUEUE)

    # --- lifecycle ---------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.mesh.set_stream_handler(PROTOCOL, self._serve_stream)
        self.mesh.on_peer_connected(lambda peer: self._queue("connected", peer))
        self.mesh.on_peer_disconnected(self._forget)
        self.registry.listeners.append(lambda mesh: self._queue("changed", str(mesh)))
        self.registry.record_listeners.append(self._signed_here)
        self.registry.catalogue_listeners.append(self._signed_here)
        async with trio.open_nursery() as nursery:
            await self._subscribe_joined()
            nursery.start_soon(self._run, nursery)
            nursery.start_soon(self._run_catalogues)
            nursery.start_soon(self._dial_bootstraps)
            task_status.started()

    async def _dial_bootstraps(self) -> None:
        """Dial the bootstrap peers of the meshes this node is in, once, at start: joining
        dialled them, and a restarted node is back in its meshes the same way (its own
        `--bootstrap` peers are the mesh layer's to dial)."""
        own = f"/p2p/{self.mesh.peer_id}"
        addrs = dict.fromkeys(
            addr
            for joined in self.registry.joined()
            for addr in joined.body.bootstrap
            if not addr.endswith(own)
        )
        limiter = trio.CapacityLimiter(BOOTSTRAP_PARALLEL_DIALS)

        async def dial(addr: str) -> None:
            async with limiter:
                try:
                    await self.mesh.connect(addr)
                except OstromError as exc:
                    log.info("mesh bootstrap %s: %s", addr, exc.message)

        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(dial, addr)

    def _forget(self, peer_id: str) -> None:
        self._shared.pop(peer_id, None)

    def shared_meshes(self, peer_id: str) -> list[str]:
        """The meshes this node shares with `peer_id`, by name."""
        names = []
        for cid in sorted(self._shared.get(peer_id, ())):
            joined = self.registry.get(cid)
            if joined is not None:
                names.append(joined.body.name)
        return names

    def _queue(self, kind: str, subject: Any) -> None:
        try:
            self._send.send_nowait((kind, subject))
        except trio.WouldBlock:
            log.debug("mesh queue full; dropping %s %s", kind, subject)

    async def _run(self, nursery: trio.Nursery) -> None:
        async for kind, subject in self._receive:
            if kind == "connected":
                if await self._gate(subject):
                    nursery.start_soon(self._initiate, subject)
            elif kind == "publish":
                await self.mesh.publish(topic_of(subject.mesh), subject.data)
            elif kind == "changed":
                self.mesh.recheck_topic_access()
                await self._subscribe_joined()
                nursery.start_soon(self.refresh_catalogues)
                peers = [p.peer_id for p in self.mesh.peers()]
                refused = [p for p in peers if not self.registry.admits(_peer_key(p))]
                if refused:
                    nursery.start_soon(self._cut_off, refused)
                for peer in peers:
                    if peer not in refused:
                        nursery.start_soon(self._initiate, peer)

    async def _cut_off(self, peers: list[str]) -> None:
        """Disconnect peers that membership no longer admits, after a grace period in which
        the revocation that caused it reaches them."""
        await trio.sleep(REVOCATION_GRACE_S)
        for peer in peers:
            await self._gate(peer)

    async def _gate(self, peer_id: str) -> bool:
        """Disconnect `peer_id` unless this node's meshes admit it; True if it may stay."""
        if self.registry.admits(_peer_key(peer_id)):
            return True
        log.info("disconnecting %s: not a member of any mesh this node is in", peer_id)
        self.registry.events.publish(
            {
                "type": "peer.refused",
                "peer": peer_id,
                "reason": "not a member of this node's meshes",
            }
        )
        try:
            await self.mesh.disconnect(peer_id, "not a member of this node's meshes")
        except OstromError as exc:
            log.debug("disconnecting %s: %s", peer_id, exc.message)
        return False

    async def _subscribe_joined(self) -> None:
        joined = {m.cid: m for m in self.registry.joined()}
        for mesh in joined.keys() - self._subscribed:
            if joined[mesh].members.access == "private":
                self.mesh.set_topic_access(topic_of(mesh), self._member_of(mesh))
            await self.mesh.subscribe(topic_of(mesh), self._gossip_received)
            self._subscribed.add(mesh)
        for mesh in self._subscribed - joined.keys():
            await self.mesh.unsubscribe(topic_of(mesh))
            self.mesh.set_topic_access(topic_of(mesh), None)
            self._subscribed.discard(mesh)

    def _member_of(self, mesh: CID) -> Callable[[str], bool]:
        """Who may take part in a private mesh's topic: its members as this node knows them
        now (asked again at every check, so admissions and revocations count at once)."""

        def allowed(peer_id: str) -> bool:
            joined = self.registry.get(mesh)
            key = _peer_key(peer_id)
            return joined is not None and key is not None and joined.members.admits(key)

        return allowed

    # --- catalogues ----------------------------------------------------------------------------

    async def _run_catalogues(self) -> None:
        while True:
            await self.refresh_catalogues()
            self.registry.expire_catalogues()
            await trio.sleep(CATALOGUE_CHECK_S)

    async def refresh_catalogues(self) -> None:
        """Re-sign this node's catalogues where what it hosts changed; publish the new ones."""
        async with self._refreshing:
            try:
                # A node in no mesh announces nothing: no store read every few seconds.
                hosted = await self.registry.hosted_projects() if self.registry.joined() else []
            except OstromError as exc:
                log.warning("reading the followed projects failed: %s", exc.message)
                return
            # The addresses go with the projects: a member that is not connected to this
            # node finds it through them when it follows one (private projects are on no DHT).
            addrs = self.mesh.advertised_addrs
            self._signed_here(self.registry.refresh_own(hosted, addrs))

    # --- gossip --------------------------------------------------------------------------------

    def _signed_here(self, records: Sequence[SignedMeshRecord | SignedCatalogue]) -> None:
        for record in records:
            self._queue("publish", record)

    async def _gossip_received(self, topic: str, data: bytes, from_peer: str) -> bool:
        """A membership record or a catalogue on a mesh topic: relayed only if valid for
        that mesh (a catalogue: only if it is a member's and newer than the one held)."""
        if is_catalogue(data):
            try:
                catalogue = decode_catalogue(data)
            except (DecodeError, InvalidRecord) as exc:
                log.info("bad catalogue from %s: %s", from_peer, exc.message)
                return False
            return topic == topic_of(catalogue.mesh) and self.registry.accept_catalogue(catalogue)
        try:
            record = decode_mesh_record(data)
        except (DecodeError, InvalidRecord) as exc:
            log.info("bad mesh record from %s: %s", from_peer, exc.message)
            return False
        if topic != topic_of(record.mesh) or not self.registry.accepts(record):
            return False
        await self.registry.ingest([record])
        return True

    # --- the exchange --------------------------------------------------------------------------

    def _offer(self, peer_id: str) -> list[CID]:
        """The meshes this node may name to `peer_id`."""
        key = _peer_key(peer_id)
        return [
            m.cid
            for m in self.registry.joined()
            if m.members.access == "open" or (key is not None and m.members.admits(key))
        ]

    async def _initiate(self, peer_id: str) -> None:
        try:
            async with await self.mesh.open_stream(peer_id, PROTOCOL) as stream:
                await self.exchange(MeteredStream(stream, self.bandwidth), peer_id)
        except OstromError as exc:
            log.info("mesh exchange with %s stopped: %s", peer_id, exc.message)

    async def _serve_stream(self, stream: MeshStream) -> None:
        try:
            await self.exchange(MeteredStream(stream, self.bandwidth), stream.peer_id)
        except OstromError as exc:
            log.info("mesh exchange with %s stopped: %s", stream.peer_id, exc.message)

    async def exchange(self, stream: ByteStream, peer_id: str) -> set[CID]:
        """Run one exchange; return the meshes shared with `peer_id`."""
        framed = FramedStream(stream, max_frame=MAX_FRAME)
        offered = self._offer(peer_id)
        shared: set[CID] | None = None
        # A broken stream fails the side that notices it; callers catch that error itself,
        # not the nursery's ExceptionGroup around it (which would end the daemon's nursery).
        with trio.move_on_after(EXCHANGE_TIMEOUT_S), unwrap_single_error():
            async with trio.open_nursery() as nursery:
                hello, their_hello = trio.open_memory_channel[set[CID]](1)
                nursery.start_soon(self._send_side, framed, offered, their_hello)
                shared = await self._receive_side(framed, offered, hello, peer_id)
        if shared is None:
            raise PeerSilent(f"the mesh exchange did not end within {EXCHANGE_TIMEOUT_S:.0f} s")
        self._shared[peer_id] = shared
        return shared

    async def _send_side(
        self,
        framed: FramedStream,
        offered: list[CID],
        their_hello: trio.MemoryReceiveChannel[set[CID]],
    ) -> None:
        await framed.send({"t": "hello", "meshes": [m.raw for m in offered]})
        shared = await their_hello.receive()
        for mesh in sorted(shared):
            records = [r.data for r in self.registry.records_of(mesh)]
            await _send_batched(framed, "records", mesh, records)
        if shared:
            await self.refresh_catalogues()
        # Membership first (above), so that the peer knows who may have signed a catalogue.
        for mesh in sorted(shared):
            catalogues = [c.data for c in self.registry.catalogues_of(mesh)]
            await _send_batched(framed, "catalogues", mesh, catalogues)
        await framed.send({"t": "done"})

    async def _receive_side(
        self,
        framed: FramedStream,
        offered: list[CID],
        hello: trio.MemorySendChannel[set[CID]],
        peer_id: str,
    ) -> set[CID]:
        first = _expect(await framed.receive(), "hello")
        listed = first.get("meshes")
        if not isinstance(listed, list) or len(listed) > MAX_HELLO_MESHES:
            raise DecodeError(f"a hello lists up to {MAX_HELLO_MESHES} meshes")
        theirs = {_cid(raw) for raw in listed}
        shared = theirs & set(offered)
        await hello.send(shared)
        key = _peer_key(peer_id)
        if key is not None:
            # A peer that no longer names a mesh it had a catalogue in has left it.
            for mesh in set(offered) - theirs:
                self.registry.forget_catalogue(mesh, key)
        for _ in range(MAX_EXCHANGE_FRAMES):
            frame = _expect(await framed.receive(), "records", "catalogues", "done")
            if frame["t"] == "done":
                return shared
            mesh = _cid(frame.get("mesh"))
            items = frame.get(frame["t"])
            if mesh not in shared or not isinstance(items, list):
                raise DecodeError(f"{frame['t']} for a mesh not shared in this exchange")
            if frame["t"] == "catalogues":
                self._catalogues_received(mesh, items, peer_id)
                continue
            records = []
            for data in items:
                if not isinstance(data, bytes):
                    raise DecodeError("a mesh record is bytes")
                try:
                    records.append(decode_mesh_record(data))
                except InvalidRecord as exc:
                    log.info("bad mesh record from %s: %s", peer_id, exc.message)
            await self.registry.ingest([r for r in records if r.mesh == mesh])
        raise DecodeError(f"more than {MAX_EXCHANGE_FRAMES} frames in one mesh exchange")

    def _catalogues_received(self, mesh: CID, items: list[Any], peer_id: str) -> None:
        for data in items:
            if not isinstance(data, bytes):
                raise DecodeError("a catalogue is bytes")
            try:
                catalogue = decode_catalogue(data)
            except InvalidRecord as exc:
                log.info("bad catalogue from %s: %s", peer_id, exc.message)
                continue
            if catalogue.mesh == mesh:
                self.registry.accept_catalogue(catalogue)


async def _send_batched(framed: FramedStream, kind: str, mesh: CID, items: list[bytes]) -> None:
    """Send `items` as `kind` frames for `mesh`, each holding about `RECORDS_FRAME_BYTES`."""
    batch: list[bytes] = []
    size = 0
    for data in items:
        if batch and size + len(data) > RECORDS_FRAME_BYTES:
            await framed.send({"t": kind, "mesh": mesh.raw, kind: batch})
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        await framed.send({"t": kind, "mesh": mesh.raw, kind: batch})


def _expect(frame: Any, *kinds: str) -> dict[str, Any]:
    if frame is None:
        raise DecodeError("the peer closed the mesh exchange early")
    if not isinstance(frame, dict) or frame.get("t") not in kinds:
        raise DecodeError(f"expected {' or '.join(kinds)} in the mesh exchange")
    return frame


def _cid(raw: object) -> CID:
    if not isinstance(raw, bytes):
        raise DecodeError("a mesh is named by its CID's bytes")
    try:
        return CID(raw)
    except (DecodeError, InvalidInput) as exc:
        raise DecodeError(f"not a CID: {exc.message}") from None
