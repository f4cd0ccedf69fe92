"""Signed records: the six record types, their validation, encoding, signing and decoding.

A record is a DAG-CBOR map. The signature covers `RECORD_DOMAIN` + the canonical encoding of
the map without `sig`; the record's id is the CID of the whole signed map. Each body type is a
frozen dataclass validated on construction, so an invalid body cannot exist; `decode_record`
returns only records whose encoding, fields and signature all check out.

docs/PROTOCOL.md is the specification of these formats; this module is one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Final, Literal, TypeAlias

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import SIGNATURE_LENGTH, Identity
from ostrom.errors import InvalidLicense, InvalidRecord, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.envelope import cut_sig_entry
from ostrom.protocol.fields import (
    check_key,
    check_link,
    check_links,
    check_name,
    check_text,
    check_ts,
    fail,
)

# The only record format version this code reads and writes.
RECORD_VERSION: Final = 1
# A record over 64 KiB is refused (DESIGN.md): records are gossiped whole, and bulk data
# belongs in blocks.
MAX_RECORD_SIZE: Final = 64 * 1024
# Bounds on fields. Each keeps a record well under MAX_RECORD_SIZE on its own, so the
# record-size check is the one that bites first only when several fields are large at once.
MAX_NAME_LENGTH: Final = 100  # a project name is a label shown in lists
MAX_TITLE_LENGTH: Final = 200  # a need's title is one line
MAX_LICENSE_LENGTH: Final = 512  # long enough for any real compound SPDX expression
MAX_TEXT_LENGTH: Final = 16 * 1024  # messages, descriptions, notes, comments, bodies
MAX_PARENTS: Final = 64  # a merge of more than 64 heads is not a plausible workflow
MAX_LINKS: Final = 256  # changeset links, resolved needs, fork heads
MAX_MAINTAINERS: Final = 256  # keeps the policy map far below the record size

Verdict: TypeAlias = Literal["accept", "reject"]
GovernanceAction: TypeAlias = Literal["add-maintainer", "remove-maintainer", "set-quorum"]
VERDICTS: Final = ("accept", "reject")
GOVERNANCE_ACTIONS: Final = ("add-maintainer", "remove-maintainer", "set-quorum")

# --- field checks -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _syntax_licensing() -> Any:
    # A licensing with no known symbols parses the SPDX grammar without judging the ids, so a
    # license id newer than this node's SPDX list never makes a valid record look invalid.
    import license_expression

    return license_expression.Licensing()


@lru_cache(maxsize=1)
def _spdx_licensing() -> Any:
    import license_expression

    return license_expression.get_spdx_licensing()


def check_license_syntax(expression: str) -> None:
    """Raise `InvalidLicense` unless `expression` parses as an SPDX license expression."""
    import license_expression

    if not expression.strip():
        raise InvalidLicense("a license expression is required")
    try:
        parsed = _syntax_licensing().parse(expression, simple=False)
    except license_expression.ExpressionError as exc:
        raise InvalidLicense(f"not an SPDX license expression: {expression!r} ({exc})") from None
    except (IndexError, AssertionError):
        # The parser trips over some malformed input (`()`, `( OR +`) with these instead of
        # its own error; they mean the same thing here.
        raise InvalidLicense(f"not an SPDX license expression: {expression!r}") from None
    if parsed is None:
        raise InvalidLicense(f"not an SPDX license expression: {expression!r}")


def check_license_known(expression: str) -> str:
    """Validate against the SPDX license list; return the expression in its normal form.

    Used when this node's user creates a project: a typo in a license id is caught there.
    Records from others are checked for syntax only (see `_syntax_licensing`).
    """
    check_license_syntax(expression)
    info = _spdx_licensing().validate(expression)
    if info.errors:
        raise InvalidLicense(f"{expression!r}: {'; '.join(info.errors)}")
    return str(info.normalized_expression)


# --- record bodies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may validate and how many acceptances make a record accepted."""

    maintainers: tuple[bytes, ...]
    quorum: int = 1

    def __post_init__(self) -> None:
        if (
            not isinstance(self.maintainers, tuple)
            or not 1 <= len(self.maintainers) <= MAX_MAINTAINERS
        ):
            raise fail("policy", f"maintainers must list 1 to {MAX_MAINTAINERS} keys")
        for key in self.maintainers:
            check_key("policy", "maintainer", key)
        if len(set(self.maintainers)) != len(self.maintainers):
            raise fail("policy", "a maintainer is listed twice")
        if list(self.maintainers) != sorted(self.maintainers):
            raise fail("policy", "maintainers must be sorted by key bytes")
        if (
            not isinstance(self.quorum, int)
            or isinstance(self.quorum, bool)
            or not 1 <= self.quorum <= MAX_MAINTAINERS
        ):
            raise fail("policy", f"quorum must be an integer from 1 to {MAX_MAINTAINERS}")

    def to_map(self) -> dict[str, Any]:
        return {"maintainers": list(self.maintainers), "quorum": self.quorum}

    @classmethod
    def from_map(cls, value: object) -> Policy:
        if not isinstance(value, dict) or set(value) != {"maintainers", "quorum"}:
            raise fail("policy", "must be a map of exactly maintainers and quorum")
        maintainers = value["maintainers"]
        if not isinstance(maintainers, list):
            raise fail("policy", "maintainers must be a list")
        return cls(maintainers=tuple(maintainers), quorum=value["quorum"])


