"""Signed records: round trips of every shape, the signing payload, every field rule, tampering."""

from __future__ import annotations

import contextlib
import dataclasses
import unicodedata
from collections.abc import Callable
from typing import Any

import dag_cbor
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import BadSignature, DecodeError, InvalidRecord, OstromError, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.fields import MAX_TS
from ostrom.protocol.records import (
    GOVERNANCE_ACTIONS,
    MAX_LICENSE_LENGTH,
    MAX_LINKS,
    MAX_MAINTAINERS,
    MAX_NAME_LENGTH,
    MAX_PARENTS,
    MAX_RECORD_SIZE,
    MAX_TEXT_LENGTH,
    MAX_TITLE_LENGTH,
    Body,
    Comment,
    Contribution,
    ForkOf,
    Governance,
    GovernanceAction,
    Need,
    Policy,
    Project,
    SignedRecord,
    Validation,
    decode_record,
    record_from_value,
    sign,
    signing_payload,
)
from tests.dagfactory import identity
from tests.test_dagcbor import from_reference

ALICE = identity("alice")
BOB = identity("bob")
_DAG_PREFIX = bytes([1, 0x71, 0x12, 0x20])
_RAW_PREFIX = bytes([1, 0x55, 0x12, 0x20])


def link(n: int) -> CID:
    """The n-th of a family of dag-cbor links; link(i) < link(j) when i < j."""
    return CID(_DAG_PREFIX + n.to_bytes(32, "big"))


def links(count: int, start: int = 0) -> tuple[CID, ...]:
    return tuple(link(start + i) for i in range(count))


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


RAW = CID(_RAW_PREFIX + bytes(32))
GENESIS = link(10_000)
TARGET = link(10_001)

# --- strategies ---------------------------------------------------------------------------------

# Timestamps at every CBOR integer width boundary (the signing payload is cut out of the record
# bytes by computing where `ts` ends), then anywhere in range.
TS_WIDTHS = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, MAX_TS]
timestamps = st.one_of(st.sampled_from(TS_WIDTHS), st.integers(0, MAX_TS))
record_links = st.binary(min_size=32, max_size=32).map(lambda d: CID(_DAG_PREFIX + d))
public_keys = st.binary(min_size=32, max_size=32)
identities = st.binary(min_size=32, max_size=32).map(Identity.from_seed)

_FORBIDDEN = "".join(chr(c) for c in range(0x20) if c not in (0x09, 0x0A)) + "\x7f"
_text_chars = st.characters(exclude_categories=["Cs"], exclude_characters=_FORBIDDEN)
_line_chars = st.characters(exclude_categories=["Cs"], exclude_characters=_FORBIDDEN + "\t\n")


def texts(max_size: int = 200) -> st.SearchStrategy[str]:
    return st.text(_text_chars, max_size=max_size)


