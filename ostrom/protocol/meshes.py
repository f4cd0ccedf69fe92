"""Community meshes: a signed mesh description, signed admissions and revocations, invites.

A mesh is a named group of nodes with stewards. Its description (`mesh`) is signed by the
steward who created it and names the stewards, whether the mesh is `open` (anyone who has
the invite may join) or `private` (only admitted members), and the bootstrap addresses a
joining node dials first. A mesh is named by the CID of its description. In a private mesh a
steward signs `membership` records that admit or revoke a member's key; the latest one by
`(ts, cid)` for a key decides, and stewards are always members.

These records are a family of their own, signed under their own domain, so a mesh record can
never be taken for a project record or the other way round. docs/PROTOCOL.md specifies them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeAlias

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import DecodeError, InvalidRecord, TooLarge
from ostrom.protocol.envelope import check_envelope, open_map, seal, unsigned_bytes
from ostrom.protocol.fields import check_key, check_link, check_name, check_text, check_ts, fail

# What mesh signatures cover before the payload: not the record domain, so no signature over
# a mesh record is valid as one over a project record, and no signature the other way round.
MESH_DOMAIN: Final = b"ostrom/mesh/v1\x00"
# The only mesh record format version this code reads and writes.
MESH_VERSION: Final = 1
# Mesh records are small maps: a description with 64 stewards and 16 addresses is under 4 KiB.
# The bound keeps an invite short enough to paste into a chat message.
MAX_MESH_RECORD_SIZE: Final = 8 * 1024
MAX_MESH_NAME_LENGTH: Final = 100  # a label shown in lists, like a project name
MAX_MESH_DESCRIPTION_LENGTH: Final = 2000  # a paragraph; the invite carries it
MAX_STEWARDS: Final = 64  # a community's stewards, not its membership
MAX_BOOTSTRAP: Final = 16  # a handful of always-on nodes is what bootstrapping needs
MAX_ADDRESS_LENGTH: Final = 256  # the longest plausible multiaddr with a /p2p/ suffix
MAX_NOTE_LENGTH: Final = 1000  # why someone was admitted or revoked
# How an invite string starts: names what it is and its format version, so a pasted string
# of something else is recognised as such.
INVITE_PREFIX: Final = "ostrom-mesh1:"

Access: TypeAlias = Literal["open", "private"]
MembershipAction: TypeAlias = Literal["admit", "revoke"]
ACCESS_KINDS: Final = ("open", "private")
MEMBERSHIP_ACTIONS: Final = ("admit", "revoke")

# A multiaddr in text form that names its peer: no spaces, at least one /proto/value pair,
# and a /p2p/ peer id at the end.
_ADDRESS = re.compile(r"(/[a-z0-9-]+/[^/\s]+)+/p2p/[1-9A-HJ-NP-Za-km-z]{40,60}")


@dataclass(frozen=True, slots=True)
class MeshDescription:
    """A mesh's founding record; the mesh is named by this record's CID."""

    TYPE: ClassVar[str] = "mesh"
    author: bytes
    ts: int
    name: str
    access: Access
    stewards: tuple[bytes, ...]
    bootstrap: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        kind = self.TYPE
        check_key(kind, "author", self.author)
        check_ts(kind, self.ts)
        check_name(kind, "name", self.name, max_length=MAX_MESH_NAME_LENGTH)
        check_text(kind, "description", self.description, max_length=MAX_MESH_DESCRIPTION_LENGTH)
        if self.access not in ACCESS_KINDS:
            raise fail(kind, "access must be open or private")
        if not isinstance(self.stewards, tuple) or not 1 <= len(self.stewards) <= MAX_STEWARDS:
            raise fail(kind, f"stewards must list 1 to {MAX_STEWARDS} keys")
        for key in self.stewards:
            check_key(kind, "steward", key)
        if list(self.stewards) != sorted(set(self.stewards)):
            raise fail(kind, "stewards must be sorted by key bytes, each listed once")
        if self.author not in self.stewards:
            raise fail(kind, "the author of a mesh is one of its stewards")
        if not isinstance(self.bootstrap, tuple) or len(self.bootstrap) > MAX_BOOTSTRAP:
            raise fail(kind, f"bootstrap must list at most {MAX_BOOTSTRAP} addresses")
        for addr in self.bootstrap:
            if (
                not isinstance(addr, str)
                or len(addr) > MAX_ADDRESS_LENGTH
                or not _ADDRESS.fullmatch(addr)
            ):
                raise fail(kind, f"bootstrap address {addr!r} is not a multiaddr ending in /p2p/")
        if len(set(self.bootstrap)) != len(self.bootstrap):
            raise fail(kind, "a bootstrap address is listed twice")

    def fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "access": self.access,
            "stewards": list(self.stewards),
            "bootstrap": list(self.bootstrap),
        }


@dataclass(frozen=True, slots=True)
class Membership:
    """A steward's admission or revocation of `member` in the private mesh `mesh`."""

    TYPE: ClassVar[str] = "membership"
    author: bytes
    ts: int
    mesh: CID
    action: MembershipAction
    member: bytes
    note: str = ""

    def __post_init__(self) -> None:
        kind = self.TYPE
        check_key(kind, "author", self.author)
        check_ts(kind, self.ts)
        check_link(kind, "mesh", self.mesh)
        if self.action not in MEMBERSHIP_ACTIONS:
            raise fail(kind, "action must be admit or revoke")
        check_key(kind, "member", self.member)
        check_text(kind, "note", self.note, max_length=MAX_NOTE_LENGTH)

    def fields(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh,
            "action": self.action,
            "member": self.member,
            "note": self.note,
        }


