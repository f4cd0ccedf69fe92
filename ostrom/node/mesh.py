"""The libp2p adapter: the one module of Ostrom that imports libp2p.

Everything else talks to the mesh through the types defined here (`Mesh`, `MeshStream`,
`PeerInfo`, peer ids and multiaddrs as strings); no libp2p object leaves this module, so that
the daemon can be read, typed and tested without knowing py-libp2p, and so that the 0.3 s,
56 MB `import libp2p` happens only in a process that joins the network.

py-libp2p 0.8.1 has sharp edges (see the team's LIBP2P_NOTES.md); this module holds every
workaround in one place:

- Noise is the only security transport offered (the default also accepts plaintext and secio).
- The swarm's own connection limits are lifted (its inbound slots leak until shutdown) and
  its auto-connector and pruner are switched off; `max_peers` is enforced here instead, by
  closing extra inbound connections as soon as they are registered. The task py-libp2p keeps
  per inbound connection until shutdown is ended when the connection closes.
- A dial returns as soon as it connects (py-libp2p waits 250 ms for a second address), tries
  each address once, and forgets earlier failures of that peer.
- A listen port another socket holds is refused (py-libp2p binds with SO_REUSEPORT and would
  share the port with another node); wildcard listen addresses (0.0.0.0) are advertised as
  the machine's interface addresses (py-libp2p would tell peers, the DHT and mDNS 0.0.0.0).
- Streams: a reset or lost connection is an error, not end of stream; a failed stream is
  reset so the peer stops waiting; sockets are closed on shutdown (py-libp2p leaves the
  dialler's open when cancelled).
- Gossipsub beats every second, with adaptive gossip, spam protection and IP-diversity
  grafting off, so local publishing never throttles itself; the message id is the sha256 of
  the message bytes, in the message cache too (py-libp2p keys that cache by sender and seqno
  whatever id function is configured), so IHAVE/IWANT match other implementations.
  Publishing waits for room in the peers' outbound queues (full queues drop silently).
- Gossip relaying is made cheaper (each patch is checked at import and by tests/test_mesh.py):
  gossipsub 1.1 only (no IDONTWANT), the signed peer record attached to every RPC is built and
  verified once instead of per RPC, Yamux returns window credit at half the window (go-yamux's
  rule) instead of after every read, queued RPCs to a peer go out in one write, and pubsub
  streams are read in chunks instead of a byte at a time for each length prefix. A copy of a
  message already seen or being validated is dropped in the read loop, before py-libp2p
  starts a task for it; a new one is validated and relayed by a bounded task of the mesh's
  own, along a shorter path than py-libp2p's `push_msg` and `GossipSub.publish` (same checks,
  same order). Noise messages are read from the socket in chunks, the secure session keeps
  a decrypted message without copying it and joins a frame body's pieces once, a Yamux
  frame body already buffered is taken without a timeout, a frame sent or a stream read
  builds no debug line nobody prints, the locks taken per frame do not yield when free
  (`QuickLock`), binary IHAVE ids skip a hex-decoding attempt, and a message's origin key
  is kept per peer id. A writer cancelled mid-frame closes the connection instead of
  leaving the peer a frame short (py-libp2p did, and the connection failed). Yamux's tuning
  variables are read from the environment once, not on every frame, and a per-message list
  py-libp2p never trims is bounded.
- Gossip degree D=3 (D_high 4) with no opportunistic grafting, a node's own messages sent
  to D peers even when its mesh is smaller, IHAVE gossip to peers in back-off too, and a
  10 s prune back-off (see the constants below for why).
- Subscriptions are drained at once (their channels hold 32 messages and drop the rest);
  the caller's handler runs as the topic validator, which is what decides relaying.
- Identified peers are fed to the Kad-DHT routing table, which connections do not feed.
- mDNS discoveries arrive on a zeroconf thread, for every host in the process (the discovery
  event is a process-wide singleton); they are handed to trio and dialled here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import socket
import time
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

import libp2p.peer.peerstore as libp2p_peerstore
import libp2p.pubsub.gossipsub as libp2p_gossipsub
import libp2p.pubsub.pubsub as libp2p_pubsub
import libp2p.pubsub.utils as libp2p_pubsub_utils
import libp2p.stream_muxer.yamux.yamux as libp2p_yamux
import libp2p.utils.varint as libp2p_varint
import multiaddr
import trio
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import MessageID, TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import MDNSDiscovery
from libp2p.exceptions import BaseLibp2pError, ParseError
from libp2p.host.basic_host import BasicHost
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError, MessageTooLarge
from libp2p.io.trio import TrioTCPStream
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID as MESHSUB_10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as MESHSUB_11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub, ValidationResult
from libp2p.pubsub.subscription import TrioSubscriptionAPI
from libp2p.pubsub.utils import safe_bytes_from_hex
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX, signature_validator
from libp2p.rcmgr import Direction
from libp2p.security.noise.io import NoiseTransportReadWriter
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, Yamux, YamuxStream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address
from libp2p.utils.varint import encode_uvarint
from nacl.exceptions import CryptoError

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import (
    InternalError,
    InvalidInput,
    OstromError,
    PeerUnreachable,
    Refused,
    TooLarge,
)
from ostrom.node.quicklock import QuickLock

log = logging.getLogger(__name__)

# Without LIBP2P_DEBUG, py-libp2p's loggers have no handler and do not propagate, so Python's
# last-resort handler printed their warnings and errors (several for an ordinary disconnect)
# on stderr. They are discarded instead; LIBP2P_DEBUG still routes them to py-libp2p's handler.
if not os.environ.get("LIBP2P_DEBUG"):
    logging.getLogger("libp2p").addHandler(logging.NullHandler())

# --- tuning --------------------------------------------------------------------------------------

# The swarm's own cap. Its inbound slots are only released when the swarm stops, so the real
# limit (`MeshConfig.max_peers`) is enforced in this module and the swarm's is set out of reach.
_SWARM_MAX_CONNECTIONS: Final = 1_000_000
# How long an explicit dial may take before the peer counts as unreachable. A LAN or Internet
# handshake (TCP + Noise + Yamux) takes well under a second; 10 s covers a slow Raspberry Pi.
_DIAL_TIMEOUT: Final = 10.0
# Gossipsub mesh degree. Each mesh link carries about one copy of each record, and in
# py-libp2p every copy costs a relay CPU (a frame to decrypt, parse and drop, or to build
# and send): with the specification's D=6 a 20-node mesh spent more CPU per record than two
# cores have. With D=3 a node receives 1.46 copies of each record (counted over a
# 20-daemon run, without opportunistic grafting). Records still reach everyone: a publisher
# with too few mesh peers sends to other subscribers (`_publish_to_enough_peers`), peers
# outside the mesh, pruned ones included, hear of every message (`_gossip_to_all_but_mesh`),
# a pruned peer may graft again after `_GOSSIP_PRUNE_BACKOFF_S`, and sync fills whatever
# gossip misses. D_high is D+1: a node receives about as many grafts as it makes, so
# meshes of up to 6 peers (D_high=6) held more of them, and every mesh peer is a copy of
# every record. At 20 daemons D_high=4 cut relays' CPU per record by 7% on average over 7
# paired runs (docs/BENCHMARKS.md, gossip step 17). (It once cut a node of 8 off for a
# whole 60 s back-off; with the 10 s back-off and announcements to pruned peers, 8 and 12
# daemons deliver as fast as with D_high=6.)
_GOSSIP_D: Final = 3
_GOSSIP_D_LOW: Final = 2
_GOSSIP_D_HIGH: Final = 4
# How long a pruned peer waits before grafting again (py-libp2p: 60 s, sent in each PRUNE,
# which the other side respects). With a small D, a node whose peers were all pruned within
# the last minute kept an empty mesh for that minute; 10 s heals it within a few heartbeats
# and still damps graft/prune flapping (one heartbeat is 1 s).
_GOSSIP_PRUNE_BACKOFF_S: Final = 10
# Of the last `_GOSSIP_FIRST_WINDOW` new messages of a topic, those that reached this node
# first from a subscriber outside its mesh (not their origin: an answer to IWANT) past which
# it grafts the peer that brought the most (`_graft_where_gossip_comes_from`). Counted over
# 24 twenty-daemon runs at 20 records a second: in the one whose mesh had split in two (12
# and 8 nodes, for the whole run), 12% of a node's new messages came so, and 4 or more of
# most nodes' 20 a second; in the others 0.1-1.2% of all (2 at most in any node's second)
# on a machine not saturated, 2-5% on one that was (up to 9 in a second: there gossip
# outran a slow mesh path, and a graft shortens it too).
_GOSSIP_FIRST_TO_GRAFT: Final = 4
# New messages per topic whose first deliveries are remembered for that count: about a
# heartbeat and a half at 20 records a second, and the last 32 records of a quiet topic,
# so that a split mesh is joined whatever the topic's rate (at 1.2% by chance, 4 of 32
# happen about once in 1,750 windows; at 12%, in every other one).
_GOSSIP_FIRST_WINDOW: Final = 32
# Heartbeats between a node's grafts of a subscriber outside its mesh drawn at random, on
# average (`_graft_at_random_now_and_then`), while its mesh has room below D_high. That count
# sees a split only once messages flow, so a split formed while a topic was quiet cost the
# first second of the next busy stretch (2 runs of 21 at 20 daemons). Twenty nodes each
# grafting once in 30 heartbeats make two grafts every three seconds between them, half of
# which cross a split of 10 and 10: a split is joined within seconds of quiet, at the cost
# of a GRAFT (and now and then a PRUNE, past D_high) every half a minute per node, where
# go-libp2p's opportunistic grafting (scored) grafts two peers every minute.
_GOSSIP_EXPLORE_HEARTBEATS: Final = 30
# Peers outside the mesh told of recent messages (IHAVE) at each heartbeat: at least
# D_lazy, else this share of them (the specification's defaults, as py-libp2p uses).
_GOSSIP_D_LAZY: Final = 6
_GOSSIP_FACTOR: Final = 0.25
# Entries kept of py-libp2p's per-topic list of delivery times, which only its adaptive
# gossip (off) reads and nothing trims: unbounded, it grew by one float per message relayed.
_DELIVERY_TIMES_KEPT: Final = 64
# Messages kept in py-libp2p's equivocation check (same sender and sequence number, other
# content), which it trims only from 1,000 down to 500: a few minutes of a busy topic's
# messages, data included. Our records are content-addressed and signed by their authors,
# so the check protects nothing of ours; a short window keeps it cheap.
_EQUIVOCATION_KEPT: Final = 128
# Recipients of a message this node publishes, at least (as far as it has subscribed
# peers): its mesh peers, topped up with other subscribers when the mesh is smaller. Not
# all subscribers (go-libp2p's flood publishing): sending each record to 19 peers made the
# publisher of a 20-node mesh its slowest node (7.5 ms of CPU a record instead of 4.6).
_PUBLISH_MIN_RECIPIENTS: Final = _GOSSIP_D
# Gossipsub versions offered, preferred first. Not 1.2: its IDONTWANT sends a control message
# to every mesh peer for every message received, which costs more CPU in py-libp2p (a frame,
# an encryption and a send each) than the duplicates it saves for our small records. 1.1 and
# 1.0 are what every implementation (go, js, rust) still speaks.
_GOSSIP_PROTOCOLS: Final = (MESHSUB_11, MESHSUB_10)
# One heartbeat a second, the specification's default (py-libp2p's is 120 s).
_GOSSIP_HEARTBEAT_S: Final = 1
# How long an identify exchange may take before a new peer is left out of the DHT routing table
# (it is retried on the next connection); identify normally completes within a few round trips.
_IDENTIFY_WAIT_S: Final = 10.0
# Poll period while waiting for identify: py-libp2p offers no event for "identified".
_IDENTIFY_POLL_S: Final = 0.05
# mDNS: discoveries queued for the trio side; a LAN rarely has more Ostrom nodes than this, and
# a discovery that does not fit is sent again by the peer's next announcement.
_MDNS_QUEUE: Final = 64
# Parallel dials to mDNS-discovered peers, so that a crowded LAN does not flood the node.
_MDNS_PARALLEL_DIALS: Final = 4
# A peer discovered by mDNS is dialled at most once per this many seconds (announcements repeat).
_MDNS_REDIAL_S: Final = 60.0
# Upper bound on the redial bookkeeping, so a hostile LAN cannot grow it without limit.
_MDNS_MAX_TRACKED: Final = 1024
# Seconds between sweeps of expired peerstore entries (py-libp2p does not sweep by itself).
_PEERSTORE_SWEEP_S: Final = 300
# How long shutdown waits for connections to close (each close sleeps 0.2 s inside py-libp2p;
# they run in parallel).
_SHUTDOWN_CLOSE_S: Final = 3.0
# How long resetting a failed stream may take (one frame to send; the connection may be gone).
_ABORT_TIMEOUT_S: Final = 1.0
# Period of the sweep that releases streams both sides closed but nobody read to the end.
_STREAM_SWEEP_S: Final = 10.0
# How long `MeshStream.finish` waits for the peer to close its side before resetting: one
# round trip, generously.
_FINISH_WAIT_S: Final = 2.0
# Read size while discarding what the peer still sends before closing.
_FINISH_READ_BYTES: Final = 65536
# Bootstrap dials run in parallel up to this many at once.
_BOOTSTRAP_PARALLEL_DIALS: Final = 8
# Publishing waits while a peer's outbound gossip queue (32 RPCs in py-libp2p, full = dropped)
# holds this many: room is left for the control messages that share the queue.
_PUBLISH_QUEUE_HIGH: Final = 24
# How long one publish waits for a queue to drain before treating that peer as stalled.
_PUBLISH_PACE_MAX_S: Final = 1.0
# Poll period while pacing: a queue drains one message per write, well under a millisecond.
_PUBLISH_POLL_S: Final = 0.002
# Largest gossip message: peers drop a gossip RPC over 1 MiB (py-libp2p's and go's limit),
# and the RPC adds the topic, signature, key and framing to the data.
_MAX_GOSSIP_BYTES: Final = 1024 * 1024 - 16 * 1024
# Bounds on a gossip topic name: non-empty, and short enough to be a sane protobuf field.
_MAX_TOPIC_LENGTH: Final = 1024
# How long our own signed peer record is reused before py-libp2p is asked again (it compares
# the record with the host's current addresses, which costs about 2 ms each time). Addresses
# change rarely (a new observed address); a minute is soon enough for peers to learn of it.
_SENDER_RECORD_REISSUE_S: Final = 60.0
# How long a peer's signed peer record, once verified, is taken as verified when the same
# bytes arrive again. py-libp2p stores it with a 2-hour TTL; verifying it again every 10
# minutes keeps that entry fresh.
_SENDER_RECORD_RECHECK_S: Final = 600.0
# Verified peer records remembered per host; past this the memory is dropped and rebuilt
# (a node has at most 1,000 peers, see MeshConfig.max_peers).
_SENDER_RECORD_CACHE: Final = 1024
# Origins whose public key `_message_signature_valid` keeps, taken from their peer ids; past
# this the memory is dropped and rebuilt (a mesh of a few hundred publishing nodes fits).
_ORIGIN_KEYS_KEPT: Final = 1024
# New gossip messages being validated and relayed at once, at most. py-libp2p starts a task
# per message without a bound; under the load of a 20-node mesh a relay has a few dozen in
# flight. Past this bound a new message is dropped: its topic's sync brings it.
_MAX_RELAYS: Final = 1024
# Queued gossip RPCs are written together up to about this many bytes: one Yamux frame
# (64 KiB at most) and one Noise frame carry them.
_RPC_BATCH_BYTES: Final = 60 * 1024
# Read size on pubsub streams: what Yamux has buffered, up to one frame.
_RPC_READ_BYTES: Final = 64 * 1024
# What a pubsub message's signature covers before the message (py-libp2p's, go's and js's).
_PUBSUB_SIGNING_PREFIX: Final = PUBSUB_SIGNING_PREFIX.encode()
# Read size on a connection's socket once Noise is set up: what the kernel holds, up to one
# Noise message at its largest (2 + 65535 bytes), so that a burst of small frames costs one
# socket read instead of two per frame.
_NOISE_READ_BYTES: Final = 64 * 1024
# The length prefix of a Noise transport message (big-endian, as py-libp2p frames them).
_NOISE_LENGTH_BYTES: Final = 2

# --- public types --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer and the multiaddrs (strings, without `/p2p/<id>`) it can be dialled at."""

    peer_id: str
    addrs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise InvalidInput("a peer id is a non-empty string")
        if not isinstance(self.addrs, tuple) or not all(isinstance(a, str) for a in self.addrs):
            raise InvalidInput("peer addresses are a tuple of multiaddr strings")


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """How a node joins the network.

    `listen` and `bootstrap` are multiaddr strings; a bootstrap address ends with `/p2p/<id>`.
    `max_peers` bounds the peers connected at once; extra inbound connections are closed.
    """

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    dht: bool = True
    max_peers: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.listen, tuple) or not self.listen:
            raise InvalidInput("listen is a non-empty tuple of multiaddrs")
        for addr in self.listen:
            names = [p.name for p in _parse_multiaddr(addr).protocols()]
            if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
                raise InvalidInput(
                    f"a listen address is /ip4/<ip>/tcp/<port> or /ip6/..., got {addr!r}"
                )
        if not isinstance(self.bootstrap, tuple):
            raise InvalidInput("bootstrap is a tuple of multiaddrs")
        for addr in self.bootstrap:
            _split_p2p_addr(addr)
        if not isinstance(self.max_peers, int) or isinstance(self.max_peers, bool):
            raise InvalidInput("max_peers is an integer")
        # py-libp2p's resource manager admits at most 1000 live connections.
        if not 1 <= self.max_peers <= 1000:
            raise InvalidInput(f"max_peers is between 1 and 1000, got {self.max_peers}")