@dataclass(frozen=True, slots=True)
class ForkOf:
    """Where a fork starts: the parent project and the heads of it the fork begins at."""

    project: CID
    heads: tuple[CID, ...]

    def __post_init__(self) -> None:
        check_link("fork_of", "project", self.project)
        check_links("fork_of", "heads", self.heads, max_count=MAX_PARENTS, min_count=1)

    def to_map(self) -> dict[str, Any]:
        return {"project": self.project, "heads": list(self.heads)}

    @classmethod
    def from_map(cls, value: object) -> ForkOf:
        if not isinstance(value, dict) or set(value) != {"project", "heads"}:
            raise fail("fork_of", "must be a map of exactly project and heads")
        heads = value["heads"]
        if not isinstance(heads, list):
            raise fail("fork_of", "heads must be a list")
        return cls(project=value["project"], heads=tuple(heads))


@dataclass(frozen=True, slots=True)
class Project:
    """A project's genesis record; the project is named by this record's CID."""

    TYPE: ClassVar[str] = "project"
    author: bytes
    ts: int
    name: str
    license: str
    policy: Policy
    description: str = ""
    fork_of: ForkOf | None = None
    # The private community mesh the project belongs to (its description's CID): nodes
    # serve the project only to that mesh's members. None: a public project.
    mesh: CID | None = None

    def __post_init__(self) -> None:
        check_key(self.TYPE, "author", self.author)
        check_ts(self.TYPE, self.ts)
        check_name(self.TYPE, "name", self.name, max_length=MAX_NAME_LENGTH)
        check_text(
            self.TYPE,
            "license",
            self.license,
            max_length=MAX_LICENSE_LENGTH,
            line=True,
            required=True,
        )
        try:
            check_license_syntax(self.license)
        except InvalidLicense as exc:
            raise fail(self.TYPE, exc.message) from None
        check_text(self.TYPE, "description", self.description, max_length=MAX_TEXT_LENGTH)
        if not isinstance(self.policy, Policy):
            raise fail(self.TYPE, "policy must be a Policy")
        if self.fork_of is not None and not isinstance(self.fork_of, ForkOf):
            raise fail(self.TYPE, "fork_of must be a ForkOf")
        if self.mesh is not None:
            check_link(self.TYPE, "mesh", self.mesh)

    @property
    def parents(self) -> tuple[CID, ...]:
        """A fork's genesis descends from the heads it forks at; an original has no parents."""
        return self.fork_of.heads if self.fork_of is not None else ()

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "license": self.license,
            "policy": self.policy.to_map(),
        }
        if self.fork_of is not None:
            out["fork_of"] = self.fork_of.to_map()
        if self.mesh is not None:
            out["mesh"] = self.mesh
        return out


@dataclass(frozen=True, slots=True)
class Contribution:
    """A change to a project's files. `changes` links to changeset blocks (see changesets.py)."""

    TYPE: ClassVar[str] = "contribution"
    author: bytes
    ts: int
    project: CID
    parents: tuple[CID, ...]
    changes: tuple[CID, ...]
    message: str
    resolves: tuple[CID, ...] = ()

    def __post_init__(self) -> None:
        check_key(self.TYPE, "author", self.author)
        check_ts(self.TYPE, self.ts)
        check_link(self.TYPE, "project", self.project)
        check_links(self.TYPE, "parents", self.parents, max_count=MAX_PARENTS, min_count=1)
        # Changesets are ordered: a later changeset's change to a path wins over an earlier one.
        if not isinstance(self.changes, tuple) or len(self.changes) > MAX_LINKS:
            raise fail(self.TYPE, f"changes must be a list of at most {MAX_LINKS} links")
        for link in self.changes:
            check_link(self.TYPE, "changes", link)
        check_text(self.TYPE, "message", self.message, max_length=MAX_TEXT_LENGTH, required=True)
        check_links(self.TYPE, "resolves", self.resolves, max_count=MAX_LINKS)

    def fields(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "parents": list(self.parents),
            "changes": list(self.changes),
            "message": self.message,
            "resolves": list(self.resolves),
        }


