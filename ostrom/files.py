"""Reading files to contribute and writing checkouts, without ever leaving the chosen tree.

`collect` turns the paths given to `ostrom contribute PROJECT PATH... [--to DIR]` into the
files to publish and their tree paths:

- a file given directly lands at `DIR/<its name>`;
- a directory contributes its contents, not itself: `d/x/y` lands at `DIR/x/y`, like
  `cp -r d/. DIR/`. Contributing `.` from inside a checkout thus maps the checkout back onto
  the tree's root. Empty directories contribute nothing (a tree holds only files);
- nothing is skipped: `.git`, dotfiles and editor backups are included, because guessing what
  a user meant to leave out would silently drop work;
- every symlink is refused (`UnsafePath` naming it), whether given directly or found inside a
  directory, and wherever it points: a tree has no symlinks, and following one could publish
  files from outside the directory the user named. So are fifos, sockets and devices;
- the executable bit is the owner's (`S_IXUSR`), as git records it.

`CheckoutWriter` writes a tree's files under a root directory and cannot be made to write
outside it: every path is checked as a tree path, each directory is opened relative to its
parent's descriptor with `O_NOFOLLOW`, and each file is written under a temporary name in its
directory and renamed into place, so a symlink planted in the checkout (`root/a -> /etc`) makes
the write fail with `UnsafePath`, and a killed process never leaves half a file under the
final name. Operating-system failures the user must fix (a full disk, no permission) pass
through as `OSError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from ostrom.errors import AlreadyExists, InvalidInput, NotFound, UnsafePath
from ostrom.protocol.paths import check_tree_path, join_tree_path

# Modes git uses for checked-out files; directories get 0o755 less the umask.
EXEC_FILE_MODE: Final = 0o755
PLAIN_FILE_MODE: Final = 0o644
DIR_MODE: Final = 0o755
# The prefix of the temporary files a checkout writes before renaming them; a leftover after a
# crash is recognisable by it.
TEMP_PREFIX: Final = ".ostrom-tmp-"

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
)


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file on disk and the tree path it is contributed at."""

    tree_path: str
    fs_path: Path
    size: int
    exec: bool

    def __post_init__(self) -> None:
        check_tree_path(self.tree_path)
        if not isinstance(self.fs_path, Path):
            raise InvalidInput("fs_path must be a Path")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise InvalidInput(f"file size out of range: {self.size!r}")
        if not isinstance(self.exec, bool):
            raise InvalidInput("exec must be a boolean")


def collect(paths: Sequence[Path], *, to: str = "") -> list[LocalFile]:
    """The regular files under `paths`, mapped to tree paths under `to`, sorted by tree path.

    See the module docstring for the rules. Raises `NotFound` for a path that does not exist,
    `UnsafePath` for a symlink, a special file or a name that is not a valid tree path, and
    `InvalidInput` when two inputs would land on the same tree path.
    """
    found: dict[str, LocalFile] = {}
    for path in paths:
        path = Path(path)
        st = _lstat(path)
        if stat.S_ISDIR(st.st_mode):
            for rel, fs_path, file_st in _walk(path):
                _add(found, join_tree_path(to, rel), fs_path, file_st)
        else:
            _refuse_non_regular(path, st.st_mode)
            _add(found, join_tree_path(to, _name_of(path)), path, st)
    return [found[key] for key in sorted(found)]


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"no such file or directory: {path}") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def _name_of(path: Path) -> str:
    name = path.name
    if not name:
        raise UnsafePath(f"{path} has no file name to contribute it under")
    return name


def _refuse_non_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise UnsafePath(
            f"{path} is a symlink; symlinks are never contributed (a tree has none, and following"
            " one could publish files from elsewhere): replace it with the file or leave it out"
        )
    raise UnsafePath(f"{path} is not a regular file (a fifo, socket or device); leave it out")


