"""End to end with several authors: records signed by other keys enter through CAR files.

Each author runs their own daemon; replicas travel as CAR files, as they would on a USB
stick before the mesh exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ostrom.crypto import signing
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.protocol import dagcbor
from ostrom.protocol.car import CarHeader, CarReader, CarSection, encode_header, encode_section
from tests.daemons import Daemon, DaemonFactory

pytestmark = pytest.mark.slow


def _sync(src: Daemon, dst: Daemon, project: str, tmp_path: Path, name: str) -> dict[str, Any]:
    car = tmp_path / f"{name}.car"
    src.json("export", project, str(car))
    return dst.json("import", str(car))  # type: ignore[no-any-return]


def _statuses(node: Daemon, project: str) -> dict[str, str]:
    return {e["cid"]: e["status"] for e in node.json("log", project)}


def test_outside_contribution_waits_for_a_maintainer(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice, bob = daemons.make("alice"), daemons.make("bob")
    project = alice.json("project", "create", "commons", "--license", "MIT")["cid"]
    first = tmp_path / "a.txt"
    first.write_text("alice\n")
    alice.json("contribute", project, str(first), "-m", "start")
    imported = _sync(alice, bob, project, tmp_path, "a1")
    assert imported["stored"] == 2 and imported["refused"] == []
    assert bob.json("tree", project)["files"][0]["path"] == "a.txt"

    patch = tmp_path / "b.txt"
    patch.write_text("bob\n")
    by_bob = bob.json("contribute", project, str(patch), "-m", "bob's idea")
    assert by_bob["status"] == "pending"  # bob is not a maintainer

    _sync(bob, alice, project, tmp_path, "b1")
    assert _statuses(alice, project)[by_bob["cid"]] == "pending"
    assert "b.txt" not in {f["path"] for f in alice.json("tree", project)["files"]}
    # bob's checkout of his own pending work: the tree at his record.
    assert {f["path"] for f in alice.json("tree", project, "--at", by_bob["cid"])["files"]} == {
        "a.txt",
        "b.txt",
    }

    # bob's own validation does not count; alice's does.
    bob_vote = bob.json("validate", by_bob["cid"], "--accept")
    assert "not a maintainer" in bob_vote["warning"]
    alice.json("validate", by_bob["cid"], "--accept", "--note", "thanks")
    assert _statuses(alice, project)[by_bob["cid"]] == "accepted"
    assert {f["path"] for f in alice.json("tree", project)["files"]} == {"a.txt", "b.txt"}

    # The verdict travels back: bob sees his work accepted.
    _sync(alice, bob, project, tmp_path, "a2")
    assert _statuses(bob, project)[by_bob["cid"]] == "accepted"
    log = bob.json("log", project)
    entry = next(e for e in log if e["cid"] == by_bob["cid"])
    counted = {v["author_peer_id"]: v["counted"] for v in entry["validations"]}
    assert counted == {alice.json("id")["peer_id"]: True, bob.json("id")["peer_id"]: False}


def test_quorum_two_needs_two_maintainers(daemons: DaemonFactory, tmp_path: Path) -> None:
    alice, bob, carol = daemons.make("alice"), daemons.make("bob"), daemons.make("carol")
    bob_id = bob.json("id")["peer_id"]
    project = alice.json(
        "project",
        "create",
        "q2",
        "--license",
        "Apache-2.0",
        "--quorum",
        "2",
        "--maintainer",
        bob_id,
    )["cid"]
    _sync(alice, carol, project, tmp_path, "c0")
    f = tmp_path / "carol.txt"
    f.write_text("carol\n")
    by_carol = carol.json("contribute", project, str(f), "-m", "from carol")["cid"]
    _sync(carol, alice, project, tmp_path, "c1")
    _sync(alice, bob, project, tmp_path, "b0")

    alice.json("validate", by_carol, "--accept")
    assert _statuses(alice, project)[by_carol] == "pending"  # one of two

    bob.json("validate", by_carol, "--reject", "--note", "needs tests")
    _sync(bob, alice, project, tmp_path, "b1")
    assert _statuses(alice, project)[by_carol] == "pending"  # one each: neither side wins

    bob.json("validate", by_carol, "--accept", "--note", "fine after all")  # latest counts
    _sync(bob, alice, project, tmp_path, "b2")
    assert _statuses(alice, project)[by_carol] == "accepted"

    # A maintainer's own work still needs the second maintainer at quorum 2.
    g = tmp_path / "alice.txt"
    g.write_text("alice\n")
    by_alice = alice.json("contribute", project, str(g), "-m", "from alice")
    assert by_alice["status"] == "pending" and by_alice["accepts"] == 1


def test_export_import_round_trip_gives_the_same_replica(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice, fresh = daemons.make("alice"), daemons.make("fresh")
    project = alice.json("project", "create", "rt", "--license", "CC0-1.0")["cid"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(700_000))
    (src / "small.txt").write_text("small\n")
    alice.json("contribute", project, str(src), "-m", "files")
    need = alice.json("need", "create", project, "More files")["cid"]
    alice.json("comment", need, "agreed")
    fork = alice.json("fork", project, "--name", "rt-fork")["cid"]

    imported = _sync(alice, fresh, project, tmp_path, "rt")
    assert imported["refused"] == []
    assert fresh.json("tree", project) == alice.json("tree", project)
    assert _statuses(fresh, project) == _statuses(alice, project)
    assert fresh.json("need", "list", project) == alice.json("need", "list", project)
    out = tmp_path / "out"
    fresh.json("checkout", project, str(out))
    assert (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()

    # Importing twice changes nothing.
    again = _sync(alice, fresh, project, tmp_path, "rt2")
    assert again["stored"] == 0 and again["blocks_stored"] == 0

    # A fork's file carries its lineage, and its parent's replica sees the fork.
    _sync(alice, fresh, fork, tmp_path, "fork")
    assert [f["name"] for f in fresh.json("forks", project)["forks"]] == ["rt-fork"]


def test_work_flows_from_upstream_into_a_fork(daemons: DaemonFactory, tmp_path: Path) -> None:
    alice, bob = daemons.make("alice"), daemons.make("bob")
    upstream = alice.json("project", "create", "up", "--license", "MIT")["cid"]
    f = tmp_path / "f.txt"
    f.write_text("1\n")
    alice.json("contribute", upstream, str(f), "-m", "one")
    _sync(alice, bob, upstream, tmp_path, "u1")
    fork = bob.json("fork", upstream, "--name", "bobs")["cid"]
    g = tmp_path / "g.txt"
    g.write_text("fork\n")
    bob_head = bob.json("contribute", fork, str(g), "-m", "fork work")["cid"]

    f.write_text("2\n")
    later = alice.json("contribute", upstream, str(f), "-m", "two")["cid"]
    _sync(alice, bob, upstream, tmp_path, "u2")
    # bob merges upstream's new work into his fork: a contribution with parents on both sides.
    merge = bob.json(
        "contribute",
        fork,
        "--parent",
        bob_head,
        "--parent",
        later,
        "--delete",
        "g.txt",
        "-m",
        "merge upstream, drop g",
    )
    assert merge["status"] == "accepted"
    tree = {e["path"]: e["size"] for e in bob.json("tree", fork)["files"]}
    assert tree == {"f.txt": 2}
    assert bob.json("tree", upstream)["files"][0]["record"] == later


# --- hostile CAR files ---------------------------------------------------------------------------


def _sections(car: Path) -> tuple[list[CID], list[CarSection]]:
    reader = CarReader()
    roots: list[CID] = []
    sections: list[CarSection] = []
    for item in reader.feed(car.read_bytes()):
        if isinstance(item, CarHeader):
            roots = list(item.roots)
        else:
            sections.append(item)
    reader.close()
    return roots, sections


def _signed(identity: Identity, fields: dict[str, Any]) -> bytes:
    sig = signing.sign(identity, signing.RECORD_DOMAIN, dagcbor.encode(fields))
    return dagcbor.encode({**fields, "sig": sig})


def test_import_refuses_forged_and_malformed_records(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice, victim = daemons.make("alice"), daemons.make("victim")
    project = alice.json("project", "create", "target", "--license", "MIT")["cid"]
    f = tmp_path / "f.txt"
    f.write_text("real\n")
    real = alice.json("contribute", project, str(f), "-m", "real work")["cid"]
    car = tmp_path / "real.car"
    alice.json("export", project, str(car))
    roots, sections = _sections(car)
    by_cid = {str(s.cid): s for s in sections}
    genuine = dagcbor.decode(by_cid[real].data)

    mallory = Identity.generate()
    forged = dict(genuine)
    forged["message"] = "real work (edited by mallory)"  # signature no longer matches
    forged_bytes = dagcbor.encode(forged)
    base = {k: v for k, v in genuine.items() if k != "sig"}
    unknown_type = _signed(mallory, {**base, "author": mallory.public_key, "type": "poll"})
    missing = {k: v for k, v in base.items() if k != "message"}
    missing_field = _signed(mallory, {**missing, "author": mallory.public_key})
    huge = _signed(mallory, {**base, "author": mallory.public_key, "message": "x" * 70_000})
    evil = [forged_bytes, unknown_type, missing_field, huge]

    hostile = tmp_path / "hostile.car"
    with open(hostile, "wb") as out:
        out.write(encode_header(roots))
        for s in sections:
            out.write(encode_section(s.cid, s.data))
        for data in evil:
            out.write(encode_section(CID.of_dag_cbor(data), data))
    result = victim.cli("import", str(hostile), "--json", check=False)
    assert result.returncode == 1
    import json

    summary = json.loads(result.stdout)
    codes = sorted(r["code"] for r in summary["refused"])
    assert codes == sorted(["bad_signature", "invalid_record", "invalid_record", "too_large"])
    messages = " ".join(r["message"] for r in summary["refused"])
    assert "unknown record type" in messages and "missing fields" in messages
    # Everything genuine was kept; nothing forged was.
    assert _statuses(victim, project) == _statuses(alice, project)
    for data in evil:
        shown = victim.cli("show", str(CID.of_dag_cbor(data)), check=False)
        assert shown.returncode == 1
    assert victim.json("status")["store"]["records"] == 2