def non_blank(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return strategy.filter(lambda s: s.strip() != "")


def _is_name(s: str) -> bool:
    return 0 < len(s) <= MAX_NAME_LENGTH and s == s.strip() and unicodedata.normalize("NFC", s) == s


names = (
    st.text(_line_chars, min_size=1, max_size=40)
    .map(lambda s: unicodedata.normalize("NFC", s).strip())
    .filter(_is_name)
)
titles = non_blank(st.text(_line_chars, min_size=1, max_size=MAX_TITLE_LENGTH))
_license_ids = st.from_regex(r"[A-Za-z][A-Za-z0-9.-]{0,15}\+?", fullmatch=True).filter(
    lambda s: s.lower().rstrip("+") not in ("and", "or", "with")
)
licenses = st.recursive(
    _license_ids,
    lambda children: st.one_of(
        st.tuples(children, st.sampled_from([" AND ", " OR "]), children).map("".join),
        st.tuples(_license_ids, st.just(" WITH "), _license_ids).map("".join),
        children.map(lambda s: f"({s})"),
    ),
    max_leaves=6,
)


def sorted_links(min_size: int, max_size: int) -> st.SearchStrategy[tuple[CID, ...]]:
    return st.lists(record_links, min_size=min_size, max_size=max_size, unique=True).map(
        lambda items: tuple(sorted(items))
    )


policies = st.builds(
    Policy,
    maintainers=st.lists(public_keys, min_size=1, max_size=6, unique=True).map(
        lambda items: tuple(sorted(items))
    ),
    quorum=st.integers(1, MAX_MAINTAINERS),
)
fork_ofs = st.builds(ForkOf, project=record_links, heads=sorted_links(1, 4))


@st.composite
def signed_bodies(draw: st.DrawFn, kind: str | None = None) -> tuple[Body, Identity]:
    """A valid body of `kind` (any kind if None) and the identity of its author."""
    author = draw(identities)
    common: dict[str, Any] = {"author": author.public_key, "ts": draw(timestamps)}
    kind = kind or draw(st.sampled_from(sorted(_SHAPES)))
    body: Body
    if kind == "project":
        body = Project(
            **common,
            name=draw(names),
            license=draw(licenses),
            policy=draw(policies),
            description=draw(texts()),
            fork_of=draw(st.none() | fork_ofs),
        )
    elif kind == "contribution":
        body = Contribution(
            **common,
            project=draw(record_links),
            parents=draw(sorted_links(1, 4)),
            changes=tuple(draw(st.lists(record_links, max_size=4))),
            message=draw(non_blank(texts())),
            resolves=draw(sorted_links(0, 4)),
        )
    elif kind == "validation":
        body = Validation(
            **common,
            project=draw(record_links),
            target=draw(record_links),
            verdict=draw(st.sampled_from(["accept", "reject"])),
            note=draw(texts()),
        )
    elif kind == "governance":
        action: GovernanceAction = draw(st.sampled_from(GOVERNANCE_ACTIONS))
        body = Governance(
            **common,
            project=draw(record_links),
            parents=draw(sorted_links(1, 4)),
            action=action,
            key=None if action == "set-quorum" else draw(public_keys),
            quorum=draw(st.integers(1, MAX_MAINTAINERS)) if action == "set-quorum" else None,
            note=draw(texts()),
        )
    elif kind == "need":
        body = Need(**common, project=draw(record_links), title=draw(titles), body=draw(texts()))
    else:
        body = Comment(
            **common,
            project=draw(record_links),
            target=draw(record_links),
            text=draw(non_blank(texts())),
        )
    return body, author


# --- fixed bodies of every shape ----------------------------------------------------------------


def _shape(name: str, ts: int = 1_700_000_000_000) -> Body:
    a = ALICE.public_key
    if name == "project":
        return Project(a, ts, "demo", "MIT", Policy((a,), 1), "a project")
    if name == "fork":
        return Project(a, ts, "fork", "MIT", Policy((a,), 1), "", ForkOf(GENESIS, links(2)))
    if name == "contribution":
        return Contribution(a, ts, GENESIS, links(2), (link(5), link(3)), "add docs", links(1, 7))
    if name == "validation":
        return Validation(a, ts, GENESIS, TARGET, "accept", "looks good")
    if name == "add-maintainer":
        return Governance(a, ts, GENESIS, links(1), "add-maintainer", key=BOB.public_key)
    if name == "remove-maintainer":
        return Governance(a, ts, GENESIS, links(1), "remove-maintainer", key=BOB.public_key)
    if name == "set-quorum":
        return Governance(a, ts, GENESIS, links(1), "set-quorum", quorum=2, note="two now")
    if name == "need":
        return Need(a, ts, GENESIS, "write docs", "please")
    return Comment(a, ts, GENESIS, TARGET, "nice")


_SHAPES = {
    "project": "project",
    "contribution": "contribution",
    "validation": "validation",
    "governance": "add-maintainer",
    "need": "need",
    "comment": "comment",
}
SHAPES = [
    "project",
    "fork",
    "contribution",
    "validation",
    "add-maintainer",
    "remove-maintainer",
    "set-quorum",
    "need",
    "comment",
]


def forge(value: dict[str, Any], signer: Identity = ALICE) -> bytes:
    """`value` as record bytes signed by `signer`, whatever its fields (no checks at all)."""
    unsigned = {k: v for k, v in value.items() if k != "sig"}
    sig = signing.sign(signer, signing.RECORD_DOMAIN, dagcbor.encode(unsigned))
    return dagcbor.encode({**unsigned, "sig": sig})


def record_map(shape: str) -> dict[str, Any]:
    """The decoded map of the fixed record of `shape`."""
    value: dict[str, Any] = dagcbor.decode(sign(_shape(shape), ALICE).data)
    return value


def captured_payload(data: bytes) -> bytes:
    """The payload `decode_record` hands to signature verification."""
    seen: list[bytes] = []

    def verify(public_key: bytes, sig: bytes, domain: bytes, payload: bytes) -> None:
        assert domain == signing.RECORD_DOMAIN
        signing.verify(public_key, sig, domain, payload)
        seen.append(payload)

    decode_record(data, verify=verify)
    assert len(seen) == 1
    return seen[0]


def check_round_trip(body: Body, author: Identity) -> SignedRecord:
    record = sign(body, author)
    assert record.body == body and record.cid == CID.of_dag_cbor(record.data)
    assert len(record.data) <= MAX_RECORD_SIZE
    decoded = decode_record(record.data)
    assert decoded == record
    assert record_from_value(record.data, dagcbor.decode(record.data)) == decoded
    assert sign(body, author) == record  # ed25519 is deterministic: one body, one record id

    # The signing payload is the canonical encoding of the map without `sig`, by our encoder
    # and by an independent one, and it is what the signature is checked against.
    payload = captured_payload(record.data)
    without_sig = {k: v for k, v in dagcbor.decode(record.data).items() if k != "sig"}
    assert payload == signing_payload(body) == dagcbor.encode(without_sig)
    reference = dag_cbor.decode(record.data)
    assert isinstance(reference, dict)
    assert from_reference(reference.pop("sig")) == record.sig
    assert payload == dag_cbor.encode(reference)

    # The record's edges and identity, as the DAG sees them.
    assert decoded.type == body.TYPE and decoded.author == author.public_key
    if isinstance(body, Project):
        assert decoded.project == record.cid
        assert decoded.parents == (body.fork_of.heads if body.fork_of else ())
    else:
        assert decoded.project == body.project
    return decoded


# --- round trips --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(signed_bodies())
def test_every_valid_body_round_trips_through_sign_and_decode(pair: tuple[Body, Identity]) -> None:
    check_round_trip(*pair)


@pytest.mark.parametrize("kind", sorted(_SHAPES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_each_record_type_round_trips(kind: str, data: st.DataObject) -> None:
    check_round_trip(*data.draw(signed_bodies(kind)))


@pytest.mark.parametrize("ts", TS_WIDTHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_signing_payload_at_every_integer_width_of_ts(shape: str, ts: int) -> None:
    check_round_trip(_shape(shape, ts), ALICE)


def test_the_signing_payload_of_a_vector_shape_is_documented() -> None:
    """Section 4.6: `sig` follows `v`, `ts` and (in governance) `key`; the count drops by one."""
    record = sign(_shape("add-maintainer", 1), ALICE)
    head = b"\xaa\x61v\x01\x62ts\x01\x63key\x58\x20" + BOB.public_key
    assert record.data.startswith(head + b"\x63sig\x58\x40" + record.sig)
    assert captured_payload(record.data) == b"\xa9" + head[1:] + record.data[len(head) + 70 :]


def test_the_author_must_sign() -> None:
    with pytest.raises(InvalidRecord, match="author"):
        sign(_shape("need"), BOB)


# --- field rules, at the bound and one past it --------------------------------------------------

_DELETE = object()


def mutated(shape: str, path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """The map of `shape` with the field at `path` set to `value` (or removed by `_DELETE`)."""
    out = record_map(shape)
    target = out
    for step in path[:-1]:
        target[step] = dict(target[step])
        target = target[step]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


_ACCEPTED: list[tuple[str, tuple[str, ...], Any]] = [
    ("project", ("name",), "n" * MAX_NAME_LENGTH),
    ("project", ("name",), "é" * MAX_NAME_LENGTH),
    ("project", ("name",), "two words"),
    ("project", ("license",), "LicenseRef-" + "a" * (MAX_LICENSE_LENGTH - 11)),
    ("project", ("license",), "(MIT OR Apache-2.0) AND GPL-2.0-only WITH Classpath-exception-2.0"),
    ("project", ("description",), "d" * MAX_TEXT_LENGTH),
    ("project", ("description",), ""),
    ("project", ("description",), "tabs\tand\nnewlines are fine"),
    ("project", ("policy", "maintainers"), [key(i) for i in range(MAX_MAINTAINERS)]),
    ("project", ("policy", "quorum"), MAX_MAINTAINERS),  # more than there are maintainers
    ("project", ("policy", "quorum"), 1),
    ("fork", ("fork_of", "heads"), list(links(MAX_PARENTS))),
    ("fork", ("fork_of", "heads"), list(links(1))),
    ("contribution", ("parents",), list(links(MAX_PARENTS))),
    ("contribution", ("changes",), list(links(MAX_LINKS))),
    ("contribution", ("changes",), []),
    ("contribution", ("changes",), [link(3), link(1), link(3)]),  # ordered, repeats allowed
    ("contribution", ("resolves",), list(links(MAX_LINKS))),
    ("contribution", ("resolves",), []),
    ("contribution", ("message",), "m" * MAX_TEXT_LENGTH),
    ("contribution", ("message",), "line one\n\n\tline two"),
    ("validation", ("note",), "n" * MAX_TEXT_LENGTH),
    ("validation", ("verdict",), "reject"),
    ("validation", ("target",), GENESIS),
    ("add-maintainer", ("note",), "n" * MAX_TEXT_LENGTH),
    ("add-maintainer", ("parents",), list(links(MAX_PARENTS))),
    ("set-quorum", ("quorum",), MAX_MAINTAINERS),
    ("set-quorum", ("quorum",), 1),
    ("need", ("title",), "t" * MAX_TITLE_LENGTH),
    ("need", ("body",), "b" * MAX_TEXT_LENGTH),
    ("comment", ("text",), "t" * MAX_TEXT_LENGTH),
    ("comment", ("text",), "\u0085x"),
    ("comment", ("ts",), 0),
    ("comment", ("ts",), MAX_TS),
]


@pytest.mark.parametrize(
    ("shape", "path", "value"),
    _ACCEPTED,
    ids=[f"{s}-{'.'.join(p)}-{i}" for i, (s, p, _) in enumerate(_ACCEPTED)],
)
def test_values_at_the_bounds_are_accepted(shape: str, path: tuple[str, ...], value: Any) -> None:
    data = forge(mutated(shape, path, value))
    record = decode_record(data)
    assert sign(record.body, ALICE).data == data  # and the writer produces the same bytes


_REFUSED: list[tuple[str, tuple[str, ...], Any, str]] = [
    # Lengths one past the bound.
    ("project", ("name",), "n" * (MAX_NAME_LENGTH + 1), "name"),
    ("project", ("license",), "LicenseRef-" + "a" * (MAX_LICENSE_LENGTH - 10), "license"),
    ("project", ("description",), "d" * (MAX_TEXT_LENGTH + 1), "description"),
    ("contribution", ("message",), "m" * (MAX_TEXT_LENGTH + 1), "message"),
    ("validation", ("note",), "n" * (MAX_TEXT_LENGTH + 1), "note"),
    ("add-maintainer", ("note",), "n" * (MAX_TEXT_LENGTH + 1), "note"),
    ("need", ("title",), "t" * (MAX_TITLE_LENGTH + 1), "title"),
    ("need", ("body",), "b" * (MAX_TEXT_LENGTH + 1), "body"),
    ("comment", ("text",), "t" * (MAX_TEXT_LENGTH + 1), "text"),
    # Counts one past the bound, and below it.
    ("project", ("policy", "maintainers"), [key(i) for i in range(MAX_MAINTAINERS + 1)], "maint"),
    ("project", ("policy", "maintainers"), [], "maintainers"),
    ("fork", ("fork_of", "heads"), list(links(MAX_PARENTS + 1)), "heads"),
    ("fork", ("fork_of", "heads"), [], "heads"),
    ("contribution", ("parents",), list(links(MAX_PARENTS + 1)), "parents"),
    ("contribution", ("parents",), [], "parents"),
    ("contribution", ("changes",), list(links(MAX_LINKS + 1)), "changes"),
    ("contribution", ("resolves",), list(links(MAX_LINKS + 1)), "resolves"),
    ("add-maintainer", ("parents",), list(links(MAX_PARENTS + 1)), "parents"),
    ("set-quorum", ("parents",), [], "parents"),
    # Integers out of range, and booleans where integers are expected.
    ("project", ("policy", "quorum"), 0, "quorum"),
    ("project", ("policy", "quorum"), MAX_MAINTAINERS + 1, "quorum"),
    ("project", ("policy", "quorum"), True, "quorum"),
    ("set-quorum", ("quorum",), 0, "quorum"),
    ("set-quorum", ("quorum",), MAX_MAINTAINERS + 1, "quorum"),
    ("set-quorum", ("quorum",), True, "quorum"),
    ("set-quorum", ("quorum",), "2", "quorum"),
    ("need", ("ts",), MAX_TS + 1, "ts"),
    ("need", ("ts",), -1, "ts"),
    ("need", ("ts",), True, "ts"),
    ("need", ("ts",), "1", "ts"),
    ("need", ("v",), True, "version"),
    ("need", ("v",), 0, "version"),
    ("need", ("v",), 2, "version"),
    ("need", ("v",), "1", "version"),
    ("need", ("v",), _DELETE, "version"),
    # Unsorted and repeated link and key lists.
    ("contribution", ("parents",), [link(2), link(1)], "parents"),
    ("contribution", ("parents",), [link(1), link(1)], "parents"),
    ("contribution", ("resolves",), [link(2), link(1)], "resolves"),
    ("contribution", ("resolves",), [link(1), link(1)], "resolves"),
    ("fork", ("fork_of", "heads"), [link(2), link(1)], "heads"),
    ("fork", ("fork_of", "heads"), [link(1), link(1)], "heads"),
    ("set-quorum", ("parents",), [link(2), link(1)], "parents"),
    ("project", ("policy", "maintainers"), [key(2), key(1)], "maintainers"),
    ("project", ("policy", "maintainers"), [key(1), key(1)], "maintainer"),
    # Wrong types and wrong kinds of links.
    ("need", ("author",), ALICE.public_key[:31], "author"),
    ("need", ("author",), ALICE.public_key.hex(), "author"),
    ("need", ("sig",), bytes(63), "sig"),
    ("need", ("sig",), "signature", "sig"),
    ("need", ("project",), RAW, "project"),
    ("need", ("project",), GENESIS.raw, "project"),
    ("need", ("title",), b"title", "title"),
    ("need", ("title",), None, "title"),
    ("comment", ("target",), RAW, "target"),
    ("contribution", ("parents",), [RAW], "parents"),
    ("contribution", ("parents",), GENESIS, "parents"),
    ("contribution", ("changes",), [RAW], "changes"),
    ("contribution", ("changes",), GENESIS, "changes"),
    ("contribution", ("resolves",), ["not a link"], "resolves"),
    ("fork", ("fork_of", "project"), RAW, "project"),
    ("fork", ("fork_of", "heads"), GENESIS, "heads"),
    ("fork", ("fork_of",), [GENESIS], "fork_of"),
    ("fork", ("fork_of", "extra"), 1, "fork_of"),
    ("project", ("policy",), [ALICE.public_key], "policy"),
    ("project", ("policy", "extra"), 1, "policy"),
    ("project", ("policy", "maintainers"), ALICE.public_key, "maintainers"),
    ("project", ("policy", "maintainers"), [ALICE.public_key[:31]], "maintainer"),
    ("project", ("policy", "quorum"), _DELETE, "policy"),
    ("validation", ("verdict",), "maybe", "verdict"),
    ("validation", ("verdict",), "Accept", "verdict"),
    ("validation", ("verdict",), True, "verdict"),
    ("add-maintainer", ("action",), "promote", "action"),
    ("add-maintainer", ("key",), ALICE.public_key[:31], "key"),
    # Governance: a key exactly for the maintainer actions, a quorum exactly for set-quorum.
    ("set-quorum", ("key",), BOB.public_key, "key"),
    ("add-maintainer", ("key",), _DELETE, "key"),
    ("remove-maintainer", ("key",), _DELETE, "key"),
    ("add-maintainer", ("quorum",), 2, "quorum"),
    ("set-quorum", ("quorum",), _DELETE, "quorum"),
    # Text rules.
    ("contribution", ("message",), "", "message"),
    ("contribution", ("message",), " \t\n\u3000\u2028", "message"),
    ("comment", ("text",), "", "text"),
    ("need", ("title",), "   ", "title"),
    ("need", ("title",), "two\nlines", "title"),
    ("need", ("title",), "tab\tbed", "title"),
    ("project", ("name",), "", "name"),
    ("project", ("name",), " demo", "name"),
    ("project", ("name",), "demo\u3000", "name"),
    ("project", ("name",), "two\nlines", "name"),
    ("project", ("name",), "cafe\u0301", "name"),  # NFD; the NFC form is "café"
    ("project", ("license",), "MIT\nOR Apache-2.0", "license"),
    ("project", ("license",), "", "license"),
    # Licenses that are not SPDX expressions.
    ("project", ("license",), "MIT AND", "license"),
    ("project", ("license",), "(MIT", "license"),
    ("project", ("license",), "MIT)", "license"),
    ("project", ("license",), "MIT OR OR Apache-2.0", "license"),
    ("project", ("license",), "AND", "license"),
    ("project", ("license",), "WITH MIT", "license"),
    ("project", ("license",), "MIT/Apache-2.0", "license"),
    ("project", ("license",), "MIT, Apache-2.0", "license"),
    # Optional fields are absent, never null.
    ("fork", ("fork_of",), None, "fork_of"),
    ("set-quorum", ("key",), None, "key"),
    ("add-maintainer", ("quorum",), None, "quorum"),
    # Unknown fields.
    ("need", ("extra",), 1, "extra"),
    ("project", ("project",), GENESIS, "project"),
    ("contribution", ("fork_of",), None, "fork_of"),
    ("need", ("key",), BOB.public_key, "key"),
    ("validation", ("Note",), "", "Note"),
    # Unknown types.
    ("need", ("type",), "patch", "type"),
    ("need", ("type",), "Need", "type"),
    ("need", ("type",), "", "type"),
    ("need", ("type",), 1, "type"),
    ("need", ("type",), None, "type"),
    ("need", ("type",), _DELETE, "type"),
]
# Every forbidden control character, in every text field.
_TEXT_FIELDS = [
    ("project", "name"),
    ("project", "license"),
    ("project", "description"),
    ("contribution", "message"),
    ("validation", "note"),
    ("set-quorum", "note"),
    ("need", "title"),
    ("need", "body"),
    ("comment", "text"),
]
_REFUSED += [
    (shape, (name,), f"a{char}b", name)
    for shape, name in _TEXT_FIELDS
    for char in [chr(c) for c in range(0x20) if c not in (0x09, 0x0A)] + ["\x7f"]
]


@pytest.mark.parametrize(
    ("shape", "path", "value", "named"),
    _REFUSED,
    ids=[f"{s}-{'.'.join(p)}-{i}" for i, (s, p, _, _) in enumerate(_REFUSED)],
)
def test_a_field_that_breaks_a_rule_is_refused_and_named(
    shape: str, path: tuple[str, ...], value: Any, named: str
) -> None:
    changed = mutated(shape, path, value)
    data = dagcbor.encode(changed) if path == ("sig",) else forge(changed)
    with pytest.raises(InvalidRecord) as refused:
        decode_record(data)
    assert type(refused.value) is InvalidRecord  # a rule, not the (valid) signature
    assert named in refused.value.message
    # record_from_value reaches the same verdict from the already-decoded value.
    with pytest.raises(InvalidRecord) as again:
        record_from_value(data, dagcbor.decode(data))
    assert again.value.message == refused.value.message


@pytest.mark.parametrize("shape", SHAPES)
def test_every_missing_field_is_refused_and_named(shape: str) -> None:
    required = record_map(shape).keys() - {"fork_of", "type", "v"}
    for name in required:
        changed = mutated(shape, (name,), _DELETE)
        with pytest.raises(InvalidRecord, match=name):
            decode_record(dagcbor.encode(changed) if name == "sig" else forge(changed))


def test_a_fork_without_fork_of_is_an_original_project() -> None:
    record = decode_record(forge(mutated("fork", ("fork_of",), _DELETE)))
    assert isinstance(record.body, Project) and record.body.fork_of is None
    assert record.parents == ()


# --- the same rules on construction -------------------------------------------------------------

_CONSTRUCTION: list[tuple[str, dict[str, Any]]] = [
    ("need", {"ts": True}),
    ("need", {"ts": MAX_TS + 1}),
    ("need", {"ts": -1}),
    ("need", {"ts": 1.0}),
    ("need", {"author": bytearray(32)}),
    ("need", {"project": GENESIS.raw}),
    ("need", {"title": "a\x00b"}),
    ("need", {"title": "t" * (MAX_TITLE_LENGTH + 1)}),
    ("contribution", {"parents": list(links(2))}),  # a list, not a tuple
    ("contribution", {"parents": (link(2), link(1))}),
    ("contribution", {"parents": (link(1), link(1))}),
    ("contribution", {"parents": ()}),
    ("contribution", {"parents": links(MAX_PARENTS + 1)}),
    ("contribution", {"changes": links(MAX_LINKS + 1)}),
    ("contribution", {"changes": [link(1)]}),
    ("contribution", {"resolves": (link(2), link(1))}),
    ("contribution", {"resolves": links(MAX_LINKS + 1)}),
    ("contribution", {"message": ""}),
    ("contribution", {"message": "\n\n"}),
    ("validation", {"verdict": "yes"}),
    ("project", {"name": "two\nlines"}),
    ("project", {"name": "x" * (MAX_NAME_LENGTH + 1)}),
    ("project", {"license": "MIT AND"}),
    ("project", {"policy": {"maintainers": [ALICE.public_key], "quorum": 1}}),
    ("fork", {"fork_of": {"project": GENESIS, "heads": [link(1)]}}),
    ("set-quorum", {"quorum": 0}),
    ("set-quorum", {"quorum": MAX_MAINTAINERS + 1}),
    ("set-quorum", {"quorum": True}),
    ("set-quorum", {"quorum": None}),
    ("set-quorum", {"key": BOB.public_key}),
    ("add-maintainer", {"key": None}),
    ("add-maintainer", {"quorum": 1}),
    ("add-maintainer", {"action": "add"}),
]


@pytest.mark.parametrize(
    ("shape", "changes"),
    _CONSTRUCTION,
    ids=[f"{shape}-{next(iter(changes))}-{i}" for i, (shape, changes) in enumerate(_CONSTRUCTION)],
)
def test_an_invalid_body_cannot_be_constructed(shape: str, changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecord):
        dataclasses.replace(_shape(shape), **changes)


@pytest.mark.parametrize(
    ("maintainers", "quorum"),
    [
        ((), 1),
        ([key(1)], 1),
        ((key(2), key(1)), 1),
        ((key(1), key(1)), 1),
        (tuple(key(i) for i in range(MAX_MAINTAINERS + 1)), 1),
        ((key(1)[:31],), 1),
        ((key(1),), 0),
        ((key(1),), MAX_MAINTAINERS + 1),
        ((key(1),), True),
        ((key(1),), "1"),
    ],
)
def test_an_invalid_policy_cannot_be_constructed(maintainers: Any, quorum: Any) -> None:
    with pytest.raises(InvalidRecord):
        Policy(maintainers=maintainers, quorum=quorum)


def test_an_invalid_fork_of_cannot_be_constructed() -> None:
    for project, heads in [(RAW, links(1)), (GENESIS, ()), (GENESIS, (link(2), link(1)))]:
        with pytest.raises(InvalidRecord):
            ForkOf(project=project, heads=heads)


# --- licenses -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["(", ")", " ", " AND ", " OR ", " WITH ", "+", "MIT", "GPL-2.0", "é", ","]
        ),
        max_size=8,
    ).map("".join)
)
@example("()")
def test_any_license_text_makes_a_project_or_an_invalid_record(license: str) -> None:
    with contextlib.suppress(InvalidRecord):
        Project(ALICE.public_key, 1, "demo", license, Policy((ALICE.public_key,), 1))


@pytest.mark.parametrize("license", ["()", "(())", "( OR +", "( AND x"])
def test_a_record_with_a_license_the_parser_chokes_on_is_an_invalid_record(license: str) -> None:
    with pytest.raises(InvalidRecord, match="license"):
        decode_record(forge(mutated("project", ("license",), license)))


# --- text that is not Unicode -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "name"),
    [("project", "name"), ("need", "title"), ("contribution", "message"), ("comment", "text")],
)
def test_text_with_a_lone_surrogate_is_an_invalid_record(shape: str, name: str) -> None:
    """Text from a terminal or a file name may hold surrogate escapes of undecodable bytes."""
    changes: dict[str, Any] = {name: "bad \udcff byte"}
    with pytest.raises(InvalidRecord, match=name):
        sign(dataclasses.replace(_shape(shape), **changes), ALICE)


# --- signatures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_a_record_signed_by_another_key_than_its_author_is_refused(shape: str) -> None:
    value = record_map(shape)
    with pytest.raises(BadSignature):
        decode_record(forge(value, BOB))
    assert decode_record(forge(value, ALICE)).author == ALICE.public_key


def test_a_signature_from_another_record_or_without_the_domain_is_refused() -> None:
    need, comment = record_map("need"), record_map("comment")
    with pytest.raises(BadSignature):
        decode_record(dagcbor.encode({**need, "sig": comment["sig"]}))
    unsigned = {k: v for k, v in need.items() if k != "sig"}
    bare = ALICE.sign(dagcbor.encode(unsigned))  # the payload without RECORD_DOMAIN
    with pytest.raises(BadSignature):
        decode_record(dagcbor.encode({**unsigned, "sig": bare}))


# --- size ---------------------------------------------------------------------------------------


def _contribution_of_size(size: int) -> tuple[Contribution, bytes]:
    """A contribution whose signed record is exactly `size` bytes (for sizes near 64 KiB)."""
    base = Contribution(ALICE.public_key, 1, GENESIS, links(1), links(MAX_LINKS), "m" * 300)
    spare = size - len(sign(base, ALICE).data) + 300  # bytes left for the message
    wide, narrow = divmod(spare, 4)  # 4-byte characters keep the code point count low
    body = dataclasses.replace(base, message="\U0001f600" * wide + "m" * narrow)
    value = {**dagcbor.decode(sign(base, ALICE).data), "message": body.message}
    return body, forge(value)


def test_a_record_of_exactly_64_kib_is_accepted() -> None:
    body, data = _contribution_of_size(MAX_RECORD_SIZE)
    assert len(data) == MAX_RECORD_SIZE and len(body.message) <= MAX_TEXT_LENGTH
    assert sign(body, ALICE).data == data
    assert decode_record(data).body == body


def test_a_record_over_64_kib_is_refused_by_writer_and_reader() -> None:
    body, data = _contribution_of_size(MAX_RECORD_SIZE + 1)
    assert len(data) == MAX_RECORD_SIZE + 1 and len(body.message) <= MAX_TEXT_LENGTH
    with pytest.raises(TooLarge):
        sign(body, ALICE)
    with pytest.raises(TooLarge):
        decode_record(data)
    with pytest.raises(TooLarge):
        record_from_value(data, dagcbor.decode(data))
    with pytest.raises(TooLarge):
        decode_record(b"\xff" * (MAX_RECORD_SIZE + 1))  # refused before it is decoded


# --- tampering ----------------------------------------------------------------------------------


def _refuses_consistently(data: bytes) -> None:
    """`data` is refused with a typed error, the same from both decoding entry points."""
    with pytest.raises((DecodeError, InvalidRecord)) as refused:
        decode_record(data)
    try:
        value = dagcbor.decode(data)
    except DecodeError:
        return
    with pytest.raises(OstromError) as again:
        record_from_value(data, value)
    assert (type(again.value), again.value.message) == (type(refused.value), refused.value.message)


@pytest.mark.parametrize("shape", SHAPES)
def test_flipping_any_single_byte_of_a_record_is_refused(shape: str) -> None:
    data = sign(_shape(shape), ALICE).data
    for position in range(len(data)):
        for mask in (0x01, 0x20, 0x80, 0xFF):
            tampered = bytearray(data)
            tampered[position] ^= mask
            _refuses_consistently(bytes(tampered))


@settings(max_examples=200, deadline=None)
@given(signed_bodies(), st.integers(min_value=0), st.integers(1, 255))
def test_a_changed_byte_of_any_valid_record_is_refused(
    pair: tuple[Body, Identity], position: int, mask: int
) -> None:
    data = bytearray(sign(*pair).data)
    data[position % len(data)] ^= mask
    _refuses_consistently(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_with_a_typed_error(data: bytes) -> None:
    _refuses_consistently(data)


# Any data-model value, for replacing one field of a record.
_anything = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64 - 1),
        st.text(max_size=20),
        st.binary(max_size=40),
        record_links,
        st.just(RAW),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SHAPES), st.data())