def _walk(top: Path) -> Iterable[tuple[str, Path, os.stat_result]]:
    """The regular files under `top`: (path relative to top, fs path, lstat)."""
    # An explicit stack, not recursion: depth is bounded only by the file system.
    stack: list[tuple[str, Path]] = [("", top)]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)
        except OSError as exc:
            raise InvalidInput(f"cannot read directory {directory}: {exc.strerror}") from None
        subdirs: list[tuple[str, Path]] = []
        for entry in listed:
            rel = f"{prefix}{entry.name}"
            fs_path = directory / entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise InvalidInput(f"cannot read {fs_path}: {exc.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((f"{rel}/", fs_path))
            else:
                _refuse_non_regular(fs_path, st.st_mode)
                yield rel, fs_path, st
        stack.extend(reversed(subdirs))


def _add(found: dict[str, LocalFile], tree_path: str, fs_path: Path, st: os.stat_result) -> None:
    earlier = found.get(tree_path)
    if earlier is not None:
        raise InvalidInput(
            f"{earlier.fs_path} and {fs_path} would both be contributed as {tree_path!r}"
        )
    found[tree_path] = LocalFile(
        tree_path=tree_path,
        fs_path=fs_path,
        size=st.st_size,
        exec=bool(st.st_mode & stat.S_IXUSR),
    )


class CheckoutWriter:
    """Write a tree's files under `root`; see the module docstring.

    `root` is created (with its parents) if missing. An existing empty directory is used as is;
    a non-empty one is refused with `AlreadyExists` unless `overwrite=True`, in which case the
    tree's files are written over whatever is there and nothing is ever deleted. With
    `durable=True` each file is fsynced before it is renamed into place and its directory
    after, so a power loss cannot leave an empty file under its final name; without it a
    checkout survives a killed process but not a power loss, and is much faster on SD cards.

    Use it as a context manager, or call `close()`: it keeps descriptors of the root and of
    the last directory written to, so that writing many files of one directory opens it once.
    """

    __slots__ = ("_durable", "_parent", "_root", "_root_fd")

    def __init__(self, root: Path, *, overwrite: bool = False, durable: bool = False) -> None:
        root = Path(root)
        self._root = root
        self._durable = durable
        self._parent: tuple[tuple[str, ...], int] | None = None
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=DIR_MODE, parents=True)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise InvalidInput(f"checkout directory {root} exists and is not a directory") from None
        try:
            if not overwrite and os.listdir(fd):
                raise AlreadyExists(
                    f"checkout directory {root} is not empty; choose an empty or new directory,"
                    " or overwrite (which writes the tree's files over it and deletes nothing)"
                )
        except BaseException:
            os.close(fd)
            raise
        self._root_fd = fd

    def __enter__(self) -> CheckoutWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the descriptors; the writer cannot be used afterwards."""
        self._forget_parent()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def write(self, tree_path: str, chunks: Iterable[bytes], *, exec: bool) -> None:
        """Write the file at `tree_path` from `chunks`, replacing any file already there.

        If `chunks` raises (a block missing or mismatched), the temporary file is removed and
        nothing appears under `tree_path`.
        """
        if self._root_fd < 0:
            raise InvalidInput("this checkout writer is closed")
        check_tree_path(tree_path)
        *dirs, name = tree_path.split("/")
        parent = self._open_parent(tuple(dirs))
        mode = EXEC_FILE_MODE if exec else PLAIN_FILE_MODE
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(temp, _FILE_FLAGS, mode, dir_fd=parent)
        try:
            try:
                for chunk in chunks:
                    _write_all(fd, chunk)
                # The mode given to open is reduced by the umask; a checkout gets git's modes.
                os.fchmod(fd, mode)
                if self._durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._rename_into_place(temp, name, parent, tree_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=parent)
            raise

    def _rename_into_place(self, temp: str, name: str, parent: int, tree_path: str) -> None:
        # rename replaces a symlink at `name` itself, never what it points to.
        try:
            os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except IsADirectoryError:
            raise InvalidInput(
                f"cannot write {tree_path!r}: {self._root / tree_path} is a directory"
            ) from None
        if self._durable:
            # Make the rename itself survive a power loss.
            os.fsync(parent)

    def _open_parent(self, dirs: tuple[str, ...]) -> int:
        """A descriptor of the directory `dirs` under root, creating it one level at a time."""
        if not dirs:
            return self._root_fd
        if self._parent is not None and self._parent[0] == dirs:
            return self._parent[1]
        self._forget_parent()
        current = self._root_fd
        try:
            for depth, segment in enumerate(dirs):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(segment, DIR_MODE, dir_fd=current)
                child = self._open_dir(current, segment, dirs[: depth + 1])
                if current != self._root_fd:
                    os.close(current)
                current = child
        except BaseException:
            if current != self._root_fd:
                os.close(current)
            raise
        self._parent = (dirs, current)
        return current

    def _open_dir(self, parent: int, segment: str, dirs: tuple[str, ...]) -> int:
        try:
            return os.open(segment, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        shown = self._root.joinpath(*dirs)
        if stat.S_ISLNK(os.stat(segment, dir_fd=parent, follow_symlinks=False).st_mode):
            raise UnsafePath(
                f"{shown} is a symlink; refusing to write through it"
                " (remove it and check out again)"
            )
        raise InvalidInput(f"{shown} is in the way: the tree needs a directory there")

    def _forget_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
