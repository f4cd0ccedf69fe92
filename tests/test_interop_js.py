"""Interop with another libp2p implementation: a js-libp2p node against a real Ostrom daemon.

The js peer (interop/js_peer.mjs, installed from the npm registry by `make setup` / `make test`)
dials the daemon over TCP + Noise + Yamux, identifies it, joins a project's gossipsub topic and
decodes the record it receives as DAG-CBOR. A missing Node.js or npm install is a failure, not a
skip: the project's own set-up installs both.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.daemons import DaemonFactory

pytestmark = pytest.mark.slow

INTEROP = Path(__file__).resolve().parent.parent / "interop"
JS_PEER = INTEROP / "js_peer.mjs"
# js-libp2p 3 runs on Node.js 20 or later (with the Promise.withResolvers polyfill the peer has).
MIN_NODE_MAJOR = 20
# Starting Node and libp2p takes under a second; dial, Noise, Yamux and identify on loopback
# are milliseconds. The bound leaves room for a loaded CI machine.
IDENTIFY_TIMEOUT = 30.0
# Joining the mesh takes one or two gossipsub heartbeats (1 s each) on both sides.
MESH_TIMEOUT = 20.0
# Ostrom grafts new topic peers on its heartbeat (1 s); two of them let its mesh take the js peer
# in, so the record goes out through the mesh rather than only through IHAVE gossip.
SETTLE_S = 2.0
# A published record reaches mesh peers at once, other topic peers within a few heartbeats.
RECORD_TIMEOUT = 20.0
# The js peer's own bound, above every wait here: it must outlive the test's waits, never hang.
JS_PEER_TIMEOUT_S = 120
# How long the js peer may take to close libp2p and exit after SIGTERM.
STOP_TIMEOUT = 10.0


def _node_binary() -> str:
    """The `node` executable, or a failure that says how to install it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "Node.js is not installed: the js-libp2p interop test needs it. "
            "`make setup` (or `make test`) installs it with npm on Debian/Ubuntu."
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        pytest.fail(
            f"Node.js {version} is too old for js-libp2p 3: {MIN_NODE_MAJOR} or later needed"
        )
    if not (INTEROP / "node_modules" / "libp2p" / "package.json").is_file():
        pytest.fail(
            f"the js peer's packages are not installed in {INTEROP / 'node_modules'}: "
            "run `make setup` (it runs `npm ci` in interop/)"
        )
    return node


class JsPeer:
    """The js peer as a subprocess; its JSON lines are read on a thread into a queue."""

    def __init__(self, node: str, target: str, topic: str, stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.events: list[dict[str, Any]] = []
        self._returned: set[int] = set()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [
                node,
                str(JS_PEER),
                target,
                topic,
                "--until-type",
                "contribution",
                "--timeout",
                str(JS_PEER_TIMEOUT_S),
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=INTEROP,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        """The earliest line with this `event` not returned before; fail after `timeout` s.

        Lines come in the peer's order, which is not the order the test asks in (the peer may
        say "subscribed" before "identify"), so lines read while waiting for another event are
        kept for later calls.
        """
        deadline = time.monotonic() + timeout
        while True:
            for index, seen in enumerate(self.events):
                if seen["event"] == event and index not in self._returned:
                    self._returned.add(index)
                    return seen
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no {event!r} from the js peer within {timeout} s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue  # the deadline check above fails the test
            if line is None:
                self._lines.put(None)  # later waits see the end too
                self.process.wait(STOP_TIMEOUT)
                self._fail(f"the js peer exited ({self.process.returncode}) before {event!r}")
            self.events.append(json.loads(line))

    def _fail(self, what: str) -> NoReturn:
        self._stderr.flush()
        stderr = self._stderr_path.read_text(errors="replace")
        pytest.fail(f"{what}\nevents: {self.events}\nstderr:\n{stderr}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()
        return self.process.returncode


@pytest.fixture
def js_peers() -> Iterator[list[JsPeer]]:
    """Js peers the test starts; each is stopped (SIGTERM, then SIGKILL) when the test ends."""
    peers: list[JsPeer] = []
    try:
        yield peers
    finally:
        for peer in peers:
            peer.stop()


def _loopback_address(status: dict[str, Any]) -> str:
    addresses = [a for a in status["addresses"] if a.startswith("/ip4/127.0.0.1/tcp/")]
    assert addresses, f"the daemon does not listen on 127.0.0.1: {status['addresses']}"
    return str(addresses[0])


def test_js_libp2p_node_identifies_ostrom_and_decodes_a_gossiped_record(
    daemons: DaemonFactory, js_peers: list[JsPeer], tmp_path: Path
) -> None:
    js_node = _node_binary()
    ostrom = daemons.make("ostrom")
    status = ostrom.json("status")
    project = ostrom.json("project", "create", "interop", "--license", "MIT")["cid"]
    topic = f"ostrom/1/project/{project}"
    peer = JsPeer(js_node, _loopback_address(status), topic, tmp_path / "js_peer.stderr")
    js_peers.append(peer)

    identified = peer.wait_for("identify", IDENTIFY_TIMEOUT)
    assert identified["peer"] == status["peer_id"]
    assert "/ostrom/sync/1.0.0" in identified["protocols"]
    assert any(p.startswith("/meshsub/1.") for p in identified["protocols"])
    peer.wait_for("subscribed", IDENTIFY_TIMEOUT)
    peer.wait_for("mesh", MESH_TIMEOUT)
    time.sleep(SETTLE_S)

    source = tmp_path / "hello.txt"
    source.write_text("hello from ostrom\n")
    contributed = ostrom.json("contribute", project, str(source), "-m", "for the js peer")

    record = peer.wait_for("record", RECORD_TIMEOUT)
    # The genesis, published before the js peer joined, may arrive first by IHAVE/IWANT.
    while record["type"] != "contribution":
        assert record["cid"] == project and record["type"] == "project"
        record = peer.wait_for("record", RECORD_TIMEOUT)
    assert record["cid"] == contributed["cid"]
    assert record["message"] == "for the js peer"
    assert record["canonical"] is True
    assert record["from"] == status["peer_id"]
    assert peer.process.wait(STOP_TIMEOUT) == 0
