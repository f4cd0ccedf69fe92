"""Mesh catalogues (ostrom/protocol/catalogue.py): the signed record, and the book of other
nodes' catalogues with its rules (latest wins, members only, age, rate and size bounds)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.errors import BadSignature, DecodeError, InvalidRecord, TooLarge
from ostrom.protocol import catalogue as cat
from ostrom.protocol import dagcbor
from ostrom.protocol.catalogue import (
    CATALOGUE_DOMAIN,
    CATALOGUE_FUTURE_MS,
    CATALOGUE_MIN_INTERVAL_MS,
    CATALOGUE_TTL_MS,
    MAX_CATALOGUE_ADDRS,
    MAX_CATALOGUE_ENTRIES,
    MAX_CATALOGUE_SIZE,
    Catalogue,
    CatalogueBook,
    CatalogueEntry,
    SignedCatalogue,
    announceable_addrs,
    decode_catalogue,
    fit_entries,
    is_catalogue,
    sign_catalogue,
)
from ostrom.protocol.envelope import unsigned_bytes
from ostrom.protocol.meshes import (
    MAX_ADDRESS_LENGTH,
    MESH_DOMAIN,
    MeshDescription,
    sign_mesh_record,
)
from tests.dagfactory import identity

ALICE, BOB, CAROL = identity("alice"), identity("bob"), identity("carol")
NOW = 1_700_000_000_000
MESH = CID.of_dag_cbor(dagcbor.encode({"mesh": "riverside"}))
OTHER_MESH = CID.of_dag_cbor(dagcbor.encode({"mesh": "workshop"}))


def project(n: int) -> CID:
    return CID.of_dag_cbor(dagcbor.encode({"project": n}))


def entries(*names: str) -> tuple[CatalogueEntry, ...]:
    return fit_entries(CatalogueEntry(project(i), name) for i, name in enumerate(names))


HOME = ("/ip4/192.0.2.7/tcp/4001", "/ip6/2001:db8::7/tcp/4001")


def signed(
    who: object = ALICE,
    ts: int = NOW,
    mesh: CID = MESH,
    names: tuple[str, ...] = ("benches",),
    addrs: tuple[str, ...] = HOME,
) -> SignedCatalogue:
    body = Catalogue(who.public_key, ts, mesh, entries(*names), addrs)  # type: ignore[attr-defined]
    return sign_catalogue(body, who)  # type: ignore[arg-type]


def everyone(key: bytes) -> bool:
    return True


# --- the record --------------------------------------------------------------------------------


def test_a_catalogue_round_trips_through_its_bytes() -> None:
    record = signed(names=("benches", "looms", "jigs"))
    again = decode_catalogue(record.data)
    assert again == record and again.cid == CID.of_dag_cbor(record.data)
    assert [e.name for e in again.body.projects] == [
        e.name for e in sorted(again.body.projects, key=lambda e: e.project)
    ]
    assert is_catalogue(record.data) and not is_catalogue(b"\xff") and not is_catalogue(b"")
    assert again.body.addrs == HOME  # in the signer's order
    empty = signed(names=(), addrs=())
    assert decode_catalogue(empty.data).body.projects == ()
    assert decode_catalogue(empty.data).body.addrs == ()


def test_a_forged_or_altered_catalogue_is_refused() -> None:
    value = dagcbor.decode(signed().data)
    assert isinstance(value, dict)
    value["projects"] = [{"project": project(99), "name": "not hosted"}]
    with pytest.raises(BadSignature):
        decode_catalogue(dagcbor.encode(value))


def test_a_signature_from_another_domain_does_not_verify() -> None:
    """A catalogue signed as a mesh record (same key, same map) is no catalogue."""
    record = signed()
    value = dagcbor.decode(record.data)
    assert isinstance(value, dict)
    del value["sig"]
    value["sig"] = signing.sign(ALICE, MESH_DOMAIN, dagcbor.encode(value))
    with pytest.raises(BadSignature):
        decode_catalogue(dagcbor.encode(value))
    assert CATALOGUE_DOMAIN == b"ostrom/catalogue/v1\x00" != MESH_DOMAIN
    # And a mesh record is not taken for a catalogue.
    mesh = sign_mesh_record(
        MeshDescription(ALICE.public_key, NOW, "riverside", "open", (ALICE.public_key,)), ALICE
    )
    assert not is_catalogue(mesh.data)
    with pytest.raises(InvalidRecord, match="not a catalogue"):
        decode_catalogue(mesh.data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.pop("mesh"), "missing fields mesh"),
        (lambda v: v.update(extra=1), "unknown fields extra"),
        (lambda v: v.update(v=2), "unsupported version"),
        (lambda v: v.update(v=True), "unsupported version"),
        (lambda v: v.update(projects="benches"), "projects must be a list"),
        (lambda v: v.update(projects=[{"project": project(1)}]), "exactly project and name"),
        (lambda v: v.update(projects=[{"project": project(1), "name": 7}]), "name"),
        (lambda v: v.update(projects=[{"project": project(1), "name": " x"}]), "name"),
        (lambda v: v.update(projects=[{"project": b"x", "name": "x"}]), "project"),
        (lambda v: v.update(projects=[{"project": CID.of_raw(b"x"), "name": "x"}]), "dag-cbor"),
        (lambda v: v.pop("addrs"), "missing fields addrs"),
        (lambda v: v.update(addrs="/ip4/192.0.2.7/tcp/4001"), "addrs must list"),
        (lambda v: v.update(addrs=[HOME[0]] * 2), "listed twice"),
        (lambda v: v.update(addrs=[7]), "not a multiaddr"),
        (lambda v: v.update(addrs=["192.0.2.7:4001"]), "not a multiaddr"),
        (lambda v: v.update(addrs=[HOME[0] + "/p2p/" + ALICE.peer_id]), "without a /p2p/"),
        (lambda v: v.update(addrs=["/dns4/" + "h" * 250 + "/tcp/1"]), "not a multiaddr"),
        (
            lambda v: v.update(addrs=[f"/ip4/192.0.2.{i}/tcp/1" for i in range(9)]),
            f"at most {MAX_CATALOGUE_ADDRS}",
        ),
        (lambda v: v.update(mesh="riverside"), "mesh"),
        (lambda v: v.update(ts=-1), "ts"),
        (lambda v: v.update(sig=b"short"), "64-byte"),
        (
            lambda v: v.update(
                projects=[
                    {"project": project(1), "name": "x"},
                    {"project": project(1), "name": "y"},
                ]
            ),
            "each listed once",
        ),
    ],
)
def test_a_malformed_catalogue_is_refused_with_the_reason(change: object, message: str) -> None:
    value = dagcbor.decode(signed(names=("benches", "looms")).data)
    assert isinstance(value, dict)
    change(value)  # type: ignore[operator]
    with pytest.raises(InvalidRecord, match=message):
        decode_catalogue(dagcbor.encode(value))


def test_the_signed_bytes_are_cut_out_of_the_record_exactly_as_encoded_again() -> None:
    """Verification cuts the `sig` entry out of the bytes instead of encoding the map again;
    both give the same payload, for catalogues and mesh records of every shape."""
    mesh = sign_mesh_record(
        MeshDescription(ALICE.public_key, NOW, "riverside", "open", (ALICE.public_key,)), ALICE
    )
    records = [signed(names=()), signed(addrs=()), signed(ts=2**40, names=("a", "b")), mesh]
    for record in records:
        value = dagcbor.decode(record.data)
        assert isinstance(value, dict)
        del value["sig"]
        assert unsigned_bytes(record.data, value) == dagcbor.encode(value)
    # Bytes that do not hold the signature where the map says it is are refused.
    value = dagcbor.decode(records[0].data)
    assert isinstance(value, dict)
    del value["sig"]
    with pytest.raises(InvalidRecord, match="canonical"):
        unsigned_bytes(signed(ts=5).data, value)  # its `ts` is 8 bytes shorter


def test_unsorted_or_too_many_entries_cannot_be_built() -> None:
    two = entries("a", "b")
    with pytest.raises(InvalidRecord, match="sorted"):
        Catalogue(ALICE.public_key, NOW, MESH, tuple(reversed(two)))
    many = tuple(
        sorted(
            (CatalogueEntry(project(i), "p") for i in range(MAX_CATALOGUE_ENTRIES + 1)),
            key=lambda e: e.project,
        )
    )
    with pytest.raises(InvalidRecord, match="at most"):
        Catalogue(ALICE.public_key, NOW, MESH, many)
    with pytest.raises(InvalidRecord, match="author"):
        sign_catalogue(Catalogue(ALICE.public_key, NOW, MESH, two), BOB)


def test_an_oversized_catalogue_is_refused_before_decoding() -> None:
    with pytest.raises(TooLarge):
        decode_catalogue(b"\xa0" * (MAX_CATALOGUE_SIZE + 1))


def test_fit_entries_keeps_the_first_given_within_the_count_and_size_bounds() -> None:
    given_order = [CatalogueEntry(project(i), f"project {i}") for i in range(400)]
    kept = fit_entries(given_order)
    assert len(kept) == MAX_CATALOGUE_ENTRIES
    assert {e.project for e in kept} == {e.project for e in given_order[:MAX_CATALOGUE_ENTRIES]}
    assert list(kept) == sorted(kept, key=lambda e: e.project)
    # Long names of four-byte characters: cut by size, and what is kept still signs.
    wide = [CatalogueEntry(project(i), "\U0001d505" * 100) for i in range(MAX_CATALOGUE_ENTRIES)]
    cut = fit_entries(wide)
    assert 0 < len(cut) < MAX_CATALOGUE_ENTRIES
    # However long the addresses the signer gives, the cut list and they fit together.
    longest = tuple(
        f"/dns4/{i}{'h' * (MAX_ADDRESS_LENGTH - 16)}/tcp/4001" for i in range(MAX_CATALOGUE_ADDRS)
    )
    assert all(len(a) == MAX_ADDRESS_LENGTH for a in longest)
    record = sign_catalogue(Catalogue(ALICE.public_key, NOW, MESH, cut, longest), ALICE)
    assert len(record.data) <= MAX_CATALOGUE_SIZE
    assert fit_entries([given_order[0], replace(given_order[0], name="again")]) == (given_order[0],)


def test_a_node_announces_only_the_addresses_others_can_dial() -> None:
    me = f"/p2p/{ALICE.peer_id}"
    given = [
        "/ip4/127.0.0.1/tcp/4001" + me,  # loopback: kept, but tried last
        "/ip4/0.0.0.0/tcp/4001" + me,  # a wildcard names no machine
        "/ip6/::/tcp/4001",
        "/ip4/192.0.2.7/tcp/0",  # port 0 is no port
        "/ip4/192.0.2.7/tcp/4001" + me,
        "/ip4/192.0.2.7/tcp/4001",  # the same without the suffix
        "/ip4/169.254.1.1/tcp/4001",  # link-local: needs the interface's name
        "/ip6/fe80::1/tcp/4001",
        "/ip4/224.0.0.1/tcp/4001",  # multicast
        "/ip4/192.0.2.7/udp/4001/quic-v1",  # not a transport this node dials
        "/ip4/not-an-ip/tcp/4001",
        "/ip6/192.0.2.7/tcp/4001",  # an IPv4 address under ip6
        "/dns4/node.example.org/tcp/4001",
        "/ip6/2001:db8::7/tcp/4001",
    ]
    assert announceable_addrs(given) == (
        "/ip4/192.0.2.7/tcp/4001",
        "/dns4/node.example.org/tcp/4001",
        "/ip6/2001:db8::7/tcp/4001",
        "/ip4/127.0.0.1/tcp/4001",
    )
    many = [f"/ip4/192.0.2.{i}/tcp/4001" for i in range(1, 20)]
    assert announceable_addrs(many) == tuple(many[:MAX_CATALOGUE_ADDRS])
    # What it keeps, a catalogue takes.
    Catalogue(ALICE.public_key, NOW, MESH, (), announceable_addrs(given + many))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_get_a_typed_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError, InvalidRecord):
        decode_catalogue(data)


# --- the book ----------------------------------------------------------------------------------


def test_the_latest_catalogue_of_each_author_replaces_the_older() -> None:
    book = CatalogueBook()
    first = signed(ts=NOW - 5000, names=("benches", "looms"))
    later = signed(ts=NOW, names=("looms",))
    assert book.offer(first, NOW, everyone)
    assert book.offer(later, NOW, everyone)
    assert not book.offer(first, NOW, everyone)  # an older one arriving late changes nothing
    assert book.of_mesh(MESH) == [later]
    assert [h.name for h in book.hosts(MESH)[project(0)]] == ["looms"]
    assert project(1) not in book.hosts(MESH)
    assert book.total_bytes == len(later.data)


def test_a_catalogue_too_old_too_new_too_soon_or_from_a_non_member_is_refused() -> None:
    book = CatalogueBook()
    assert not book.offer(signed(ts=NOW - CATALOGUE_TTL_MS), NOW, everyone)
    assert not book.offer(signed(ts=NOW + CATALOGUE_FUTURE_MS + 1), NOW, everyone)
    assert not book.offer(signed(), NOW, lambda key: key != ALICE.public_key)
    assert book.offer(signed(ts=NOW), NOW, everyone)
    # A flood of re-signed catalogues is held to one a second of `ts`.
    assert not book.offer(signed(ts=NOW + CATALOGUE_MIN_INTERVAL_MS - 1), NOW, everyone)
    assert book.offer(signed(ts=NOW + CATALOGUE_MIN_INTERVAL_MS), NOW, everyone)


def test_the_hosts_of_a_project_come_with_the_addresses_their_catalogues_give() -> None:
    book = CatalogueBook()
    bob_home = ("/ip4/192.0.2.8/tcp/4001",)
    assert book.offer(signed(ALICE, names=("benches", "looms")), NOW, everyone)
    assert book.offer(signed(BOB, names=("benches", "looms"), addrs=bob_home), NOW, everyone)
    assert book.offer(signed(CAROL, names=("benches",)), NOW, everyone)
    looms = project(1)
    assert [(h.author, h.name, h.addrs) for h in book.hosts_of(MESH, looms)] == sorted(
        [(ALICE.public_key, "looms", HOME), (BOB.public_key, "looms", bob_home)]
    )
    assert book.hosts_of(MESH, project(7)) == [] and book.hosts_of(OTHER_MESH, looms) == []
    by_project = book.hosts(MESH)
    assert all(book.hosts_of(MESH, p) == hosts for p, hosts in by_project.items())


def test_revoked_departed_and_aged_out_authors_disappear() -> None:
    book = CatalogueBook()
    for who in (ALICE, BOB, CAROL):
        assert book.offer(signed(who, ts=NOW), NOW, everyone)
    assert book.offer(signed(ALICE, mesh=OTHER_MESH), NOW, everyone)
    assert book.keep_only(MESH, lambda key: key != BOB.public_key) == [BOB.public_key]
    assert book.drop(MESH, CAROL.public_key) and not book.drop(MESH, CAROL.public_key)
    assert book.authors(MESH) == {ALICE.public_key}
    assert book.expire(NOW + CATALOGUE_TTL_MS - 1) == 0
    assert book.expire(NOW + CATALOGUE_TTL_MS) == 2
    assert book.of_mesh(MESH) == [] and book.total_bytes == 0
    book.offer(signed(ALICE, mesh=OTHER_MESH), NOW, everyone)
    book.drop_mesh(OTHER_MESH)
    assert book.of_mesh(OTHER_MESH) == [] and book.total_bytes == 0


def test_a_full_mesh_pushes_out_its_oldest_catalogue_for_a_newer_one_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cat, "MAX_CATALOGUES_PER_MESH", 2)
    book = CatalogueBook()
    assert book.offer(signed(ALICE, ts=NOW - 2000), NOW, everyone)
    assert book.offer(signed(BOB, ts=NOW - 1000), NOW, everyone)
    assert not book.offer(signed(CAROL, ts=NOW - 3000), NOW, everyone)  # older than all held
    assert book.offer(signed(CAROL, ts=NOW), NOW, everyone)
    assert book.authors(MESH) == {BOB.public_key, CAROL.public_key}
    # A held author's newer catalogue replaces its own, pushing nobody out.
    assert book.offer(signed(BOB, ts=NOW + 1000), NOW, everyone)
    assert book.authors(MESH) == {BOB.public_key, CAROL.public_key}
    # Other meshes have their own bound.
    assert book.offer(signed(ALICE, mesh=OTHER_MESH), NOW, everyone)


def test_the_byte_bound_holds_across_meshes(monkeypatch: pytest.MonkeyPatch) -> None:
    one = signed(ALICE)
    monkeypatch.setattr(cat, "MAX_CATALOGUE_BYTES", 2 * len(one.data) + 10)
    book = CatalogueBook()
    assert book.offer(one, NOW, everyone)
    assert book.offer(signed(ALICE, mesh=OTHER_MESH), NOW, everyone)
    # A third mesh's catalogue would exceed the bound, and nothing of its mesh can go.
    third = CID.of_dag_cbor(dagcbor.encode({"mesh": "third"}))
    assert not book.offer(signed(BOB, mesh=third), NOW, everyone)
    assert book.total_bytes <= 2 * len(one.data) + 10