@dataclass(frozen=True, slots=True)
class Validation:
    """A signed verdict on a record, counted under the policy of `project`."""

    TYPE: ClassVar[str] = "validation"
    author: bytes
    ts: int
    project: CID
    target: CID
    verdict: Verdict
    note: str = ""

    def __post_init__(self) -> None:
        check_key(self.TYPE, "author", self.author)
        check_ts(self.TYPE, self.ts)
        check_link(self.TYPE, "project", self.project)
        check_link(self.TYPE, "target", self.target)
        if self.verdict not in VERDICTS:
            raise fail(self.TYPE, "verdict must be accept or reject")
        check_text(self.TYPE, "note", self.note, max_length=MAX_TEXT_LENGTH)

    def fields(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "target": self.target,
            "verdict": self.verdict,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Governance:
    """A change to a project's policy; it takes effect once accepted, for its descendants."""

    TYPE: ClassVar[str] = "governance"
    author: bytes
    ts: int
    project: CID
    parents: tuple[CID, ...]
    action: GovernanceAction
    key: bytes | None = None
    quorum: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        check_key(self.TYPE, "author", self.author)
        check_ts(self.TYPE, self.ts)
        check_link(self.TYPE, "project", self.project)
        check_links(self.TYPE, "parents", self.parents, max_count=MAX_PARENTS, min_count=1)
        if self.action not in GOVERNANCE_ACTIONS:
            raise fail(self.TYPE, f"action must be one of {', '.join(GOVERNANCE_ACTIONS)}")
        if self.action == "set-quorum":
            if self.key is not None:
                raise fail(self.TYPE, "set-quorum takes no key")
            if (
                not isinstance(self.quorum, int)
                or isinstance(self.quorum, bool)
                or not 1 <= self.quorum <= MAX_MAINTAINERS
            ):
                raise fail(self.TYPE, f"quorum must be an integer from 1 to {MAX_MAINTAINERS}")
        else:
            if self.quorum is not None:
                raise fail(self.TYPE, f"{self.action} takes no quorum")
            check_key(self.TYPE, "key", self.key)
        check_text(self.TYPE, "note", self.note, max_length=MAX_TEXT_LENGTH)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "project": self.project,
            "parents": list(self.parents),
            "action": self.action,
            "note": self.note,
        }
        if self.key is not None:
            out["key"] = self.key
        if self.quorum is not None:
            out["quorum"] = self.quorum
        return out


@dataclass(frozen=True, slots=True)
class Need:
    """A task the project asks for; contributions say which needs they resolve."""

    TYPE: ClassVar[str] = "need"
    author: bytes
    ts: int
    project: CID
    title: str
    body: str = ""

    def __post_init__(self) -> None:
        check_key(self.TYPE, "author", self.author)
        check_ts(self.TYPE, self.ts)
        check_link(self.TYPE, "project", self.project)
        check_text(
            self.TYPE, "title", self.title, max_length=MAX_TITLE_LENGTH, line=True, required=True
        )
        check_text(self.TYPE, "body", self.body, max_length=MAX_TEXT_LENGTH)

    def fields(self) -> dict[str, Any]:
        return {"project": self.project, "title": self.title, "body": self.body}


@dataclass(frozen=True, slots=True)
class Comment:
    """A signed comment on any record of a project."""

    TYPE: ClassVar[str] = "comment"
    author: bytes
    ts: int
    project: CID
    target: CID
    text: str

    def __post_init__(self) -> None:
        check_key(self.TYPE, "author", self.author)
        check_ts(self.TYPE, self.ts)
        check_link(self.TYPE, "project", self.project)
        check_link(self.TYPE, "target", self.target)
        check_text(self.TYPE, "text", self.text, max_length=MAX_TEXT_LENGTH, required=True)

    def fields(self) -> dict[str, Any]:
        return {"project": self.project, "target": self.target, "text": self.text}


Body: TypeAlias = Project | Contribution | Validation | Governance | Need | Comment
BODY_TYPES: Final[dict[str, type[Body]]] = {
    cls.TYPE: cls for cls in (Project, Contribution, Validation, Governance, Need, Comment)
}


