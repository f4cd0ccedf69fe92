"""The node's SQLite store: round trips, idempotence, lookups, history walks, verification."""

from __future__ import annotations

import base64
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import (
    Ambiguous,
    BlockMismatch,
    DecodeError,
    InvalidInput,
    NotFound,
    StoreCorrupt,
    TooLarge,
)
from ostrom.node.blockdb import blocks_path
from ostrom.node.store import SCHEMA_VERSION, Store, _prefix_range
from ostrom.protocol import dagcbor
from ostrom.protocol.changesets import MAX_BLOCK_SIZE
from ostrom.protocol.meshes import Membership, MeshDescription, sign_mesh_record
from ostrom.protocol.records import (
    Comment,
    Contribution,
    ForkOf,
    Governance,
    Need,
    Policy,
    Project,
    SignedRecord,
    Validation,
    sign,
)

ALICE = Identity.from_seed(bytes([1]) * 32)
BOB = Identity.from_seed(bytes([2]) * 32)
# Any dag-cbor CID will do as a changeset link: the store does not follow it.
CHANGES = CID.of_dag_cbor(dagcbor.encode({"changes": []}))


# --- record builders ----------------------------------------------------------------------------


def genesis(
    name: str = "commons", *, ts: int = 1_000, who: Identity = ALICE, fork_of: ForkOf | None = None
) -> SignedRecord:
    body = Project(
        author=who.public_key,
        ts=ts,
        name=name,
        license="CC-BY-SA-4.0",
        policy=Policy(maintainers=(who.public_key,)),
        fork_of=fork_of,
    )
    return sign(body, who)


def contribution(
    project: SignedRecord,
    *parents: SignedRecord,
    ts: int = 2_000,
    message: str = "a change",
    who: Identity = ALICE,
) -> SignedRecord:
    links = tuple(sorted(p.cid for p in parents)) or (project.cid,)
    body = Contribution(
        author=who.public_key,
        ts=ts,
        project=project.cid,
        parents=links,
        changes=(CHANGES,),
        message=message,
    )
    return sign(body, who)


def validation(
    project: SignedRecord, target: SignedRecord, *, ts: int = 3_000, who: Identity = BOB
) -> SignedRecord:
    body = Validation(
        author=who.public_key, ts=ts, project=project.cid, target=target.cid, verdict="accept"
    )
    return sign(body, who)


def comment(project: SignedRecord, target: SignedRecord, *, ts: int = 3_500) -> SignedRecord:
    body = Comment(
        author=BOB.public_key, ts=ts, project=project.cid, target=target.cid, text="nice"
    )
    return sign(body, BOB)


def need(project: SignedRecord) -> SignedRecord:
    body = Need(author=BOB.public_key, ts=4_000, project=project.cid, title="docs")
    return sign(body, BOB)


def governance(project: SignedRecord, parent: SignedRecord) -> SignedRecord:
    body = Governance(
        author=ALICE.public_key,
        ts=5_000,
        project=project.cid,
        parents=(parent.cid,),
        action="add-maintainer",
        key=BOB.public_key,
    )
    return sign(body, ALICE)


def fork(parent_project: SignedRecord, *heads: SignedRecord, name: str = "fork") -> SignedRecord:
    where = ForkOf(project=parent_project.cid, heads=tuple(sorted(h.cid for h in heads)))
    return genesis(name, ts=6_000, who=BOB, fork_of=where)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store.db")
    try:
        yield s
    finally:
        s.close()


