from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.errors import BlockMismatch, DecodeError, InvalidInput, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.car import (
    DEFAULT_MAX_SECTION,
    MAX_HEADER,
    CarHeader,
    CarReader,
    CarSection,
    encode_header,
    encode_section,
    encode_uvarint,
)
from ostrom.protocol.changesets import MAX_BLOCK_SIZE
from ostrom.protocol.chunking import chunk_bytes

# A CAR with root and one raw block b"hello", written by the ipld-car library (py-ipld-car).
HELLO_CAR = bytes.fromhex(
    "3aa265726f6f747381d82a582500015512202cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73"
    "043362938b98246776657273696f6e0129015512202cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7"
    "425e73043362938b982468656c6c6f"
)
HELLO_CID = CID.parse("bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq")


def _file_car(data: bytes, block_size: int = 7) -> tuple[bytes, list[CarHeader | CarSection]]:
    """A CAR of one file: its manifest as root, the manifest, then its blocks."""
    blocks, _, encoded, mcid = chunk_bytes(data, block_size)
    items: list[CarHeader | CarSection] = [CarHeader((mcid,)), CarSection(mcid, encoded)]
    items += [CarSection(cid, block) for cid, block in blocks]
    car = encode_header([mcid]) + encode_section(mcid, encoded)
    car += b"".join(encode_section(cid, block) for cid, block in blocks)
    return car, items


def _read(car: bytes, step: int | None = None, **kwargs: int) -> list[CarHeader | CarSection]:
    reader = CarReader(**kwargs)
    out: list[CarHeader | CarSection] = []
    step = step or max(len(car), 1)
    for i in range(0, len(car), step):
        out += reader.feed(car[i : i + step])
    reader.close()
    return out


def _header_bytes(value: object) -> bytes:
    header = dagcbor.encode(value)
    return encode_uvarint(len(header)) + header


def test_fixed_vector() -> None:
    assert encode_header([HELLO_CID]) + encode_section(HELLO_CID, b"hello") == HELLO_CAR
    assert _read(HELLO_CAR) == [CarHeader((HELLO_CID,)), CarSection(HELLO_CID, b"hello")]


def test_round_trip_whole_and_one_byte_at_a_time() -> None:
    car, items = _file_car(b"the quick brown fox jumps over the lazy dog" * 3)
    assert _read(car) == items
    assert _read(car, step=1) == items


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=15))
def test_any_split_reads_the_same(data: bytes, cuts: list[int]) -> None:
    car, items = _file_car(data)
    reader = CarReader()
    out: list[CarHeader | CarSection] = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(car)):
        out += reader.feed(car[start:cut])
        start = cut
    out += reader.feed(car[start:])
    reader.close()
    assert out == items


def test_header_only_and_empty_data_section() -> None:
    assert _read(encode_header([HELLO_CID])) == [CarHeader((HELLO_CID,))]
    empty = CID.of_raw(b"")
    car = encode_header([empty]) + encode_section(empty, b"")
    assert _read(car) == [CarHeader((empty,)), CarSection(empty, b"")]


def test_empty_roots_read_but_not_written() -> None:
    assert _read(_header_bytes({"roots": [], "version": 1})) == [CarHeader(())]
    with pytest.raises(InvalidInput):
        encode_header([])
    with pytest.raises(InvalidInput):
        encode_header([b"\x01" * 36])  # type: ignore[list-item]


def test_every_truncation_is_an_error_except_at_a_section_boundary() -> None:
    blocks, _, encoded, mcid = chunk_bytes(b"0123456789abcdef", 5)
    parts = [encode_header([mcid]), encode_section(mcid, encoded)]
    parts += [encode_section(cid, block) for cid, block in blocks]
    car = b"".join(parts)
    boundaries = {sum(len(p) for p in parts[:n]) for n in range(1, len(parts) + 1)}
    for cut in range(len(car)):
        reader = CarReader()
        reader.feed(car[:cut])
        if cut in boundaries:
            reader.close()
        else:
            with pytest.raises(DecodeError, match=f"ended at byte {cut}"):
                reader.close()