class MeshStream:
    """One libp2p stream, speaking one protocol with one peer.

    `read` returns at most `max_bytes` bytes as soon as some are available, and `b""` once the
    peer has closed its side. A stream reset or a lost connection raises `PeerUnreachable`;
    a connection we close ourselves (`Mesh.disconnect`, shutdown) ends our streams with `b""`,
    so protocols should frame their messages and not take end of stream as success.
    After any `PeerUnreachable` the stream has been reset, so the peer stops waiting on it.

    A stream holds py-libp2p resources (10,000 streams at most) until it is finished: both
    sides closed (`close`, then `read` until `b""`), `reset`, or `finish`. `async with stream:`
    finishes it on exit, as `Mesh` does when a stream handler returns; as a safety net, `Mesh`
    releases every 10 s the streams both sides have closed.
    py-libp2p's Yamux gives up on a write that waits more than 5 s for the reader to make room
    (a 256 KiB to 16 MiB window): a reader must keep reading while its peer writes.
    """

    __slots__ = ("_closed", "_done", "_eof", "_stream", "peer_id", "protocol")

    def __init__(self, stream: INetStream, protocol: str, peer_id: str) -> None:
        self._stream = cast(NetStream, stream)
        self._closed = False  # our side is closed
        self._eof = False  # the peer's side is closed
        self._done = False  # py-libp2p's resources are released
        self.protocol = protocol
        self.peer_id = peer_id

    def __repr__(self) -> str:
        return f"MeshStream({self.protocol!r}, peer={self.peer_id})"

    @property
    def reusable(self) -> bool:
        """Neither side has closed the stream, and it has not failed (a failure resets it)."""
        return not (self._closed or self._eof or self._done)

    async def __aenter__(self) -> MeshStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.finish()

    async def read(self, max_bytes: int) -> bytes:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidInput(f"max_bytes is a positive integer, got {max_bytes!r}")
        if self._eof:
            return b""
        try:
            return await self._stream.read(max_bytes)
        except StreamEOF:
            # py-libp2p reports a stream reset by the peer, or a lost connection, as end of
            # stream; only the muxer's flag tells them apart from a clean close.
            if getattr(self._stream.muxed_stream, "reset_received", False):
                await self._abort()
                raise PeerUnreachable(
                    f"{self.protocol} stream with {self.peer_id} was reset"
                ) from None
            self._eof = True
            if self._closed:
                # Both sides are closed; py-libp2p only notices when the write side closes
                # last, so the stream's resources are released here.
                await self._release()
            return b""
        except (StreamError, BaseLibp2pError) as exc:
            await self._abort()
            raise PeerUnreachable(
                f"{self.protocol} stream with {self.peer_id} failed while reading: {exc!r}"
            ) from None

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise InvalidInput(f"{self.protocol} stream with {self.peer_id} is closed for writing")
        if not data:
            return
        try:
            await self._stream.write(bytes(data))
        except (StreamError, BaseLibp2pError) as exc:
            await self._abort()
            raise PeerUnreachable(
                f"{self.protocol} stream with {self.peer_id} failed while writing: {exc!r}"
            ) from None

    async def close(self) -> None:
        """Half-close: the peer reads end of stream; this side can still read its reply."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.close_write()
        except (StreamError, BaseLibp2pError) as exc:
            log.debug("closing %r: %r", self, exc)
        if self._eof:
            self._done = True  # py-libp2p released it: the peer had closed its side first

    async def reset(self) -> None:
        """Abort the stream in both directions; the peer's reads and writes fail."""
        self._closed = True
        self._done = True
        await self._stream.reset()

    async def finish(self) -> None:
        """Close our side, read (and discard) until the peer closes its own, release the stream.

        Waits at most 2 s for the peer; the stream is released either way, without a reset
        that could cut off data the peer is still reading. Called on leaving `async with`.
        """
        if self._done:
            return
        await self.close()
        with trio.move_on_after(_FINISH_WAIT_S):
            try:
                while await self.read(_FINISH_READ_BYTES):
                    pass
            except PeerUnreachable:
                return  # reset, and so released
        await self._release()

    async def _release(self) -> None:
        if not self._done:
            self._done = True
            await self._stream.remove()

    async def _abort(self) -> None:
        """Reset after a failure, even while being cancelled, so the peer stops waiting."""
        if self._done:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_ABORT_TIMEOUT_S):
            await self.reset()


StreamHandler = Callable[[MeshStream], Awaitable[None]]
# (topic, message bytes, peer id of the neighbour that sent it) -> relay it?
GossipHandler = Callable[[str, bytes, str], Awaitable[bool]]

# --- helpers -------------------------------------------------------------------------------------


def _parse_multiaddr(addr: str) -> multiaddr.Multiaddr:
    if not isinstance(addr, str) or not addr.startswith("/"):
        raise InvalidInput(f"not a multiaddr: {addr!r}")
    try:
        return multiaddr.Multiaddr(addr)
    except (ValueError, TypeError, multiaddr.exceptions.Error) as exc:
        raise InvalidInput(f"not a multiaddr: {addr!r} ({exc})") from None


def _parse_peer_id(peer_id: str) -> ID:
    if not isinstance(peer_id, str) or not peer_id:
        raise InvalidInput(f"not a peer id: {peer_id!r}")
    try:
        pid = ID.from_base58(peer_id)
    except ValueError:
        raise InvalidInput(f"not a peer id: {peer_id!r}") from None
    if pid.to_base58() != peer_id:
        raise InvalidInput(f"not a peer id: {peer_id!r}")
    return pid


def _split_p2p_addr(addr: str) -> tuple[ID, multiaddr.Multiaddr]:
    """The peer id and transport part of `/.../p2p/<id>`."""
    maddr = _parse_multiaddr(addr)
    protocols = list(maddr.protocols())
    if len(protocols) < 2 or protocols[-1].name != "p2p":
        raise InvalidInput(f"a peer address ends with /p2p/<peer id>, got {addr!r}")
    text = maddr.value_for_protocol("p2p")
    pid = _parse_peer_id(str(text))
    return pid, maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{text}"))


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not 0 < len(topic) <= _MAX_TOPIC_LENGTH:
        raise InvalidInput(f"a topic is a string of 1 to {_MAX_TOPIC_LENGTH} characters")


def _dht_key(key: bytes) -> bytes:
    """The DHT key of a CID: its multihash, as IPFS and js-libp2p use for provider records."""
    if not isinstance(key, bytes | bytearray):
        raise InvalidInput("a DHT key is the bytes of a CID")
    cid = CID(bytes(key))
    # Our CIDs are <version><codec><multihash>, with one-byte version and codec varints.
    return cid.raw[2:]


def _content_message_id(msg: rpc_pb2.Message) -> bytes:
    """A gossip message's id: sha256(topic || 0x00 || data), the same in every implementation.

    The topic is part of it because the same bytes may be published on two topics (a fork's
    genesis goes to the fork's topic and to its parent's); an id of the data alone would make
    the second publish a duplicate of the first and drop it.
    """
    topic = "\n".join(msg.topicIDs).encode("utf-8")
    return hashlib.sha256(topic + b"\x00" + msg.data).digest()


class _ContentIdMessageCache(MessageCache):
    """The gossipsub message cache, keyed by content id.

    py-libp2p 0.8.1 keys this cache by sender and seqno whatever `msg_id_constructor` says,
    so the ids it gossips (IHAVE) and looks up (IWANT) would differ from the ids every peer,
    itself included, uses for "seen".
    """

    def put(self, msg: rpc_pb2.Message) -> None:
        self.put_with_id(msg, _content_message_id(msg))

    def put_with_id(self, msg: rpc_pb2.Message, mid: bytes) -> None:
        """`put`, for a message whose id the caller has already computed."""
        if mid in self.msgs:
            return
        self.msgs[mid] = msg
        self.history[0].append(CacheEntry(mid, msg.topicIDs))


def _cache_message(router: GossipSub, msg: rpc_pb2.Message, mid: bytes) -> None:
    """Keep `msg`, whose id is `mid`, in `router`'s message cache (for IHAVE and IWANT)."""
    mcache = router.mcache
    if isinstance(mcache, _ContentIdMessageCache):
        mcache.put_with_id(msg, mid)
    else:
        mcache.put(msg)


# Public keys of message origins whose peer id embeds them (ed25519): from_id -> key.
_origin_keys: dict[bytes, Any] = {}


