"""Community meshes on real `ostrom daemon` processes on 127.0.0.1 (issue 4: creating,
inviting, joining by invite, admitting and revoking, and finding the projects members host)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import DaemonFactory, wait_for

pytestmark = pytest.mark.slow


def test_a_mesh_is_joined_by_invite_and_its_bootstrap_peer_dialled(
    daemons: DaemonFactory,
) -> None:
    alice = daemons.make("alice")
    bob = daemons.make("bob")
    alice_id = alice.json("id")["peer_id"]
    created = alice.json("mesh", "create", "riverside", "--description", "makers by the river")
    assert created["access"] == "open" and created["steward"]
    assert created["bootstrap"] and all(
        a.endswith(f"/p2p/{alice_id}") for a in created["bootstrap"]
    )
    invite = alice.json("mesh", "invite", "riverside")["invite"]
    assert invite.startswith("ostrom-mesh1:")

    joined = bob.json("mesh", "join", invite)
    assert joined["cid"] == created["cid"] and joined["name"] == "riverside"
    assert joined["connected"] == [alice_id] and joined["unreachable"] == []
    assert not joined["steward"] and joined["member"]
    assert alice_id in {p["peer_id"] for p in bob.json("peers")}
    assert [m["name"] for m in bob.json("mesh", "list")] == ["riverside"]

    # Joined meshes survive a restart.
    bob.stop()
    bob.start()
    assert [m["cid"] for m in bob.json("mesh", "list")] == [created["cid"]]
    assert bob.json("mesh", "leave", "riverside")["joined"] is False
    assert bob.json("mesh", "list") == []


def test_a_steward_admits_and_revokes_members_of_a_private_mesh(daemons: DaemonFactory) -> None:
    steward = daemons.make("steward")
    member = daemons.make("member")
    member_id = member.json("id")["peer_id"]
    mesh = steward.json("mesh", "create", "workshop", "--private")
    assert mesh["access"] == "private" and mesh["members"] == 1

    admitted = steward.json("mesh", "admit", "workshop", member_id, "--note", "welcome")
    assert (admitted["action"], admitted["member"]) == ("admit", member_id)
    shown = steward.json("mesh", "show", "workshop")
    assert shown["admitted"] == [member_id] and shown["members"] == 2
    steward.json("mesh", "revoke", "workshop", member_id)
    assert steward.json("mesh", "show", "workshop")["admitted"] == []

    # Only a steward signs membership records.
    invite = steward.json("mesh", "invite", "workshop")["invite"]
    member.json("mesh", "join", invite)
    refused = member.cli("mesh", "admit", "workshop", member_id, check=False)
    assert refused.returncode == 1 and "only a steward" in refused.stderr


def test_a_bad_invite_or_mesh_name_is_a_clear_error(daemons: DaemonFactory) -> None:
    node = daemons.make("node")
    for invite in ("ostrom-mesh1:abc", "https://example.org/join", "ostrom-mesh1:" + "a" * 20000):
        result = node.cli("mesh", "join", invite, check=False)
        assert result.returncode == 1 and "invite" in result.stderr, result.stderr
    missing = node.cli("mesh", "show", "nowhere", check=False)
    assert missing.returncode == 1 and "no mesh named 'nowhere'" in missing.stderr
    assert node.json("mesh", "list") == []
    assert node.cli("status").returncode == 0


def test_a_private_mesh_refuses_outsiders_and_a_revocation_takes_effect_at_once(
    daemons: DaemonFactory,
) -> None:
    steward = daemons.make("steward")
    member, outsider = daemons.make("member"), daemons.make("outsider")
    member_id = member.json("id")["peer_id"]
    outsider_id = outsider.json("id")["peer_id"]
    steward.json("mesh", "create", "workshop", "--private")
    steward.json("mesh", "admit", "workshop", member_id)
    invite = steward.json("mesh", "invite", "workshop")["invite"]

    member.json("mesh", "join", invite)
    # The exchange on connect brings the steward's admission to the member's node.
    wait_for(lambda: member.json("mesh", "show", "workshop")["member"], "the member's admission")
    peers = {p["peer_id"]: p for p in steward.json("peers")}
    assert peers[member_id]["meshes"] == ["workshop"]

    outsider.json("mesh", "join", invite)
    wait_for(
        lambda: outsider_id not in {p["peer_id"] for p in steward.json("peers")},
        "the steward to close the outsider's connection",
    )
    assert not outsider.json("mesh", "show", "workshop")["member"]
    assert member_id in {p["peer_id"] for p in steward.json("peers")}

    steward.json("mesh", "revoke", "workshop", member_id, "--note", "left the group")
    wait_for(
        lambda: not member.json("mesh", "show", "workshop")["member"],
        "the revocation to reach the member's node",
    )
    wait_for(
        lambda: member_id not in {p["peer_id"] for p in steward.json("peers")},
        "the steward to cut the revoked member off",
    )
    # Nothing was restarted, and both nodes still answer.
    assert steward.cli("status").returncode == 0 and member.cli("status").returncode == 0


def test_a_private_mesh_project_is_served_to_members_only(daemons: DaemonFactory) -> None:
    steward = daemons.make("steward")
    member, outsider = daemons.make("member"), daemons.make("outsider")
    member_id = member.json("id")["peer_id"]
    steward.json("mesh", "create", "workshop", "--private")
    steward.json("mesh", "admit", "workshop", member_id)
    # An open mesh too, so the outsider may connect: what is tested is the project rule.
    steward.json("mesh", "create", "town")
    member.json("mesh", "join", steward.json("mesh", "invite", "workshop")["invite"])
    outsider.json("mesh", "join", steward.json("mesh", "invite", "town")["invite"])

    private = steward.json(
        "project", "create", "jigs", "--license", "CERN-OHL-S-2.0", "--mesh", "workshop"
    )
    assert private["mesh"] is not None
    public = steward.json("project", "create", "benches", "--license", "CC0-1.0")["cid"]
    for node in (member, outsider):
        node.json("follow", private["cid"])
        node.json("follow", public)

    def has(node: Any, cid: str) -> bool:
        return cid in {p["cid"] for p in node.json("project", "list")}

    wait_for(lambda: has(member, private["cid"]), "the member to get the private project")
    wait_for(lambda: has(outsider, public), "the outsider to get the public project")
    assert has(member, public)
    assert not has(outsider, private["cid"])
    refused = steward.cli(
        "project", "create", "x", "--license", "MIT", "--mesh", "town", check=False
    )
    assert refused.returncode == 1 and "open" in refused.stderr


def _listed(node: Any, mesh: str) -> dict[str, dict[str, Any]]:
    """The projects `ostrom mesh show MESH` lists on `node`, by CID."""
    return {p["project"]: p for p in node.json("mesh", "show", mesh)["projects"]}


def _hosts(node: Any, mesh: str, project: str) -> set[str]:
    entry = _listed(node, mesh).get(project)
    return set() if entry is None else {h["peer_id"] for h in entry["hosts"]}


def test_a_member_finds_the_projects_hosted_in_a_mesh_and_follows_one(
    daemons: DaemonFactory,
) -> None:
    alice, bob = daemons.make("alice"), daemons.make("bob")
    alice_id, bob_id = alice.json("id")["peer_id"], bob.json("id")["peer_id"]
    benches = alice.json("project", "create", "benches", "--license", "CC0-1.0")["cid"]
    alice.json("mesh", "create", "riverside")
    bob.json("mesh", "join", alice.json("mesh", "invite", "riverside")["invite"])

    # The exchange on connect brings Alice's catalogue: Bob sees what she hosts, by name.
    wait_for(lambda: benches in _listed(bob, "riverside"), "Alice's catalogue to reach Bob")
    entry = _listed(bob, "riverside")[benches]
    assert entry["name"] == "benches" and entry["following"] is None and not entry["here"]
    assert entry["hosts"] == [{"peer_id": alice_id, "connected": True, "self": False}]
    shown = bob.cli("mesh", "show", "riverside").stdout
    assert "benches" in shown and benches in shown and "not followed" in shown

    bob.json("follow", benches)
    wait_for(
        lambda: benches in {p["cid"] for p in bob.json("project", "list")},
        "Bob to replicate the project he found",
    )
    # Bob hosts it now, and says so in his own catalogue, which reaches Alice by gossip.
    wait_for(lambda: _hosts(alice, "riverside", benches) == {alice_id, bob_id}, "Bob's catalogue")
    listed = bob.json("mesh", "projects", "riverside")
    assert listed["total"] == 1 and listed["projects"][0]["following"] == "full"

    # Leaving withdraws Bob's catalogue: Alice no longer lists him as a host.
    bob.json("mesh", "leave", "riverside")
    wait_for(lambda: _hosts(alice, "riverside", benches) == {alice_id}, "Bob's withdrawal")


def test_a_private_mesh_catalogue_reaches_members_only(daemons: DaemonFactory) -> None:
    steward = daemons.make("steward")
    member, outsider = daemons.make("member"), daemons.make("outsider")
    steward_id = steward.json("id")["peer_id"]
    member_id = member.json("id")["peer_id"]
    steward.json("mesh", "create", "workshop", "--private")
    steward.json("mesh", "admit", "workshop", member_id)
    # An open mesh too, so the outsider stays connected to the steward and could overhear.
    steward.json("mesh", "create", "town")
    jigs = steward.json(
        "project", "create", "jigs", "--license", "CERN-OHL-S-2.0", "--mesh", "workshop"
    )["cid"]
    benches = steward.json("project", "create", "benches", "--license", "CC0-1.0")["cid"]
    workshop_invite = steward.json("mesh", "invite", "workshop")["invite"]
    outsider.json("mesh", "join", steward.json("mesh", "invite", "town")["invite"])
    # The outsider even holds the private mesh's invite, without being admitted.
    outsider.json("mesh", "join", workshop_invite)
    member.json("mesh", "join", workshop_invite)

    wait_for(
        lambda: {jigs, benches} <= _listed(member, "workshop").keys(),
        "the steward's workshop catalogue to reach the member",
    )
    wait_for(lambda: benches in _listed(outsider, "town"), "the steward's town catalogue")
    # The private project is listed in its own mesh only: never to the outsider, who sees the
    # steward's public project in the open mesh they share.
    assert jigs not in _listed(outsider, "town")
    member.json("follow", jigs)
    wait_for(lambda: member_id in _hosts(steward, "workshop", jigs), "the member's catalogue")
    # A private project created now is announced by gossip on the mesh's topic, which the
    # outsider's node subscribes to as well: only members receive it.
    clamps = steward.json(
        "project", "create", "clamps", "--license", "CERN-OHL-S-2.0", "--mesh", "workshop"
    )["cid"]
    wait_for(lambda: clamps in _listed(member, "workshop"), "the steward's new catalogue")
    assert outsider_sees_nothing(outsider, jigs) and outsider_sees_nothing(outsider, clamps)
    assert _listed(outsider, "workshop") == {}

    # A revoked member's catalogue disappears with its membership.
    steward.json("mesh", "revoke", "workshop", member_id)
    wait_for(lambda: _hosts(steward, "workshop", jigs) == {steward_id}, "the revocation")
    assert outsider_sees_nothing(outsider, jigs)


def outsider_sees_nothing(outsider: Any, project: str) -> bool:
    """Whether `project` is absent from everything the outsider's node can show."""
    meshes = [m["name"] for m in outsider.json("mesh", "list")]
    return all(project not in _listed(outsider, name) for name in meshes) and project not in {
        p["cid"] for p in outsider.json("project", "list")
    }


