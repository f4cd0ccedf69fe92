"""The daemon's settings: config.toml, the limit flags and the `--spare` preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ostrom.errors import InvalidInput
from ostrom.node.__main__ import EXIT_CANNOT_START
from ostrom.node.config import DEFAULT_LISTEN, DaemonConfig, load_config
from ostrom.node.limits import SPARE, Limits, parse_rate, parse_size


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_no_file_means_the_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "config.toml")
    assert config.listen == DEFAULT_LISTEN and config.mdns and config.dht
    assert config.limits == Limits()


def test_limits_are_read_in_the_units_people_write(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            'mdns = false\ndht = false\n[limits]\nupload_rate = "256KiB/s"\n'
            'download_rate = "2 MB/s"\n'
            'storage = "8GiB"\nproject_storage = 1048576\nmax_peers = 12\n',
        )
    )
    assert not config.mdns and not config.dht
    assert config.limits == Limits(
        upload_rate=262_144,
        download_rate=2_000_000,
        storage=8 * 1024**3,
        project_storage=1_048_576,
        max_peers=12,
    )


def test_the_spare_preset_and_what_overrides_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'spare = true\n[limits]\nstorage = "16GiB"\n'))
    assert config.limits.storage == 16 * 1024**3
    assert config.limits.upload_rate == SPARE.upload_rate
    # A flag given after the file overrides both.
    flagged = DaemonConfig(spare=True, limit_settings=(*config.limit_settings, ("storage", "1GiB")))
    assert flagged.limits.storage == 1024**3
    assert flagged.limits.project_storage == SPARE.project_storage


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'blue'\n", "unknown setting"),
        ("mdns = 'yes'\n", "mdns must be true or false"),
        ("dht = 'no'\n", "dht must be true or false"),
        ("spare = 1\n", "spare must be true or false"),
        ("limits = 5\n", "limits must be a table"),
        ("[limits]\nupload_rate = 'fast'\n", "upload_rate must be a size"),
        ("[limits]\nstorage = -5\n", "must not be negative"),
        ("[limits]\nbandwidth = 5\n", "unknown limit 'bandwidth'"),
        ("[limits]\nmax_peers = 0\n", "max_peers must be from 1"),
        ("listen = '/ip4/0.0.0.0/tcp/1'\n", "listen must be a list"),
        ("listen = [\n", "not valid TOML"),
    ],
)
def test_a_bad_setting_is_an_error_that_names_it(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput, match=message) as caught:
        load_config(path)
    assert str(path) in caught.value.message


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("unlimited", 0), ("1.5KiB", 1536), ("10kb", 10_000), ("3 GiB", 3 * 1024**3)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_rate() -> None:
    assert parse_rate("1MiB/s") == parse_rate("1MiB") == 1024**2
    for bad in ("1 parsec", "MiB", "1e6", "-3"):
        with pytest.raises(InvalidInput):
            parse_size(bad)


def test_the_daemon_refuses_a_bad_limit_flag_and_says_which(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ostrom.node",
            "--data-dir",
            str(tmp_path / "d"),
            "--storage-limit",
            "lots",
            "--no-mdns",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_CANNOT_START
    assert "storage must be a size" in result.stderr
    assert not (tmp_path / "d" / "ostrom.sock").exists()