def _message_signature_valid(msg: rpc_pb2.Message) -> bool:
    """py-libp2p's `signature_validator`, keeping the origin's public key.

    For each message py-libp2p parses the origin's peer id, extracts the key embedded in it,
    derives the peer id from that key again and compares: a few percent of a relay's CPU.
    For an origin whose id embeds its key (ed25519, every Ostrom node) that outcome depends on
    the id alone, so it is kept; the signature itself is checked on every message, over the
    same bytes. Any other origin goes through `signature_validator`.
    """
    if msg.signature == b"":
        return False
    try:
        key = _origin_keys.get(msg.from_id)
        if key is None:
            sender = ID(msg.from_id)
            key = sender.extract_public_key()
            if key is None or ID.from_pubkey(key) != sender:
                return signature_validator(msg)
            if len(_origin_keys) >= _ORIGIN_KEYS_KEPT:
                _origin_keys.clear()
            _origin_keys[msg.from_id] = key
        unsigned = rpc_pb2.Message(
            data=msg.data, topicIDs=msg.topicIDs, from_id=msg.from_id, seqno=msg.seqno
        )
        return bool(
            key.verify(_PUBSUB_SIGNING_PREFIX + unsigned.SerializeToString(), msg.signature)
        )
    except (CryptoError, ValueError, TypeError, BaseLibp2pError, ProtobufDecodeError):
        # A key or origin id that does not parse (any peer may send one): not a valid
        # signature, and never an error that reaches the mesh's nursery.
        return False


class _Notifee(INotifee):
    """Swarm events, forwarded to the mesh (called on the trio thread, inside the swarm)."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._mesh._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._mesh._on_disconnected(conn)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


def _addr_texts(addrs: Sequence[multiaddr.Multiaddr]) -> tuple[str, ...]:
    """Multiaddrs as distinct strings, without their `/p2p/<id>` part."""
    out: dict[str, None] = {}
    for addr in addrs:
        text = str(addr)
        cut = text.find("/p2p/")
        out[text if cut < 0 else text[:cut]] = None
    return tuple(a for a in out if a)


def _check_ports_free(addrs: Sequence[multiaddr.Multiaddr]) -> None:
    """Refuse a listen port that another socket holds.

    py-libp2p binds with SO_REUSEPORT, so a second node on the same port would bind too and
    the kernel would share incoming connections between the two. A probe bound without
    SO_REUSEPORT fails on a port that any socket is listening on.
    """
    for addr in addrs:
        port = int(addr.value_for_protocol("tcp"))
        if port == 0:
            continue
        names = {p.name for p in addr.protocols()}
        family = socket.AF_INET6 if "ip6" in names else socket.AF_INET
        host = str(addr.value_for_protocol("ip6" if "ip6" in names else "ip4"))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise InvalidInput(f"cannot listen on {addr}: {exc.strerror}") from None


_WILDCARDS: Final = {"/ip4/0.0.0.0/": "/ip4/127.0.0.1/", "/ip6/::/": "/ip6/::1/"}


def _advertised(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Listen addresses as peers can dial them.

    A wildcard becomes the machine's non-loopback interface addresses, or loopback when it has
    none (py-libp2p falls back to the wildcard itself, which no peer can dial).
    """
    out: dict[str, multiaddr.Multiaddr] = {}
    for addr in candidates:
        text = str(addr)
        prefix = next((p for p in _WILDCARDS if text.startswith(p)), None)
        if prefix is None:
            out.setdefault(text, addr)
            continue
        expanded = [a for a in expand_wildcard_address(addr) if not str(a).startswith(prefix)]
        if not expanded:
            expanded = [multiaddr.Multiaddr(_WILDCARDS[prefix] + text[len(prefix) :])]
        for one in expanded:
            out.setdefault(str(one), one)
    return list(out.values())


# --- patches to py-libp2p ------------------------------------------------------------------------
#
# py-libp2p 0.8.1 attaches the sender's signed peer record (an envelope with its addresses,
# about 150 bytes) to every pubsub RPC, and on each RPC the sender builds it again and every
# receiver verifies it again (an ed25519 verification, twice per RPC: once in Pubsub and once
# in GossipSub.handle_rpc) before replacing the peer's addresses in the peerstore. For small
# records that was most of a relay's CPU. Both ends are cached here, per host: the record we
# send is reused for `_SENDER_RECORD_REISSUE_S`, and a peer's record is verified once and
# accepted without a new verification while the same bytes keep coming, for
# `_SENDER_RECORD_RECHECK_S`. What goes on the wire and what is accepted are unchanged.
#
# pubsub.py and gossipsub.py import the two functions by name, so the names are replaced in
# those modules; `_patch_py_libp2p` refuses to run against a py-libp2p that no longer has
# them, and tests/test_mesh.py checks that the caches are what the RPCs go through.

# py-libp2p's own functions, which the caches call (module attributes so tests can count).
_issue_sender_record = libp2p_peerstore.env_to_send_in_RPC
_verify_sender_record = libp2p_pubsub_utils.maybe_consume_signed_record
# The functions `_send_queued_rpcs` and `_read_rpc` replace, as shipped.
_PUBSUB_SEND_LOOP: Final = Pubsub.handle_sending_messages
_PUBSUB_READ_RPC: Final = libp2p_varint.read_varint_prefixed_bytes_limited
_YAMUX_WINDOW_UPDATE: Final = YamuxStream._auto_tune_and_send_window_update
_NOISE_READ_MSG: Final = NoiseTransportReadWriter.read_msg
_YAMUX_READ_DATA_BODY: Final = Yamux._read_data_body
_YAMUX_WRITE_FRAME: Final = Yamux._write_frame
_YAMUX_READ_STREAM: Final = Yamux.read_stream
_SESSION_READ: Final = SecureSession.read
_SESSION_DRAIN: Final = SecureSession._drain
_SESSION_FILL: Final = SecureSession._fill
_SESSION_RESET_BUFFER: Final = SecureSession._reset_internal_buffer
_OPPORTUNISTIC_GRAFTING: Final = GossipSub._perform_opportunistic_grafting
# host -> (reuse until, envelope bytes)
_issued_records: weakref.WeakKeyDictionary[IHost, tuple[float, bytes]] = weakref.WeakKeyDictionary()
# host -> {peer -> (trust until, envelope bytes)}
_verified_records: weakref.WeakKeyDictionary[IHost, dict[ID, tuple[float, bytes]]] = (
    weakref.WeakKeyDictionary()
)


def _sender_record_to_send(host: IHost) -> tuple[bytes, bool]:
    """`env_to_send_in_RPC`, reusing the envelope for `_SENDER_RECORD_REISSUE_S`."""
    now = time.monotonic()
    cached = _issued_records.get(host)
    if cached is not None and now < cached[0]:
        return cached[1], False
    data, fresh = _issue_sender_record(host)
    _issued_records[host] = (now + _SENDER_RECORD_REISSUE_S, data)
    return data, fresh


def _consume_sender_record(msg: rpc_pb2.RPC, host: IHost, peer_id: ID) -> bool:
    """`maybe_consume_signed_record`, skipping bytes already verified for this peer."""
    if not msg.HasField("senderRecord"):
        return True
    record = msg.senderRecord
    now = time.monotonic()
    known = _verified_records.setdefault(host, {})
    cached = known.get(peer_id)
    if cached is not None and now < cached[0] and cached[1] == record:
        return True
    if not _verify_sender_record(msg, host, peer_id):
        known.pop(peer_id, None)
        return False
    if len(known) >= _SENDER_RECORD_CACHE:
        known.clear()
    known[peer_id] = (now + _SENDER_RECORD_RECHECK_S, record)
    return True


# py-libp2p's Yamux gives receive-window credit back after every read that consumed anything
# (its "partial slack" branch), so each gossip RPC received cost a WINDOW_UPDATE frame, with its
# own Noise encryption and socket send: about as many frames as the RPCs themselves.
# go-yamux and js-yamux send an update only once half of the window has been consumed, which
# is what `_window_update_at_half` does with the same bookkeeping (GrowTo and auto-tuning
# kept). A sender never waits on it: while less than half is consumed, more than half of the
# window is still credited to it, and a reader that consumes more sends the update.


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """`YamuxStream._auto_tune_and_send_window_update`, go-yamux's rule: credit at half."""
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed <= 0 or consumed < self._grow_threshold():
            return
        increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        self._pending_recv_release = 0
    if increment > 0:
        await self.send_window_update(increment, skip_lock=True)


# A stream's receive window starts at 256 KiB and py-libp2p's Yamux doubles it only when a
# window update comes within four round trips of the one before, the round trip being a
# ping measured every 30 s. A window update comes every 128 KiB consumed (1-2 ms apart at
# 100 MB/s), so whether the window grew depended on how that ping came out: in 5 of 30 runs
# of `bench.artifact` a 256 MiB fetch ran at 32-57 MB/s instead of 95-139, both processes
# mostly idle, the sender waiting on each update. A block fetch bounds what it asks for
# (16 MiB, `FETCH_IN_FLIGHT_BLOCKS`), so its streams open the window to Yamux's largest,
# 16 MiB, at once (docs/BENCHMARKS.md, Artifacts, tenth round).


async def _open_receive_window(stream: YamuxStream) -> None:
    """Grow `stream`'s receive window to `MAX_WINDOW_SIZE` and credit the peer with it."""
    async with stream.window_lock:
        stream.target_recv_window = max(stream.target_recv_window, MAX_WINDOW_SIZE)
        buffered = len(stream.conn.stream_buffers.get(stream.stream_id, b""))
        increment = stream._grow_to_delta(buffered)
    await stream.send_window_update(increment, skip_lock=True)


# py-libp2p's pubsub sends each queued RPC with its own write (a Yamux frame, a Noise frame, a
# socket send) and reads each one a byte at a time for its length prefix, every byte a
# stream read through three trio locks. Under load the per-peer queue holds several RPCs;
# `_send_queued_rpcs` writes what is queued (up to `_RPC_BATCH_BYTES`) with one write, the
# same bytes on the wire, and `_read_rpc` reads pubsub streams in large chunks and cuts the
# RPCs out of its own per-stream buffer. Only the pubsub read loop reads those streams
# (`Pubsub.continuously_read_stream`, the one caller of the replaced name), so nothing else
# misses the buffered bytes.


async def _send_queued_rpcs(self: Pubsub, peer_id: ID, stream: INetStream, queue: Any) -> None:
    """`Pubsub.handle_sending_messages`, writing every RPC queued so far in one write."""
    try:
        while True:
            rpc = await queue.pop()
            if rpc is None:
                return  # the queue was closed: the peer is gone
            data = bytearray()
            while True:
                body = rpc.SerializeToString()
                data += encode_uvarint(len(body))
                data += body
                # `pop` returns at once, without a checkpoint, while the queue is not empty.
                if not len(queue) or len(data) >= _RPC_BATCH_BYTES:
                    break
                rpc = await queue.pop()
                if rpc is None:
                    break
            try:
                await stream.write(bytes(data))
            except (StreamClosed, StreamReset):
                self._handle_dead_peer(peer_id)
                return
    except (StreamError, BaseLibp2pError, OSError) as exc:
        log.debug("gossip sending to %s stopped: %r", peer_id, exc)
        self._handle_dead_peer(peer_id)


_rpc_read_buffers: weakref.WeakKeyDictionary[object, bytearray] = weakref.WeakKeyDictionary()


async def _read_rpc(reader: Any, max_length: int) -> bytes:
    """`read_varint_prefixed_bytes_limited` for pubsub streams, reading ahead into a buffer.

    Raises what the original raises: `ParseError` for a bad length prefix, `MessageTooLarge`
    over `max_length`, `IncompleteReadError` when the stream ends mid-RPC.
    """
    buf = _rpc_read_buffers.get(reader)
    if buf is None:
        buf = _rpc_read_buffers[reader] = bytearray()
    while True:
        length = used = 0
        for i, byte in enumerate(buf[:10]):
            length |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                used = i + 1
                break
        if used:
            break
        if len(buf) >= 10:
            raise ParseError("varint length prefix exceeds 64 bits")
        chunk = await reader.read(_RPC_READ_BYTES)
        if not chunk:
            raise IncompleteReadError(
                "Stream ended while reading varint length prefix",
                expected_bytes=1,
                received_bytes=0,
            )
        buf += chunk
    if length > max_length:
        raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
    while len(buf) < used + length:
        chunk = await reader.read(max(_RPC_READ_BYTES, used + length - len(buf)))
        if not chunk:
            raise IncompleteReadError(
                f"Incomplete message: expected {length}, got {len(buf) - used}",
                expected_bytes=length,
                received_bytes=len(buf) - used,
            )
        buf += chunk
    data = bytes(buf[used : used + length])
    del buf[: used + length]
    return data


# Below Yamux, py-libp2p reads each Noise message from the socket with two reads (its 2-byte
# length, then its body), each a trio socket call behind a lock; a relay receives one Noise
# message per Yamux frame, most of them small. `_read_noise_msg` reads the socket in chunks
# into a buffer of its own per connection and cuts the messages out of it. The buffer is
# keyed by the raw connection, and only the transport phase reads through it: the handshake
# keeps py-libp2p's exact reads, so no byte it did not consume can be held back from it, and
# after the handshake nothing but this reader reads the raw connection.
#
# Yamux then reads each DATA frame's body under its own timeout (a cancel scope per frame),
# although the body came in the same Noise message as its header and is already decrypted
# and buffered in the secure session; `_read_buffered_data_body` takes it from there, and
# keeps the timed read for a body that is not (yet) all buffered.

_noise_read_buffers: weakref.WeakKeyDictionary[object, bytearray] = weakref.WeakKeyDictionary()