def test_empty_input_is_an_error() -> None:
    with pytest.raises(DecodeError, match="before its header"):
        CarReader().close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_typed_errors(data: bytes) -> None:
    reader = CarReader()
    try:
        reader.feed(data)
        reader.close()
    except (DecodeError, BlockMismatch):
        pass


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_a_flipped_bit_is_always_detected(position: int, bit: int) -> None:
    car, items = _file_car(b"some file content that spans blocks")
    damaged = bytearray(car)
    damaged[position % len(car)] ^= 1 << bit
    try:
        out = _read(bytes(damaged))
    except (DecodeError, BlockMismatch):
        return
    # A flip inside a CBOR header string may still decode; it can never yield other blocks.
    assert [i for i in out if isinstance(i, CarSection)] == items[1:]


def test_section_data_not_matching_its_cid() -> None:
    cid = CID.of_raw(b"hello")
    car = encode_header([cid]) + encode_section(cid, b"hellO")
    reader = CarReader()
    with pytest.raises(BlockMismatch, match=str(cid)) as info:
        reader.feed(car)
    assert "section at byte 59" in info.value.message
    with pytest.raises(InvalidInput):
        reader.feed(b"")


def test_oversized_section_refused_from_its_length_alone() -> None:
    reader = CarReader(max_section=100)
    reader.feed(encode_header([HELLO_CID]))
    with pytest.raises(TooLarge, match="101 bytes"):
        reader.feed(encode_uvarint(101))
    default = CarReader()
    default.feed(encode_header([HELLO_CID]))
    with pytest.raises(TooLarge):
        default.feed(encode_uvarint(DEFAULT_MAX_SECTION + 1))


def test_largest_block_fits_the_default_limit() -> None:
    data = b"\x00" * MAX_BLOCK_SIZE
    cid = CID.of_raw(data)
    assert _read(encode_header([cid]) + encode_section(cid, data))[1] == CarSection(cid, data)


