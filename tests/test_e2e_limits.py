"""The owner's limits on real daemons: a download rate that a transfer respects, changed while
the node runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