async def _read_noise_msg(self: NoiseTransportReadWriter, prefix_encoded: bool = False) -> bytes:
    """`BaseNoiseMsgReadWriter.read_msg` for transport messages, reading ahead in chunks.

    Raises what the original raises: `IncompleteReadError` when the connection ends before
    a whole message (with nothing received: a clean close), and the decryption's errors.
    """
    if prefix_encoded:
        return await _NOISE_READ_MSG(self, prefix_encoded)
    raw = self.read_writer.read_write_closer
    buf = _noise_read_buffers.get(raw)
    if buf is None:
        buf = _noise_read_buffers[raw] = bytearray()
    while len(buf) < _NOISE_LENGTH_BYTES:
        chunk = await raw.read(_NOISE_READ_BYTES)
        if not chunk:
            raise IncompleteReadError(
                f"Connection closed during read operation: expected {_NOISE_LENGTH_BYTES} "
                f"bytes but received {len(buf)} bytes",
                expected_bytes=_NOISE_LENGTH_BYTES,
                received_bytes=len(buf),
            )
        buf += chunk
    end = _NOISE_LENGTH_BYTES + int.from_bytes(buf[:_NOISE_LENGTH_BYTES], "big")
    while len(buf) < end:
        chunk = await raw.read(max(_NOISE_READ_BYTES, end - len(buf)))
        if not chunk:
            raise IncompleteReadError(
                f"Connection closed during read operation: expected {end} bytes but "
                f"received {len(buf)} bytes",
                expected_bytes=end - _NOISE_LENGTH_BYTES,
                received_bytes=len(buf) - _NOISE_LENGTH_BYTES,
            )
        buf += chunk
    # One copy out of the buffer (a slice of the bytearray, then `bytes` of it, was two).
    with memoryview(buf) as view, view[_NOISE_LENGTH_BYTES:end] as message:
        encrypted = bytes(message)
    del buf[:end]
    return self.decrypt(encrypted)


# Between the two, `SecureSession` keeps what a read did not take of a decrypted Noise message
# in a BytesIO: it copied the rest of the message in (`msg[needed:]`, then `write`), copied
# it out again (`getbuffer()[...].tobytes()`), and `read` assembled a body that spans two
# messages in a bytearray and copied that into `bytes`: five copies of nearly every byte
# received, since a Yamux frame of 64 KiB is one byte more than a Noise message holds. The
# replacements keep the message itself and an offset into it (the watermarks, with the same
# meaning), and join a body's pieces once.

_held_messages: weakref.WeakKeyDictionary[SecureSession, bytes] = weakref.WeakKeyDictionary()


def _hold(session: SecureSession, msg: bytes, start: int) -> None:
    _held_messages[session] = msg
    session.low_watermark = start
    session.high_watermark = len(msg)


def _session_reset_buffer(self: SecureSession) -> None:
    """`SecureSession._reset_internal_buffer`: nothing held."""
    _held_messages.pop(self, None)
    self.low_watermark = 0
    self.high_watermark = 0


def _session_fill(self: SecureSession, msg: bytes) -> None:
    """`SecureSession._fill`: hold `msg` (not a copy of it)."""
    _hold(self, msg, 0)


def _session_drain(self: SecureSession, n: int | None) -> bytes:
    """`SecureSession._drain`: up to `n` (None: all) of the held bytes."""
    low, high = self.low_watermark, self.high_watermark
    if low == high:
        return b""
    held = _held_messages[self]
    end = high if n is None else min(high, low + n)
    data = held if low == 0 and end == len(held) else held[low:end]
    if end == high:
        _session_reset_buffer(self)
    else:
        self.low_watermark = end
    return data


async def _session_read(self: SecureSession, n: int | None = None) -> bytes:
    """`SecureSession.read`: `n` bytes (None: what one message holds), fewer only if the
    connection closes after some; `ConnectionClosedError` if it closes before any."""
    if n == 0:
        return b""
    if n is None or self.high_watermark - self.low_watermark >= n:
        data = _session_drain(self, n)
        if data:
            return data
        msg: bytes = await self.conn.read_msg()
        if msg == b"":
            raise ConnectionClosedError("Connection closed")
        return msg
    parts: list[bytes | memoryview] = []
    have = 0
    if self.high_watermark > self.low_watermark:
        held = _held_messages[self]
        parts.append(memoryview(held)[self.low_watermark : self.high_watermark])
        have = self.high_watermark - self.low_watermark
        _session_reset_buffer(self)
    while have < n:
        msg = await self.conn.read_msg()
        if msg == b"":
            if have:
                return b"".join(parts)
            raise ConnectionClosedError("Connection closed")
        needed = n - have
        if len(msg) <= needed:
            parts.append(msg)
            have += len(msg)
        else:
            parts.append(memoryview(msg)[:needed])
            _hold(self, msg, needed)
            have = n
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


async def _read_buffered_data_body(self: Yamux, length: int) -> bytes:
    """`Yamux._read_data_body`, without a timeout when the body is already buffered."""
    conn = self.secured_conn
    if isinstance(conn, SecureSession) and conn.high_watermark - conn.low_watermark >= length:
        return conn._drain(length)
    return await _YAMUX_READ_DATA_BODY(self, length)


# Yamux's `_write_frame` writes each frame under the connection's write lock, where Noise
# encrypts it and so advances the session's nonce. A frame encrypted and then not sent, or
# sent in part, leaves the peer a frame short, and every later frame then fails
# authentication at the peer: the connection is lost, with every stream on it, and until the
# peer notices, it is kept as if it worked. py-libp2p's locks were checkpoints that took most
# cancellations before the encryption; `QuickLock`s are not (an end-to-end test lost its
# connection that way every time). So `_write_frame_whole` takes a pending cancellation
# before encrypting, and closes the connection if one arrives while the frame is on its way,
# which happens only while the socket is full (the peer is not reading). (Shielding the send
# instead would cost a cancel scope per frame, 9-13 µs on this machine, more than the
# locks saved.) It also builds py-libp2p's debug line per frame only when that logger prints
# debug, and adds no checkpoint after the send, which has just rescheduled the task.


async def _write_frame_whole(self: Yamux, data: bytes) -> None:
    """`Yamux._write_frame`: the whole frame; or, if cancelled, none of it, or else no more
    connection."""
    if libp2p_yamux.logger.isEnabledFor(logging.DEBUG):
        libp2p_yamux.logger.debug("writing a %d-byte frame to %s", len(data), self.peer_id)
    async with self._write_lock:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await self.secured_conn.write(data)
        except trio.Cancelled:
            log.debug("a frame to %s was cut short; closing the connection", self.peer_id)
            with trio.CancelScope(shield=True):
                await self.secured_conn.close()
            raise


# Yamux's `read_stream`, which every stream read goes through, formats several debug lines
# per call (the peer id among them) that are not printed; `_read_stream_unlogged` is the
# same function without them, and leaves them to py-libp2p when its logger prints debug.


async def _read_stream_unlogged(self: Yamux, stream_id: int, n: int | None = -1) -> bytes:
    """`Yamux.read_stream`, building its debug lines only when they would be printed."""
    if n is None:
        n = -1
    if libp2p_yamux.logger.isEnabledFor(logging.DEBUG):
        return await _YAMUX_READ_STREAM(self, stream_id, n)
    while True:
        async with self.streams_lock:
            if stream_id not in self.streams:
                raise MuxedStreamEOF("Stream closed")
            if self.event_shutting_down.is_set():
                raise MuxedStreamEOF("Connection shut down")
            stream = self.streams[stream_id]
            buffer = self.stream_buffers.get(stream_id)
            if buffer is None:
                if stream.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF("Stream buffer closed")
            if buffer and (stream.recv_closed or not stream.reset_received):
                if n == -1 or n >= len(buffer):
                    data = bytes(buffer)
                    buffer.clear()
                else:
                    data = bytes(buffer[:n])
                    del buffer[:n]
                if stream.closed:
                    # Drained on a fully closed stream: py-libp2p reclaims it here.
                    self._finalize_stream_locked(stream, fully_closed=True)
                return data
            if stream.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if stream.recv_closed:
                raise MuxedStreamEOF("Stream is closed for receiving")
            if stream.closed:
                raise MuxedStreamReset("Stream is reset or closed")
        try:
            await self.stream_events[stream_id].wait()
        except KeyError:
            raise MuxedStreamEOF("Stream was removed") from None
        # Armed again only for a stream still open: py-libp2p's reader also put one back for
        # a stream removed while it waited, which nothing would ever remove.
        if stream_id in self.streams:
            self.stream_events[stream_id] = trio.Event()


# Every frame py-libp2p writes takes the stream's state lock, the Yamux stream's write and
# window locks, the connection's write lock and the socket's, and every read three of them;
# each `trio.Lock` acquire is a reschedule even when the lock is free, which it nearly always
# is. These constructors swap those locks for `QuickLock`s, free ones taken without a
# yield. Each holder either runs a synchronous section or goes on to a socket operation or a
# wait for data, which yield on their own, so cancellation and fairness are unchanged.
#
# The lock attributes each class's constructor creates, as `_with_quick_locks` expects.
_QUICK_LOCKS: Final[dict[type, tuple[str, ...]]] = {
    NetStream: ("_state_lock",),
    YamuxStream: ("window_lock", "close_lock", "rw_lock"),
    Yamux: ("streams_lock", "_write_lock"),
    TrioTCPStream: ("read_lock", "write_lock"),
}


def _with_quick_locks(init: Callable[..., None], names: tuple[str, ...]) -> Callable[..., None]:
    """`init`, then the trio locks `names` it made replaced by `QuickLock`s (refusing a
    py-libp2p whose constructor no longer makes them)."""

    def quick_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name in names:
            if not hasattr(self, name):
                raise InternalError(f"py-libp2p's {type(self).__name__} has no {name}")
            setattr(self, name, QuickLock())

    return quick_init


# The constructors as shipped (each class defines its own), and the ones
# `_patch_py_libp2p` puts in their place.
_SHIPPED_INITS: Final = {owner: vars(owner)["__init__"] for owner in _QUICK_LOCKS}
_QUICK_INITS: Final = {
    owner: _with_quick_locks(_SHIPPED_INITS[owner], names) for owner, names in _QUICK_LOCKS.items()
}


# py-libp2p's Yamux reads its PY_YAMUX_* tuning variables from the environment on every
# frame (several `os.getenv` calls per read and write, a few percent of a relay's CPU).
# They are read once here: a daemon's environment does not change while it runs.
_YAMUX_ENV: Final = libp2p_yamux._py_yamux_env
_YAMUX_ENV_SET: Final = libp2p_yamux._py_yamux_env_set
_yamux_settings: Final = {k: v for k, v in os.environ.items() if k.startswith("PY_YAMUX_")}


def _yamux_env(name: str, default: str = "") -> str:
    """`_py_yamux_env` from the environment as it was when this module was imported."""
    return _yamux_settings.get(f"PY_YAMUX_{name}", default)


def _yamux_env_set(name: str) -> bool:
    """`_py_yamux_env_set`, likewise."""
    return f"PY_YAMUX_{name}" in _yamux_settings


# Names `_window_update_at_half` and `_open_receive_window` rely on; a py-libp2p without them
# is refused.
_YAMUX_STREAM_NEEDS: Final = (
    "_auto_tune_and_send_window_update",
    "_grow_threshold",
    "_grow_to_delta",
    "_apply_autotune_epoch",
    "send_window_update",
)


# py-libp2p's gossipsub grafts up to two more peers on every heartbeat whenever its mesh has
# D_low peers or more ("opportunistic grafting"). The specification does that once a minute,
# and only when the mesh peers' median score is below a threshold the application sets: it
# replaces poorly scoring peers. py-libp2p's threshold is half the median, so with no scoring
# parameters (every peer scores 0) every subscriber outside the mesh qualifies. Each
# heartbeat then grafted two peers, the mesh exceeded D_high, and the next heartbeat pruned
# it again: at 20 daemons, every node sent 3 GRAFTs and 3 PRUNEs a second, its mesh sat at
# D_high+1, and a relay received 1.97 copies of each record instead of 1.46 (counted over
# all 20 nodes). Ostrom sets no score parameters, so the mesh keeps the peers it has.


def _no_opportunistic_grafting(
    self: GossipSub, topic: str, peers_to_graft: defaultdict[ID, list[str]]
) -> int:
    """`GossipSub._perform_opportunistic_grafting`: graft no one (see above)."""
    return 0


def _replace(owner: Any, name: str, original: object, patched: object) -> None:
    """Set `owner.name` to `patched`, refusing a py-libp2p where it is not `original`."""
    current = getattr(owner, name, None)
    if current is not original and current is not patched:
        raise InternalError(
            f"{owner.__name__}.{name} is not the function ostrom/node/mesh.py patches; "
            "check it against the installed py-libp2p"
        )
    setattr(owner, name, patched)