def test_a_member_follows_a_private_project_whose_host_it_is_not_connected_to(
    daemons: DaemonFactory,
) -> None:
    """C reaches the mesh through the bootstrap node B only; the project's host A is
    known to C from A's catalogue alone, which carries A's addresses: following the project
    dials A and syncs with it. (A private project is not on the DHT, and B does not host it.
    The nodes stay off the DHT: in three nodes, a DHT lookup would walk to A by chance.)"""
    bootstrap, host, newcomer = (daemons.make(name, "--no-dht") for name in ("b", "a", "c"))
    host_id, newcomer_id = host.json("id")["peer_id"], newcomer.json("id")["peer_id"]
    bootstrap.json("mesh", "create", "workshop", "--private")
    bootstrap.json("mesh", "admit", "workshop", host_id)
    bootstrap.json("mesh", "admit", "workshop", newcomer_id)
    invite = bootstrap.json("mesh", "invite", "workshop")["invite"]
    assert host.json("mesh", "join", invite)["connected"] == [bootstrap.json("id")["peer_id"]]
    jigs = host.json(
        "project", "create", "jigs", "--license", "CERN-OHL-S-2.0", "--mesh", "workshop"
    )["cid"]
    need = host.json("need", "create", jigs, "A jig for dovetails")["cid"]
    wait_for(lambda: host_id in _hosts(bootstrap, "workshop", jigs), "A's catalogue to reach B")

    newcomer.json("mesh", "join", invite)
    listed = wait_for(
        lambda: _listed(newcomer, "workshop").get(jigs), "A's catalogue to reach C through B"
    )
    assert listed["hosts"] == [{"peer_id": host_id, "connected": False, "self": False}]
    assert host_id not in {p["peer_id"] for p in newcomer.json("peers")}

    newcomer.json("follow", jigs)
    wait_for(lambda: need in _needs(newcomer, jigs), "C to dial A and replicate its project")
    assert host_id in {p["peer_id"] for p in newcomer.json("peers")}

    # Restarted, C is back in the mesh through B, and its periodic sync (every 30 s), finding
    # no peer that shares the project, dials A again from the catalogue B passes on.
    newcomer.stop()
    later = host.json("need", "create", jigs, "A jig for tenons")["cid"]
    newcomer.start()
    wait_for(lambda: later in _needs(newcomer, jigs), "C to reach A after a restart", 90)


