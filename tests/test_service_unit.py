"""contrib/systemd/ostrom.service: the unit `make service` installs runs the real daemon."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

from ostrom.node.__main__ import EXIT_CANNOT_START

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "ostrom.service"


def rendered(tmp_path: Path) -> Path:
    """The unit as `make service` writes it, for this environment's `ostrom`."""
    ostrom = Path(sys.executable).parent / "ostrom"
    path = tmp_path / "ostrom.service"
    path.write_text(UNIT.read_text().replace("@OSTROM@", str(ostrom)))
    return path


def test_the_unit_starts_the_daemon_and_does_not_retry_one_that_cannot_start(
    tmp_path: Path,
) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read_string(rendered(tmp_path).read_text())
    service = unit["Service"]
    command, subcommand = service["ExecStart"].split()
    assert subcommand == "daemon"
    help_text = subprocess.run(
        [command, "daemon", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "--listen" in help_text
    assert service["Restart"] == "on-failure"
    assert str(EXIT_CANNOT_START) in service["RestartPreventExitStatus"].split()
    assert service["KillSignal"] == "SIGTERM"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # Without systemd's tools only the parse above checks the unit.
        return
    result = subprocess.run(
        [analyze, "verify", str(rendered(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
