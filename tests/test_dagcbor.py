"""Strict DAG-CBOR: round trips, canonical key order, an independent codec, and every refusal."""

from __future__ import annotations

from typing import Any

import cbor2
import dag_cbor
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from multiformats import CID as ReferenceCID

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError
from ostrom.protocol import dagcbor
from ostrom.protocol.dagcbor import MAX_DEPTH

# --- strategies ---------------------------------------------------------------------------------

cids = st.builds(
    CID,
    st.tuples(
        st.sampled_from([bytes([1, 0x71, 0x12, 0x20]), bytes([1, 0x55, 0x12, 0x20])]),
        st.binary(min_size=32, max_size=32),
    ).map(lambda parts: parts[0] + parts[1]),
)
# Integers at and around every CBOR head width, plus anything in the 64-bit range.
_EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
ints = st.one_of(
    st.sampled_from(_EDGES + [-1 - n for n in _EDGES]),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
)
# Keys longer than 23 and 255 bytes cross the CBOR length-head boundaries of the key order.
keys = st.one_of(st.text(max_size=6), st.text(min_size=20, max_size=300))
scalars_without_links = st.one_of(
    st.none(), st.booleans(), ints, st.text(max_size=40), st.binary(max_size=40)
)
scalars = st.one_of(scalars_without_links, cids)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=5))


values = st.recursive(scalars, _containers, max_leaves=25)
values_without_links = st.recursive(scalars_without_links, _containers, max_leaves=25)


def depth(value: Any) -> int:
    """Containers nested around the deepest leaf (a scalar is 0 deep)."""
    if isinstance(value, list):
        return 1 + max((depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(item) for item in value.values()), default=0)
    return 0


def to_reference(value: Any) -> Any:
    """The same value in the `dag_cbor` package's model (its CIDs are `multiformats.CID`)."""
    if isinstance(value, CID):
        return ReferenceCID.decode(value.raw)
    if isinstance(value, list):
        return [to_reference(item) for item in value]
    if isinstance(value, dict):
        return {key: to_reference(item) for key, item in value.items()}
    return value


def from_reference(value: Any) -> Any:
    if isinstance(value, ReferenceCID):
        return CID(bytes(value))
    if isinstance(value, list):
        return [from_reference(item) for item in value]
    if isinstance(value, dict):
        return {key: from_reference(item) for key, item in value.items()}
    return value


def canonical_key(key: str) -> tuple[int, bytes]:
    encoded = key.encode()
    return (len(encoded), encoded)


# --- round trips --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(values)
def test_round_trip_gives_equal_value_and_identical_bytes(value: Any) -> None:
    assume(depth(value) <= MAX_DEPTH)
    data = dagcbor.encode(value)
    decoded = dagcbor.decode(data)
    assert decoded == value
    assert dagcbor.encode(decoded) == data
    assert dagcbor.encode_trusted(decoded) == data