def _patch_py_libp2p() -> None:
    """Install the replacements above where py-libp2p looks them up."""
    missing = [name for name in _YAMUX_STREAM_NEEDS if not hasattr(YamuxStream, name)]
    if missing:
        raise InternalError(
            f"py-libp2p's YamuxStream lacks {missing}; check ostrom/node/mesh.py against it"
        )
    _replace(
        YamuxStream,
        "_auto_tune_and_send_window_update",
        _YAMUX_WINDOW_UPDATE,
        _window_update_at_half,
    )
    _replace(
        GossipSub,
        "_perform_opportunistic_grafting",
        _OPPORTUNISTIC_GRAFTING,
        _no_opportunistic_grafting,
    )
    _replace(Pubsub, "handle_sending_messages", _PUBSUB_SEND_LOOP, _send_queued_rpcs)
    _replace(NoiseTransportReadWriter, "read_msg", _NOISE_READ_MSG, _read_noise_msg)
    _replace(Yamux, "_read_data_body", _YAMUX_READ_DATA_BODY, _read_buffered_data_body)
    _replace(SecureSession, "read", _SESSION_READ, _session_read)
    _replace(SecureSession, "_drain", _SESSION_DRAIN, _session_drain)
    _replace(SecureSession, "_fill", _SESSION_FILL, _session_fill)
    _replace(SecureSession, "_reset_internal_buffer", _SESSION_RESET_BUFFER, _session_reset_buffer)
    _replace(Yamux, "_write_frame", _YAMUX_WRITE_FRAME, _write_frame_whole)
    _replace(Yamux, "read_stream", _YAMUX_READ_STREAM, _read_stream_unlogged)
    _replace(libp2p_yamux, "_py_yamux_env", _YAMUX_ENV, _yamux_env)
    _replace(libp2p_yamux, "_py_yamux_env_set", _YAMUX_ENV_SET, _yamux_env_set)
    _replace(libp2p_pubsub, "read_varint_prefixed_bytes_limited", _PUBSUB_READ_RPC, _read_rpc)
    for owner, quick_init in _QUICK_INITS.items():
        _replace(owner, "__init__", _SHIPPED_INITS[owner], quick_init)
    for module in (libp2p_pubsub, libp2p_gossipsub):
        _replace(module, "env_to_send_in_RPC", _issue_sender_record, _sender_record_to_send)
        _replace(
            module, "maybe_consume_signed_record", _verify_sender_record, _consume_sender_record
        )


_patch_py_libp2p()


# --- the mesh ------------------------------------------------------------------------------------


