"""Real `ostrom daemon` processes for end-to-end tests, and the `ostrom` CLI run against them.

Every daemon a test starts is stopped by the test (SIGTERM, then SIGKILL after a bound), and
every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How long a daemon may take to create its socket: imports and SQLite set-up take well under
# a second; the bound is generous for a loaded CI machine.
START_TIMEOUT = 30.0
# How long a daemon may take to stop after SIGTERM before the test kills it.
STOP_TIMEOUT = 15.0
# A CLI command is one RPC round trip; anything near this bound is a hang.
CLI_TIMEOUT = 120.0
# How long a change may take to show on another node: gossip arrives in milliseconds, a sync
# or a mesh exchange on connect within a second or two; the bound is for a loaded CI machine.
REPLICATION_TIMEOUT = 45.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = REPLICATION_TIMEOUT) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def _env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["OSTROM_HOME"] = str(data_dir)
    env.pop("PYTHONWARNINGS", None)
    return env


@dataclass
class Daemon:
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.data_dir / "ostrom.sock"

    def start(self, *extra: str) -> Daemon:
        """Start the daemon: loopback only, a free port, no LAN discovery (tests stay apart)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        network = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", *extra]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ostrom.cli",
                "--data-dir",
                str(self.data_dir),
                "daemon",
                *network,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_env(self.data_dir),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if self.socket.exists() and self.cli("status", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon did not start within {START_TIMEOUT} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        code = self.process.returncode
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(
        self, *args: str, check: bool = True, input: bytes | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "ostrom.cli", "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env=_env(self.data_dir),
            cwd=cwd,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ostrom {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def cli_on_terminal(self, *args: str) -> tuple[str, bytes]:
        """Run `ostrom ARGS` with stderr on a pseudo-terminal (where progress bars are drawn);
        returns its stdout and everything drawn on the terminal. Fails if it exits non-zero.

        The terminal is read while the command runs: a long progress bar would otherwise
        fill the terminal's buffer and block the command."""
        controller, terminal = pty.openpty()
        drawn = b""
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "ostrom.cli", "--data-dir", str(self.data_dir), *args],
                stdout=subprocess.PIPE,
                stderr=terminal,
                text=True,
                env=_env(self.data_dir),
            )
            os.close(terminal)
            terminal = -1
            deadline = time.monotonic() + CLI_TIMEOUT
            while time.monotonic() < deadline:
                if select.select([controller], [], [], 0.2)[0]:
                    try:
                        chunk = os.read(controller, 65536)
                    except OSError:
                        chunk = b""  # Linux reports a terminal closed by the command as EIO
                    drawn += chunk
                    if chunk:
                        continue
                if process.poll() is not None:
                    break
            else:
                process.kill()
            stdout, _ = process.communicate(timeout=STOP_TIMEOUT)
        finally:
            if terminal >= 0:
                os.close(terminal)
            os.close(controller)
        if process.returncode != 0:
            raise AssertionError(
                f"ostrom {' '.join(args)} exited {process.returncode}\nterminal: {drawn!r}"
            )
        return stdout, drawn

    def client(self) -> Any:
        from ostrom.client import Client

        return Client(self.data_dir)


class DaemonFactory:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._daemons: list[Daemon] = []

    def make(self, name: str = "node", *extra: str, start: bool = True) -> Daemon:
        data_dir = self._tmp / name
        daemon = Daemon(data_dir=data_dir, log_path=self._tmp / f"{name}.log")
        self._daemons.append(daemon)
        return daemon.start(*extra) if start else daemon

    def stop_all(self) -> None:
        for daemon in self._daemons:
            daemon.stop()