def test_any_value_in_any_field_decodes_or_is_an_invalid_record(
    shape: str, data: st.DataObject
) -> None:
    value = record_map(shape)
    name = data.draw(st.sampled_from(sorted(value.keys() - {"sig"})))
    replacement = data.draw(_anything)
    forged = forge({**value, name: replacement})
    try:
        record = decode_record(forged)
    except InvalidRecord as exc:
        # Signed by ALICE: only a rule can fail, or the signature if the author changed.
        assert type(exc) is InvalidRecord or name == "author"
        return
    assert record.data == forged and sign(record.body, ALICE).data == forged


@pytest.mark.parametrize(
    "make",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data + b"\x00",
        lambda data: dagcbor.encode([dagcbor.decode(data)]),
        lambda data: dagcbor.encode("a record"),
    ],
    ids=["truncated", "trailing byte", "in a list", "not a map"],
)
def test_bytes_that_are_not_a_record_map_are_refused(make: Callable[[bytes], bytes]) -> None:
    _refuses_consistently(make(sign(_shape("need"), ALICE).data))


def test_a_project_of_a_private_mesh_names_it_and_round_trips() -> None:
    founder = Identity.generate()
    mesh = CID.of_dag_cbor(b"\xa0")
    body = Project(
        author=founder.public_key,
        ts=1,
        name="workshop tools",
        license="CERN-OHL-S-2.0",
        policy=Policy((founder.public_key,)),
        mesh=mesh,
    )
    record = sign(body, founder)
    again = decode_record(record.data)
    assert isinstance(again.body, Project) and again.body.mesh == mesh
    with pytest.raises(InvalidRecord, match="mesh must be a CID link"):
        Project(founder.public_key, 1, "x", "MIT", Policy((founder.public_key,)), mesh="m")  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord, match="mesh must link to a dag-cbor record"):
        Project(
            founder.public_key, 1, "x", "MIT", Policy((founder.public_key,)), mesh=CID.of_raw(b"")
        )
