"""What the benchmarks share: real daemons on loopback, CAR files, and writing results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.hosts import LOOPBACK, Host
from ostrom.client import Client
from ostrom.crypto.cid import CID
from ostrom.errors import OstromError
from ostrom.protocol.car import encode_header, encode_section
from ostrom.protocol.records import SignedRecord

# Seconds a daemon gets to open its RPC socket: startup imports libp2p (a few seconds on
# a loaded 2-core machine with many daemons starting).
START_TIMEOUT_S = 60.0


class Daemon:
    """A real `python -m ostrom.node` process listening on 127.0.0.1 (any free port)."""

    def __init__(
        self, home: Path, bootstrap: list[str] | None = None, host: Host = LOOPBACK
    ) -> None:
        """On `host` (`bench.hosts`), listening on its address."""
        self.home = home
        self._ip = host.address
        home.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "ostrom.node",
            "--data-dir",
            str(home),
            "--listen",
            f"/ip4/{self._ip}/tcp/0",
            "--no-mdns",
            "--log-level",
            "warning",
        ]
        for addr in bootstrap or []:
            cmd += ["--bootstrap", addr]
        self.log = open(home / "daemon.log", "wb")  # noqa: SIM115 (closed in `stop`)
        self.proc = subprocess.Popen(
            host.command(cmd), env=dict(os.environ, OSTROM_HOME=str(home)), stderr=self.log
        )
        self._client: Client | None = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.home / "ostrom.sock").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"daemon in {self.home} did not start")
            time.sleep(0.05)
        while True:
            try:
                Client(self.home, timeout=30).status()
                return
            except (OstromError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.home, timeout=300)
        return self._client

    def addr(self) -> str:
        """A multiaddr ending in /p2p/<id> on the address it listens on."""
        addrs: list[str] = self.client.status()["addresses"]
        return next(a for a in addrs if f"/{self._ip}/" in a)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def write_car(
    path: Path, records: Sequence[SignedRecord], blocks: Sequence[tuple[CID, bytes]] = ()
) -> None:
    """A CARv1 file rooted at the first record, holding `records` then `blocks`."""
    with open(path, "wb") as f:
        f.write(encode_header([records[0].cid]))
        for r in records:
            f.write(encode_section(r.cid, r.data))
        for cid, data in blocks:
            f.write(encode_section(cid, data))


def machine() -> dict[str, Any]:
    """What a result was measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_result(result: dict[str, Any], out: str | Path, *, show: bool = True) -> dict[str, Any]:
    """Write `result` as JSON to `out` (and print it, with `show`); return it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    path.write_text(text + "\n")
    if show:
        print(text)
    return result