@pytest.mark.parametrize("value", [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_integers_at_every_head_width_round_trip_with_the_shortest_head(value: int) -> None:
    for number in (value, -1 - value):
        data = dagcbor.encode(number)
        assert dagcbor.decode(data) == number
        width = 0 if value < 24 else 1 if value < 256 else 2 if value < 65536 else 4
        width = 8 if value >= 2**32 else width
        assert len(data) == 1 + width


@given(st.dictionaries(keys, st.integers(0, 10), max_size=12), st.randoms(use_true_random=False))
@example({"éé": 1, "abc": 2, "b": 3, "aa": 4, "a": 5}, None)
def test_key_order_is_length_first_then_bytewise_whatever_the_insertion_order(
    mapping: dict[str, int], rng: Any
) -> None:
    items = list(mapping.items())
    if rng is not None:
        rng.shuffle(items)
    data = dagcbor.encode(dict(items))
    assert data == dagcbor.encode(dict(reversed(items)))
    # cbor2 keeps the order of the encoding when it decodes a map.
    assert list(cbor2.loads(data)) == sorted(mapping, key=canonical_key)


@settings(max_examples=200, deadline=None)
@given(values_without_links, st.randoms(use_true_random=False))
def test_decode_accepts_a_map_exactly_when_its_keys_came_in_canonical_order(
    value: Any, rng: Any
) -> None:
    # Decoding checks key order as it walks the value, not by sorting it again: bytes
    # written with every map's keys shuffled are accepted exactly when they are canonical.
    def shuffled(v: Any) -> Any:
        if isinstance(v, list):
            return [shuffled(item) for item in v]
        if isinstance(v, dict):
            items = [(k, shuffled(item)) for k, item in v.items()]
            rng.shuffle(items)
            return dict(items)
        return v

    data = cbor2.dumps(shuffled(value))
    if data == dagcbor.encode(value):
        assert dagcbor.encode(dagcbor.decode(data)) == data
    else:
        with pytest.raises(DecodeError, match="not canonical"):
            dagcbor.decode(data)


def test_utf8_length_not_code_points_decides_key_order() -> None:
    # "éé" is 2 code points but 4 bytes, so it sorts after the 3-byte "abc".
    assert list(cbor2.loads(dagcbor.encode({"éé": 1, "abc": 2}))) == ["abc", "éé"]


# --- an independent implementation --------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(values_without_links)
def test_encoding_without_links_matches_the_dag_cbor_package(value: Any) -> None:
    assume(depth(value) <= MAX_DEPTH)
    data = dagcbor.encode(value)
    assert data == dag_cbor.encode(value)
    assert dag_cbor.decode(data) == value


@settings(max_examples=100, deadline=None)
@given(values)
def test_encoding_with_links_matches_the_dag_cbor_package(value: Any) -> None:
    assume(depth(value) <= MAX_DEPTH)
    data = dagcbor.encode(value)
    assert data == dag_cbor.encode(to_reference(value))
    assert from_reference(dag_cbor.decode(data)) == value
    assert dagcbor.decode(dag_cbor.encode(to_reference(value))) == value


def test_a_link_is_tag_42_over_zero_and_the_binary_cid() -> None:
    cid = CID.of_dag_cbor(b"x")
    assert dagcbor.encode(cid) == bytes.fromhex("d82a5825") + b"\x00" + cid.raw
    assert dagcbor.decode(dagcbor.encode([cid])) == [cid]


# --- nesting ------------------------------------------------------------------------------------


def _nest(containers: int, leaf: Any) -> Any:
    value = leaf
    for level in range(containers):
        value = [value] if level % 2 else {"k": value}
    return value


_LEAVES: list[Any] = [None, 7, "s", b"b", CID.of_raw(b"leaf")]
_DEPTH_CASES = [
    pytest.param(containers, leaf, id=f"{containers}-{type(leaf).__name__}")
    for containers in range(MAX_DEPTH - 1, MAX_DEPTH + 4)
    for leaf in _LEAVES
]


@pytest.mark.parametrize(("containers", "leaf"), _DEPTH_CASES)
def test_encode_and_decode_agree_on_how_deep_is_too_deep(containers: int, leaf: Any) -> None:
    """Up to MAX_DEPTH containers always work; beyond, encode refuses exactly what decode does."""
    value = _nest(containers, leaf)
    data = dag_cbor.encode(to_reference(value))  # the reference encoder has no depth limit
    try:
        ours = dagcbor.encode(value)
    except DecodeError:
        encoded = False
    else:
        encoded = True
        assert ours == data
    try:
        decoded = dagcbor.decode(data) == value
    except DecodeError:
        decoded = False
    assert encoded == decoded
    if containers <= MAX_DEPTH:
        assert decoded
    if containers > MAX_DEPTH + 1:
        assert not decoded


def test_hostile_nesting_is_refused_quickly() -> None:
    for data in (b"\x81" * 100_000 + b"\xf6", b"\xa1\x61k" * 50_000 + b"\xf6"):
        with pytest.raises(DecodeError):
            dagcbor.decode(data)


# --- refusals when encoding ---------------------------------------------------------------------


_UNENCODABLE: dict[str, Any] = {
    "float": 1.5,
    "nan": float("nan"),
    "float in a list": [0.0],
    "float in a map": {"a": 1.0},
    "2^64": 2**64,
    "-2^64-1": -(2**64) - 1,
    "big int in a list": [2**70],
    "int key": {1: "int key"},
    "bytes key": {b"k": "bytes key"},
    "bool key": {True: "bool key"},
    "null key": {None: "null key"},
    "tuple": (1, 2),
    "set": {1, 2},
    "bytearray": bytearray(b"x"),
    "object": object(),
    "raw cbor2 tag 42": cbor2.CBORTag(42, b"\x00" + CID.of_raw(b"x").raw),
    "other tag": cbor2.CBORTag(1, 0),
    "undefined": cbor2.undefined,
    "too deep": _nest(MAX_DEPTH + 2, None),
}


@pytest.mark.parametrize("value", list(_UNENCODABLE.values()), ids=list(_UNENCODABLE))
def test_encode_refuses_values_outside_the_data_model(value: Any) -> None:
    with pytest.raises(DecodeError):
        dagcbor.encode(value)


@pytest.mark.parametrize("value", ["\ud800", {"\udfff": 1}, ["ok", "a\udcffb"]], ids=repr)
def test_encode_refuses_text_that_is_not_unicode_with_a_decode_error(value: Any) -> None:
    with pytest.raises(DecodeError):
        dagcbor.encode(value)


# --- refusals when decoding ---------------------------------------------------------------------

_CID = CID.of_dag_cbor(b"link")
_LINK = bytes.fromhex("d82a5825") + b"\x00" + _CID.raw
_REFUSED = {
    # Floats of every width, and the special ones.
    "half float": "f93c00",
    "single float": "fa3f800000",
    "double float": "fb3ff0000000000000",
    "NaN": "f97e00",
    "infinity": "f97c00",
    "float in a map": "a16161f93c00",
    # Tags other than 42.
    "tag 0 date text": "c074323031332d30332d32315432303a30343a30305a",
    "tag 1 epoch": "c11a514b67b0",
    "tag 2 bignum 2^64": "c249010000000000000000",
    "tag 3 bignum -2^64-1": "c349010000000000000000",
    "tag 2 bignum small": "c24101",
    "tag 4 decimal": "c48221196ab3",
    "tag 5 bigfloat": "c5822003",
    "tag 24 embedded cbor": "d81841f6",
    "tag 28 shareable": "d81c80",
    "tag 30 rational": "d81e820102",
    "tag 32 uri": "d8206161",
    "tag 37 uuid": "d82550" + "00" * 16,
    "tag 43 over bytes": "d82b4100",
    "tag 258 set": "d9010280",
    "tag 55799 self-describe": "d9d9f7f6",
    "tag 6": "c6f6",
    "tag 42 as a non-minimal head": "d9002a5825" + "00" + _CID.raw.hex(),
    # Links that are not links.
    "tag 42 without the 00 prefix": "d82a5824" + _CID.raw.hex(),
    "tag 42 with a 01 prefix": "d82a5825" + "01" + _CID.raw.hex(),
    "tag 42 over empty bytes": "d82a40",
    "tag 42 over only 00": "d82a4100",
    "tag 42 over text": "d82a6161",
    "tag 42 over an int": "d82a01",
    "tag 42 over a list": "d82a80",
    "tag 42 over a CIDv0": "d82a5823" + "00" + "1220" + "00" * 32,
    "tag 42 over another codec": "d82a5825" + "00" + "01701220" + "00" * 32,
    "tag 42 over another hash": "d82a5825" + "00" + "01711320" + "00" * 32,
    "tag 42 over a short digest": "d82a5824" + "00" + "01711220" + "00" * 31,
    "tag 42 around tag 42": "d82ad82a5825" + "00" + _CID.raw.hex(),
    # Map keys that are not text.
    "int key": "a10101",
    "negative int key": "a12001",
    "bytes key": "a1416101",
    "bool key": "a1f501",
    "null key": "a1f601",
    "list key": "a18001",
    "map key": "a1a001",
    "link key": "a1" + _LINK.hex() + "01",
    # Duplicate and unsorted keys.
    "duplicate key": "a2616101616101",
    "duplicate key, other values": "a2616101616102",
    "bytewise unsorted": "a2616201616102",
    "longer key first": "a2626161016162 02".replace(" ", ""),
    "unsorted nested map": "a16161a2616201616102",
    # Non-minimal integers, lengths and simple values.
    "23 in a 1-byte head": "1817",
    "0 in a 1-byte head": "1800",
    "255 in a 2-byte head": "1900ff",
    "65535 in a 4-byte head": "1a0000ffff",
    "2^32-1 in an 8-byte head": "1b00000000ffffffff",
    "-1 in a 1-byte head": "3800",
    "-24 in a 2-byte head": "390017",
    "bytes length in a 1-byte head": "580100",
    "text length in a 1-byte head": "780161",
    "list length in a 1-byte head": "9800",
    "map length in a 2-byte head": "b90000",
    "false as a two-byte simple value": "f814",
    # Indefinite lengths and stray breaks.
    "indefinite bytes": "5f4100ff",
    "indefinite text": "7f6161ff",
    "indefinite list": "9f01ff",
    "indefinite map": "bf616101ff",
    "empty indefinite list": "9fff",
    "break": "ff",
    "break in a list": "82 01 ff".replace(" ", ""),
    # Trailing bytes.
    "two items": "0000",
    "map then a byte": "a000",
    "link then a byte": _LINK.hex() + "00",
    # Undefined and other simple values.
    "undefined": "f7",
    "simple 0": "e0",
    "simple 16": "f0",
    "simple 19": "f3",
    "simple 32": "f820",
    "simple 255": "f8ff",
    "reserved 28": "fc",
    "undefined in a map": "a16161f7",
    # Text that is not UTF-8.
    "invalid utf-8": "62c328",
    "encoded surrogate": "63eda080",
    "overlong utf-8": "62c0af",
    # Nothing at all, and declared lengths that are not there.
    "empty input": "",
    "bytes longer than the input": "5b0000010000000000",
    "list longer than the input": "9b0000010000000000",
    "map longer than the input": "bb0000010000000000",
    "text longer than the input": "7a00010000",
    # Too deep: 18 containers.
    "nested too deeply": "81" * (MAX_DEPTH + 2) + "f6",
}


@pytest.mark.parametrize("hex_data", list(_REFUSED.values()), ids=list(_REFUSED))
def test_decode_refuses(hex_data: str) -> None:
    with pytest.raises(DecodeError):
        dagcbor.decode(bytes.fromhex(hex_data))


def test_the_refused_examples_are_one_step_from_accepted_ones() -> None:
    """Each family above is refused for its flaw, not because the decoder refuses everything."""
    for hex_data in (
        "f6",
        "f5",
        "17",
        "1818",
        "20",
        "37",
        "3818",
        "4100",
        "6161",
        "80",
        "a0",
        "a1616101",
    ):
        dagcbor.decode(bytes.fromhex(hex_data))
    assert dagcbor.decode(_LINK) == _CID
    assert dagcbor.decode(bytes.fromhex("3bffffffffffffffff")) == -(2**64)
    assert dagcbor.decode(bytes.fromhex("1bffffffffffffffff")) == 2**64 - 1
    assert dagcbor.decode(bytes.fromhex("a2616101616202")) == {"a": 1, "b": 2}


@settings(max_examples=100, deadline=None)
@given(values)
def test_every_truncation_of_a_valid_encoding_is_refused(value: Any) -> None:
    assume(depth(value) <= MAX_DEPTH)
    data = dagcbor.encode(value)
    for end in range(len(data)):
        with pytest.raises(DecodeError):
            dagcbor.decode(data[:end])


@settings(max_examples=50, deadline=None)
@given(values, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_after_a_valid_encoding_are_refused(value: Any, tail: bytes) -> None:
    assume(depth(value) <= MAX_DEPTH)
    with pytest.raises(DecodeError):
        dagcbor.decode(dagcbor.encode(value) + tail)


# --- fuzz ---------------------------------------------------------------------------------------


def _decode_or_refuse(data: bytes) -> None:
    """Decode `data`; only `DecodeError` may escape, and what is accepted must be canonical."""
    try:
        value = dagcbor.decode(data)
    except DecodeError:
        return
    assert dagcbor.encode(value) == data
    assert from_reference(dag_cbor.decode(data)) == value


@pytest.mark.timeout(60)
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_decode_of_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    _decode_or_refuse(data)


@pytest.mark.timeout(60)
@settings(max_examples=250, deadline=None)
@given(values, st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4))
def test_decode_of_mutated_valid_encodings_raises_only_decode_error(
    value: Any, edits: list[tuple[int, int]]
) -> None:
    assume(depth(value) <= MAX_DEPTH)
    data = bytearray(dagcbor.encode(value))
    for position, byte in edits:
        data[position % len(data)] = byte
    _decode_or_refuse(bytes(data))


# Tags cbor2 gives a meaning to (dates, bignums, decimals, sharing, string references, sets,
# regexes, MIME, UUIDs, IP addresses, self-description) and some it does not.
_TAGS = [0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37, 42]
_TAGS += [100, 256, 258, 260, 261, 262, 263, 1004, 55799, 2**32, 2**64 - 1]
wire_values = st.recursive(
    st.one_of(
        scalars,
        st.floats(),
        st.just(cbor2.undefined),
        st.integers(min_value=-(2**80), max_value=2**80),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-2, 2)), children, max_size=3),
        st.builds(cbor2.CBORTag, st.one_of(st.sampled_from(_TAGS), st.integers(0, 300)), children),
    ),
    max_leaves=12,
)


def _cbor2_default(encoder: Any, value: Any) -> None:
    encoder.encode(cbor2.CBORTag(42, b"\x00" + value.raw))


@pytest.mark.timeout(60)
@settings(max_examples=250, deadline=None)
@given(wire_values)
def test_decode_of_arbitrary_tagged_cbor_raises_only_decode_error(value: Any) -> None:
    """CBOR with every kind of tag, float and simple value cbor2 can write; only links pass."""
    for canonical in (False, True):
        try:
            data = cbor2.dumps(value, default=_cbor2_default, canonical=canonical)
        except (cbor2.CBOREncodeError, ValueError, TypeError):
            continue  # a tag over content cbor2 will not write
        _decode_or_refuse(data)