# --- signed records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A record body with its author's signature, its canonical bytes and its CID.

    Only `sign` and `decode_record` make these, so every instance is verified.
    """

    body: Body
    sig: bytes = field(repr=False)
    cid: CID
    data: bytes = field(repr=False)

    @property
    def type(self) -> str:
        return self.body.TYPE

    @property
    def author(self) -> bytes:
        return self.body.author

    @property
    def ts(self) -> int:
        return self.body.ts

    @property
    def project(self) -> CID:
        """The project this record belongs to; a genesis belongs to itself."""
        if isinstance(self.body, Project):
            return self.cid
        return self.body.project

    @property
    def parents(self) -> tuple[CID, ...]:
        """The record's edges in the project DAG (empty for validations, needs, comments)."""
        if isinstance(self.body, (Project, Contribution, Governance)):
            return self.body.parents
        return ()

    @property
    def target(self) -> CID | None:
        if isinstance(self.body, (Validation, Comment)):
            return self.body.target
        return None


def _unsigned_map(body: Body) -> dict[str, Any]:
    out = body.fields()
    out["type"] = body.TYPE
    out["v"] = RECORD_VERSION
    out["author"] = body.author
    out["ts"] = body.ts
    return out


def signing_payload(body: Body) -> bytes:
    """The bytes a record's signature covers, after `signing.RECORD_DOMAIN`."""
    return dagcbor.encode(_unsigned_map(body))


def sign(body: Body, identity: Identity) -> SignedRecord:
    """Sign `body` with `identity`, which must be the body's author."""
    if identity.public_key != body.author:
        raise InvalidRecord("a record is signed by its author's key")
    unsigned = _unsigned_map(body)
    sig = signing.sign(identity, signing.RECORD_DOMAIN, dagcbor.encode(unsigned))
    unsigned["sig"] = sig
    data = dagcbor.encode(unsigned)
    if len(data) > MAX_RECORD_SIZE:
        raise TooLarge(f"{body.TYPE} record is {len(data)} bytes; the limit is {MAX_RECORD_SIZE}")
    return SignedRecord(body=body, sig=sig, cid=CID.of_dag_cbor(data), data=data)


def _list_field(kind: str, fields: Mapping[str, Any], name: str) -> tuple[Any, ...]:
    value = fields[name]
    if not isinstance(value, list):
        raise fail(kind, f"{name} must be a list")
    return tuple(value)


_REQUIRED: Final[dict[str, frozenset[str]]] = {
    "project": frozenset({"name", "description", "license", "policy"}),
    "contribution": frozenset({"project", "parents", "changes", "message", "resolves"}),
    "validation": frozenset({"project", "target", "verdict", "note"}),
    "governance": frozenset({"project", "parents", "action", "note"}),
    "need": frozenset({"project", "title", "body"}),
    "comment": frozenset({"project", "target", "text"}),
}
_OPTIONAL: Final[dict[str, frozenset[str]]] = {
    "project": frozenset({"fork_of", "mesh"}),
    "governance": frozenset({"key", "quorum"}),
}
_COMMON: Final = frozenset({"type", "v", "author", "ts", "sig"})
_REQUIRED_ALL: Final = {kind: fields | _COMMON for kind, fields in _REQUIRED.items()}


def _body_from_map(kind: str, m: Mapping[str, Any]) -> Body:
    author, ts = m["author"], m["ts"]
    try:
        if kind == "project":
            fork_of = m.get("fork_of")
            return Project(
                author=author,
                ts=ts,
                name=m["name"],
                license=m["license"],
                policy=Policy.from_map(m["policy"]),
                description=m["description"],
                fork_of=None if fork_of is None else ForkOf.from_map(fork_of),
                mesh=m.get("mesh"),
            )
        if kind == "contribution":
            return Contribution(
                author=author,
                ts=ts,
                project=m["project"],
                parents=_list_field(kind, m, "parents"),
                changes=_list_field(kind, m, "changes"),
                message=m["message"],
                resolves=_list_field(kind, m, "resolves"),
            )
        if kind == "validation":
            return Validation(
                author=author,
                ts=ts,
                project=m["project"],
                target=m["target"],
                verdict=m["verdict"],
                note=m["note"],
            )
        if kind == "governance":
            return Governance(
                author=author,
                ts=ts,
                project=m["project"],
                parents=_list_field(kind, m, "parents"),
                action=m["action"],
                key=m.get("key"),
                quorum=m.get("quorum"),
                note=m["note"],
            )
        if kind == "need":
            return Need(
                author=author, ts=ts, project=m["project"], title=m["title"], body=m["body"]
            )
        return Comment(
            author=author, ts=ts, project=m["project"], target=m["target"], text=m["text"]
        )
    except TypeError as exc:  # a field of a type the dataclass checks cannot even compare
        raise fail(kind, f"a field has the wrong type ({exc})") from None