def test_oversized_header() -> None:
    with pytest.raises(TooLarge):
        CarReader().feed(encode_uvarint(MAX_HEADER + 1))


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"\x80" * 9 + b"\x01", "longer than 9 bytes"),
        (b"\x81\x00", "non-minimal varint"),
        (b"\x00", "header at byte 0 is empty"),
    ],
)
def test_bad_header_varint(prefix: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        CarReader().feed(prefix)


def test_non_minimal_section_varint_names_its_position() -> None:
    header = encode_header([HELLO_CID])
    with pytest.raises(DecodeError, match=f"non-minimal varint at byte {len(header)}"):
        CarReader().feed(header + b"\xa9\x80\x00")


@pytest.mark.parametrize(
    "value",
    [
        [HELLO_CID],
        {"roots": [HELLO_CID]},
        {"roots": [HELLO_CID], "version": 2},
        {"version": 2},
        {"roots": [HELLO_CID], "version": 1, "extra": 0},
        {"roots": HELLO_CID, "version": 1},
        {"roots": ["bafk..."], "version": 1},
    ],
)
def test_header_must_be_roots_and_version_1(value: object) -> None:
    with pytest.raises(DecodeError, match="CAR header at byte 0"):
        CarReader().feed(_header_bytes(value))


def test_header_that_is_not_dag_cbor() -> None:
    with pytest.raises(DecodeError, match="CAR header"):
        CarReader().feed(b"\x03\xff\xff\xff")


def test_header_with_a_cidv0_root() -> None:
    v0 = b"\x00" + bytes([0x12, 0x20]) + hashlib.sha256(b"x").digest()
    header = bytes([0xA2, 0x65]) + b"roots" + bytes([0x81, 0xD8, 0x2A, 0x58, len(v0)]) + v0
    header += bytes([0x67]) + b"version" + b"\x01"
    with pytest.raises(DecodeError, match="CAR header"):
        CarReader().feed(encode_uvarint(len(header)) + header)


@pytest.mark.parametrize(
    ("cid_bytes", "reason"),
    [
        (bytes([0x12, 0x20]) + hashlib.sha256(b"hello").digest(), "CIDv0"),
        (bytes([1, 0x55, 0x13, 0x40]) + hashlib.sha512(b"hello").digest(), "not a CIDv1"),
        (bytes([1, 0x70, 0x12, 0x20]) + hashlib.sha256(b"hello").digest(), "not a CIDv1"),
    ],
)
def test_section_with_another_kind_of_cid(cid_bytes: bytes, reason: str) -> None:
    header = encode_header([HELLO_CID])
    section = encode_uvarint(len(cid_bytes) + 5) + cid_bytes + b"hello"
    with pytest.raises(DecodeError, match=f"section at byte {len(header)}.*{reason}"):
        CarReader().feed(header + section)


def test_section_shorter_than_a_cid() -> None:
    with pytest.raises(DecodeError, match="too short"):
        CarReader().feed(encode_header([HELLO_CID]) + encode_uvarint(35) + b"\x01" * 35)


def test_values_validate_themselves() -> None:
    with pytest.raises(BlockMismatch):
        CarSection(HELLO_CID, b"bye")
    with pytest.raises(InvalidInput):
        CarHeader([HELLO_CID])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        CarReader(max_section=0)


def test_uvarint_encoding() -> None:
    assert encode_uvarint(0) == b"\x00"
    assert encode_uvarint(127) == b"\x7f"
    assert encode_uvarint(128) == b"\x80\x01"
    assert encode_uvarint(300) == b"\xac\x02"
    assert len(encode_uvarint(2**63 - 1)) == 9
    with pytest.raises(InvalidInput):
        encode_uvarint(2**63)
    with pytest.raises(InvalidInput):
        encode_uvarint(-1)


# --- interop with independent implementations ---------------------------------------------------


def test_ipld_car_reads_what_we_write() -> None:
    ipld_car = pytest.importorskip("ipld_car", reason="dev extra ipld-car (needs dag-cbor)")
    car, items = _file_car(b"interop with py-ipld-car " * 5)
    roots, blocks = ipld_car.decode(car)
    assert [bytes(root) for root in roots] == [items[1].cid.raw]  # type: ignore[union-attr]
    assert [(bytes(cid), bytes(data)) for cid, data in blocks] == [
        (item.cid.raw, item.data) for item in items[1:] if isinstance(item, CarSection)
    ]


def test_we_read_what_ipld_car_writes() -> None:
    ipld_car = pytest.importorskip("ipld_car", reason="dev extra ipld-car (needs dag-cbor)")
    from multiformats import CID as MfCID
    from multiformats import multihash

    raw = [b"alpha", b"beta" * 100, b""]
    blocks = [(MfCID("base32", 1, "raw", multihash.digest(d, "sha2-256")), d) for d in raw]
    manifest = dagcbor.encode({"note": "a dag-cbor block"})
    mcid = MfCID("base32", 1, "dag-cbor", multihash.digest(manifest, "sha2-256"))
    car = bytes(ipld_car.encode([mcid], [(mcid, manifest), *blocks]))
    ours = CID(bytes(mcid))
    assert _read(car, step=3) == [
        CarHeader((ours,)),
        CarSection(ours, manifest),
        *(CarSection(CID.of_raw(d), d) for d in raw),
    ]


def test_libipld_reads_what_we_write() -> None:
    # libipld (Rust) reads only dag-cbor blocks; a CAR of manifests exercises header and framing.
    libipld = pytest.importorskip("libipld", reason="dev extra libipld")
    manifests = [chunk_bytes(bytes([i]) * 40, 16) for i in range(3)]
    car = encode_header([m[3] for m in manifests])
    car += b"".join(encode_section(m[3], m[2]) for m in manifests)
    header, blocks = libipld.decode_car(car)
    assert header == {"version": 1, "roots": [m[3].raw for m in manifests]}
    assert list(blocks) == [m[3].raw for m in manifests]
    assert [libipld.encode_dag_cbor(v) for v in blocks.values()] == [m[2] for m in manifests]
