"""Mesh descriptions, membership records and invites (ostrom/protocol/meshes.py)."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.errors import BadSignature, DecodeError, InvalidRecord, TooLarge
from ostrom.protocol import dagcbor
from ostrom.protocol.meshes import (
    INVITE_PREFIX,
    MAX_BOOTSTRAP,
    MESH_DOMAIN,
    Membership,
    MeshDescription,
    SignedMeshRecord,
    check_membership,
    decode_invite,
    decode_mesh_record,
    encode_invite,
    members,
    sign_mesh_record,
)
from tests.dagfactory import identity

STEWARD, OTHER_STEWARD, ALICE, BOB = (identity(n) for n in ("steward", "other", "alice", "bob"))
TS = 1_700_000_000_000
ADDR = f"/ip4/192.0.2.7/tcp/4001/p2p/{STEWARD.peer_id}"


def description(access: str = "private", **changes: object) -> SignedMeshRecord:
    stewards = tuple(sorted((STEWARD.public_key, OTHER_STEWARD.public_key)))
    body = MeshDescription(
        author=STEWARD.public_key,
        ts=TS,
        name="Riverside makers",
        access=access,  # type: ignore[arg-type]
        stewards=stewards,
        bootstrap=(ADDR,),
        description="Open hardware for the\nneighbourhood.",
    )
    return sign_mesh_record(replace(body, **changes), STEWARD)  # type: ignore[arg-type]


def membership(
    mesh: SignedMeshRecord, action: str, member: bytes, ts: int, by: object = STEWARD
) -> SignedMeshRecord:
    body = Membership(
        author=by.public_key,  # type: ignore[attr-defined]
        ts=ts,
        mesh=mesh.cid,
        action=action,  # type: ignore[arg-type]
        member=member,
    )
    return sign_mesh_record(body, by)  # type: ignore[arg-type]


def test_records_round_trip_through_their_bytes() -> None:
    mesh = description()
    admit = membership(mesh, "admit", ALICE.public_key, TS + 1)
    for record in (mesh, admit):
        again = decode_mesh_record(record.data)
        assert again == record and again.cid == CID.of_dag_cbor(record.data)
    assert admit.mesh == mesh.cid == mesh.mesh


def test_a_forged_or_altered_record_is_refused() -> None:
    mesh = description()
    value = dagcbor.decode(mesh.data)
    assert isinstance(value, dict)
    value["name"] = "Someone else's mesh"
    with pytest.raises(BadSignature):
        decode_mesh_record(dagcbor.encode(value))


def test_a_signature_from_the_record_domain_does_not_make_a_mesh_record() -> None:
    mesh = description()
    value = dagcbor.decode(mesh.data)
    assert isinstance(value, dict)
    del value["sig"]
    value["sig"] = signing.sign(STEWARD, signing.RECORD_DOMAIN, dagcbor.encode(value))
    with pytest.raises(BadSignature):
        decode_mesh_record(dagcbor.encode(value))
    assert MESH_DOMAIN != signing.RECORD_DOMAIN


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": " padded"}, "name"),
        ({"name": ""}, "name"),
        ({"access": "secret"}, "access"),
        ({"stewards": ()}, "stewards"),
        ({"stewards": (ALICE.public_key,)}, "author of a mesh"),
        ({"bootstrap": ("/ip4/192.0.2.7/tcp/4001",)}, "/p2p/"),
        ({"bootstrap": ("../../etc/passwd",)}, "/p2p/"),
        ({"bootstrap": (ADDR, ADDR)}, "twice"),
        ({"bootstrap": (ADDR,) * (MAX_BOOTSTRAP + 1)}, "at most"),
        ({"description": "bell\x07"}, "control"),
        ({"ts": -1}, "ts"),
    ],
)
def test_a_bad_description_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRecord, match=message):
        description(**changes)


def test_unknown_or_missing_fields_are_refused() -> None:
    mesh = description()
    value = dagcbor.decode(mesh.data)
    assert isinstance(value, dict)
    for change in ({"extra": 1}, {"bootstrap": None}):
        broken = {k: v for k, v in {**value, **change}.items() if v is not None}
        with pytest.raises(InvalidRecord, match="fields"):
            decode_mesh_record(dagcbor.encode(broken))
    with pytest.raises(TooLarge):
        decode_mesh_record(b"\xa0" * 9000)
    with pytest.raises(InvalidRecord, match="not a mesh record type"):
        decode_mesh_record(dagcbor.encode({"type": "project"}))


def test_latest_membership_record_decides_and_stewards_are_always_members() -> None:
    mesh = description()
    records = [
        membership(mesh, "admit", ALICE.public_key, TS + 1),
        membership(mesh, "admit", BOB.public_key, TS + 2, by=OTHER_STEWARD),
        membership(mesh, "revoke", ALICE.public_key, TS + 3, by=OTHER_STEWARD),
    ]
    state = members(mesh, records)
    assert not state.admits(ALICE.public_key)
    assert state.admits(BOB.public_key)
    assert state.admits(STEWARD.public_key) and state.admits(OTHER_STEWARD.public_key)
    # Order of arrival does not matter, only (ts, cid).
    assert members(mesh, reversed(records)) == state
    readmitted = members(mesh, [*records, membership(mesh, "admit", ALICE.public_key, TS + 4)])
    assert readmitted.admits(ALICE.public_key)


def test_membership_records_that_no_steward_could_sign_are_ignored() -> None:
    mesh = description()
    by_member = membership(mesh, "admit", BOB.public_key, TS + 1, by=ALICE)
    against_steward = membership(mesh, "revoke", OTHER_STEWARD.public_key, TS + 1)
    other_mesh = description(name="Another mesh")
    elsewhere = membership(other_mesh, "admit", BOB.public_key, TS + 1)
    for record, reason in (
        (by_member, "only a steward"),
        (against_steward, "a steward is a member"),
        (elsewhere, "another mesh"),
    ):
        with pytest.raises(InvalidRecord, match=reason):
            check_membership(mesh, record)
    state = members(mesh, [by_member, against_steward, elsewhere])
    assert not state.admits(BOB.public_key) and state.admits(OTHER_STEWARD.public_key)


def test_an_open_mesh_admits_anyone_and_takes_no_membership_records() -> None:
    mesh = description(access="open")
    assert members(mesh, []).admits(BOB.public_key)
    with pytest.raises(InvalidRecord, match="open"):
        check_membership(mesh, membership(mesh, "revoke", BOB.public_key, TS + 1))


def test_an_invite_carries_the_verified_description() -> None:
    mesh = description()
    invite = encode_invite(mesh)
    assert invite.startswith(INVITE_PREFIX) and invite == invite.strip()
    assert decode_invite(invite) == mesh
    assert decode_invite(f"  {invite.upper().replace('OSTROM-MESH1:', INVITE_PREFIX)}\n") == mesh


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ostrom-mesh1:",
        "ostrom-mesh1:!!!!",
        "https://example.org/invite",
        "ostrom-mesh1:" + "a" * 20_000,
    ],
)
def test_a_malformed_invite_is_a_decode_error(text: str) -> None:
    with pytest.raises((DecodeError, InvalidRecord)):
        decode_invite(text)


def test_an_invite_of_a_membership_record_is_refused() -> None:
    mesh = description()
    admit = membership(mesh, "admit", ALICE.public_key, TS + 1)
    with pytest.raises(InvalidRecord):
        encode_invite(admit)
    smuggled = INVITE_PREFIX + base64.b32encode(admit.data).decode().rstrip("=").lower()
    with pytest.raises(DecodeError, match="does not carry a mesh description"):
        decode_invite(smuggled)


@settings(max_examples=50, deadline=None)
@given(
    name=st.text(min_size=1, max_size=40).map(str.strip).filter(bool),
    note=st.text(max_size=200),
    ts=st.integers(min_value=0, max_value=2**40),
)
def test_any_valid_record_round_trips(name: str, note: str, ts: int) -> None:
    try:
        mesh = description(name=name, ts=ts)
        admit = sign_mesh_record(
            Membership(STEWARD.public_key, ts, mesh.cid, "admit", ALICE.public_key, note), STEWARD
        )
    except InvalidRecord:
        return  # names and notes with control characters are refused, as tested above
    assert decode_mesh_record(mesh.data) == mesh
    assert decode_mesh_record(admit.data) == admit
    assert decode_invite(encode_invite(mesh)) == mesh
