"""The owner's limits on what the node may use: rates, storage, peers.

Sizes and rates are written the way people write them (`8GiB`, `256KiB/s`, `1.5MB/s`) or as
plain byte counts; 0 (or `unlimited`) means no limit. The `--spare` preset suits a Raspberry
Pi with a small SD card on a home connection; anything set explicitly overrides it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from ostrom.errors import InvalidInput

# Decimal and binary multipliers, as `ls`, `df` and ISPs write them.
_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
# The most peers a node may be told to keep: the mesh's own bound on its connection table.
MAX_PEERS_LIMIT: Final = 1000
# The mesh's default number of peers when the owner sets none: enough for gossip to reach
# every follower of a project through several paths, few enough for a small machine.
DEFAULT_MAX_PEERS: Final = 64


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes from `8GiB`, `500MB`, `1048576`; 0 or `unlimited` for no limit."""
    if isinstance(text, bool):
        raise InvalidInput(f"{what} must be a size such as 8GiB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidInput(f"{what} must not be negative")
        return text
    if text.strip().lower() in ("unlimited", "none"):
        return 0
    match = _QUANTITY.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise InvalidInput(f"{what} must be a size such as 8GiB or 500MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_rate(text: str | int, *, what: str = "rate") -> int:
    """Bytes per second from `256KiB/s`, `2MB/s`, `100000`; 0 or `unlimited` for none."""
    if isinstance(text, str):
        stripped = text.strip()
        if stripped.lower().endswith("/s"):
            stripped = stripped[:-2]
        return parse_size(stripped, what=what)
    return parse_size(text, what=what)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the owner grants the node; 0 means unlimited, except `max_peers`."""

    upload_rate: int = 0  # bytes/s our protocols send
    download_rate: int = 0  # bytes/s our protocols receive
    storage: int = 0  # bytes of blocks and records in the store
    # Bytes of blocks one project may hold; a value over `storage` is bounded by it anyway,
    # so lowering `storage` below a preset's per-project figure is not an error.
    project_storage: int = 0
    max_peers: int = DEFAULT_MAX_PEERS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"limit {f.name} must be a whole number, got {value!r}")
        if not 1 <= self.max_peers <= MAX_PEERS_LIMIT:
            raise InvalidInput(f"max_peers must be from 1 to {MAX_PEERS_LIMIT}")

    def to_map(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def updated(self, values: dict[str, Any]) -> Limits:
        """These limits with `values` (names as in `to_map`; sizes and rates may be text)."""
        parsed: dict[str, int] = {}
        for name, value in values.items():
            if name in ("upload_rate", "download_rate"):
                parsed[name] = parse_rate(value, what=name)
            elif name in ("storage", "project_storage"):
                parsed[name] = parse_size(value, what=name)
            elif name == "max_peers":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise InvalidInput("max_peers must be a whole number")
                parsed[name] = value
            else:
                raise InvalidInput(f"unknown limit {name!r}")
        return replace(self, **parsed)


# A Raspberry Pi with a 32 GB SD card on a home connection: a quarter of the card, an upload
# rate that leaves a typical 10-20 Mbit/s uplink usable for the household (2 Mbit/s), four
# times that for downloads, and fewer peers than a desktop keeps.
SPARE: Final = Limits(
    upload_rate=256 * 1024,
    download_rate=1024 * 1024,
    storage=8 * 1024**3,
    project_storage=2 * 1024**3,
    max_peers=24,
)
