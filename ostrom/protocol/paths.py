"""Paths inside a project tree: always relative, normalised, POSIX, and unable to escape.

A tree path is a `/`-separated sequence of segments. No segment is empty, `.` or `..`, none
contains NUL, a backslash or a control character, and the path is NFC-normalised, so that
two nodes never disagree about whether two paths are the same file. These rules are what
make `../../etc/passwd` or `/etc/passwd` in a contribution an error instead of a write
outside the checkout directory.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from ostrom.errors import UnsafePath

# Linux's PATH_MAX and NAME_MAX: a longer path could not be checked out on the common
# filesystems anyway.
MAX_PATH_LENGTH: Final = 4096
MAX_SEGMENT_LENGTH: Final = 255
_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f\\]")


def check_tree_path(path: str) -> str:
    """Return `path` if it is a valid tree path; raise `UnsafePath` saying why not."""
    if not isinstance(path, str) or not path:
        raise UnsafePath("a path must be a non-empty string")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_LENGTH:
        raise UnsafePath(f"path longer than {MAX_PATH_LENGTH} bytes")
    if path.startswith("/"):
        raise UnsafePath(f"absolute path not allowed: {path!r}")
    if _FORBIDDEN.search(path):
        raise UnsafePath(f"path contains a control character or backslash: {path!r}")
    if unicodedata.normalize("NFC", path) != path:
        raise UnsafePath(f"path is not NFC-normalised: {path!r}")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafePath(f"path escapes or is not normalised ({segment!r} segment): {path!r}")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_LENGTH:
            raise UnsafePath(f"path segment longer than {MAX_SEGMENT_LENGTH} bytes: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"path is not valid UTF-8: {path!r}") from None
    return path


def join_tree_path(prefix: str, path: str) -> str:
    """`prefix/path`, both checked; an empty prefix means the tree's root.

    An absolute prefix is refused like any absolute path: `--to /etc` is a mistake to
    report, not a path to reinterpret. A trailing slash (`docs/`) is fine.
    """
    if prefix.startswith("/"):
        raise UnsafePath(f"absolute path not allowed: {prefix!r}")
    prefix = prefix.rstrip("/")
    return check_tree_path(f"{prefix}/{path}" if prefix else path)


def parent_dirs(path: str) -> list[str]:
    """The directories that contain `path`, outermost first: `a/b/c` gives `a`, `a/b`."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