def _needs(node: Any, project: str) -> set[str]:
    """The needs of `project` that `node` holds (none while the project is not there)."""
    result = node.cli("need", "list", project, "--json", check=False)
    return {n["cid"] for n in json.loads(result.stdout)} if result.returncode == 0 else set()


def test_work_a_public_project_merges_from_a_private_one_reaches_its_followers(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    steward, outsider = daemons.make("steward"), daemons.make("outsider")
    steward.json("mesh", "create", "workshop", "--private")
    # An open mesh too, so the outsider may connect: what is tested is what it is served.
    steward.json("mesh", "create", "town")
    outsider.json("mesh", "join", steward.json("mesh", "invite", "town")["invite"])
    jigs = steward.json("project", "create", "jigs", "--license", "MIT", "--mesh", "workshop")
    benches = steward.json("project", "create", "benches", "--license", "CC0-1.0")["cid"]
    (tmp_path / "bench.txt").write_text("a bench\n")
    head = steward.json("contribute", benches, str(tmp_path / "bench.txt"), "-m", "a bench")
    outsider.json("follow", benches)
    wait_for(
        lambda: {f["path"] for f in outsider.json("tree", benches)["files"]} == {"bench.txt"},
        "the outsider to have the public project",
    )

    jig = tmp_path / "jig.step"
    jig.write_bytes(os.urandom(300 * 1024))  # two blocks
    merged = steward.json("contribute", jigs["cid"], str(jig), "-m", "a jig")["cid"]
    (tmp_path / "secret.txt").write_text("not for the town\n")
    unmerged = steward.json("contribute", jigs["cid"], str(tmp_path / "secret.txt"), "-m", "s")
    # The public project takes in the jig: a merge naming the private contribution.
    (tmp_path / "notes.txt").write_text("the jig fits the bench\n")
    merge = ["-m", "take in the jig", "--parent", head["cid"], "--parent", merged]
    steward.json("contribute", benches, str(tmp_path / "notes.txt"), *merge)

    out = tmp_path / "out"
    wait_for(
        lambda: (
            outsider.cli("checkout", benches, str(out), "--force", check=False).returncode == 0
            and (out / "jig.step").exists()
        ),
        "the outsider to check out the merged tree, the jig's blocks included",
    )
    assert (out / "jig.step").read_bytes() == jig.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["bench.txt", "jig.step", "notes.txt"]
    # The merged work came with the public project, down to the private project's genesis
    # (its lineage); the private project's other work stays with the mesh.
    assert outsider.json("show", merged)["cid"] == merged
    assert outsider.cli("show", unmerged["cid"], check=False).returncode == 1
    held = {entry["cid"] for entry in outsider.json("log", jigs["cid"])}
    assert merged in held and unmerged["cid"] not in held
