"""Tree paths: every safe path is accepted, every way out of the tree is refused."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostrom.errors import InvalidInput, UnsafePath
from ostrom.protocol.paths import (
    MAX_PATH_LENGTH,
    MAX_SEGMENT_LENGTH,
    check_tree_path,
    join_tree_path,
    parent_dirs,
)

_FORBIDDEN = "".join(chr(c) for c in range(0x20)) + "\x7f\\"


def _is_segment(s: str) -> bool:
    return (
        s not in ("", ".", "..")
        and unicodedata.normalize("NFC", s) == s
        and len(s.encode()) <= MAX_SEGMENT_LENGTH
    )


segments = (
    st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters=_FORBIDDEN + "/"),
        min_size=1,
        max_size=16,
    )
    .map(lambda s: unicodedata.normalize("NFC", s))
    .filter(_is_segment)
)
paths = (
    st.lists(segments, min_size=1, max_size=5)
    .map("/".join)
    .filter(lambda p: unicodedata.normalize("NFC", p) == p)
)


@given(paths)
def test_safe_paths_are_accepted_unchanged(path: str) -> None:
    assert check_tree_path(path) == path
    assert join_tree_path("", path) == path
    assert parent_dirs(path) == [
        "/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)
    ]


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "README",
        "docs/hello.txt",
        ".hidden",
        "...",
        "..a",
        "a..",
        "a/.b/..c",
        "with space/and-dash_under.score",
        "café/ünïcödé/日本語/😀",
        "a\u0085b",  # C1 controls are not forbidden by section 5.5
        "x" * MAX_SEGMENT_LENGTH,
        "é" * (MAX_SEGMENT_LENGTH // 2),
        "/".join(["s" * 200] * 20)[:MAX_PATH_LENGTH].rstrip("/"),
    ],
)
def test_normal_paths_are_accepted(path: str) -> None:
    assert check_tree_path(path) == path


def _at_most(length: int) -> str:
    """A valid path of exactly `length` UTF-8 bytes, in segments of 100."""
    path = "/".join(["s" * 99] * (length // 100 + 1))
    path = path[:length]
    return path[:-1] + "t" if path.endswith("/") else path


def test_the_length_bounds_are_in_utf8_bytes() -> None:
    assert len(_at_most(MAX_PATH_LENGTH)) == MAX_PATH_LENGTH
    check_tree_path(_at_most(MAX_PATH_LENGTH))
    with pytest.raises(UnsafePath, match="longer"):
        check_tree_path(_at_most(MAX_PATH_LENGTH + 1))
    check_tree_path("é" * (MAX_SEGMENT_LENGTH // 2))  # 254 bytes
    with pytest.raises(UnsafePath, match="longer"):
        check_tree_path("é" * (MAX_SEGMENT_LENGTH // 2 + 1))  # 256 bytes, 128 code points
    with pytest.raises(UnsafePath, match="longer"):
        check_tree_path("ok/" + "x" * (MAX_SEGMENT_LENGTH + 1) + "/ok")


_UNSAFE = [
    "",
    "/",
    "/x",
    "/etc/passwd",
    "//x",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "a/..",
    "a/../..",
    "a/../b",
    "./a",
    "a/.",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "C:\\Windows",
    "a\x00b",
    "a\nb",
    "a\tb",
    "a\rb",
    "a\x1fb",
    "a\x7fb",
    "cafe\u0301",  # NFD
    "e\u0301/x",
    "\u212b",  # ANGSTROM SIGN: its NFC is U+00C5
    "a\ud800b",  # a lone surrogate is not UTF-8
    "x" * (MAX_PATH_LENGTH + 1),
    "x" * (MAX_SEGMENT_LENGTH + 1),
]


@pytest.mark.parametrize("path", _UNSAFE, ids=repr)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePath):
        check_tree_path(path)


@pytest.mark.parametrize("path", [None, 1, b"a", ["a"]], ids=repr)
def test_a_path_that_is_not_a_string_is_refused(path: object) -> None:
    with pytest.raises(UnsafePath):
        check_tree_path(path)  # type: ignore[arg-type]


def test_an_unsafe_path_is_invalid_input_to_a_caller() -> None:
    """RPC callers catch `InvalidInput`; a bad path must reach them as one."""
    with pytest.raises(InvalidInput):
        check_tree_path("../x")


@given(
    st.lists(segments, min_size=0, max_size=3).map("/".join),
    st.sampled_from(["/x", "x/", "./x", "x/.", "../x", "x/..", "a//b", "a\\b", "a\x00b"]),
    st.lists(segments, min_size=0, max_size=3).map("/".join),
)
def test_an_unsafe_part_anywhere_makes_the_path_unsafe(head: str, bad: str, tail: str) -> None:
    path = "/".join(part for part in (head, bad, tail) if part)
    with pytest.raises(UnsafePath):
        check_tree_path(path)


# --- join_tree_path -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "joined"),
    [
        ("", "a", "a"),
        ("", "a/b", "a/b"),
        ("docs", "a", "docs/a"),
        ("docs/", "a", "docs/a"),
        ("docs//", "a", "docs/a"),
        ("docs/api", "a/b.md", "docs/api/a/b.md"),
        ("docs/api/", "a/b.md", "docs/api/a/b.md"),
    ],
)
def test_join_with_and_without_a_prefix(prefix: str, path: str, joined: str) -> None:
    assert join_tree_path(prefix, path) == joined


@pytest.mark.parametrize(
    ("prefix", "path"),
    [
        ("/", "a"),
        ("/etc", "passwd"),
        ("//etc", "passwd"),
        ("..", "a"),
        ("docs/..", "a"),
        (".", "a"),
        ("a//b", "c"),
        ("docs", ""),
        ("docs", "/a"),
        ("docs", "../a"),
        ("docs", "a/../../b"),
        ("docs", "a/"),
        ("", ""),
        ("", "/a"),
        ("a\\b", "c"),
        ("x" * MAX_PATH_LENGTH, "a"),
    ],
)
def test_join_refuses_absolute_and_escaping_parts(prefix: str, path: str) -> None:
    with pytest.raises(UnsafePath):
        join_tree_path(prefix, path)


@given(st.lists(segments, max_size=3).map("/".join), st.booleans(), paths)
def test_join_is_prefix_slash_path(prefix: str, trailing_slash: bool, path: str) -> None:
    joined = join_tree_path(prefix + "/" * (trailing_slash and bool(prefix)), path)
    assert joined == (f"{prefix}/{path}" if prefix else path)
    assert joined.endswith(path) and check_tree_path(joined) == joined
