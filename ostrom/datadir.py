"""The data directory: where it is, what lives in it, and creating it with its identity.

Shared by the CLI and the daemon; it imports nothing heavy, so `ostrom id` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ostrom.crypto.keys import Identity, read_key_file, write_key_file

# The environment variable that names the data directory when `--data-dir` is not given.
ENV_HOME: Final = "OSTROM_HOME"
# The data directory holds the identity and every record: only its owner may enter it.
DIR_MODE: Final = 0o700


@dataclass(frozen=True, slots=True)
class DataDir:
    """The paths inside a data directory."""

    root: Path

    @property
    def key_file(self) -> Path:
        return self.root / "identity.key"

    @property
    def socket(self) -> Path:
        return self.root / "ostrom.sock"

    @property
    def database(self) -> Path:
        return self.root / "store.sqlite"

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    def exists(self) -> bool:
        return self.key_file.exists()

    def identity(self) -> Identity:
        return read_key_file(self.key_file)


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> DataDir:
    """`--data-dir` if given, else `$OSTROM_HOME`, else the platform's user data directory."""
    if explicit:
        return DataDir(Path(explicit).expanduser().absolute())
    env = os.environ.get(ENV_HOME)
    if env:
        return DataDir(Path(env).expanduser().absolute())
    import platformdirs

    return DataDir(Path(platformdirs.user_data_dir("ostrom", appauthor=False)))


def init_data_dir(data_dir: DataDir) -> tuple[Identity, bool]:
    """Create the directory (0700) and an identity if there is none; never overwrite a key.

    Returns the identity and whether it was created now.
    """
    data_dir.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(data_dir.root, DIR_MODE)
    if data_dir.key_file.exists():
        return data_dir.identity(), False
    identity = Identity.generate()
    write_key_file(data_dir.key_file, identity)
    return identity, True
