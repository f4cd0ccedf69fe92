"""Community meshes on real `ostrom daemon` processes on 127.0.0.1 (issue 4, in progress:
creating, inviting, joining by invite, admitting and revoking)."""

from __future__ import annotations

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
