"""Mesh catalogues: what each member of a community mesh says it hosts there.

A catalogue is one node's signed list of the projects it follows, announced within one mesh:
the public projects it follows go into the catalogue of every mesh it is in, a private
mesh's project only into that mesh's. A node's newer catalogue for a mesh replaces its older
one (latest `(ts, cid)` wins), so the catalogue is a statement of the present, never a
history: a project unfollowed disappears from the next one, and an empty catalogue withdraws
a node that leaves. Catalogues are also bounded in age: a node re-signs its own every hour
and a reader drops one older than `CATALOGUE_TTL_MS`, so a node that vanished ages out.

A catalogue also carries the addresses its author can be dialled at, so that a member who
finds a project there can reach its host without being connected to it already: a private
mesh's project is announced nowhere else (not on the DHT).

The record is signed under its own domain, so it can be taken for neither a project record
nor a mesh record. `CatalogueBook` is what a node holds of other nodes' catalogues: every
bound a peer could push on (count, bytes, age, rate) is enforced there. docs/PROTOCOL.md 13.5
specifies both.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import DecodeError, InvalidRecord
from ostrom.protocol import dagcbor
from ostrom.protocol.envelope import check_envelope, open_map, seal, unsigned_bytes
from ostrom.protocol.fields import check_key, check_link, check_name, check_ts, fail
from ostrom.protocol.meshes import MAX_ADDRESS_LENGTH

# What catalogue signatures cover before the payload: neither the record domain nor the mesh
# domain, so a catalogue signature is valid as nothing else and nothing else as a catalogue.
CATALOGUE_DOMAIN: Final = b"ostrom/catalogue/v1\x00"
# The only catalogue format version this code reads and writes.
CATALOGUE_VERSION: Final = 1
# The most projects one catalogue lists: more than one node follows in practice; a node that
# follows more announces the first it followed, so its catalogue does not churn.
MAX_CATALOGUE_ENTRIES: Final = 256
# A listed project's name, as its genesis spells it: the bound of a project name.
MAX_CATALOGUE_NAME_LENGTH: Final = 100
# The largest catalogue encoding: 256 entries with names of typical length fit; one whose
# names are long (or many bytes per character) is cut to fit by its signer. Small enough that
# a mesh's worth of catalogues is a few MiB.
MAX_CATALOGUE_SIZE: Final = 32 * 1024
# A catalogue older than this (by its `ts`) is dropped: six re-signings (one an hour) may be
# missed before a live node's entries vanish, and a node gone for good ages out in hours.
CATALOGUE_TTL_MS: Final = 6 * 3600 * 1000
# How often a node re-signs its catalogues though nothing changed, to keep them from aging
# out: a sixth of the TTL.
CATALOGUE_REFRESH_MS: Final = 3600 * 1000
# How far ahead of the reader's clock a catalogue's `ts` may be: home machines' clocks drift
# by seconds to minutes; more is a wrong clock, or a signer trying to outlive the TTL.
CATALOGUE_FUTURE_MS: Final = 10 * 60 * 1000
# The least `ts` step between two catalogues of one author that a reader takes: with the
# future bound above, it holds a signer that floods new catalogues to one a second.
CATALOGUE_MIN_INTERVAL_MS: Final = 1000
# Catalogues a node holds per mesh, and their bytes: a community of hundreds of hosts, each
# with a full catalogue, while one mesh flooded by fresh keys costs at most 2 MiB.
MAX_CATALOGUES_PER_MESH: Final = 512
MAX_CATALOGUE_BYTES_PER_MESH: Final = 2 * 1024 * 1024
# Catalogue bytes a node holds over all its meshes: eight full meshes.
MAX_CATALOGUE_BYTES: Final = 16 * 1024 * 1024
# The most addresses a catalogue gives for its author: a node has a few interfaces (LAN and
# public IPv4, an IPv6 address or two) and perhaps an address its peers observed; each one a
# reader cannot reach costs it a dial attempt, so a long list is worse, not better.
MAX_CATALOGUE_ADDRS: Final = 8

# A transport address in multiaddr text form: /protocol/value pairs, no spaces. Whether it
# names the author's peer (`/p2p/`) is checked apart: the reader adds the author's own id.
_ADDRESS: Final = re.compile(r"(/[a-z0-9-]+/[^/\s]+)+")
# Those pairs a reader can dial (the reference node speaks TCP only): host, then TCP port.
_DIALABLE: Final = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/([^/\s]+)/tcp/([0-9]{1,5})")
# Room a catalogue keeps for its addresses when `fit_entries` fills it with projects: each
# address is a text of at most `MAX_ADDRESS_LENGTH` bytes plus its CBOR header, and the key.
_ADDRS_RESERVE: Final = MAX_CATALOGUE_ADDRS * (MAX_ADDRESS_LENGTH + 3) + 16


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One project a node hosts: its genesis CID and the name its genesis gives."""

    project: CID
    name: str

    def __post_init__(self) -> None:
        check_link(Catalogue.TYPE, "project", self.project)
        check_name(Catalogue.TYPE, "name", self.name, max_length=MAX_CATALOGUE_NAME_LENGTH)