def _sorts_before_sig(key: str) -> bool:
    # DAG-CBOR orders keys by encoded length, then bytewise; for our ASCII keys, by length
    # then by the string.
    return (len(key), key) < (3, "sig")


def _head_size(n: int) -> int:
    """Bytes of a CBOR head (major type + argument) carrying the number `n`."""
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5 if n < 2**32 else 9


def _entry_size(key: str, value: object) -> int:
    """Encoded size of one `key: value` map entry; keys before `sig` hold only uints or bytes."""
    if type(value) is int and value >= 0:
        size = _head_size(value)
    elif type(value) is bytes:
        size = _head_size(len(value)) + len(value)
    else:
        return len(dagcbor.encode_trusted({key: value})) - 1
    return _head_size(len(key)) + len(key) + size


def _cut_signature(data: bytes, unsigned: dict[str, Any]) -> bytes:
    """The signing payload of canonical record bytes: `data` with the `sig` entry removed.

    `data` is canonical (decode checked it), so the payload is the same bytes less the entry,
    with the map's entry count one lower; no second full encoding is needed. Every record
    map has fewer than 24 entries, so the count is the low bits of the first byte, and the
    `sig` entry starts right after the entries whose keys sort before it (`v`, `ts`, `key`).
    """
    offset = 1 + sum(_entry_size(k, unsigned[k]) for k in _KEYS_BEFORE_SIG if k in unsigned)
    return cut_sig_entry(data, offset, "record map")


# Every field name that sorts before `sig` in canonical order; decoding has already refused
# names outside the schema, so these are the only entries that can precede the signature.
_KEYS_BEFORE_SIG: Final = tuple(
    sorted(
        {
            k
            for fields in (*_REQUIRED.values(), *_OPTIONAL.values(), _COMMON)
            for k in fields
            if _sorts_before_sig(k)
        },
        key=lambda k: (len(k), k),
    )
)


def decode_record(
    data: bytes, *, verify: Callable[[bytes, bytes, bytes, bytes], None] | None = None
) -> SignedRecord:
    """Decode and verify one record; raise a typed error saying what is wrong with it.

    `verify` replaces the signature check (the benchmark and batch paths pass one that
    releases the GIL the same way); by default it is `signing.verify`.
    """
    if len(data) > MAX_RECORD_SIZE:
        raise TooLarge(f"record is {len(data)} bytes; the limit is {MAX_RECORD_SIZE}")
    return record_from_value(data, dagcbor.decode(data), verify=verify)


def record_from_value(
    data: bytes, value: Any, *, verify: Callable[[bytes, bytes, bytes, bytes], None] | None = None
) -> SignedRecord:
    """`decode_record` for bytes already decoded once by `dagcbor.decode` into `value`.

    Callers that must look inside DAG-CBOR bytes before knowing they hold a record (CAR
    import) use this to decode them only once. `value` is consumed (its `sig` is removed).
    """
    if len(data) > MAX_RECORD_SIZE:
        raise TooLarge(f"record is {len(data)} bytes; the limit is {MAX_RECORD_SIZE}")
    if not isinstance(value, dict):
        raise InvalidRecord("a record is a DAG-CBOR map")
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in BODY_TYPES:
        raise InvalidRecord(f"unknown record type {kind!r}")
    version = value.get("v")
    if type(version) is not int or version != RECORD_VERSION:
        raise InvalidRecord(f"{kind}: unsupported version {version!r}")
    keys = value.keys()
    required = _REQUIRED_ALL[kind]
    if not keys >= required:
        missing = required - keys
        raise InvalidRecord(f"{kind}: missing fields {', '.join(sorted(missing))}")
    optional = _OPTIONAL.get(kind)
    if len(keys) != len(required):
        unknown = keys - required - (optional or frozenset())
        if unknown:
            raise InvalidRecord(f"{kind}: unknown fields {', '.join(sorted(unknown))}")
        # An optional field is absent or has a value; null would give a record two encodings.
        nulls = [key for key in optional or () if key in value and value[key] is None]
        if nulls:
            raise InvalidRecord(
                f"{kind}: optional fields are left out, not null: {', '.join(nulls)}"
            )
    sig = value.pop("sig")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_LENGTH:
        raise InvalidRecord(f"{kind}: sig must be a 64-byte ed25519 signature")
    body = _body_from_map(kind, value)
    (verify or signing.verify)(body.author, sig, signing.RECORD_DOMAIN, _cut_signature(data, value))
    return SignedRecord(body=body, sig=sig, cid=CID.of_dag_cbor(data), data=data)