def tamper(path: Path, table: str, cid: CID, column: str, value: object) -> None:
    """Change one stored column behind the store's back, as a disk fault or an editor would."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE cid = ?", (value, cid.raw))
    finally:
        conn.close()


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# --- opening ------------------------------------------------------------------------------------


def test_open_creates_a_wal_store_with_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_records_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    g = genesis()
    with Store.open(path) as s:
        s.put_records([g])
    with Store.open(path) as s:
        again = s.get_record(g.cid)
    assert again is not None and again.data == g.data


def test_open_refuses_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all, just some text " * 100)
    with pytest.raises(StoreCorrupt, match="not a readable Ostrom store"):
        Store.open(junk)


def test_open_refuses_a_foreign_database_and_a_newer_schema(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreCorrupt, match="no Ostrom schema version"):
        Store.open(foreign)

    newer = tmp_path / "newer.db"
    Store.open(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreCorrupt, match="schema version"):
        Store.open(newer)


def test_a_version_1_store_is_migrated_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    g = genesis()
    with Store.open(path) as s:
        s.put_records([g])
    # Take the store back to what version 1 wrote: no mesh tables, blocks in the same file.
    conn = sqlite3.connect(path)
    conn.executescript(
        f"DROP TABLE mesh_records; DROP TABLE meshes_joined; {OLD_BLOCKS}; PRAGMA user_version = 1;"
    )
    conn.close()
    with Store.open(path) as s:
        again = s.get_record(g.cid)
        assert again is not None and again.data == g.data
        assert s.joined_meshes() == []
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


# The block table of schema versions 1 and 2, in the record file.
OLD_BLOCKS = (
    "CREATE TABLE blocks (id INTEGER PRIMARY KEY, cid BLOB NOT NULL UNIQUE,"
    " size INTEGER NOT NULL, data BLOB NOT NULL)"
)


def test_a_version_2_store_moves_its_blocks_to_the_block_file(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    g = genesis()
    with Store.open(path) as s:
        s.put_records([g])
    blocks_path(path).unlink()
    old = [bytes([i]) * (1000 + i) for i in range(150)]  # more than one batch of the move
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(OLD_BLOCKS)
        conn.executemany(
            "INSERT INTO blocks (cid, size, data) VALUES (?, ?, ?)",
            [(CID.of_raw(b).raw, len(b), b) for b in old],
        )
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    with Store.open(path) as s:
        assert all(s.get_block(CID.of_raw(b)) == b for b in old)
        assert (s.stats().blocks, s.stats().block_bytes) == (150, sum(map(len, old)))
        assert s.get_record(g.cid) is not None
        # Where they came from is not known: they are kept, never evicted.
        assert s.blocks.evictable_bytes() == 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        assert "blocks" not in tables
    finally:
        conn.close()
    with Store.open(path) as s:  # and it opens again as a version 3 store
        assert s.has_blocks([CID.of_raw(old[0])]) == {CID.of_raw(old[0])}


def test_mesh_records_are_stored_once_and_read_back_verified(tmp_path: Path) -> None:
    steward, member = Identity.generate(), Identity.generate()
    description = sign_mesh_record(
        MeshDescription(steward.public_key, 1, "makers", "private", (steward.public_key,)),
        steward,
    )
    admit = sign_mesh_record(
        Membership(steward.public_key, 2, description.cid, "admit", member.public_key), steward
    )
    path = tmp_path / "store.db"
    with Store.open(path) as s:
        assert s.put_mesh_records([admit, description]) == [admit.cid, description.cid]
        assert s.put_mesh_records([description]) == []
        assert s.mesh_records(description.cid) == [description, admit]
        s.join_mesh(description.cid, since=5)
        assert s.joined_meshes() == [description.cid]
        assert s.leave_mesh(description.cid) and not s.leave_mesh(description.cid)
        assert s.mesh_records(description.cid) == [description, admit]  # records stay
    tamper(path, "mesh_records", admit.cid, "data", description.data)
    with Store.open(path) as s, pytest.raises(StoreCorrupt, match="does not match"):
        s.mesh_records(description.cid)


def test_open_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot open the store"):
        Store.open(tmp_path / "no" / "such" / "dir" / "store.db")


# --- records ------------------------------------------------------------------------------------


def test_every_record_type_round_trips(store: Store) -> None:
    g = genesis()
    c = contribution(g)
    records = [g, c, validation(g, c), comment(g, c), need(g), governance(g, c)]
    assert store.put_records(records) == [r.cid for r in records]
    for r in records:
        got = store.get_record(r.cid)
        assert got is not None
        assert (got.cid, got.data, got.body, got.sig) == (r.cid, r.data, r.body, r.sig)
    assert {c: r.data for c, r in store.get_records([r.cid for r in records]).items()} == {
        r.cid: r.data for r in records
    }


def test_missing_records_are_absent_not_errors(store: Store) -> None:
    g = genesis()
    other = genesis("other")
    store.put_records([g])
    assert store.get_record(other.cid) is None
    assert set(store.get_records([g.cid, other.cid])) == {g.cid}
    assert store.has_records([g.cid, other.cid]) == {g.cid}
    assert store.has_records([]) == set()


def test_put_records_is_idempotent_and_reports_only_new_records(store: Store) -> None:
    g = genesis()
    a = contribution(g, message="a")
    b = contribution(g, message="b")
    assert store.put_records([g, a]) == [g.cid, a.cid]
    assert store.put_records([a, b, b, g]) == [b.cid]
    assert store.put_records([g, a, b]) == []
    assert store.put_records([]) == []
    assert store.record_count() == 3


def test_project_records_filters_by_project_and_type(store: Store) -> None:
    g = genesis()
    c1 = contribution(g, ts=2_000)
    c2 = contribution(g, c1, ts=2_100)
    v = validation(g, c1)
    other = genesis("other")
    oc = contribution(other)
    store.put_records([c2, v, oc, other, g, c1])

    assert [r.cid for r in store.project_records(g.cid)] == [g.cid, c1.cid, c2.cid, v.cid]
    assert [r.cid for r in store.project_records(g.cid, {"contribution"})] == [c1.cid, c2.cid]
    assert [r.cid for r in store.project_records(g.cid, ["project"])] == [g.cid]
    assert store.project_records(g.cid, ()) == []
    assert store.project_cids(other.cid) == sorted([other.cid, oc.cid])
    assert store.record_count(g.cid) == 4
    assert store.record_count(other.cid) == 2
    assert store.record_count() == 6
    with pytest.raises(InvalidInput, match="unknown record type 'contributions'"):
        store.project_records(g.cid, {"contributions"})
    with pytest.raises(InvalidInput, match="not one string"):
        store.project_records(g.cid, "contribution")


def test_records_by_target_lists_validations_and_comments(store: Store) -> None:
    g = genesis()
    c = contribution(g)
    c2 = contribution(g, c, ts=2_500)
    v1 = validation(g, c, ts=3_000)
    v2 = validation(g, c, ts=3_100, who=ALICE)
    note = comment(g, c, ts=3_050)
    store.put_records([g, c, c2, v1, v2, note, validation(g, c2)])
    assert [r.cid for r in store.records_by_target(c.cid)] == [v1.cid, note.cid, v2.cid]
    assert store.records_by_target(g.cid) == []


def test_projects_names_and_forks(store: Store) -> None:
    first = genesis("commons", ts=10)
    second = genesis("commons", ts=20, who=BOB)
    other = genesis("atlas", ts=15)
    c = contribution(first)
    forked = fork(first, c, name="commons-fork")
    store.put_records([forked, second, c, other, first])

    assert [r.cid for r in store.projects()] == [first.cid, other.cid, second.cid, forked.cid]
    assert [r.cid for r in store.projects_named("commons")] == [first.cid, second.cid]
    assert [r.cid for r in store.projects_named(" atlas ")] == [other.cid]
    assert store.projects_named("nothing") == []
    assert [r.cid for r in store.forks_of(first.cid)] == [forked.cid]
    assert store.forks_of(second.cid) == []


def test_the_store_can_be_used_from_a_worker_thread(store: Store) -> None:
    g = genesis()
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(store.put_records([g])))
    worker.start()
    worker.join(timeout=10)
    assert results == [[g.cid]]
    assert store.has_records([g.cid]) == {g.cid}


# --- resolving CIDs and prefixes ----------------------------------------------------------------


def test_resolve_a_full_cid_and_unique_prefixes(store: Store) -> None:
    g = genesis()
    c = contribution(g)
    store.put_records([g, c])
    text = str(c.cid)
    assert store.resolve(text) == c.cid
    assert store.resolve(f"  {text}\n") == c.cid
    # The shortest prefix that tells the two apart, and every longer one, find the record.
    shared = 0
    while str(g.cid)[shared] == text[shared]:
        shared += 1
    for length in range(shared + 1, len(text)):
        assert store.resolve(text[:length]) == c.cid
    assert store.resolve(text[: shared + 1].upper()) == c.cid


def test_resolve_reports_ambiguity_with_candidates(store: Store) -> None:
    g = genesis()
    records = [g] + [contribution(g, message=f"change {i}") for i in range(7)]
    store.put_records(records)
    # Every dag-cbor sha2-256 CID starts "bafyrei", so this prefix matches all of them.
    with pytest.raises(Ambiguous) as caught:
        store.resolve("bafyrei")
    listed = [str(r.cid) for r in records if str(r.cid) in caught.value.message]
    assert len(listed) == 5
    assert "and more" in caught.value.message
    # Restricted to projects, the same prefix names the single genesis.
    assert store.resolve("bafyrei", types={"project"}) == g.cid
    with pytest.raises(NotFound):
        store.resolve("bafyrei", types={"need"})


def test_resolve_finds_exactly_the_records_that_share_a_prefix(store: Store) -> None:
    g = genesis()
    records = [g] + [contribution(g, message=f"change {i}") for i in range(40)]
    store.put_records(records)
    texts = sorted(str(r.cid) for r in records)
    for text in texts:
        # The longest prefix this CID shares with another decides how much must be typed.
        shared = max(
            next(i for i, (a, b) in enumerate(zip(text, other, strict=True)) if a != b)
            for other in texts
            if other != text
        )
        assert str(store.resolve(text[: shared + 1])) == text
        with pytest.raises(Ambiguous):
            store.resolve(text[:shared])


def test_resolve_rejects_unknown_and_malformed_text(store: Store) -> None:
    g = genesis()
    store.put_records([g])
    absent = genesis("absent")
    with pytest.raises(NotFound, match="no record in this store matches"):
        store.resolve(str(absent.cid))
    with pytest.raises(NotFound):
        store.resolve(str(absent.cid)[:30])
    with pytest.raises(NotFound, match="no contribution in this store"):
        store.resolve(str(g.cid)[:20], types={"contribution"})
    with pytest.raises(DecodeError, match="not a base32 character"):
        store.resolve("bafy!nope")
    with pytest.raises(DecodeError, match="start with 'bafy'"):
        store.resolve("QmSomethingElse")
    with pytest.raises(DecodeError, match="longer than a CID"):
        store.resolve(str(g.cid) + "aa")
    with pytest.raises(DecodeError):
        store.resolve("b" + "8" * 58)  # the length of a CID, but not one
    with pytest.raises(InvalidInput, match="at least 4 characters"):
        store.resolve("baf")


@given(
    digest=st.binary(min_size=32, max_size=32),
    codec=st.sampled_from([b"\x01\x71\x12\x20", b"\x01\x55\x12\x20"]),
    length=st.integers(min_value=1, max_value=57),
)
def test_a_text_prefix_maps_to_the_binary_range_of_cids_spelled_with_it(
    digest: bytes, codec: bytes, length: int
) -> None:
    raw = codec + digest
    text = base64.b32encode(raw).decode().lower().rstrip("=")
    low, high = _prefix_range(text[:length])
    assert low <= raw <= high
    for bound in (low, high):
        assert base64.b32encode(bound).decode().lower().startswith(text[:length])


# --- history ------------------------------------------------------------------------------------


def test_ancestors_follow_parents_across_a_fork(store: Store) -> None:
    g = genesis()
    c1 = contribution(g, ts=2_001)
    c2 = contribution(g, c1, ts=2_002)
    c3 = contribution(g, c2, ts=2_003)
    forked = fork(g, c2)
    f1 = contribution(forked, forked, ts=7_000, who=BOB)
    merge = contribution(g, c3, f1, ts=8_000)
    store.put_records([g, c1, c2, c3, forked, f1, merge, validation(g, c3)])

    assert set(store.ancestors([f1.cid])) == {f1.cid, forked.cid, c2.cid, c1.cid, g.cid}
    assert set(store.ancestors([c3.cid])) == {c3.cid, c2.cid, c1.cid, g.cid}
    everything = {g.cid, c1.cid, c2.cid, c3.cid, forked.cid, f1.cid, merge.cid}
    walked = store.ancestors([merge.cid])
    assert set(walked) == everything
    assert walked[f1.cid].data == f1.data
    assert store.ancestor_cids([merge.cid]) == everything
    assert store.ancestor_cids([f1.cid]) == {f1.cid, forked.cid, c2.cid, c1.cid, g.cid}
    assert store.ancestors([]) == {}


def test_ancestors_stop_at_records_the_store_lacks(store: Store) -> None:
    g = genesis()
    c1 = contribution(g, ts=2_001)
    c2 = contribution(g, c1, ts=2_002)
    c3 = contribution(g, c2, ts=2_003)
    store.put_records([g, c1, c3])  # c2 not (yet) received
    assert set(store.ancestors([c3.cid])) == {c3.cid}
    assert store.ancestor_cids([c3.cid]) == {c3.cid}
    assert store.ancestors([c2.cid]) == {}
    assert set(store.ancestors([c2.cid, c1.cid])) == {c1.cid, g.cid}


def test_ancestors_of_many_heads_and_a_long_chain(store: Store) -> None:
    # More heads than one query takes (500), and a chain far deeper than Python's recursion.
    g = genesis()
    wide = [contribution(g, message=f"leaf {i}") for i in range(1_200)]
    chain = [contribution(g, ts=3_000)]
    for i in range(1, 1_500):
        chain.append(contribution(g, chain[-1], ts=3_000 + i))
    store.put_records([g, *wide, *chain])

    assert set(store.ancestors([r.cid for r in wide])) == {g.cid} | {r.cid for r in wide}
    assert len(store.ancestors([chain[-1].cid])) == 1 + len(chain)
    assert len(store.ancestor_cids([chain[-1].cid, *(r.cid for r in wide)])) == 2_701
    assert len(store.get_records(r.cid for r in wide)) == 1_200
    assert len(store.has_records(r.cid for r in [*wide, *chain])) == 2_700


# --- blocks -------------------------------------------------------------------------------------


def test_blocks_round_trip_and_deduplicate(store: Store) -> None:
    raw_block = b"file bytes " * 1000
    manifest = dagcbor.encode({"size": len(raw_block), "blocks": []})
    blocks = [(CID.of_raw(raw_block), raw_block), (CID.of_dag_cbor(manifest), manifest)]
    assert store.put_blocks(blocks) == 2
    assert store.put_blocks(blocks + blocks) == 0
    assert store.get_block(blocks[0][0]) == raw_block
    assert store.get_block(blocks[1][0]) == manifest
    missing = CID.of_raw(b"never stored")
    assert store.get_block(missing) is None
    assert store.has_blocks([blocks[0][0], missing]) == {blocks[0][0]}
    assert store.put_blocks([]) == 0


def test_a_block_that_does_not_match_its_cid_refuses_the_whole_batch(store: Store) -> None:
    good = [(CID.of_raw(bytes([i]) * 100), bytes([i]) * 100) for i in range(3)]
    liar = CID.of_raw(b"what was promised")
    with pytest.raises(BlockMismatch, match=str(liar)):
        store.put_blocks([*good, (liar, b"what was sent"), good[0]])
    assert store.has_blocks(cid for cid, _ in good) == set()
    assert store.stats().blocks == 0


def test_a_block_over_the_size_limit_is_refused(store: Store) -> None:
    big = b"\x00" * (MAX_BLOCK_SIZE + 1)
    small = b"ok"
    with pytest.raises(TooLarge, match=str(MAX_BLOCK_SIZE)):
        store.put_blocks([(CID.of_raw(small), small), (CID.of_raw(big), big)])
    assert store.has_blocks([CID.of_raw(small)]) == set()
    limit = b"\x01" * MAX_BLOCK_SIZE
    assert store.put_blocks([(CID.of_raw(limit), limit)]) == 1


# --- corruption ---------------------------------------------------------------------------------


def test_a_tampered_record_is_never_served_and_others_still_read(store: Store) -> None:
    g = genesis()
    c = contribution(g)
    v = validation(g, c)
    store.put_records([g, c, v])
    tamper(store.path, "records", c.cid, "data", flip(c.data, len(c.data) // 2))

    with pytest.raises(StoreCorrupt, match=str(c.cid)):
        store.get_record(c.cid)
    with pytest.raises(StoreCorrupt):
        store.get_records([g.cid, c.cid])
    with pytest.raises(StoreCorrupt):
        store.project_records(g.cid)
    with pytest.raises(StoreCorrupt):
        store.ancestors([c.cid])
    got = store.get_record(v.cid)
    assert got is not None and got.data == v.data
    assert set(store.get_records([g.cid, v.cid])) == {g.cid, v.cid}
    assert [r.cid for r in store.records_by_target(c.cid)] == [v.cid]
    assert store.has_records([c.cid]) == {c.cid}  # present, just not servable


def test_valid_bytes_of_another_record_are_corrupt_under_the_wrong_cid(store: Store) -> None:
    g = genesis()
    c = contribution(g)
    other = contribution(g, message="other")
    store.put_records([g, c])
    tamper(store.path, "records", c.cid, "data", other.data)
    with pytest.raises(StoreCorrupt, match="do not match"):
        store.get_record(c.cid)


def test_a_record_moved_to_another_project_in_the_index_is_caught(store: Store) -> None:
    g = genesis()
    other = genesis("other")
    c = contribution(g)
    store.put_records([g, other, c])
    tamper(store.path, "records", c.cid, "project", other.cid.raw)
    with pytest.raises(StoreCorrupt, match="wrong project"):
        store.project_records(other.cid)


def test_ancestors_walk_verified_parents_even_if_the_parents_column_is_damaged(
    store: Store,
) -> None:
    g = genesis()
    c1 = contribution(g, ts=2_001)
    c2 = contribution(g, c1, ts=2_002)
    store.put_records([g, c1, c2])
    tamper(store.path, "records", c2.cid, "parents", b"")
    assert set(store.ancestors([c2.cid])) == {c2.cid, c1.cid, g.cid}
    # The cheap walk trusts the column: it is cut short, but it never invents records.
    assert store.ancestor_cids([c2.cid]) == {c2.cid}
    tamper(store.path, "records", c2.cid, "parents", b"\x01" * 7)
    with pytest.raises(StoreCorrupt, match="parents column"):
        store.ancestor_cids([c2.cid])


def test_a_tampered_block_is_never_served(store: Store) -> None:
    data = b"some file content" * 50
    keep = b"another block"
    cid = CID.of_raw(data)
    store.put_blocks([(cid, data), (CID.of_raw(keep), keep)])
    conn = sqlite3.connect(blocks_path(store.path))
    with conn:
        conn.execute(
            "UPDATE block_data SET data = ? WHERE id = (SELECT id FROM blocks WHERE cid = ?)",
            (flip(data, 7), cid.raw),
        )
    conn.close()
    with pytest.raises(StoreCorrupt, match=str(cid)):
        store.get_block(cid)
    assert store.get_block(CID.of_raw(keep)) == keep


# --- statistics ---------------------------------------------------------------------------------


def test_stats_count_records_projects_and_blocks(store: Store) -> None:
    g = genesis()
    other = genesis("other")
    c = contribution(g)
    store.put_records([g, other, c, validation(g, c), validation(g, c, who=ALICE)])
    block = b"x" * 1234
    store.put_blocks([(CID.of_raw(block), block)])
    stats = store.stats()
    assert stats.records_by_type == {"project": 2, "contribution": 1, "validation": 2}
    assert stats.records == 5
    assert stats.projects == 2
    assert (stats.blocks, stats.block_bytes) == (1, 1234)
    assert stats.db_bytes > 1234