def check_addrs(kind: str, addrs: object) -> tuple[str, ...]:
    """A catalogue's `addrs`: at most `MAX_CATALOGUE_ADDRS` multiaddrs, each at most
    `MAX_ADDRESS_LENGTH` characters, without a `/p2p/` part, each listed once."""
    if not isinstance(addrs, tuple) or len(addrs) > MAX_CATALOGUE_ADDRS:
        raise fail(kind, f"addrs must list at most {MAX_CATALOGUE_ADDRS} addresses")
    for addr in addrs:
        if (
            not isinstance(addr, str)
            or len(addr) > MAX_ADDRESS_LENGTH
            or not _ADDRESS.fullmatch(addr)
            or "/p2p/" in addr
            or "/ipfs/" in addr
        ):
            raise fail(kind, f"address {addr!r} is not a multiaddr without a /p2p/ part")
    if len(set(addrs)) != len(addrs):
        raise fail(kind, "an address is listed twice")
    return addrs


def announceable_addrs(addrs: Iterable[str]) -> tuple[str, ...]:
    """Of a node's own addresses (with or without its `/p2p/<id>` suffix), those another
    node can dial, for its catalogues: TCP on a named host or an IP address that is neither
    unspecified (`0.0.0.0`, `::`), multicast nor link-local, with a port other than 0;
    without the suffix, each once, loopback last, at most `MAX_CATALOGUE_ADDRS`."""
    found: list[str] = []
    for given in addrs:
        addr = given.split("/p2p/", 1)[0]
        match = _DIALABLE.fullmatch(addr)
        if match is None or len(addr) > MAX_ADDRESS_LENGTH or addr in found:
            continue
        proto, host, port = match.groups()
        if not 0 < int(port) < 65536:
            continue
        if proto in ("ip4", "ip6"):
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                continue
            if ip.version != int(proto[-1]) or ip.is_unspecified or ip.is_multicast:
                continue
            if ip.is_link_local:
                continue  # needs an interface name to dial, which only this machine knows
        found.append(addr)
    found.sort(key=_is_loopback)  # stable: the node's own order otherwise
    return tuple(found[:MAX_CATALOGUE_ADDRS])


def _is_loopback(addr: str) -> bool:
    """Whether `addr` reaches only this machine: dialled from elsewhere, it reaches the
    dialler's own machine, so readers try it last."""
    match = _DIALABLE.fullmatch(addr)
    if match is None:
        return False
    proto, host, _ = match.groups()
    if proto in ("ip4", "ip6"):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


@dataclass(frozen=True, slots=True)
class Catalogue:
    """What `author` hosts within the mesh `mesh`, as of `ts`, and the addresses it says
    it can be dialled at (`addrs`, without `/p2p/<its peer id>`)."""

    TYPE: ClassVar[str] = "catalogue"
    author: bytes
    ts: int
    mesh: CID
    projects: tuple[CatalogueEntry, ...] = ()
    addrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kind = self.TYPE
        check_key(kind, "author", self.author)
        check_ts(kind, self.ts)
        check_link(kind, "mesh", self.mesh)
        if not isinstance(self.projects, tuple) or len(self.projects) > MAX_CATALOGUE_ENTRIES:
            raise fail(kind, f"projects must list at most {MAX_CATALOGUE_ENTRIES} entries")
        for entry in self.projects:
            if not isinstance(entry, CatalogueEntry):
                raise fail(kind, "projects must hold {project, name} entries")
        # Strictly increasing bytes: sorted, and no project twice (one pass, no sort).
        keys = [entry.project.raw for entry in self.projects]
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise fail(kind, "projects must be sorted by project CID bytes, each listed once")
        check_addrs(kind, self.addrs)

    def fields(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh,
            "projects": [{"project": e.project, "name": e.name} for e in self.projects],
            "addrs": list(self.addrs),
        }


_FIELDS: Final = frozenset({"type", "v", "author", "ts", "mesh", "projects", "addrs", "sig"})
_ENTRY_FIELDS: Final = frozenset({"project", "name"})


@dataclass(frozen=True, slots=True)
class SignedCatalogue:
    """A catalogue with its signature, canonical bytes and CID; only `sign_catalogue` and
    `decode_catalogue` make these, so every instance is verified."""

    body: Catalogue
    sig: bytes = field(repr=False)
    cid: CID
    data: bytes = field(repr=False)

    @property
    def mesh(self) -> CID:
        return self.body.mesh

    @property
    def order(self) -> tuple[int, bytes]:
        """What decides which of one author's catalogues for a mesh is the latest."""
        return (self.body.ts, self.cid.raw)


