"""The daemon's settings: `<data-dir>/config.toml`, overridden by command-line flags.

    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    mdns = true
    dht = true                 # false: stay off the public DHT (find no providers, provide none)
    spare = false              # true: start from the Raspberry Pi preset (limits.SPARE)

    [limits]                   # each one overrides the preset; 0 or "unlimited": no limit
    upload_rate = "256KiB/s"
    download_rate = "1MiB/s"
    storage = "8GiB"
    project_storage = "2GiB"
    max_peers = 24

An unknown key or a value of the wrong type is an error that names the key, so a typo never
silently leaves a setting at its default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ostrom.errors import InvalidInput
from ostrom.node.limits import SPARE, Limits

# The TCP port libp2p nodes conventionally listen on.
DEFAULT_LISTEN: Final = ("/ip4/0.0.0.0/tcp/4001",)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    dht: bool = True
    # Start from the `--spare` preset rather than no limits.
    spare: bool = False
    # Limits set explicitly, in order (config.toml, then flags): each overrides the preset.
    limit_settings: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        self.limits  # noqa: B018  (a bad limit is refused when the settings are made)

    @property
    def limits(self) -> Limits:
        """The limits in effect: the preset (or none), then each explicit setting."""
        return (SPARE if self.spare else Limits()).updated(dict(self.limit_settings))


def _strings(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput(f"{path}: {key} must be a list of multiaddr strings")
    return tuple(value)


def load_config(path: Path) -> DaemonConfig:
    """The settings in `path`, or the defaults when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DaemonConfig()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path} is not valid TOML: {exc}") from None
    unknown = set(values) - {"listen", "bootstrap", "mdns", "dht", "spare", "limits"}
    if unknown:
        raise InvalidInput(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    for key in ("mdns", "dht", "spare"):
        if key in values and not isinstance(values[key], bool):
            raise InvalidInput(f"{path}: {key} must be true or false")
    settings: tuple[tuple[str, str | int], ...] = ()
    if "limits" in values:
        if not isinstance(values["limits"], dict):
            raise InvalidInput(f"{path}: limits must be a table ([limits])")
        settings = tuple(values["limits"].items())
    try:
        return DaemonConfig(
            listen=_strings(path, "listen", values["listen"])
            if "listen" in values
            else DEFAULT_LISTEN,
            bootstrap=_strings(path, "bootstrap", values["bootstrap"])
            if "bootstrap" in values
            else (),
            mdns=values.get("mdns", True),
            dht=values.get("dht", True),
            spare=values.get("spare", False),
            limit_settings=settings,
        )
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc.message}") from None