class Mesh:
    """A libp2p host with gossipsub, the Kad-DHT and mDNS, behind Ostrom's own types.

    Construct it, register stream handlers, then run `serve` in a nursery with
    `await nursery.start(mesh.serve)`; every other coroutine method needs `serve` running.
    """

    def __init__(self, seed: bytes, config: MeshConfig) -> None:
        if not isinstance(config, MeshConfig):
            raise InvalidInput("config is a MeshConfig")
        identity = Identity.from_seed(bytes(seed))
        self.peer_id: str = identity.peer_id
        self._config = config
        private_key = Ed25519PrivateKey.from_bytes(identity.seed)
        key_pair = KeyPair(private_key, private_key.get_public_key())
        self._listen = [_parse_multiaddr(a) for a in dict.fromkeys(config.listen)]
        noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        self._host: BasicHost = cast(
            BasicHost,
            new_host(
                key_pair=key_pair,
                sec_opt={NOISE_PROTOCOL_ID: noise},
                muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                listen_addrs=self._listen,
                connection_config=ConnectionConfig(
                    max_connections=_SWARM_MAX_CONNECTIONS,
                    # The pruner trims above the high watermark: never.
                    high_watermark=_SWARM_MAX_CONNECTIONS,
                    low_watermark=0,
                    min_connections=0,
                    dial_timeout=_DIAL_TIMEOUT,
                    # The dialler waits 250 ms before trying a peer's next address unless the
                    # dials so far reached this many connections: with 1, a dial returns as
                    # soon as it connects (about 10 ms on a LAN instead of 250 ms). Both sides
                    # dialling at once still gives two connections, and both are kept.
                    max_connections_per_peer=1,
                ),
                addrs_factory=_advertised,
            ),
        )
        if self._host.get_id().to_base58() != self.peer_id:
            raise InternalError("libp2p derived a different peer id from the node's key")
        self._swarm = cast(Swarm, self._host.get_network())
        # One attempt per address (the default retries 3 times with backoff, which only delays
        # the answer for a dead address); the caller decides when to try again.
        self._swarm.retry_config = RetryConfig(max_retries=0)
        # The auto-connector dials every peer the peerstore knows whenever connections are
        # below its watermarks; the node decides whom to connect to, so it never starts.
        self._swarm.auto_connector._started = False
        self._swarm.auto_connector.start = _never_start  # type: ignore[method-assign]
        self._swarm.register_notifee(_Notifee(self))
        self._end_inbound_handlers_on_close()

        self._gossipsub = GossipSub(
            protocols=list(_GOSSIP_PROTOCOLS),
            degree=_GOSSIP_D,
            degree_low=_GOSSIP_D_LOW,
            degree_high=_GOSSIP_D_HIGH,
            heartbeat_interval=_GOSSIP_HEARTBEAT_S,
            prune_back_off=_GOSSIP_PRUNE_BACKOFF_S,
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
            # Grafts extra peers from other IPs every heartbeat; on a LAN or a test machine
            # every peer may share an address. Our own sync protocol guarantees delivery.
            eclipse_protection_enabled=False,
        )
        self._gossipsub.mcache = _ContentIdMessageCache(
            self._gossipsub.mcache.window_size, self._gossipsub.mcache.history_size
        )
        self._gossipsub.recent_message_deliveries = defaultdict(
            partial(deque, maxlen=_DELIVERY_TIMES_KEPT)  # type: ignore[arg-type]
        )
        self._pubsub = Pubsub(
            self._host,
            self._gossipsub,
            strict_signing=True,
            msg_id_constructor=_content_message_id,
        )
        self._dht: KadDHT | None = KadDHT(self._host, DHTMode.SERVER) if config.dht else None

        self._topics: dict[str, GossipHandler] = {}
        self._on_connect: list[Callable[[str], None]] = []
        self._on_disconnect: list[Callable[[str], None]] = []
        self._reported: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._served = False
        # Peers whose gossip queue stayed full for a whole pacing wait (see `publish`).
        self._stalled: set[ID] = set()
        self._mdns_attempts: dict[str, float] = {}
        # Topics only some peers may take part in (`set_topic_access`), and the subscriptions
        # held back from peers not allowed, taken up if they become allowed.
        self._topic_access: dict[str, Callable[[str], bool]] = {}
        self._held_subscriptions: dict[str, set[ID]] = {}
        self._filter_topic_subscriptions()
        # Ids of gossip messages being validated (bounded by py-libp2p's concurrent validations).
        self._validating: set[bytes] = set()
        # Ids of new gossip messages whose validation and relay task has started (at most
        # `_MAX_RELAYS`; see `_drop_known_messages_early`), each with the other peers that
        # sent a copy meanwhile: they hold the message, so the relay skips them. An entry
        # goes when its task ends.
        self._relaying: dict[bytes, set[ID]] = {}
        # Per topic, how the last new messages came (`_graft_where_gossip_comes_from`): the
        # subscriber outside the mesh that brought one first, or None (the mesh, or its
        # origin).
        self._first_deliveries: defaultdict[str, deque[ID | None]] = defaultdict(
            partial(deque, maxlen=_GOSSIP_FIRST_WINDOW)
        )
        self._drop_known_messages_early()
        self._publish_to_enough_peers()
        self._gossip_to_all_but_mesh()
        self._relay_received_messages()
        self._graft_where_gossip_comes_from()
        self._graft_at_random_now_and_then()
        self._read_ihave_ids_directly()

    def _end_inbound_handlers_on_close(self) -> None:
        """End each inbound connection's handler task when its connection closes.

        py-libp2p keeps the task that accepted a connection (and its listener slot) waiting
        until the whole swarm stops: one task per inbound connection for the life of the
        daemon (about 7.5 KB each, measured). Here the wait is cancelled once the
        connection has closed.
        """
        swarm = self._swarm
        handle = swarm._do_handle_inbound_connection
        upgrade = swarm.upgrade_inbound_raw_conn

        async def handle_until_closed(*args: Any) -> None:
            with trio.CancelScope() as scope:
                _inbound_scope.set(scope)
                await handle(*args)

        async def upgrade_and_watch(*args: Any) -> Any:
            muxed = await upgrade(*args)
            scope = _inbound_scope.get()
            closed = getattr(muxed, "event_closed", None)
            if scope is not None and isinstance(closed, trio.Event) and self._nursery is not None:
                self._nursery.start_soon(_cancel_when_set, closed, scope)
            return muxed

        setattr(swarm, "_do_handle_inbound_connection", handle_until_closed)  # noqa: B010
        setattr(swarm, "upgrade_inbound_raw_conn", upgrade_and_watch)  # noqa: B010

    # --- lifecycle ---------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host, gossipsub, the DHT and mDNS until cancelled (once per `Mesh`).

        `task_status.started()` is called once every listen address is bound; a listen address
        that cannot be bound (or that another process holds) raises `InvalidInput`.
        """
        if self._served:
            raise InternalError("Mesh.serve runs once per Mesh")
        self._served = True
        _check_ports_free(self._listen)
        refused: InvalidInput | None = None
        async with self._host.run(listen_addrs=self._listen):
            bound = self._host.get_transport_addrs()
            if len(bound) < len(self._listen):
                refused = InvalidInput(
                    f"cannot listen on every address of {[str(a) for a in self._listen]} "
                    f"(bound: {[str(a) for a in bound]})"
                )
            else:
                await self._serve_listening(task_status)
        if refused is not None:
            raise refused

    async def _serve_listening(self, task_status: Any) -> None:
        async with (
            background_trio_service(self._pubsub),
            background_trio_service(self._gossipsub),
            trio.open_nursery() as nursery,
        ):
            if self._dht is not None:
                await nursery.start(self._run_dht)
            await self._pubsub.wait_until_ready()
            store = self._host.get_peerstore()
            nursery.start_soon(store.start_cleanup_task, _PEERSTORE_SWEEP_S)
            nursery.start_soon(self._sweep_streams)
            self._nursery = nursery
            try:
                if self._config.mdns:
                    # In the background: zeroconf first probes the LAN for its name (1.5 s).
                    nursery.start_soon(self._run_mdns)
                if self._config.bootstrap:
                    nursery.start_soon(self._dial_bootstrap)
                log.info("mesh %s listening on %s", self.peer_id, self.listen_addrs)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    await self._close_all_connections()

    async def _close_all_connections(self) -> None:
        """Close every connection's socket before the swarm stops.

        When `serve` is cancelled, the swarm's own tasks start closing their connections
        inside the cancelled scope, where the first await raises `Cancelled`: the connection
        is marked closed but its socket stays open. The muxer's close still reaches it.
        """

        async def close(conn: INetConn) -> None:
            try:
                await conn.close()
                if not conn.muxed_conn.is_closed:
                    await conn.muxed_conn.close()
            except (BaseLibp2pError, OSError) as exc:
                log.debug("closing a connection at shutdown: %r", exc)

        with trio.move_on_after(_SHUTDOWN_CLOSE_S):
            async with trio.open_nursery() as nursery:
                for conns in list(self._swarm.connections.values()):
                    for conn in list(conns):
                        nursery.start_soon(close, conn)

    async def _sweep_streams(self) -> None:
        """Release streams whose two sides are closed but that py-libp2p still tracks, and
        what it keeps of streams and messages that are gone.

        py-libp2p releases a stream when its write side closes last; a caller that closes
        first and never reads to the end would otherwise hold one of its 10,000 slots forever.
        Its Yamux reader puts a fresh wake-up event back for a stream that was removed while
        it waited, so each finished stream could leave one behind for the connection's life.
        """
        while True:
            await trio.sleep(_STREAM_SWEEP_S)
            held = self._gossipsub.equivocation_detection
            if len(held) > _EQUIVOCATION_KEPT:
                for key in list(held)[: len(held) - _EQUIVOCATION_KEPT]:  # oldest first
                    del held[key]
            for conns in list(self._swarm.connections.values()):
                for conn in list(conns):
                    muxed_conn = getattr(conn, "muxed_conn", None)
                    events = getattr(muxed_conn, "stream_events", None)
                    streams = getattr(muxed_conn, "streams", None)
                    if isinstance(events, dict) and isinstance(streams, dict):
                        for sid in [sid for sid in events if sid not in streams]:
                            del events[sid]
                    for stream in list(conn.get_streams()):
                        muxed = getattr(stream, "muxed_stream", None)
                        if getattr(muxed, "send_closed", False) and getattr(
                            muxed, "recv_closed", False
                        ):
                            await cast(NetStream, stream).remove()

    async def _run_dht(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._dht is not None
        async with background_trio_service(self._dht):
            task_status.started()
            await trio.sleep_forever()

    def _running(self) -> trio.Nursery:
        if self._nursery is None:
            raise InternalError("the mesh is not running (start Mesh.serve first)")
        return self._nursery

    @property
    def listen_addrs(self) -> list[str]:
        """The addresses the host is bound to, with port 0 resolved (empty before `serve`)."""
        return [str(a) for a in self._host.get_transport_addrs()]

    @property
    def advertised_addrs(self) -> list[str]:
        """Addresses other nodes can dial, each ending with `/p2p/<our id>` (for `connect`)."""
        return [str(a) for a in self._host.get_addrs()]

    # --- streams -----------------------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve `protocol`: each inbound stream runs `handler`, which owns the stream.

        When the handler returns, the stream is finished (`MeshStream.finish`); when it
        raises, the stream is reset and the error logged.
        """
        if not isinstance(protocol, str) or not protocol.startswith("/"):
            raise InvalidInput(f"a protocol id starts with '/', got {protocol!r}")

        async def on_stream(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            wrapped = MeshStream(stream, protocol, peer)
            try:
                await handler(wrapped)
            except OstromError as exc:
                log.info("%s handler for %s: %s", protocol, peer, exc.message)
                await wrapped._abort()
            except Exception:
                log.exception("%s handler failed for %s", protocol, peer)
                await wrapped._abort()
            else:
                await wrapped.finish()

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def open_stream(
        self, peer_id: str, protocol: str, *, bulk_receive: bool = False
    ) -> MeshStream:
        """A new stream to `peer_id` speaking `protocol`, dialling the peer if needed.

        `bulk_receive`: a stream this node will receive much on (a block fetch's). Its
        receive window starts at the largest Yamux allows (`_open_receive_window`), which
        the protocol must bound by what it asks for.
        """
        self._running()
        pid = _parse_peer_id(peer_id)
        if not isinstance(protocol, str) or not protocol.startswith("/"):
            raise InvalidInput(f"a protocol id starts with '/', got {protocol!r}")
        try:
            with trio.fail_after(_DIAL_TIMEOUT):
                stream = await self._host.new_stream(pid, [TProtocol(protocol)])
        except trio.TooSlowError:
            raise PeerUnreachable(f"opening {protocol} to {peer_id} timed out") from None
        except (BaseLibp2pError, OSError) as exc:
            raise PeerUnreachable(f"cannot open {protocol} to {peer_id}: {exc}") from None
        opened = MeshStream(stream, protocol, peer_id)
        muxed = cast(NetStream, stream).muxed_stream
        if bulk_receive and isinstance(muxed, YamuxStream):
            try:
                await _open_receive_window(muxed)
            except (StreamError, BaseLibp2pError) as exc:
                await opened.reset()
                raise PeerUnreachable(f"cannot open {protocol} to {peer_id}: {exc}") from None
        return opened

    # --- connections -------------------------------------------------------------------------

    async def connect(self, addr: str) -> PeerInfo:
        """Dial `addr` (`/.../p2p/<id>`) and return the peer once connected.

        Raises `PeerUnreachable` if no connection is made within 10 s, and `Refused` when the
        node already has `max_peers` peers.
        """
        self._running()
        pid, transport_addr = _split_p2p_addr(addr)
        if pid == self._host.get_id():
            raise InvalidInput("cannot connect to ourselves")
        if not self._swarm.get_connections(pid) and self._peer_count() >= self._config.max_peers:
            raise Refused(f"already connected to max_peers={self._config.max_peers} peers")
        # An explicit dial is a fresh attempt, whatever failed in the last minute.
        self._swarm.unblock_peer(pid)
        try:
            with trio.fail_after(_DIAL_TIMEOUT):
                await self._host.connect(Libp2pPeerInfo(pid, [transport_addr]))
        except trio.TooSlowError:
            raise PeerUnreachable(f"connecting to {addr} timed out") from None
        except (BaseLibp2pError, OSError) as exc:
            raise PeerUnreachable(f"cannot connect to {addr}: {exc}") from None
        if not self._swarm.get_connections(pid):
            raise PeerUnreachable(f"{addr} closed the connection (it may be full)")
        return self._peer_info(pid)

    async def disconnect(self, peer_id: str, reason: str) -> None:
        """Close every connection to `peer_id`, logging `reason`."""
        self._running()
        pid = _parse_peer_id(peer_id)
        log.info("disconnecting %s: %s", peer_id, reason)
        await self._host.disconnect(pid)

    def peers(self) -> list[PeerInfo]:
        """The connected peers, with the addresses they listen on (as far as known).

        A connection refused for `max_peers` is not a peer, even while it is being closed.
        """
        return [
            self._peer_info(pid)
            for pid, conns in list(self._swarm.connections.items())
            if conns and pid.to_base58() in self._reported
        ]

    def peer_count(self) -> int:
        """How many peers `peers` lists (a status poll's figure, without their addresses)."""
        return sum(
            1
            for pid, conns in list(self._swarm.connections.items())
            if conns and pid.to_base58() in self._reported
        )

    def set_max_peers(self, max_peers: int) -> None:
        """Change `MeshConfig.max_peers` at run time; it applies to new connections (peers
        already connected stay)."""
        self._config = dataclasses.replace(self._config, max_peers=max_peers)

    def on_peer_connected(self, callback: Callable[[str], None]) -> None:
        """Call `callback(peer_id)` when a peer's first connection opens (not when refused).

        Callbacks run on the trio thread inside the swarm and must not block; to do async
        work (a sync), start a task. An exception from a callback is logged.
        """
        self._on_connect.append(callback)

    def on_peer_disconnected(self, callback: Callable[[str], None]) -> None:
        """Call `callback(peer_id)` when the last connection to a reported peer closes."""
        self._on_disconnect.append(callback)

    def _peer_count(self) -> int:
        return sum(1 for conns in self._swarm.connections.values() if conns)

    def _peer_info(self, pid: ID) -> PeerInfo:
        found: list[multiaddr.Multiaddr] = []
        if self._host.get_peerstore().has_peer(pid):
            try:
                found = list(self._host.get_peerstore().addrs(pid))
            except BaseLibp2pError:
                found = []
        if not found:
            for conn in self._swarm.get_connections(pid):
                found.extend(conn.get_transport_addresses())
        return PeerInfo(pid.to_base58(), _addr_texts(found))

    def _on_connected(self, conn: INetConn) -> None:
        pid = conn.muxed_conn.peer_id
        peer = pid.to_base58()
        if peer in self._reported or self._nursery is None:
            return
        direction = getattr(conn, "direction", Direction.UNKNOWN)
        if direction == Direction.INBOUND and self._peer_count() > self._config.max_peers:
            log.info("refusing %s: already at max_peers=%d", peer, self._config.max_peers)
            self._nursery.start_soon(self._close_conn, conn)
            return
        self._reported.add(peer)
        if self._dht is not None:
            self._nursery.start_soon(self._add_to_dht, pid)
        _notify_all(self._on_connect, peer)

    def _on_disconnected(self, conn: INetConn) -> None:
        pid = conn.muxed_conn.peer_id
        peer = pid.to_base58()
        if self._swarm.get_connections(pid) or peer not in self._reported:
            return
        self._reported.discard(peer)
        _notify_all(self._on_disconnect, peer)

    async def _close_conn(self, conn: INetConn) -> None:
        await conn.close()

    async def _add_to_dht(self, pid: ID) -> None:
        """Add a peer to the DHT routing table once identify has told us its protocols."""
        assert self._dht is not None
        store = self._host.get_peerstore()
        with trio.move_on_after(_IDENTIFY_WAIT_S):
            while not (store.has_peer(pid) and store.get_protocols(pid)):
                if not self._swarm.get_connections(pid):
                    return
                await trio.sleep(_IDENTIFY_POLL_S)
            await self._dht.add_peer(pid)

    async def _dial_bootstrap(self) -> None:
        limiter = trio.CapacityLimiter(_BOOTSTRAP_PARALLEL_DIALS)

        async def dial(addr: str) -> None:
            async with limiter:
                try:
                    await self.connect(addr)
                except (PeerUnreachable, Refused, InvalidInput) as exc:
                    log.warning("bootstrap %s: %s", addr, exc.message)

        async with trio.open_nursery() as nursery:
            for addr in self._config.bootstrap:
                nursery.start_soon(dial, addr)

    # --- mDNS ---------------------------------------------------------------------------------

    async def _run_mdns(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Announce ourselves on the LAN and dial the Ostrom peers that announce themselves."""
        send, receive = trio.open_memory_channel[tuple[str, tuple[str, ...]]](_MDNS_QUEUE)
        token = trio.lowlevel.current_trio_token()

        def deliver(item: tuple[str, tuple[str, ...]]) -> None:
            # A full queue drops the discovery: the peer announces itself again.
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                send.send_nowait(item)

        def on_discovered(info: Libp2pPeerInfo) -> None:
            # Runs on a zeroconf thread, for every host in the process.
            item = (info.peer_id.to_base58(), tuple(str(a) for a in info.addrs))
            # Once trio has exited, nobody is left to dial.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(deliver, item)

        advertised = [str(a) for a in self._host.get_addrs()]
        tcp_port = int(self._host.get_transport_addrs()[0].value_for_protocol("tcp"))
        discovery = await trio.to_thread.run_sync(
            lambda: MDNSDiscovery(self._swarm, port=tcp_port, listen_addrs=advertised)
        )
        peerDiscovery.register_peer_discovered_handler(on_discovered)
        try:
            # Not `discovery.start()`: it registers on the trio thread, where zeroconf blocks
            # for its announcements (about 0.7 s), and spawns a system task for the sweep.
            await trio.to_thread.run_sync(discovery.broadcaster.register)
            limiter = trio.CapacityLimiter(_MDNS_PARALLEL_DIALS)
            task_status.started()
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(_sweep_mdns, discovery)
                async for peer, addrs in receive:
                    if self._should_dial_discovered(peer):
                        nursery.start_soon(self._dial_discovered, peer, addrs, limiter)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(on_discovered)
            send.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(discovery.stop)

    def _should_dial_discovered(self, peer: str) -> bool:
        if peer == self.peer_id or peer in self._reported:
            return False
        if self._peer_count() >= self._config.max_peers:
            return False
        now = time.monotonic()
        last = self._mdns_attempts.get(peer, -math.inf)
        if now - last < _MDNS_REDIAL_S:
            return False
        if len(self._mdns_attempts) >= _MDNS_MAX_TRACKED:
            self._mdns_attempts = {
                p: t for p, t in self._mdns_attempts.items() if now - t < _MDNS_REDIAL_S
            }
            if len(self._mdns_attempts) >= _MDNS_MAX_TRACKED:
                return False
        self._mdns_attempts[peer] = now
        return True

    async def _dial_discovered(
        self, peer: str, addrs: Sequence[str], limiter: trio.CapacityLimiter
    ) -> None:
        async with limiter:
            for addr in addrs:
                try:
                    await self.connect(f"{addr}/p2p/{peer}")
                except (PeerUnreachable, Refused, InvalidInput) as exc:
                    log.debug("mDNS peer %s at %s: %s", peer, addr, exc.message)
                    continue
                log.info("connected to %s found by mDNS", peer)
                return

    # --- gossip -------------------------------------------------------------------------------

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        """Receive `topic`: `handler(topic, data, from_peer)` decides whether to accept and relay.

        `from_peer` is the neighbour that sent the message (not necessarily its author). The
        handler runs before the message is relayed, must answer within 5 s (py-libp2p's
        validation timeout; later counts as a rejection), and is not called for our own
        messages. Identical bytes are delivered once (the message id is their hash).
        Subscribing again replaces the handler.
        """
        nursery = self._running()
        _check_topic(topic)
        self._topics[topic] = handler
        me = self._host.get_id()

        async def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if forwarder == me:
                return True
            current = self._topics.get(topic)
            if current is None:
                return False
            # py-libp2p marks a message seen only once it is validated, so copies from other
            # neighbours that arrive meanwhile would each be validated and relayed again. The
            # first copy decides; the others are ignored (scoring is off, so this costs the
            # neighbour nothing).
            mid = _content_message_id(msg)
            if mid in self._validating:
                return False
            self._validating.add(mid)
            try:
                accepted = bool(await current(topic, msg.data, forwarder.to_base58()))
            except Exception:
                log.exception("gossip handler for %s failed; message dropped", topic)
                return False
            finally:
                self._validating.discard(mid)
            if accepted:
                # Seen from now on, not from when py-libp2p marks it after a few more
                # checkpoints: a copy arriving in between would be relayed a second time.
                self._pubsub.seen_messages.add(mid)
            return accepted

        self._pubsub.set_topic_validator(topic, validate, True)
        if topic not in self._pubsub.topic_ids:
            subscription = cast(TrioSubscriptionAPI, await self._pubsub.subscribe(topic))
            nursery.start_soon(_drain, subscription.receive_channel)

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving and relaying `topic` (a no-op if not subscribed)."""
        self._running()
        _check_topic(topic)
        self._topics.pop(topic, None)
        await self._pubsub.unsubscribe(topic)
        self._pubsub.remove_topic_validator(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Send `data` to the topic's subscribers; gossip is best effort, never a guarantee."""
        self._running()
        _check_topic(topic)
        if not isinstance(data, bytes | bytearray) or not data:
            raise InvalidInput("a gossip message is non-empty bytes")
        if len(data) > _MAX_GOSSIP_BYTES:
            raise TooLarge(f"a gossip message is at most {_MAX_GOSSIP_BYTES} bytes")
        await self._pace()
        await self._pubsub.publish(topic, bytes(data))

    # --- topic access -------------------------------------------------------------------------

    def set_topic_access(self, topic: str, allowed: Callable[[str], bool] | None) -> None:
        """Keep `topic` to the peers for which `allowed(peer_id)` holds (None: anyone).

        A peer not allowed is never treated as a subscriber of the topic: nothing published
        or relayed on it, and no announcement of its messages, is sent to that peer, and its
        requests to join the topic's mesh are pruned. Call `recheck_topic_access` when the
        answer may have changed for peers already connected.
        """
        _check_topic(topic)
        if allowed is None:
            self._topic_access.pop(topic, None)
        else:
            self._topic_access[topic] = allowed
        self.recheck_topic_access()

    def recheck_topic_access(self) -> None:
        """Apply every topic's access rule again to the peers subscribed or held back."""
        pubsub, router = self._pubsub, self._gossipsub
        for topic, allowed in list(self._topic_access.items()):
            held = self._held_subscriptions.setdefault(topic, set())
            for peer in list(pubsub.peer_topics.get(topic, ())):
                if not allowed(peer.to_base58()):
                    pubsub.peer_topics[topic].discard(peer)
                    router.mesh.get(topic, set()).discard(peer)
                    router.fanout.get(topic, set()).discard(peer)
                    held.add(peer)
            for peer in list(held):
                if peer not in pubsub.peers:
                    held.discard(peer)  # gone; it subscribes again if it comes back
                elif allowed(peer.to_base58()):
                    held.discard(peer)
                    pubsub.peer_topics.setdefault(topic, set()).add(peer)
                    # Its earlier GRAFTs were pruned with a back-off; without this the
                    # heartbeat would not take it into the topic's mesh for a minute.
                    router.back_off.get(topic, {}).pop(peer, None)
                    if topic in router.mesh:
                        router.mesh[topic].add(peer)

    def _filter_topic_subscriptions(self) -> None:
        """Wrap py-libp2p's handling of subscriptions and GRAFTs with `_topic_access`: it
        has no notion of who may subscribe to a topic. (Instance attributes, so nothing
        outside this mesh changes; tests/test_mesh.py checks both hooks still exist.)"""
        pubsub, router = self._pubsub, self._gossipsub
        handle_subscription = pubsub.handle_subscription
        handle_graft = router.handle_graft

        def filtered_subscription(origin_id: ID, sub_message: rpc_pb2.RPC.SubOpts) -> None:
            topic = sub_message.topicid
            allowed = self._topic_access.get(topic)
            if allowed is not None:
                held = self._held_subscriptions.setdefault(topic, set())
                if not sub_message.subscribe:
                    held.discard(origin_id)
                elif not allowed(origin_id.to_base58()):
                    held.add(origin_id)
                    return
            handle_subscription(origin_id, sub_message)

        async def filtered_graft(graft_msg: rpc_pb2.ControlGraft, sender_peer_id: ID) -> None:
            allowed = self._topic_access.get(graft_msg.topicID)
            if allowed is not None and not allowed(sender_peer_id.to_base58()):
                await router.emit_prune(graft_msg.topicID, sender_peer_id, False, False)
                return
            await handle_graft(graft_msg, sender_peer_id)

        pubsub.handle_subscription = filtered_subscription  # type: ignore[method-assign]
        router.handle_graft = filtered_graft  # type: ignore[method-assign]

    def _drop_known_messages_early(self) -> None:
        """Drop a gossip copy already seen or being validated in the read loop, and start
        the task that validates and relays a new one in the mesh's nursery.

        For each message of a subscribed topic in an RPC, py-libp2p's read loop starts a
        service task (`push_msg`; the anyio service manager walks its task tree for each,
        a few percent of a relay's CPU), and only that task looks at the seen-cache. With
        each record arriving about once per mesh peer, most of those tasks were for
        duplicates. The read loop asks `_is_subscribed_to_msg` first (its only caller), so
        that answer also says "new"; and, knowing from a context variable which peer the
        loop reads, it starts `push_msg` itself (a plain trio task) and answers "no", so
        that py-libp2p starts nothing. At most `_MAX_RELAYS` such tasks run at once; a new
        message past that is dropped (sync brings it). A copy that arrives while its task
        waits names a peer that holds the message, which the relay then skips (on a busy
        node, most of its mesh). (Instance attributes; tests/test_mesh.py checks the read
        loop still asks it and that the tasks are bounded.)
        """
        pubsub = self._pubsub
        topic_ids = pubsub.topic_ids
        seen = pubsub.seen_messages
        validating = self._validating
        relaying = self._relaying
        read_loop = pubsub.continuously_read_stream

        async def read_and_say_who(stream: INetStream) -> None:
            _reading_from.set(stream.muxed_conn.peer_id)
            await read_loop(stream)

        async def push(forwarder: ID, msg: rpc_pb2.Message, mid: bytes) -> None:
            try:
                await pubsub.push_msg(forwarder, msg)
            finally:
                relaying.pop(mid, None)

        def subscribed_and_new(msg: rpc_pb2.Message) -> bool:
            if not any(topic in topic_ids for topic in msg.topicIDs):
                return False
            mid = _content_message_id(msg)
            holders = relaying.get(mid)
            if holders is not None:
                # A copy from another peer while the first waits to be relayed: that peer
                # needs none from this node.
                holder = _reading_from.get()
                if holder is not None:
                    holders.add(holder)
                return False
            if mid in validating or seen.has(mid):
                return False
            forwarder = _reading_from.get()
            if forwarder is None or self._nursery is None:
                return True  # not from a read loop we know: py-libp2p's own task
            if len(relaying) >= _MAX_RELAYS:
                log.debug("%d gossip messages in validation; one more dropped", len(relaying))
                return False
            relaying[mid] = set()
            self._nursery.start_soon(push, forwarder, msg, mid)
            return False

        pubsub._is_subscribed_to_msg = subscribed_and_new  # type: ignore[method-assign]
        pubsub.continuously_read_stream = read_and_say_who  # type: ignore[method-assign]

    def _publish_to_enough_peers(self) -> None:
        """Send a message this node publishes to `_PUBLISH_MIN_RECIPIENTS` peers at least.

        py-libp2p sends it to the topic's mesh only, so a publisher whose mesh was empty
        (its peers pruned and in back-off) sent its records to no one until the back-off
        ended. Here the mesh peers are topped up with other subscribed neighbours (like
        go-libp2p's flood publishing, but to D peers, not all). Relayed messages still go
        to the mesh only. (An instance attribute; tests/test_mesh.py checks that publishing
        goes through it.)
        """
        router = self._gossipsub
        pubsub = self._pubsub
        peers_to_send = router._get_peers_to_send

        def to_enough_peers(
            topic_ids: Any, msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
        ) -> Any:
            me = pubsub.my_id
            if msg_forwarder != me or origin != me:
                return peers_to_send(topic_ids, msg_forwarder, origin, msg_id)
            chosen: set[ID] = set(peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
            return self._topped_up(chosen, topic_ids)

        router._get_peers_to_send = to_enough_peers  # type: ignore[method-assign]

    def _topped_up(self, chosen: set[ID], topic_ids: Iterable[str]) -> set[ID]:
        """`chosen`, the recipients of a message this node publishes, with other subscribed
        and identified neighbours added until they number `_PUBLISH_MIN_RECIPIENTS`, and
        without this node."""
        router, pubsub = self._gossipsub, self._pubsub
        for topic in topic_ids:
            for peer in pubsub.peer_topics.get(topic, ()):
                if len(chosen) >= _PUBLISH_MIN_RECIPIENTS:
                    break
                if peer in router.peer_protocol:
                    chosen.add(peer)
        chosen.discard(pubsub.my_id)
        return chosen

    def _gossip_to_all_but_mesh(self) -> None:
        """Choose the peers told of recent messages (IHAVE) among every subscriber outside
        the mesh, those in prune back-off included.

        py-libp2p leaves peers in back-off out of this gossip (go-libp2p does not: back-off
        only forbids a GRAFT). A node pruned by all its mesh peers was then neither relayed
        to nor told of anything until the back-off ended, and lost those records to gossip.
        Fan-out topics (published to, not subscribed) keep py-libp2p's handling.
        (An instance attribute; tests/test_mesh.py checks the heartbeat goes through it.)
        """
        router = self._gossipsub
        pubsub = self._pubsub
        gossip_heartbeat = router.gossip_heartbeat

        def gossip_all_but_mesh() -> defaultdict[ID, dict[str, list[bytes]]]:
            mesh, router.mesh = router.mesh, {}
            try:
                chosen = gossip_heartbeat()  # the fan-out topics only
            finally:
                router.mesh = mesh
            for topic, mesh_peers in mesh.items():
                ids = router.mcache.window(topic)
                if not ids:
                    continue
                others = [
                    peer
                    for peer in pubsub.peer_topics.get(topic, ())
                    if peer not in mesh_peers and peer in router.peer_protocol
                ]
                count = max(_GOSSIP_D_LAZY, int(len(others) * _GOSSIP_FACTOR))
                for peer in random.sample(others, min(count, len(others))):
                    chosen[peer][topic] = list(ids)
            return chosen

        router.gossip_heartbeat = gossip_all_but_mesh  # type: ignore[method-assign]

    def _relay_received_messages(self) -> None:
        """Validate and relay a message received from a peer along a shorter path.

        py-libp2p's `push_msg` and `GossipSub.publish` do for each new message what a relay
        pays for per copy: the message id computed four times, a nursery, a task and a
        cancel scope around the one validator, a validation cache kept in a list it scans
        (O(n) per message), the message handed to the subscription channel (whose drain
        task wakes only to discard it: the validator is where Ostrom reads it), per mesh
        peer a copy of the RPC and a run of the splitter, and for every connected peer an
        origin peer id built again. Here a message from a peer is checked in the same
        order with the same outcome: blacklists, seen, the message signature, the topic
        validators (under py-libp2p's semaphore and timeout; a failure is cached, so that
        copies of an invalid message are refused without running the validators again),
        seen, own-message check, message cache, then one RPC sent to each mesh peer except
        the forwarder and origin, and kept for peers still being identified as py-libp2p
        does. The subscription channel is not handed the message (every subscription of
        this mesh is drained unread: `subscribe`). Our own messages of subscribed topics are
        marked seen, cached and sent the same way, to the mesh topped up to D peers, without
        the check of the signature just made or the validators (which pass them). Anything
        else (fan-out topics, peer scoring or spam protection turned on, a peer with control
        messages waiting) takes py-libp2p's path.
        (An instance attribute; tests/test_mesh.py checks the read loop still calls it.)
        """
        pubsub, router = self._pubsub, self._gossipsub
        push_msg = pubsub.push_msg
        me = pubsub.my_id
        me_bytes = me.to_bytes()
        first_deliveries = self._first_deliveries
        seen = pubsub.seen_messages
        blacklisted = pubsub.blacklisted_peers
        cache = pubsub.validation_cache
        params = router.scorer.params if router.scorer is not None else None
        scoring_off = params is None or (
            params.publish_threshold == -math.inf
            and params.gossip_threshold == -math.inf
            and params.graylist_threshold == -math.inf
        )

        async def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            """The topic validators' verdict, False on a timeout or an error."""
            # Synchronous validators first, as py-libp2p runs them.
            validators = sorted(pubsub.get_msg_validators(msg), key=lambda v: v.is_async)
            verdict = True
            with trio.move_on_after(pubsub.validation_timeout):
                async with pubsub._validator_semaphore:
                    for one in validators:
                        if one.is_async:
                            passed = await cast(Any, one.validator)(forwarder, msg)
                        else:
                            passed = one.validator(forwarder, msg)
                        if not passed:
                            verdict = False
                            break
                return verdict
            return False

        async def push_received(forwarder: ID, msg: rpc_pb2.Message) -> None:
            if (
                not scoring_off
                or router.spam_protection_enabled
                or not all(topic in router.mesh for topic in msg.topicIDs)
            ):
                await push_msg(forwarder, msg)
                return
            mid = _content_message_id(msg)
            if forwarder == me:
                # Our own message, signed a moment ago: py-libp2p would verify that signature
                # and run the validators, which pass our own messages unread (`subscribe`).
                # Then its `GossipSub.publish` builds a peer id per connected peer, twice,
                # to leave out the forwarder and origin (this node), and asks the scores of
                # each recipient: 0.41 ms of CPU per message at 20 peers, against 0.11 ms
                # on the relays' path, which it takes instead.
                if not seen.has(mid) and router._check_equivocation(msg):
                    seen.add(mid)
                    _cache_message(router, msg, mid)
                    self._send_to_mesh(forwarder, msg, mid)
                return
            if blacklisted and (forwarder in blacklisted or ID(msg.from_id) in blacklisted):
                return
            if seen.has(mid):
                return
            if pubsub.strict_signing and not _message_signature_valid(msg):
                return
            cached = cache.get(mid)
            if cached is None:
                try:
                    valid = await validate(forwarder, msg)
                except Exception:
                    log.exception("gossip validation failed; message dropped")
                    valid = False
                if not valid:
                    cache.put(mid, ValidationResult(is_valid=False, timestamp=time.time()))
                    return
                if mid in cache.cache:  # a copy refused while this one was being validated
                    cache.put(mid, ValidationResult(is_valid=True, timestamp=time.time()))
            elif not cached.is_valid:
                return
            seen.add(mid)
            if router.scorer is not None:
                for topic in msg.topicIDs:
                    router.scorer.on_first_delivery(forwarder, topic)
            if msg.from_id == me_bytes:
                return  # claims to be ours, but came from a peer
            if not router._check_equivocation(msg):
                return
            relayed = msg.from_id != forwarder.to_bytes()  # not sent by its origin
            for topic in msg.topicIDs:
                outside = relayed and forwarder not in router.mesh[topic]
                first_deliveries[topic].append(forwarder if outside else None)
            _cache_message(router, msg, mid)
            self._send_to_mesh(forwarder, msg, mid)

        pubsub.push_msg = push_received  # type: ignore[method-assign,assignment]

    def _graft_where_gossip_comes_from(self) -> None:
        """At each heartbeat, graft the subscriber outside the mesh that brought this node
        the most new messages of a topic first, once they number `_GOSSIP_FIRST_TO_GRAFT` of
        the topic's last `_GOSSIP_FIRST_WINDOW`.

        Gossipsub grafts only to keep D_low mesh peers, so a mesh can split into parts whose
        every node has enough peers in its own part, and stay split: at 20 daemons one run's
        mesh held a part of 8 nodes for its whole length, and those nodes got each record
        only when a node of the other part next told them of it (IHAVE, once a heartbeat)
        and they asked for it (IWANT): 200-450 ms late, every second. A relay sends only to
        its mesh, so a message that comes first from a subscriber outside the mesh, and not
        from its origin, is such an answer: the mesh did not bring it in time. Grafting the
        peer that answered most joins this node to where the topic's messages flow; if that
        takes a mesh past D_high, the next heartbeat prunes it as usual, and should the prune
        cut the new link, the gossip that follows grafts again (another peer: a pruned one
        is in back-off). Peers in back-off, direct peers and those without gossipsub are not
        grafted. The count is over messages, not time, so a quiet topic's split is joined too,
        a few dozen records later; once a peer is grafted the count starts again.
        (An instance attribute; tests/test_mesh.py checks the heartbeat calls it.)
        """
        router = self._gossipsub
        mesh_heartbeat = router.mesh_heartbeat
        first_deliveries = self._first_deliveries

        def heartbeat() -> tuple[defaultdict[ID, list[str]], defaultdict[ID, list[str]]]:
            grafts, prunes = mesh_heartbeat()
            for topic in [t for t in first_deliveries if t not in router.mesh]:
                del first_deliveries[topic]  # unsubscribed
            for topic, window in first_deliveries.items():
                by_peer = Counter(peer for peer in window if peer is not None)
                if sum(by_peer.values()) < _GOSSIP_FIRST_TO_GRAFT:
                    continue
                for peer, _ in by_peer.most_common():
                    if self._graftable(peer, topic):
                        log.debug("%s brought %s first by gossip; grafting it", peer, topic)
                        self._graft(peer, topic, grafts)
                        window.clear()
                        break
            return grafts, prunes

        router.mesh_heartbeat = heartbeat  # type: ignore[method-assign]

    def _graft_at_random_now_and_then(self) -> None:
        """At a heartbeat, once in `_GOSSIP_EXPLORE_HEARTBEATS` on average, graft one
        subscriber outside a topic's mesh, drawn at random, if the mesh is below D_high and
        this heartbeat grafted nothing else for the topic.

        A split mesh (`_graft_where_gossip_comes_from`) is seen only once messages flow: a
        split formed while a topic was quiet held the next records back from one part until
        that part heard of them at a heartbeat, up to a second, and the count of such
        answers grafted across. Random grafts join parts with no message at all; the mesh
        stays within D_high (a peer pushed past it prunes at its heartbeat, as for any
        graft). Peers in back-off or pruned at this heartbeat, direct peers and those without
        gossipsub are not drawn. (An instance attribute; tests/test_mesh.py checks the
        heartbeat calls it.)
        """
        router, pubsub = self._gossipsub, self._pubsub
        mesh_heartbeat = router.mesh_heartbeat

        def heartbeat() -> tuple[defaultdict[ID, list[str]], defaultdict[ID, list[str]]]:
            grafts, prunes = mesh_heartbeat()
            grafted = {topic for topics in grafts.values() for topic in topics}
            pruned = {(peer, topic) for peer, topics in prunes.items() for topic in topics}
            for topic, mesh in router.mesh.items():
                if (
                    topic in grafted
                    or len(mesh) >= router.degree_high
                    or random.randrange(_GOSSIP_EXPLORE_HEARTBEATS)
                ):
                    continue
                outside = [
                    peer
                    for peer in pubsub.peer_topics.get(topic, ())
                    if (peer, topic) not in pruned  # at this heartbeat, past D_high
                    and self._graftable(peer, topic)
                ]
                if outside:
                    peer = random.choice(outside)
                    log.debug("grafting %s, drawn at random, on %s", peer, topic)
                    self._graft(peer, topic, grafts)
            return grafts, prunes

        router.mesh_heartbeat = heartbeat  # type: ignore[method-assign]

    def _graftable(self, peer: ID, topic: str) -> bool:
        """Whether a heartbeat may graft `peer` into `topic`'s mesh beyond gossipsub's own
        grafts (`_graft_where_gossip_comes_from`, `_graft_at_random_now_and_then`): a
        subscriber outside the mesh that speaks gossipsub, not a direct peer (sent everything
        anyway) and not in back-off."""
        router = self._gossipsub
        return (
            peer not in router.mesh.get(topic, ())
            and peer in self._pubsub.peer_topics.get(topic, ())
            and peer in router.peer_protocol
            and peer not in router.direct_peers
            and not router._check_back_off(peer, topic)
        )

    def _graft(self, peer: ID, topic: str, grafts: defaultdict[ID, list[str]]) -> None:
        """Add `peer` to `topic`'s mesh at a heartbeat; the GRAFT goes out with `grafts`."""
        router = self._gossipsub
        router.mesh[topic].add(peer)
        router._notify_mesh_peer_added(peer, topic)
        grafts[peer].append(topic)

    def _send_to_mesh(self, forwarder: ID, msg: rpc_pb2.Message, mid: bytes) -> None:
        """`GossipSub.publish` for a validated message of subscribed topics (see
        `_relay_received_messages`): one RPC, queued to each mesh peer but the forwarder
        and the origin, and kept for connected peers whose subscription is not known yet.
        A message this node publishes (`forwarder` is this node) goes to the mesh topped up
        to `_PUBLISH_MIN_RECIPIENTS` (`_publish_to_enough_peers`). What py-libp2p's publish
        also does, IDONTWANT (gossipsub 1.2) and IHAVE to topic observers (1.3), has no
        peer here: this node speaks 1.1 at most."""
        pubsub, router = self._pubsub, self._gossipsub
        origin = ID(msg.from_id)
        rpc = rpc_pb2.RPC(publish=[msg])
        rpc.senderRecord = _sender_record_to_send(pubsub.host)[0]
        size = rpc.ByteSize()
        send_to: set[ID] = set()
        for topic in msg.topicIDs:
            if topic in pubsub.peer_topics:
                send_to.update(router.direct_peers)
                send_to.update(router.mesh[topic])
        if forwarder == origin == pubsub.my_id:
            # Scores gate no peer on this path (`_relay_received_messages`), and this node
            # speaks no floodsub: py-libp2p's choice of recipients (120 us at 20 peers) comes
            # to the mesh and direct peers.
            self._topped_up(send_to, msg.topicIDs)
        skipped = {forwarder, origin}
        send_to -= skipped
        send_to.difference_update(self._relaying.get(mid, ()))
        # Set operations between sets reuse the hashes they hold (ID hashes in Python).
        send_to &= pubsub.peers.keys()
        unwanted = router.dont_send_message_ids
        pending_control = router._pending_control
        for peer in send_to:
            if unwanted and mid in unwanted.get(peer, ()):
                continue
            queue = pubsub.peer_queues.get(peer)
            if queue is None:
                continue
            if (pending_control and peer in pending_control) or size > queue.max_message_size:
                router.send_rpc(peer, rpc)  # control to attach, or too large: py-libp2p's way
            elif not queue.push(rpc):
                router._handle_dropped_rpc(peer, rpc, "queue_full")
        # Connected peers not known as subscribed and identified yet keep the message until
        # they are (py-libp2p's identify-aware delivery); usually there are none.
        now = time.time()
        connected = set(pubsub.peers)
        queued: set[ID] = set()
        for topic in msg.topicIDs:
            subscribed = pubsub.peer_topics.get(topic, set())
            waiting = subscribed.difference(router.peer_protocol) | (connected - subscribed)
            waiting -= skipped
            waiting -= queued
            waiting.difference_update(router.direct_peers)
            for peer in waiting:
                router._prune_pending_messages(peer)
                router._pending_messages[peer].append((now, rpc))
            queued |= waiting
            router.time_since_last_publish[topic] = int(now)
            router.recent_message_deliveries[topic].append(now)

    def _read_ihave_ids_directly(self) -> None:
        """Take the message ids of an IHAVE as they are when they are binary.

        py-libp2p passes each id through `safe_bytes_from_hex`, which for a binary id (ours
        are sha256 digests; go and js send binary ids too) first tries to decode it as ASCII
        and fails with an exception: about 60 ids per IHAVE, several IHAVEs a second, a few
        percent of a relay's CPU. An id with a byte over 0x7F is not ASCII, so that function
        returns it unchanged; it is now used as it is, and only other ids go through that
        function. The rest is py-libp2p's `handle_ihave`. (An instance attribute;
        tests/test_mesh.py checks that the router's RPC handling calls it.)
        """
        router, pubsub = self._gossipsub, self._pubsub

        async def handle_ihave(ihave_msg: rpc_pb2.ControlIHave, sender_peer_id: ID) -> None:
            if not router._check_ihave_rate_limit(sender_peer_id, ihave_msg.topicID):
                log.debug(
                    "IHAVE rate limit exceeded for %s on %s", sender_peer_id, ihave_msg.topicID
                )
                return
            seen = pubsub.seen_messages
            wanted: list[MessageID] = []
            for msg_id in ihave_msg.messageIDs:
                mid = msg_id if not msg_id.isascii() else safe_bytes_from_hex(msg_id)
                if mid is not None and not seen.has(mid):
                    wanted.append(MessageID(mid))
            if wanted:
                await router.emit_iwant(wanted, sender_peer_id)

        router.handle_ihave = handle_ihave  # type: ignore[method-assign]

    async def _pace(self) -> None:
        """Wait until every peer's outbound gossip queue has room.

        py-libp2p drops a message silently when a peer's queue (32 RPCs) is full, so a burst
        of publishes would mostly vanish. A peer whose queue does not drain within
        `_PUBLISH_PACE_MAX_S` is stalled and no longer waited for until it drains.
        """
        deadline = trio.current_time() + _PUBLISH_PACE_MAX_S
        queues = self._pubsub.peer_queues
        while True:
            full = {peer for peer, q in list(queues.items()) if len(q) >= _PUBLISH_QUEUE_HIGH}
            self._stalled &= full
            waiting = full - self._stalled
            if not waiting:
                return
            if trio.current_time() >= deadline:
                log.info("gossip to %d peer(s) is stalled; not waiting for them", len(waiting))
                self._stalled |= waiting
                return
            await trio.sleep(_PUBLISH_POLL_S)

    # --- DHT ----------------------------------------------------------------------------------

    async def provide(self, key: bytes) -> None:
        """Announce in the DHT that this node has `key` (a CID's bytes)."""
        self._running()
        dht = self._require_dht()
        await dht.provider_store.provide(_dht_key(key))

    async def find_providers(
        self, key: bytes, *, limit: int = 20, timeout: float = 10
    ) -> list[PeerInfo]:
        """Other peers that announced `key` (a CID's bytes), at most `limit`, within `timeout`."""
        self._running()
        dht = self._require_dht()
        if not isinstance(limit, int) or limit < 1:
            raise InvalidInput(f"limit is a positive integer, got {limit!r}")
        if not timeout > 0:
            raise InvalidInput(f"timeout is positive, got {timeout!r}")
        found: list[Libp2pPeerInfo] = []
        with trio.move_on_after(timeout):
            # Ask for one more than the limit: the answer may include ourselves.
            found = await dht.provider_store.find_providers(_dht_key(key), limit + 1)
        merged: dict[str, list[multiaddr.Multiaddr]] = {}
        for info in found:
            peer = info.peer_id.to_base58()
            if peer == self.peer_id:
                continue
            merged.setdefault(peer, []).extend(info.addrs)
        return [PeerInfo(p, _addr_texts(a)) for p, a in list(merged.items())[:limit]]

    def _require_dht(self) -> KadDHT:
        if self._dht is None:
            raise Refused("the DHT is disabled in this node's mesh configuration")
        return self._dht


async def _sweep_mdns(discovery: MDNSDiscovery) -> None:
    """Forget LAN peers that stopped announcing themselves (what `MDNSDiscovery.start` runs)."""
    while True:
        await trio.sleep(discovery.cleanup_interval)
        discovery.listener.cleanup_stale_entries(max_age=discovery.ttl * 2)


# The peer whose pubsub stream the current task reads (set by the read loop's wrapper).
_reading_from: ContextVar[ID | None] = ContextVar("_reading_from", default=None)

# The cancel scope of the inbound-connection handler running in the current task.
_inbound_scope: ContextVar[trio.CancelScope | None] = ContextVar("_inbound_scope", default=None)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _notify_all(callbacks: Sequence[Callable[[str], None]], peer: str) -> None:
    for callback in callbacks:
        try:
            callback(peer)
        except Exception:
            # py-libp2p would swallow it without a word; a bug in a callback must show.
            log.exception("peer callback %r failed for %s", callback, peer)


async def _never_start() -> None:
    return None


async def _drain(channel: trio.MemoryReceiveChannel[rpc_pb2.Message]) -> None:
    """Empty a subscription's channel as fast as it fills: handlers already saw the messages."""
    async for _ in channel:
        pass