def _unsigned_map(body: Catalogue) -> dict[str, Any]:
    out = body.fields()
    out.update(type=body.TYPE, v=CATALOGUE_VERSION, author=body.author, ts=body.ts)
    return out


def sign_catalogue(body: Catalogue, identity: Identity) -> SignedCatalogue:
    """Sign `body` with `identity`, which must be its author; `TooLarge` if it does not fit
    (`fit_entries` cuts a list so that it does)."""
    sig, data = seal(
        _unsigned_map(body),
        identity,
        CATALOGUE_DOMAIN,
        what="catalogue",
        max_size=MAX_CATALOGUE_SIZE,
    )
    return SignedCatalogue(body, sig, CID.of_dag_cbor(data), data)


def fit_entries(entries: Iterable[CatalogueEntry]) -> tuple[CatalogueEntry, ...]:
    """The entries a catalogue can hold, in project order: the first `MAX_CATALOGUE_ENTRIES`
    given (the caller's order says which matter most), cut further until the encoding fits
    `MAX_CATALOGUE_SIZE`. Duplicates of one project keep the first."""
    chosen: dict[CID, CatalogueEntry] = {}
    # Fixed overhead: the map around the list, the keys, the mesh link, author and signature,
    # well under 300 bytes, and the most the addresses can take; each entry's encoding is
    # measured exactly.
    budget = MAX_CATALOGUE_SIZE - 512 - _ADDRS_RESERVE
    for entry in entries:
        if len(chosen) == MAX_CATALOGUE_ENTRIES:
            break
        if entry.project in chosen:
            continue
        size = len(dagcbor.encode({"project": entry.project, "name": entry.name}))
        if size > budget:
            continue
        budget -= size
        chosen[entry.project] = entry
    return tuple(sorted(chosen.values(), key=lambda e: e.project))


def _entry(value: object) -> CatalogueEntry:
    if not isinstance(value, dict) or value.keys() != _ENTRY_FIELDS:
        raise fail(Catalogue.TYPE, "each entry is a map of exactly project and name")
    return CatalogueEntry(project=value["project"], name=value["name"])


def decode_catalogue(data: bytes) -> SignedCatalogue:
    """Decode and verify a catalogue; raise a typed error saying what is wrong with it."""
    value = open_map(data, what="catalogue", max_size=MAX_CATALOGUE_SIZE)
    kind = Catalogue.TYPE
    if value.get("type") != kind:
        raise InvalidRecord(f"not a catalogue: type {value.get('type')!r}")
    sig = check_envelope(value, kind, CATALOGUE_VERSION, _FIELDS)
    listed = value["projects"]
    if not isinstance(listed, list) or len(listed) > MAX_CATALOGUE_ENTRIES:
        raise fail(kind, f"projects must be a list of at most {MAX_CATALOGUE_ENTRIES} entries")
    addrs = value["addrs"]
    if not isinstance(addrs, list):
        raise fail(kind, f"addrs must list at most {MAX_CATALOGUE_ADDRS} addresses")
    try:
        body = Catalogue(
            author=value["author"],
            ts=value["ts"],
            mesh=value["mesh"],
            projects=tuple(_entry(item) for item in listed),
            addrs=tuple(addrs),
        )
    except TypeError as exc:  # a field of a type the checks cannot even compare
        raise fail(kind, f"a field has the wrong type ({exc})") from None
    signing.verify(body.author, sig, CATALOGUE_DOMAIN, unsigned_bytes(data, value))
    return SignedCatalogue(body, sig, CID.of_dag_cbor(data), data)


def is_catalogue(data: bytes) -> bool:
    """Whether `data` claims to be a catalogue (its `type`), before it is verified: how a
    mesh topic, which carries catalogues and membership records, tells them apart."""
    try:
        value = dagcbor.decode(data)
    except DecodeError:
        return False
    return isinstance(value, dict) and value.get("type") == Catalogue.TYPE


# --- what a node holds of others' catalogues ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Host:
    """One node that lists a project in its catalogue for a mesh, the name it gives, and
    the addresses its catalogue gives for it."""

    author: bytes
    name: str
    ts: int
    addrs: tuple[str, ...] = ()


