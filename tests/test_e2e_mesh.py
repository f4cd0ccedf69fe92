"""End to end over the libp2p mesh: real `ostrom daemon` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.protocol.records import Need, sign
from tests.daemons import Daemon, DaemonFactory, wait_for

pytestmark = pytest.mark.slow


def address(node: Daemon) -> str:
    return str(node.json("status")["addresses"][0])


def statuses(node: Daemon, project: str) -> dict[str, str]:
    return {e["cid"]: e["status"] for e in node.json("log", project)}


def test_three_nodes_replicate_and_agree(daemons: DaemonFactory, tmp_path: Path) -> None:
    alice = daemons.make("alice")
    hub = address(alice)
    bob, carol = daemons.make("bob", "--bootstrap", hub), daemons.make("carol", "--bootstrap", hub)
    bob_id = bob.json("id")["peer_id"]
    project = alice.json(
        "project", "create", "commons", "--license", "MIT", "--maintainer", bob_id
    )["cid"]
    for node in (bob, carol):
        node.json("follow", project)
    wait_for(
        lambda: all(project in [p["cid"] for p in n.json("project", "list")] for n in (bob, carol)),
        "bob and carol to have the project",
    )

    src = tmp_path / "src"
    src.mkdir()
    (src / "design.scad").write_text("cube(10);\n")
    (src / "notes.bin").write_bytes(os.urandom(700_000))
    by_carol = carol.json("contribute", project, str(src), "-m", "carol's design")["cid"]
    assert carol.json("show", by_carol)["status"] == "pending"
    wait_for(lambda: by_carol in statuses(bob, project), "carol's work to reach bob")
    bob.json("validate", by_carol, "--accept", "--note", "looks good")

    everyone = (alice, bob, carol)
    wait_for(
        lambda: all(statuses(n, project).get(by_carol) == "accepted" for n in everyone),
        "every node to see carol's work accepted",
    )
    trees = [n.json("tree", project) for n in everyone]
    assert trees[0] == trees[1] == trees[2]
    assert {f["path"] for f in trees[0]["files"]} == {"design.scad", "notes.bin"}
    for node in everyone:
        out = tmp_path / f"out-{node.data_dir.name}"
        wait_for(
            lambda n=node, o=out: (
                n.cli("checkout", project, str(o), "--force", check=False).returncode == 0
            ),
            f"{node.data_dir.name} to check out",
        )
        assert (out / "notes.bin").read_bytes() == (src / "notes.bin").read_bytes()
    peers = {p["peer_id"]: p for p in alice.json("peers")}
    assert project in peers[bob_id]["projects"]


def test_a_20_mib_artifact_moves_and_verifies(daemons: DaemonFactory, tmp_path: Path) -> None:
    alice = daemons.make("alice")
    bob = daemons.make("bob", "--bootstrap", address(alice))
    project = alice.json("project", "create", "big", "--license", "CC0-1.0")["cid"]
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(os.urandom(20 * 1024 * 1024))
    alice.json("contribute", project, str(artifact), "-m", "a big design file")
    bob.json("follow", project)
    wait_for(
        lambda: bob.json("status")["store"]["block_bytes"] >= 20 * 1024 * 1024,
        "bob to hold the artifact's blocks",
    )
    out = tmp_path / "out"
    bob.json("checkout", project, str(out))
    assert (out / "artifact.bin").read_bytes() == artifact.read_bytes()


def test_a_records_only_checkout_fetches_blocks_on_demand(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice = daemons.make("alice")
    bob = daemons.make("bob", "--bootstrap", address(alice))
    project = alice.json("project", "create", "designs", "--license", "CERN-OHL-S-2.0")["cid"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "frame.step").write_bytes(os.urandom(3 * 1024 * 1024))
    (src / "README.md").write_text("a bicycle frame\n")
    first = alice.json("contribute", project, str(src), "-m", "frame v1")["cid"]
    bob.json("follow", project, "--records-only")
    wait_for(lambda: first in statuses(bob, project), "bob to have the contribution")
    wait_for(lambda: bob.cli("tree", project, check=False).returncode == 0, "bob's tree")
    # Records, changesets and manifests only: the 3 MiB of file blocks stay with alice.
    assert bob.json("status")["store"]["block_bytes"] < 256 * 1024

    out = tmp_path / "out"
    stdout, drawn = bob.cli_on_terminal("checkout", project, str(out))
    assert b"fetching blocks [" in drawn and b"100.0%" in drawn
    assert "checked out 2 file(s)" in stdout
    assert (out / "frame.step").read_bytes() == (src / "frame.step").read_bytes()
    assert bob.json("status")["transfers"] == []

    # Fetched blocks stay: with alice gone, the same tree still checks out.
    (src / "fork.step").write_bytes(os.urandom(512 * 1024))
    second = alice.json("contribute", project, str(src / "fork.step"), "-m", "fork")["cid"]
    wait_for(lambda: second in statuses(bob, project), "bob to have the second contribution")

    def tree_paths() -> set[str]:
        # Until the new changeset has arrived (blocks follow their record), `tree` fails.
        tree = bob.cli("tree", project, "--json", check=False)
        return (
            {f["path"] for f in json.loads(tree.stdout)["files"]} if tree.returncode == 0 else set()
        )

    wait_for(lambda: tree_paths() >= {"fork.step"}, "bob's tree to name fork.step")
    alice.stop()
    failed = bob.cli("checkout", project, str(tmp_path / "out2"), check=False)
    assert failed.returncode == 1
    assert "could not be fetched" in failed.stderr
    bob.json("checkout", project, str(tmp_path / "out3"), "--at", first)
    assert (tmp_path / "out3" / "frame.step").read_bytes() == (src / "frame.step").read_bytes()


def test_a_stopped_node_catches_up(daemons: DaemonFactory, tmp_path: Path) -> None:
    alice = daemons.make("alice")
    hub = address(alice)
    bob = daemons.make("bob", "--bootstrap", hub)
    project = alice.json("project", "create", "journal", "--license", "MIT")["cid"]
    bob.json("follow", project)
    wait_for(lambda: len(statuses(bob, project)) == 1, "bob to have the genesis")
    bob.stop()
    page = tmp_path / "page.md"
    made = []
    for day in range(3):
        page.write_text(f"day {day}\n")
        made.append(alice.json("contribute", project, str(page), "-m", f"day {day}")["cid"])
    need = alice.json("need", "create", project, "Illustrations")["cid"]
    bob.start("--bootstrap", hub)
    wait_for(lambda: set(made) <= set(statuses(bob, project)), "bob to catch up on restart")
    wait_for(
        lambda: [n["cid"] for n in bob.json("need", "list", project)] == [need],
        "bob to have the need",
    )
    assert bob.json("tree", project) == alice.json("tree", project)


def test_a_fork_made_on_one_node_is_seen_on_another(daemons: DaemonFactory) -> None:
    alice = daemons.make("alice")
    bob = daemons.make("bob", "--bootstrap", address(alice))
    project = alice.json("project", "create", "upstream", "--license", "MIT")["cid"]
    bob.json("follow", project)
    wait_for(lambda: len(statuses(bob, project)) == 1, "bob to have the project")
    fork = bob.json("fork", project, "--name", "bobs-fork")["cid"]
    wait_for(
        lambda: [f["project"] for f in alice.json("forks", project)["forks"]] == [fork],
        "alice to see bob's fork",
    )


def test_a_node_following_only_a_fork_gets_its_whole_upstream_history(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice = daemons.make("alice")
    bob = daemons.make("bob", "--bootstrap", address(alice))
    project = alice.json("project", "create", "deep", "--license", "MIT")["cid"]
    made = []
    for i in range(20):  # deeper than the rounds of parent chasing one sync session allows
        page = tmp_path / f"page{i}.txt"  # one file each: the tree shows every generation
        page.write_text(f"page {i}\n")
        made.append(alice.json("contribute", project, str(page), "-m", f"page {i}")["cid"])
    bob.json("follow", project)
    wait_for(lambda: len(statuses(bob, project)) == 21, "bob to have the upstream history")
    fork = bob.json("fork", project, "--name", "deep-fork")["cid"]
    (tmp_path / "fork.txt").write_text("the fork's own file\n")
    bob.json("contribute", fork, str(tmp_path / "fork.txt"), "-m", "fork work")
    # carol knows only bob, and follows only the fork.
    carol = daemons.make("carol", "--bootstrap", address(bob))
    carol.json("follow", fork)
    tree = bob.cli("tree", fork, "--json").stdout
    # Until the history is whole (and its blocks here), carol's `tree` fails or differs.
    wait_for(
        lambda: carol.cli("tree", fork, "--json", check=False).stdout == tree,
        "carol's tree of the fork, a replay of its upstream history too, to be bob's",
    )
    paths = {f["path"] for f in carol.json("tree", fork)["files"]}
    assert paths == {"fork.txt", *(f"page{i}.txt" for i in range(20))}
    assert carol.json("show", made[0])["cid"] == made[0]  # the deepest upstream record
    assert statuses(carol, fork) == statuses(bob, fork)
    assert set(statuses(carol, fork).values()) == {"accepted"}
    assert carol.json("forks", fork) == bob.json("forks", fork)
    assert [f["project"] for f in carol.json("forks", project)["forks"]] == [fork]


def test_a_project_known_only_by_cid_is_found_through_the_dht(daemons: DaemonFactory) -> None:
    hub = daemons.make("hub")  # follows nothing: it only routes
    hub_addr = address(hub)
    alice = daemons.make("alice", "--bootstrap", hub_addr)
    project = alice.json("project", "create", "findme", "--license", "MIT")["cid"]
    dora = daemons.make("dora", "--bootstrap", hub_addr)
    alice_id = alice.json("id")["peer_id"]
    assert alice_id not in {p["peer_id"] for p in dora.json("peers")}
    followed = dora.json("follow", project)
    assert followed["present"] is False
    wait_for(
        lambda: project in [p["cid"] for p in dora.json("project", "list")],
        "dora to find alice through the DHT and replicate the project",
    )
    assert alice_id in {p["peer_id"] for p in dora.json("peers")}


async def test_a_peer_gossiping_forged_records_is_dropped(daemons: DaemonFactory) -> None:
    from ostrom.node.mesh import Mesh, MeshConfig
    from ostrom.node.replication import topic_of

    alice = await trio.to_thread.run_sync(daemons.make, "alice")
    project = (
        await trio.to_thread.run_sync(alice.json, "project", "create", "target", "--license", "MIT")
    )["cid"]
    before = (await trio.to_thread.run_sync(alice.json, "status"))["store"]["records"]
    addr = await trio.to_thread.run_sync(address, alice)
    alice_id = addr.rsplit("/p2p/", 1)[1]

    mallory = Identity.generate()
    mesh = Mesh(mallory.seed, MeshConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False))
    forged = []
    for i in range(5):
        need = sign(
            Need(
                author=mallory.public_key,
                ts=1_700_000_000_000 + i,
                project=CID.parse(project),
                title=f"forged {i}",
            ),
            mallory,
        )
        forged.append(need.data[:-1] + bytes([need.data[-1] ^ 1]))  # break the signature

    async def nothing(topic: str, data: bytes, peer: str) -> bool:
        return True

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.serve)
            await mesh.connect(addr)
            await mesh.subscribe(topic_of(CID.parse(project)), nothing)
            await trio.sleep(3)  # let the topic mesh form (1 s heartbeats)
            for data in forged:
                await mesh.publish(topic_of(CID.parse(project)), data)
                await trio.sleep(0.3)
            while alice_id in {p.peer_id for p in mesh.peers()}:
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    after = (await trio.to_thread.run_sync(alice.json, "status"))["store"]["records"]
    assert after == before  # nothing mallory sent was stored
    log = await trio.to_thread.run_sync(alice.log)
    assert "failed verification" in log
