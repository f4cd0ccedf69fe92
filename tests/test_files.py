from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ostrom.errors import AlreadyExists, BlockMismatch, InvalidInput, NotFound, UnsafePath
from ostrom.files import TEMP_PREFIX, CheckoutWriter, LocalFile, collect


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _listing(root: Path) -> dict[str, bytes]:
    """Every file under root (not following symlinks), by relative path."""
    out: dict[str, bytes] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if not path.is_symlink():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


# --- collect -------------------------------------------------------------------------------------


def test_directory_contributes_its_contents(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, {"a.txt": b"a", "sub/b.txt": b"bb", "sub/deeper/c": b"ccc", ".git/HEAD": b"x"})
    (src / "empty").mkdir()
    got = collect([src])
    assert [f.tree_path for f in got] == [".git/HEAD", "a.txt", "sub/b.txt", "sub/deeper/c"]
    assert {f.tree_path: (f.fs_path, f.size) for f in got}["sub/deeper/c"] == (
        src / "sub/deeper/c",
        3,
    )


def test_to_prefix_and_direct_files(tmp_path: Path) -> None:
    _tree(tmp_path, {"src/x/y.md": b"y", "README": b"readme"})
    got = collect([tmp_path / "src", tmp_path / "README"], to="docs/v1")
    assert [f.tree_path for f in got] == ["docs/v1/README", "docs/v1/x/y.md"]
    assert [f.tree_path for f in collect([tmp_path / "README"], to="docs/")] == ["docs/README"]
    with pytest.raises(UnsafePath, match="absolute"):
        collect([tmp_path / "README"], to="/docs/")


def test_to_must_be_a_safe_path(tmp_path: Path) -> None:
    _tree(tmp_path, {"f": b""})
    with pytest.raises(UnsafePath):
        collect([tmp_path / "f"], to="../up")
    with pytest.raises(UnsafePath):
        collect([tmp_path / "f"], to="a/./b")


def test_exec_bit_and_size(tmp_path: Path) -> None:
    _tree(tmp_path, {"run.sh": b"#!/bin/sh\n", "data": b""})
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "data").chmod(0o644)
    got = {f.tree_path: f for f in collect([tmp_path])}
    assert got["run.sh"] == LocalFile("run.sh", tmp_path / "run.sh", 10, True)
    assert got["data"] == LocalFile("data", tmp_path / "data", 0, False)


def test_symlinks_are_refused_wherever_they_are(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, {"inside.txt": b"i", "sub/f": b"f"})
    (src / "sub" / "link").symlink_to(src / "inside.txt")
    with pytest.raises(UnsafePath, match=r"sub/link is a symlink"):
        collect([src])
    os.unlink(src / "sub" / "link")
    (src / "out").symlink_to("/etc")
    with pytest.raises(UnsafePath, match="out is a symlink"):
        collect([src])
    os.unlink(src / "out")
    (tmp_path / "direct").symlink_to(src / "inside.txt")
    with pytest.raises(UnsafePath, match="direct is a symlink"):
        collect([tmp_path / "direct"])
    (tmp_path / "dirlink").symlink_to(src)
    with pytest.raises(UnsafePath, match="dirlink is a symlink"):
        collect([tmp_path / "dirlink"])


def test_fifo_and_socket_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, {"ok": b""})
    os.mkfifo(src / "pipe")
    with pytest.raises(UnsafePath, match="pipe is not a regular file"):
        collect([src])
    with pytest.raises(UnsafePath, match="pipe is not a regular file"):
        collect([src / "pipe"])
    os.unlink(src / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        with pytest.raises(UnsafePath, match="sock is not a regular file"):
            collect([src])


def test_duplicate_target_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path, {"a/same.txt": b"1", "b/same.txt": b"2"})
    with pytest.raises(InvalidInput, match=r"same\.txt"):
        collect([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(InvalidInput):
        collect([tmp_path / "a" / "same.txt", tmp_path / "b" / "same.txt"])
    with pytest.raises(InvalidInput):
        collect([tmp_path / "a", tmp_path / "a"])


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nope"):
        collect([tmp_path / "nope"])


def test_names_that_are_not_tree_paths(tmp_path: Path) -> None:
    _tree(tmp_path, {"src/back\\slash": b""})
    with pytest.raises(UnsafePath, match="backslash"):
        collect([tmp_path / "src"])
    os.unlink(tmp_path / "src" / "back\\slash")
    # A name that is not UTF-8 (Linux allows any bytes).
    with open(os.path.join(os.fsencode(tmp_path / "src"), b"\xff\xfe"), "wb"):
        pass
    with pytest.raises(UnsafePath, match="UTF-8"):
        collect([tmp_path / "src"])


# --- CheckoutWriter ------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory next to the checkout that nothing may ever write to."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "keep").write_bytes(b"untouched")
    yield path
    assert _listing(path) == {"keep": b"untouched"}


def test_writes_files_and_directories(tmp_path: Path) -> None:
    root = tmp_path / "new" / "checkout"
    with CheckoutWriter(root) as writer:
        writer.write("a/b/c.txt", [b"hello ", b"world"], exec=False)
        writer.write("a/b/d.txt", iter([b"d"]), exec=False)
        writer.write("top", [], exec=True)
        writer.write("a/e", [b"e"], exec=False)
    assert _listing(root) == {
        "a/b/c.txt": b"hello world",
        "a/b/d.txt": b"d",
        "top": b"",
        "a/e": b"e",
    }
    assert stat.S_IMODE(os.stat(root / "top").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "a/b/c.txt").st_mode) == 0o644
    assert not [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_exec_bits_ignore_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with CheckoutWriter(tmp_path / "co") as writer:
            writer.write("x", [b""], exec=True)
            writer.write("y", [b""], exec=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "co/x").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "co/y").st_mode) == 0o644


