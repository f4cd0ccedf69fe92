"""The owner's limits on real daemons: a download rate that a transfer respects, changed while
the node runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from ostrom.client import Connection
from tests.daemons import DaemonFactory, wait_for

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
# The download limit of the test: slow enough that 6 MiB take seconds, so that the machine's
# noise is small beside the time the limit imposes.
RATE = 1 * MIB


def test_a_download_limit_holds_a_transfer_to_its_rate_and_can_be_lifted(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice = daemons.make("alice")
    addr = alice.json("status")["addresses"][0]
    bob = daemons.make("bob", "--bootstrap", addr, "--download-limit", "1MiB/s")
    limits = bob.json("limits")
    assert limits["download_rate"]["limit"] == RATE and limits["upload_rate"]["limit"] == 0

    project = alice.json("project", "create", "slow", "--license", "CC0-1.0")["cid"]
    first = tmp_path / "first.bin"
    first.write_bytes(os.urandom(6 * MIB))
    alice.json("contribute", project, str(first), "-m", "six mebibytes")
    start = time.monotonic()
    bob.json("follow", project)
    wait_for(lambda: bob.json("status")["store"]["block_bytes"] >= 6 * MIB, "the first file")
    limited = time.monotonic() - start
    # The limit allows a quarter second's burst, then its rate: at least 5.75 s for 6 MiB
    # (less 10% for the clock and for bytes counted before the first wait).
    assert limited >= 0.9 * (6 * MIB - RATE / 4) / RATE, limited
    seen = bob.json("limits")["download_rate"]
    assert seen["bytes"] >= 6 * MIB

    lifted = bob.json("limits", "--download-rate", "0")
    assert lifted["download_rate"]["limit"] == 0
    second = tmp_path / "second.bin"
    second.write_bytes(os.urandom(6 * MIB))
    alice.json("contribute", project, str(second), "-m", "six more")
    start = time.monotonic()
    wait_for(lambda: bob.json("status")["store"]["block_bytes"] >= 12 * MIB, "the second file")
    assert time.monotonic() - start < limited


def test_a_bad_limit_is_refused_and_changes_nothing(daemons: DaemonFactory) -> None:
    node = daemons.make("node", "--upload-limit", "512KiB/s")
    for flag, value in (("--upload-rate", "fast"), ("--storage", "-1"), ("--max-peers", "0")):
        result = node.cli("limits", flag, value, check=False)
        assert result.returncode == 1, result.stderr
    assert node.json("limits")["upload_rate"]["limit"] == 512 * 1024


def test_blocks_past_the_storage_limit_are_refused_and_the_node_runs_on(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice = daemons.make("alice")
    addr = alice.json("status")["addresses"][0]
    bob = daemons.make("bob", "--bootstrap", addr, "--storage-limit", "2MiB")
    project = alice.json("project", "create", "big", "--license", "CC0-1.0")["cid"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MIB))
    made = alice.json("contribute", project, str(big), "-m", "too big for bob")["cid"]
    with Connection(bob.socket) as events:
        events.call("events.subscribe")
        bob.json("follow", project)
        reached = None
        for method, params in events.notifications(timeout=30):
            event = params[0]
            if method == "event" and event.get("type") == "limit.reached":
                reached = event
                break
    assert reached is not None and reached["limit"] == "storage"
    # The records came; the blocks stopped at the limit; the node answers as before.
    wait_for(lambda: any(e["cid"] == made for e in bob.json("log", project)), "the records")
    storage = bob.json("limits")["storage"]
    assert storage["used"] <= storage["limit"] == 2 * MIB
    assert bob.json("status")["store"]["block_bytes"] < 2 * MIB


def _file_blocks(node: Any, project: str) -> list[str]:
    """The CIDs of the file blocks (not the manifests) of `project`'s accepted tree."""
    with node.client() as client:
        files = client.tree(project)["files"]
        return [str(ref.cid) for f in files for ref in client._manifest(f["file"]).blocks]


def _missing(node: Any, cids: list[str]) -> list[str]:
    with node.client() as client:
        missing: list[str] = client.missing_blocks(cids)
        return missing


def test_checkout_blocks_are_evicted_least_recently_used_and_kept_blocks_never(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    alice = daemons.make("alice")
    addr = alice.json("status")["addresses"][0]
    # Room for the followed project, bob's own and two checkouts (2 MiB each) and records.
    bob = daemons.make("bob", "--bootstrap", addr, "--storage-limit", "9MiB")

    def project(name: str, size: int) -> str:
        cid: str = alice.json("project", "create", name, "--license", "CC0-1.0")["cid"]
        data = tmp_path / f"{name}.bin"
        data.write_bytes(os.urandom(size))
        alice.json("contribute", cid, str(data), "-m", name)
        return cid

    followed = project("followed", 2 * MIB)
    on_demand = [project(f"checkout{i}", 2 * MIB) for i in range(3)]
    too_big = project("too-big", 6 * MIB)
    bob.json("follow", followed)
    wait_for(lambda: not _missing(bob, _file_blocks(alice, followed)), "the followed project")
    own = bob.json("project", "create", "own", "--license", "CC0-1.0")["cid"]
    mine = tmp_path / "mine.bin"
    mine.write_bytes(os.urandom(2 * MIB))
    bob.json("contribute", own, str(mine), "-m", "bob's own work")
    kept = _file_blocks(alice, followed) + _file_blocks(bob, own)

    with Connection(bob.socket) as events:
        events.call("events.subscribe")
        for cid in on_demand:
            bob.json("follow", "--records-only", cid)
            wait_for(lambda c=cid: bob.json("log", c), "the records")  # type: ignore[misc]
            bob.json("checkout", cid, str(tmp_path / f"out-{cid}"))
        evicted = None
        for method, params in events.notifications(timeout=30):
            if method == "event" and params[0].get("type") == "blocks.evicted":
                evicted = params[0]
                break
    # The third checkout made room by evicting the first one's blocks, least recently used.
    assert evicted is not None and evicted["bytes"] > 0, evicted
    first, second, third = (_file_blocks(alice, cid) for cid in on_demand)
    assert _missing(bob, first)
    assert _missing(bob, second + third + kept) == []
    storage = bob.json("limits")["storage"]
    assert storage["used"] <= storage["limit"] == 9 * MIB

    # A checkout that evicting every on-demand block cannot fit is refused; kept blocks stay.
    bob.json("follow", "--records-only", too_big)
    wait_for(lambda: bob.json("log", too_big), "the records")
    refused = bob.cli("checkout", too_big, str(tmp_path / "out-big"), check=False)
    assert refused.returncode != 0 and "storage limit" in refused.stderr, refused.stderr
    assert _missing(bob, kept) == []
    # The evicted checkout is fetched again when it is needed again.
    bob.json("checkout", on_demand[0], str(tmp_path / "again"), "--force")
    assert _missing(bob, first) == []
    assert _missing(bob, kept) == []
