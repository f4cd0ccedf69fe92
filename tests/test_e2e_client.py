"""End to end through `ostrom.client`: what a script does with a real daemon process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.errors import (
    DaemonNotRunning,
    InvalidInput,
    InvalidLicense,
    NotFound,
    Refused,
    UnsafePath,
)
from ostrom.protocol import dagcbor
from ostrom.protocol.car import encode_header, encode_section
from ostrom.protocol.changesets import Changeset, Delete
from tests.daemons import Daemon, DaemonFactory

pytestmark = pytest.mark.slow

# How long a test waits for an event to arrive on `ostrom events`.
EVENT_TIMEOUT = 20.0


def test_a_script_drives_the_node(node: Daemon, tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "river.geojson").write_text('{"type": "FeatureCollection"}')
    (maps / "hills.geojson").write_bytes(os.urandom(600_000))
    with node.client() as client:
        assert client.id()["peer_id"] == client.status()["peer_id"]
        project = client.create_project("atlas", license="ODbL-1.0", description="maps")
        made = client.contribute("atlas", [maps], to="maps", message="First maps")
        assert made["status"] == "accepted" and made["paths"] == 2
        assert [e["type"] for e in client.log("atlas")] == ["contribution", "project"]
        out = tmp_path / "out"
        result = client.checkout("atlas", out)
        assert result["files"] == 2
        assert (out / "maps" / "hills.geojson").read_bytes() == (
            maps / "hills.geojson"
        ).read_bytes()
        # Typed errors arrive as the same classes the daemon raised.
        with pytest.raises(NotFound):
            client.project("nothing")
        with pytest.raises(InvalidLicense):
            client.create_project("x", license="NOPE-1.0")
        with pytest.raises(UnsafePath):
            client.contribute("atlas", [maps], to="../escape", message="m")
        with pytest.raises(Refused):
            client.governance("atlas", "set-quorum", quorum=2)
        with pytest.raises(InvalidInput):
            client.call("project.show", project="atlas", extra=1)
        # The raw call interface reaches every method.
        assert client.call("project.show", project=project["cid"])["name"] == "atlas"


def test_client_without_a_daemon(tmp_path: Path) -> None:
    from ostrom.client import Client

    with pytest.raises(DaemonNotRunning, match="ostrom daemon"):
        Client(tmp_path / "nowhere")


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child before it starts: SIGINT with its default action. A shell without job
    control starts a background command with SIGINT ignored, and a program started so keeps
    ignoring it (Python then raises no KeyboardInterrupt): the suite run in the background
    would find Ctrl-C ignored, not the CLI's handling of it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_events_stream_records_and_status_changes(daemons: DaemonFactory, tmp_path: Path) -> None:
    alice, bob = daemons.make("alice"), daemons.make("bob")
    project = alice.json("project", "create", "ev", "--license", "MIT")["cid"]
    car = tmp_path / "p.car"
    alice.json("export", project, str(car))
    bob.json("import", str(car))
    f = tmp_path / "f.txt"
    f.write_text("bob\n")
    by_bob = bob.json("contribute", project, str(f), "-m", "from bob")["cid"]
    bob.json("export", project, str(car))
    alice.json("import", str(car))

    events = subprocess.Popen(
        [sys.executable, "-m", "ostrom.cli", "--data-dir", str(alice.data_dir), "events", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )
    reader: threading.Thread | None = None
    try:
        assert events.stdout is not None
        time.sleep(0.5)  # let the subscription reach the daemon
        alice.json("validate", by_bob, "--accept")
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=lambda: [lines.put(x) for x in events.stdout or ()], daemon=True
        )
        reader.start()
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + EVENT_TIMEOUT
        while time.monotonic() < deadline and not any(e["type"] == "status.changed" for e in seen):
            try:
                seen.append(json.loads(lines.get(timeout=0.5)))
            except queue.Empty:
                continue
        kinds = [e["type"] for e in seen]
        assert "record.added" in kinds
        change = next(e for e in seen if e["type"] == "status.changed")
        assert change["record"] == by_bob
        assert (change["was"], change["status"]) == ("pending", "accepted")
    finally:
        events.send_signal(signal.SIGINT)
        try:
            events.wait(10)
        except subprocess.TimeoutExpired:
            events.kill()
            events.wait(10)
        if reader is not None:
            reader.join(10)  # it ends at end of file, now that the process has exited
        if events.stdout is not None:
            events.stdout.close()
    assert events.returncode in (0, 130)


def test_concurrent_changes_are_reported_as_conflicts(node: Daemon, tmp_path: Path) -> None:
    node.json("project", "create", "cc", "--license", "MIT")
    f = tmp_path / "notes.txt"
    f.write_text("base\n")
    base = node.json("contribute", "cc", str(f), "-m", "base")["cid"]
    f.write_text("left\n")
    left = node.json("contribute", "cc", str(f), "--parent", base, "-m", "left")["cid"]
    f.write_text("right side\n")
    right = node.json("contribute", "cc", str(f), "--parent", base, "-m", "right")["cid"]
    tree = node.json("tree", "cc")
    assert len(tree["heads"]) == 2
    [conflict] = tree["conflicts"]
    assert conflict["path"] == "notes.txt"
    assert sorted(conflict["candidates"]) == sorted([left, right])
    human = node.cli("tree", "cc").stdout
    assert "conflict: notes.txt" in human
    out = tmp_path / "out"
    checkout = node.cli("checkout", "cc", str(out))
    assert "conflict: notes.txt" in checkout.stdout
    chosen = {left: "left\n", right: "right side\n"}[conflict["chosen"]]
    assert (out / "notes.txt").read_text() == chosen
    # A merge that writes the path resolves the conflict.
    f.write_text("merged\n")
    node.json("contribute", "cc", str(f), "-m", "merge")
    assert node.json("tree", "cc")["conflicts"] == []


def test_progress_bar_on_a_terminal(node: Daemon, tmp_path: Path) -> None:
    node.json("project", "create", "big", "--license", "MIT")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    stdout, drawn = node.cli_on_terminal("contribute", "big", str(big), "-m", "big file")
    assert b"uploading [" in drawn and b"100.0%" in drawn
    assert "contribution" in stdout


def test_import_refuses_a_changeset_with_an_escaping_path(node: Daemon, tmp_path: Path) -> None:
    project = node.json("project", "create", "victim", "--license", "MIT")["cid"]
    good = Changeset((Delete("ok.txt"),)).encode()
    evil = dagcbor.encode({"changes": [{"op": "delete", "path": "../../etc/passwd"}]})
    car = tmp_path / "evil.car"
    with open(car, "wb") as out:
        out.write(encode_header([CID.parse(project)]))
        for data in (good, evil):
            out.write(encode_section(CID.of_dag_cbor(data), data))
    result = node.cli("import", str(car), "--json", check=False)
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    [refusal] = summary["refused"]
    assert refusal["cid"] == str(CID.of_dag_cbor(evil))
    assert "unsafe path" in refusal["message"]
    assert summary["blocks_stored"] == 1
    assert node.json("status")["store"]["blocks"] == 1