class CatalogueBook:
    """The latest catalogue of each author in each mesh, within bounds.

    `offer` decides whether a verified catalogue is taken. Nothing here checks membership
    itself: the caller says who the mesh admits. Times are the reader's clock in ms.
    """

    def __init__(self) -> None:
        self._by_mesh: dict[CID, dict[bytes, SignedCatalogue]] = {}
        self._bytes: dict[CID, int] = {}

    @property
    def total_bytes(self) -> int:
        return sum(self._bytes.values())

    def offer(self, record: SignedCatalogue, now_ms: int, admits: Callable[[bytes], bool]) -> bool:
        """Take `record` as its author's latest catalogue for its mesh; True if taken.

        Refused (False): an author the mesh does not admit; a `ts` older than the TTL or too
        far ahead; not newer than the catalogue held, or newer by less than the minimum
        interval; and, when the mesh's or the book's bounds are reached, one that is older
        than everything it would have to push out.
        """
        body = record.body
        if not admits(body.author):
            return False
        if not now_ms - CATALOGUE_TTL_MS < body.ts <= now_ms + CATALOGUE_FUTURE_MS:
            return False
        held = self._by_mesh.get(body.mesh, {})
        current = held.get(body.author)
        if current is not None and (
            record.order <= current.order or body.ts < current.body.ts + CATALOGUE_MIN_INTERVAL_MS
        ):
            return False
        size = len(record.data)
        freed = 0 if current is None else len(current.data)
        count = len(held) - (current is not None) + 1
        mesh_bytes = self._bytes.get(body.mesh, 0) - freed + size
        total = self.total_bytes - freed + size
        # While a bound is exceeded, push out the mesh's oldest catalogue, if it is older.
        victims: list[SignedCatalogue] = []
        others: list[SignedCatalogue] | None = None  # sorted only when a bound is reached
        while (
            count > MAX_CATALOGUES_PER_MESH
            or mesh_bytes > MAX_CATALOGUE_BYTES_PER_MESH
            or total > MAX_CATALOGUE_BYTES
        ):
            if others is None:
                others = sorted(
                    (c for a, c in held.items() if a != body.author), key=lambda c: c.order
                )
            if len(victims) == len(others) or others[len(victims)].order >= record.order:
                return False
            oldest = others[len(victims)]
            victims.append(oldest)
            count -= 1
            mesh_bytes -= len(oldest.data)
            total -= len(oldest.data)
        held = self._by_mesh.setdefault(body.mesh, {})
        for victim in victims:
            del held[victim.body.author]
        held[body.author] = record
        self._bytes[body.mesh] = mesh_bytes
        return True

    def of_mesh(self, mesh: CID) -> list[SignedCatalogue]:
        """The catalogues held for `mesh`, by author."""
        held = self._by_mesh.get(mesh, {})
        return [held[author] for author in sorted(held)]

    def authors(self, mesh: CID) -> set[bytes]:
        return set(self._by_mesh.get(mesh, {}))

    def drop(self, mesh: CID, author: bytes) -> bool:
        """Forget `author`'s catalogue for `mesh` (it left the mesh or was revoked)."""
        held = self._by_mesh.get(mesh, {})
        gone = held.pop(author, None)
        if gone is not None:
            self._bytes[mesh] -= len(gone.data)
        return gone is not None

    def keep_only(self, mesh: CID, admits: Callable[[bytes], bool]) -> list[bytes]:
        """Drop the catalogues of authors the mesh no longer admits; return their keys."""
        dropped = [author for author in self.authors(mesh) if not admits(author)]
        for author in dropped:
            self.drop(mesh, author)
        return dropped

    def drop_mesh(self, mesh: CID) -> None:
        self._by_mesh.pop(mesh, None)
        self._bytes.pop(mesh, None)

    def expire(self, now_ms: int) -> int:
        """Drop catalogues older than the TTL; return how many went."""
        expired = [
            (mesh, author)
            for mesh, held in self._by_mesh.items()
            for author, record in held.items()
            if record.body.ts <= now_ms - CATALOGUE_TTL_MS
        ]
        for mesh, author in expired:
            self.drop(mesh, author)
        return len(expired)

    def hosts_of(self, mesh: CID, project: CID) -> list[Host]:
        """Who lists `project` in `mesh`, by author key (a binary search of each catalogue,
        whose entries are sorted)."""
        out = []
        for record in self.of_mesh(mesh):
            listed = record.body.projects
            at = bisect.bisect_left(listed, project, key=lambda e: e.project)
            if at < len(listed) and listed[at].project == project:
                body = record.body
                out.append(Host(body.author, listed[at].name, body.ts, body.addrs))
        return out

    def hosts(self, mesh: CID) -> dict[CID, list[Host]]:
        """For each project listed in `mesh`, who lists it, by author key."""
        out: dict[CID, list[Host]] = {}
        for record in self.of_mesh(mesh):
            for entry in record.body.projects:
                out.setdefault(entry.project, []).append(
                    Host(record.body.author, entry.name, record.body.ts, record.body.addrs)
                )
        return out