MeshBody: TypeAlias = MeshDescription | Membership
_FIELDS: Final[dict[str, frozenset[str]]] = {
    "mesh": frozenset({"name", "description", "access", "stewards", "bootstrap"}),
    "membership": frozenset({"mesh", "action", "member", "note"}),
}
_COMMON: Final = frozenset({"type", "v", "author", "ts", "sig"})


@dataclass(frozen=True, slots=True)
class SignedMeshRecord:
    """A mesh record with its signature, canonical bytes and CID; only `sign_mesh_record`
    and `decode_mesh_record` make these, so every instance is verified."""

    body: MeshBody
    sig: bytes = field(repr=False)
    cid: CID
    data: bytes = field(repr=False)

    @property
    def mesh(self) -> CID:
        """The mesh this record belongs to; a description belongs to itself."""
        return self.cid if isinstance(self.body, MeshDescription) else self.body.mesh


def _unsigned_map(body: MeshBody) -> dict[str, Any]:
    out = body.fields()
    out.update(type=body.TYPE, v=MESH_VERSION, author=body.author, ts=body.ts)
    return out


def sign_mesh_record(body: MeshBody, identity: Identity) -> SignedMeshRecord:
    """Sign `body` with `identity`, which must be its author."""
    sig, data = seal(
        _unsigned_map(body),
        identity,
        MESH_DOMAIN,
        what=f"{body.TYPE} record",
        max_size=MAX_MESH_RECORD_SIZE,
    )
    return SignedMeshRecord(body, sig, CID.of_dag_cbor(data), data)


def _tuple(kind: str, value: Mapping[str, Any], name: str) -> tuple[Any, ...]:
    item = value[name]
    if not isinstance(item, list):
        raise fail(kind, f"{name} must be a list")
    return tuple(item)


def decode_mesh_record(data: bytes) -> SignedMeshRecord:
    """Decode and verify a mesh record; raise a typed error saying what is wrong with it."""
    value = open_map(data, what="mesh record", max_size=MAX_MESH_RECORD_SIZE)
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise InvalidRecord(f"not a mesh record type: {kind!r}")
    sig = check_envelope(value, kind, MESH_VERSION, _FIELDS[kind] | _COMMON)
    body: MeshBody
    try:
        if kind == "mesh":
            body = MeshDescription(
                author=value["author"],
                ts=value["ts"],
                name=value["name"],
                access=value["access"],
                stewards=_tuple(kind, value, "stewards"),
                bootstrap=_tuple(kind, value, "bootstrap"),
                description=value["description"],
            )
        else:
            body = Membership(
                author=value["author"],
                ts=value["ts"],
                mesh=value["mesh"],
                action=value["action"],
                member=value["member"],
                note=value["note"],
            )
    except TypeError as exc:  # a field of a type the checks cannot even compare
        raise fail(kind, f"a field has the wrong type ({exc})") from None
    signing.verify(body.author, sig, MESH_DOMAIN, unsigned_bytes(data, value))
    return SignedMeshRecord(body, sig, CID.of_dag_cbor(data), data)


