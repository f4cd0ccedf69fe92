"""The daemon's settings: `<data-dir>/config.toml`, overridden by command-line flags.

    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    mdns = true

An unknown key or a value of the wrong type is an error that names the key, so a typo never
silently leaves a setting at its default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ostrom.errors import InvalidInput

# The TCP port libp2p nodes conventionally listen on.
DEFAULT_LISTEN: Final = ("/ip4/0.0.0.0/tcp/4001",)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True


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
    unknown = set(values) - {"listen", "bootstrap", "mdns"}
    if unknown:
        raise InvalidInput(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    config = DaemonConfig()
    if "listen" in values:
        config = DaemonConfig(
            _strings(path, "listen", values["listen"]), config.bootstrap, config.mdns
        )
    if "bootstrap" in values:
        config = DaemonConfig(
            config.listen, _strings(path, "bootstrap", values["bootstrap"]), config.mdns
        )
    if "mdns" in values:
        if not isinstance(values["mdns"], bool):
            raise InvalidInput(f"{path}: mdns must be true or false")
        config = DaemonConfig(config.listen, config.bootstrap, values["mdns"])
    return config
