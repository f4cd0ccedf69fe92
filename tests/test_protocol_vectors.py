"""docs/PROTOCOL.md against the code: the test vectors, the constants and the signing domain.

Every vector is parsed out of the document and checked twice: with Ostrom's own decoder and
signer, and with independent implementations (PyNaCl for ed25519, py-cid and py-multihash for
CIDs, plain cbor2 for the encoding, libp2p for peer ids), so that the document is a
specification a second implementation can rely on, not a mirror of one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import cbor2
import cid as pycid
import multihash
import nacl.signing
import pytest

from ostrom.crypto import cid as cid_module
from ostrom.crypto import keys, signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity, public_key_of_peer_id, read_key_file, write_key_file
from ostrom.errors import InvalidRecord
from ostrom.protocol import (
    blockwire,
    car,
    catalogue,
    changesets,
    chunking,
    dagcbor,
    fields,
    frames,
    meshes,
    paths,
    reconcile,
    records,
)
from ostrom.protocol.acceptance import evaluate
from ostrom.protocol.car import CarHeader, CarReader, CarSection
from ostrom.protocol.changesets import Changeset, FileManifest
from ostrom.protocol.records import decode_record, signing_payload
from ostrom.protocol.tree import replay
from tests import make_vectors

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
BEGIN, END = "<!-- vectors:begin -->", "<!-- vectors:end -->"
_FENCE = re.compile(r"^```([\w-]+)\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _parse_vectors(text: str) -> dict[str, dict[str, Any]]:
    """Each `vector` block as a dict of its lines; a following `dag-json` block as `dag_json`."""
    out: dict[str, dict[str, Any]] = {}
    last: dict[str, Any] | None = None
    for match in _FENCE.finditer(text):
        info, body = match.group(1), match.group(2)
        if info == "vector":
            fields: dict[str, Any] = {}
            for line in body.splitlines():
                key, sep, value = line.partition(": ")
                assert sep, f"vector line without `key: value`: {line!r}"
                assert key not in fields, f"key {key!r} twice in a vector"
                fields[key] = value
            assert fields["name"] not in out, f"vector {fields['name']} twice"
            out[fields["name"]] = fields
            last = fields
        elif info == "dag-json":
            assert last is not None and "dag_json" not in last, "a dag-json block follows a vector"
            last["dag_json"] = json.loads(body)
    return out


VECTORS = _parse_vectors(_doc())
_BY_KIND: dict[str, list[str]] = {}
for _name, _vector in VECTORS.items():
    _BY_KIND.setdefault(_vector["kind"], []).append(_name)


def _independent_cid(data: bytes, codec: str) -> str:
    """The base32 CIDv1 text of `data`, computed by py-multihash and py-cid alone."""
    digest = multihash.digest(data, "sha2-256").encode()
    text: bytes = pycid.make_cid(1, codec, digest).encode("base32")
    return text.decode("ascii")


def _plain_to_dag_json(value: Any) -> Any:
    """DAG-JSON form of what plain cbor2 decodes, links resolved by py-cid, not by Ostrom."""
    if isinstance(value, cbor2.CBORTag):
        assert value.tag == 42 and value.value[:1] == b"\x00"
        text: bytes = pycid.make_cid(value.value[1:]).encode("base32")
        return {"/": text.decode("ascii")}
    if isinstance(value, bytes):
        return {"/": {"bytes": base64.b64encode(value).decode("ascii").rstrip("=")}}
    if isinstance(value, list):
        return [_plain_to_dag_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_to_dag_json(item) for key, item in value.items()}
    return value


# --- the document as a whole --------------------------------------------------------------------


def test_document_vectors_are_the_generator_output() -> None:
    """The vectors in the document are exactly what the code produces today."""
    text = _doc()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    expected = make_vectors.render(make_vectors.build())
    assert block.strip() == expected.strip(), (
        "docs/PROTOCOL.md vectors are stale: run `.venv/bin/python tests/make_vectors.py` and "
        "paste its output between the vectors markers (or fix the code that changed)"
    )


def test_every_record_type_and_block_kind_has_a_vector() -> None:
    types = {VECTORS[name]["type"] for name in _BY_KIND["record"]}
    assert types == set(records.BODY_TYPES)
    assert {"identity", "raw-block", "dag-cbor-block", "record", "car"} == set(_BY_KIND)
    fork = decode_record(bytes.fromhex(VECTORS["fork-genesis"]["record"]))
    assert isinstance(fork.body, records.Project) and fork.body.fork_of is not None


def test_the_signing_domain_is_as_documented() -> None:
    documented = bytes.fromhex("6f7374726f6d2f7265636f72642f763100")
    assert documented == b"ostrom/record/v1\x00"
    assert documented == signing.RECORD_DOMAIN
    assert _doc().count(documented.hex()) >= 2  # in section 4.6 and in section 12
    mesh_domain = bytes.fromhex("6f7374726f6d2f6d6573682f763100")
    assert mesh_domain == meshes.MESH_DOMAIN == b"ostrom/mesh/v1\x00"
    assert mesh_domain.hex() in _doc()  # section 13
    catalogue_domain = bytes.fromhex("6f7374726f6d2f636174616c6f6775652f763100")
    assert catalogue_domain == catalogue.CATALOGUE_DOMAIN == b"ostrom/catalogue/v1\x00"
    assert catalogue_domain.hex() in _doc()  # section 13.5


_CONSTANT_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \| (\d+) \|", re.MULTILINE)
_CONSTANT_MODULES = (
    records,
    changesets,
    chunking,
    paths,
    dagcbor,
    car,
    cid_module,
    keys,
    reconcile,
    frames,
    blockwire,
    meshes,
    catalogue,
    fields,
)


def test_documented_constants_match_the_code() -> None:
    rows = _CONSTANT_ROW.findall(_doc())
    assert len(rows) >= 25
    for name, value in rows:
        found = [getattr(m, name) for m in _CONSTANT_MODULES if hasattr(m, name)]
        assert found, f"{name} is documented but defined in no protocol module"
        assert all(v == int(value) for v in found), f"{name}: doc says {value}, code {found}"


# --- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _BY_KIND["identity"])
def test_identity_vector(name: str, tmp_path: Path) -> None:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    vector = VECTORS[name]
    seed = bytes.fromhex(vector["seed"])
    public_key = bytes.fromhex(vector["public-key"])
    identity = Identity.from_seed(seed)
    assert identity.public_key == public_key
    assert bytes(nacl.signing.SigningKey(seed).verify_key) == public_key
    assert identity.peer_id == vector["peer-id"]
    assert ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58() == vector["peer-id"]
    assert public_key_of_peer_id(vector["peer-id"]) == public_key

    written = tmp_path / "written.key"
    write_key_file(written, identity)
    assert written.read_text(encoding="ascii") == vector["key-file"] + "\n"
    given = tmp_path / "given.key"
    given.write_text(vector["key-file"] + "\n", encoding="ascii")
    assert read_key_file(given).seed == seed


# --- blocks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _BY_KIND["raw-block"])
def test_raw_block_vector(name: str) -> None:
    vector = VECTORS[name]
    data = bytes.fromhex(vector["data"])
    assert str(CID.of_raw(data)) == vector["cid"]
    assert _independent_cid(data, "raw") == vector["cid"]
    assert CID.parse(vector["cid"]).matches(data)


@pytest.mark.parametrize("name", _BY_KIND["dag-cbor-block"])
def test_dag_cbor_block_vector(name: str) -> None:
    vector = VECTORS[name]
    data = bytes.fromhex(vector["data"])
    assert str(CID.of_dag_cbor(data)) == vector["cid"]
    assert _independent_cid(data, "dag-cbor") == vector["cid"]
    value = dagcbor.decode(data)
    block: Changeset | FileManifest = (
        Changeset.decode(data) if set(value) == {"changes"} else FileManifest.decode(data)
    )
    assert block.encode() == data
    plain = cbor2.loads(data)
    assert _plain_to_dag_json(plain) == vector["dag_json"]
    assert cbor2.dumps(plain, canonical=True) == data


# --- records ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _BY_KIND["record"])
def test_record_vector(name: str) -> None:
    vector = VECTORS[name]
    data = bytes.fromhex(vector["record"])
    payload = bytes.fromhex(vector["payload"])
    sig = bytes.fromhex(vector["sig"])
    seed = bytes.fromhex(vector["seed"])

    record = decode_record(data)  # decodes strictly and verifies the signature
    assert record.type == vector["type"]
    assert str(record.cid) == vector["cid"]
    assert _independent_cid(data, "dag-cbor") == vector["cid"]
    assert record.sig == sig
    assert signing_payload(record.body) == payload

    # The signature, checked and made again by PyNaCl over the documented domain + payload.
    message = bytes.fromhex("6f7374726f6d2f7265636f72642f763100") + payload
    nacl.signing.VerifyKey(record.author).verify(message, sig)
    signing_key = nacl.signing.SigningKey(seed)
    assert bytes(signing_key.verify_key) == record.author
    assert signing_key.sign(message).signature == sig

    # Signing the decoded body again with the seed gives the same bytes (ed25519 is
    # deterministic), hence the same record id.
    again = records.sign(record.body, Identity.from_seed(seed))
    assert (again.data, again.sig, again.cid) == (data, sig, record.cid)

    # Plain CBOR: the fields are the documented ones, and the payload is the canonical
    # encoding of the same map without `sig`.
    plain = cbor2.loads(data)
    assert _plain_to_dag_json(plain) == vector["dag_json"]
    assert plain["sig"] == sig and plain["type"] == vector["type"] and plain["v"] == 1
    without_sig = {key: value for key, value in plain.items() if key != "sig"}
    assert cbor2.dumps(without_sig, canonical=True) == payload
    assert cbor2.dumps(plain, canonical=True) == data


def test_a_changed_byte_breaks_a_record_vector() -> None:
    """The checks above are sensitive: one flipped bit in the signed text fails verification."""
    data = bytearray.fromhex(VECTORS["contribution"]["record"])
    message = b"Add docs/hello.txt"
    at = bytes(data).index(message)
    data[at] ^= 0x20  # "Add" -> "add": still valid UTF-8 and canonical
    with pytest.raises(InvalidRecord):
        decode_record(bytes(data))


def test_an_independent_dag_cbor_codec_round_trips_every_vector() -> None:
    dag_cbor = pytest.importorskip("dag_cbor")
    blobs = [VECTORS[n]["record"] for n in _BY_KIND["record"]]
    blobs += [VECTORS[n]["data"] for n in _BY_KIND["dag-cbor-block"]]
    for blob in blobs:
        data = bytes.fromhex(blob)
        assert dag_cbor.encode(dag_cbor.decode(data)) == data


# --- the CAR ------------------------------------------------------------------------------------


def _vector_bytes(name: str) -> bytes:
    vector = VECTORS[name]
    return bytes.fromhex(vector["record"] if vector["kind"] == "record" else vector["data"])


@pytest.mark.parametrize("name", _BY_KIND["car"])
def test_car_vector(name: str) -> None:
    vector = VECTORS[name]
    data = bytes.fromhex(vector["car"])
    reader = CarReader()
    items = reader.feed(data)
    reader.close()
    header, sections = items[0], items[1:]
    assert isinstance(header, CarHeader)
    assert [str(root) for root in header.roots] == [
        VECTORS[root]["cid"] for root in vector["roots"].split()
    ]
    names = vector["sections"].split()
    assert all(isinstance(s, CarSection) for s in sections)
    assert [(str(s.cid), s.data) for s in sections if isinstance(s, CarSection)] == [
        (VECTORS[n]["cid"], _vector_bytes(n)) for n in names
    ]

    # The documented order: records (geneses first, then by ts and CID bytes), then blocks.
    decoded = [decode_record(_vector_bytes(n)) for n in names if VECTORS[n]["kind"] == "record"]
    assert decoded == sorted(decoded, key=lambda r: (r.type != "project", r.ts, r.cid.raw))
    assert all(VECTORS[n]["kind"] != "record" for n in names[len(decoded) :])

    # The header, independently: a varint length, then canonical DAG-CBOR roots and version.
    header_length = data[0]
    assert header_length < 0x80
    plain = cbor2.loads(data[1 : 1 + header_length])
    assert list(plain) == ["roots", "version"] and plain["version"] == 1


# --- the worked examples of sections 7.4 and 8 --------------------------------------------------


def _records(*names: str) -> dict[str, records.SignedRecord]:
    return {name: decode_record(_vector_bytes(name)) for name in names}


def test_acceptance_example_of_section_7() -> None:
    r = _records(
        "genesis", "need", "contribution", "validation", "governance", "comment", "fork-genesis"
    )
    a = bytes.fromhex(VECTORS["identity-a"]["public-key"])
    b = bytes.fromhex(VECTORS["identity-b"]["public-key"])
    state = evaluate(r["genesis"], r.values())
    assert state.statuses[r["contribution"].cid].status == "accepted"
    assert state.statuses[r["governance"].cid].status == "accepted"
    assert state.statuses[r["governance"].cid].votes[0].validation is None  # A's implicit accept
    assert set(state.policy.maintainers) == {a, b} and state.policy.quorum == 1
    assert state.accepted_heads == (r["governance"].cid,)

    fork = evaluate(r["fork-genesis"], r.values())
    assert fork.accepted_heads == (r["fork-genesis"].cid,)
    inherited = {r[n].cid for n in ("genesis", "contribution", "governance")}
    assert inherited < fork.accepted
    assert fork.policy.maintainers == (b,)


def test_tree_example_of_section_8() -> None:
    r = _records("genesis", "contribution", "governance")
    by_cid = {record.cid: record for record in r.values()}
    changeset = CID.parse(VECTORS["changeset"]["cid"])

    def changesets(link: CID) -> Changeset:
        assert link == changeset
        return Changeset.decode(_vector_bytes("changeset"))

    tree = replay([r["governance"].cid], by_cid, changesets)
    assert tree.conflicts == ()
    assert list(tree.files) == ["docs/hello.txt"]
    entry = tree.files["docs/hello.txt"]
    assert str(entry.file) == VECTORS["manifest"]["cid"]
    assert (entry.size, entry.exec, entry.record) == (15, False, r["contribution"].cid)


# --- known gaps between the specification and the implementation --------------------------------


def _signed(value: dict[str, Any]) -> bytes:
    """`value` signed by identity A as a record, whatever its fields (bypassing the checks)."""
    identity = Identity.from_seed(make_vectors.SEED_A)
    value = {**value, "author": identity.public_key}
    sig = signing.sign(identity, signing.RECORD_DOMAIN, dagcbor.encode(value))
    return dagcbor.encode({**value, "sig": sig})


_GENESIS = CID.of_dag_cbor(b"genesis")
_NEED = {"type": "need", "v": 1, "ts": 1, "project": _GENESIS, "title": "t", "body": ""}
_SET_QUORUM = {
    "type": "governance",
    "v": 1,
    "ts": 1,
    "project": _GENESIS,
    "parents": [_GENESIS],
    "action": "set-quorum",
    "quorum": 2,
    "note": "",
}


def test_version_true_is_refused() -> None:
    with pytest.raises(InvalidRecord):
        decode_record(_signed({**_NEED, "v": True}))


def test_null_optional_field_is_refused() -> None:
    with pytest.raises(InvalidRecord):
        decode_record(_signed({**_SET_QUORUM, "key": None}))


def test_absent_optional_field_is_accepted() -> None:
    """The counterpart of the gap above: the same record without `key` is valid."""
    record = decode_record(_signed(_SET_QUORUM))
    assert isinstance(record.body, records.Governance) and record.body.key is None


def test_manifest_size_true_is_refused() -> None:
    """A manifest's `size` is an integer; `true` must not pass for 1 (section 5.2)."""
    raw = CID.of_raw(b"x")
    data = dagcbor.encode({"size": True, "blocks": [{"cid": raw, "size": 1}]})
    with pytest.raises(InvalidRecord):
        FileManifest.decode(data)


def test_vectors_use_fixed_inputs() -> None:
    """The generator's inputs are the documented ones: seeds 0..31 and 32..63."""
    assert bytes(range(32)) == make_vectors.SEED_A
    assert bytes(range(32, 64)) == make_vectors.SEED_B
    assert VECTORS["identity-a"]["seed"] == bytes(range(32)).hex()
    assert VECTORS["raw-block"]["data"] == b"hello, commons\n".hex()
    assert (
        hashlib.sha256(b"hello, commons\n").digest()
        == CID.parse(VECTORS["raw-block"]["cid"]).digest
    )