# --- membership --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshMembers:
    """Who belongs to a mesh, as its records say."""

    mesh: CID
    access: Access
    stewards: frozenset[bytes]
    # Admitted keys of a private mesh (stewards excluded); empty for an open mesh.
    admitted: frozenset[bytes]

    def admits(self, key: bytes) -> bool:
        """True if `key` may take part: anyone in an open mesh, members in a private one."""
        return self.access == "open" or key in self.stewards or key in self.admitted


def check_membership(description: SignedMeshRecord, record: SignedMeshRecord) -> None:
    """Raise `InvalidRecord` unless `record` is a membership record a steward of the mesh
    `description` describes could sign: this is what a node checks before storing one."""
    mesh = description.body
    body = record.body
    if not isinstance(mesh, MeshDescription):
        raise InvalidRecord("not a mesh description")
    if not isinstance(body, Membership):
        raise InvalidRecord("not a membership record")
    if body.mesh != description.cid:
        raise InvalidRecord("the membership record is about another mesh")
    if mesh.access != "private":
        raise InvalidRecord(f"mesh {mesh.name!r} is open: it has no membership records")
    if body.author not in mesh.stewards:
        raise InvalidRecord("only a steward of the mesh admits or revokes members")
    if body.member in mesh.stewards:
        raise InvalidRecord("a steward is a member for as long as the mesh exists")


def members(description: SignedMeshRecord, records: Iterable[SignedMeshRecord]) -> MeshMembers:
    """The members of a mesh: for each key, its latest valid membership record by
    `(ts, cid)` decides. Records that fail `check_membership` are ignored."""
    mesh = description.body
    if not isinstance(mesh, MeshDescription):
        raise InvalidRecord("not a mesh description")
    latest: dict[bytes, tuple[int, bytes, MembershipAction]] = {}
    for record in records:
        try:
            check_membership(description, record)
        except InvalidRecord:
            continue
        body = record.body
        assert isinstance(body, Membership)
        candidate = (body.ts, record.cid.raw, body.action)
        current = latest.get(body.member)
        if current is None or candidate[:2] > current[:2]:
            latest[body.member] = candidate
    admitted = frozenset(key for key, (_, _, action) in latest.items() if action == "admit")
    return MeshMembers(description.cid, mesh.access, frozenset(mesh.stewards), admitted)


# --- invites -----------------------------------------------------------------------------------


def encode_invite(description: SignedMeshRecord) -> str:
    """The invite string that carries a mesh description: a prefix, then the record's bytes
    in lowercase base32 without padding (safe to paste anywhere, case-insensitive)."""
    if not isinstance(description.body, MeshDescription):
        raise InvalidRecord("an invite carries a mesh description")
    text = base64.b32encode(description.data).decode("ascii").rstrip("=").lower()
    return INVITE_PREFIX + text


def decode_invite(text: str) -> SignedMeshRecord:
    """The verified mesh description an invite carries; `DecodeError` if it is not one."""
    text = text.strip()
    if not text.startswith(INVITE_PREFIX):
        raise DecodeError(f"an invite starts with {INVITE_PREFIX!r}")
    body = text[len(INVITE_PREFIX) :].upper()
    if len(body) > (MAX_MESH_RECORD_SIZE * 8 + 4) // 5:
        raise TooLarge("the invite is longer than any mesh description")
    try:
        data = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise DecodeError("the invite is not valid base32") from None
    record = decode_mesh_record(data)
    if not isinstance(record.body, MeshDescription):
        raise DecodeError("the invite does not carry a mesh description")
    return record