def test_existing_empty_directory_is_used(tmp_path: Path) -> None:
    (tmp_path / "co").mkdir()
    with CheckoutWriter(tmp_path / "co") as writer:
        writer.write("f", [b"1"], exec=False)
    assert (tmp_path / "co/f").read_bytes() == b"1"


def test_non_empty_directory_needs_overwrite(tmp_path: Path) -> None:
    _tree(tmp_path / "co", {"mine.txt": b"mine", "f": b"old"})
    with pytest.raises(AlreadyExists, match="not empty"):
        CheckoutWriter(tmp_path / "co")
    assert _listing(tmp_path / "co") == {"mine.txt": b"mine", "f": b"old"}
    with CheckoutWriter(tmp_path / "co", overwrite=True, durable=True) as writer:
        writer.write("f", [b"new"], exec=False)
    assert _listing(tmp_path / "co") == {"mine.txt": b"mine", "f": b"new"}


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InvalidInput, match="not a directory"):
        CheckoutWriter(tmp_path / "file")


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/../../x", "a//b", "./a", ""])
def test_unsafe_tree_paths(tmp_path: Path, outside: Path, bad: str) -> None:
    with CheckoutWriter(tmp_path / "co") as writer, pytest.raises(UnsafePath):
        writer.write(bad, [b"evil"], exec=False)
    assert _listing(tmp_path / "co") == {}


def test_planted_directory_symlink_is_not_followed(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "co"
    root.mkdir()
    (root / "a").symlink_to(outside)
    with CheckoutWriter(root, overwrite=True) as writer:
        with pytest.raises(UnsafePath, match="a is a symlink"):
            writer.write("a/b", [b"evil"], exec=False)
        with pytest.raises(UnsafePath):
            writer.write("a/keep", [b"evil"], exec=False)
        # The writer stays usable for the rest of the tree.
        writer.write("c/d", [b"fine"], exec=False)
    assert (root / "c/d").read_bytes() == b"fine"


def test_planted_symlink_deeper_down(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "co"
    with CheckoutWriter(root) as writer:
        writer.write("x/y/first", [b"1"], exec=False)
        (root / "x" / "z").symlink_to(outside)
        with pytest.raises(UnsafePath, match="x/z is a symlink"):
            writer.write("x/z/evil", [b"evil"], exec=False)


def test_planted_file_symlink_is_replaced_not_written_through(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "co"
    root.mkdir()
    (root / "f").symlink_to(outside / "keep")
    with CheckoutWriter(root, overwrite=True) as writer:
        writer.write("f", [b"tree content"], exec=False)
    assert not (root / "f").is_symlink()
    assert (root / "f").read_bytes() == b"tree content"


def test_a_file_in_the_way_of_a_directory(tmp_path: Path) -> None:
    with CheckoutWriter(tmp_path / "co") as writer:
        writer.write("a", [b"file"], exec=False)
        with pytest.raises(InvalidInput, match="in the way"):
            writer.write("a/b", [b"x"], exec=False)
        writer.write("d/e", [b"x"], exec=False)
        with pytest.raises(InvalidInput, match="is a directory"):
            writer.write("d", [b"x"], exec=False)
    assert _listing(tmp_path / "co") == {"a": b"file", "d/e": b"x"}


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"half of "
        raise BlockMismatch("block bafk...: its bytes do not hash to its CID")

    root = tmp_path / "co"
    with CheckoutWriter(root) as writer:
        writer.write("keep", [b"old"], exec=False)
        with pytest.raises(BlockMismatch):
            writer.write("keep", chunks(), exec=False)
        with pytest.raises(BlockMismatch):
            writer.write("dir/new", chunks(), exec=False)
    assert _listing(root) == {"keep": b"old"}


def test_killed_process_leaves_no_half_file(tmp_path: Path) -> None:
    root = tmp_path / "co"
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from ostrom.files import CheckoutWriter\n"
        "def chunks():\n"
        "    yield b'x' * 1000\n"
        "    os._exit(3)\n"
        f"CheckoutWriter(Path({str(root)!r})).write('f', chunks(), exec=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, check=False)
    assert done.returncode == 3
    assert not (root / "f").exists()


def test_closed_writer_refuses(tmp_path: Path) -> None:
    writer = CheckoutWriter(tmp_path / "co")
    writer.close()
    writer.close()
    with pytest.raises(InvalidInput):
        writer.write("f", [b""], exec=False)


def test_collect_then_checkout_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, {"bin/tool": b"#!", "lib/x/y.py": b"print()", "z": b"z" * 10_000})
    (src / "bin/tool").chmod(0o755)
    with CheckoutWriter(tmp_path / "co") as writer:
        for f in collect([src]):
            writer.write(f.tree_path, [f.fs_path.read_bytes()], exec=f.exec)
    assert _listing(tmp_path / "co") == _listing(src)
    assert [(f.tree_path, f.exec) for f in collect([tmp_path / "co"])] == [
        (f.tree_path, f.exec) for f in collect([src])
    ]
