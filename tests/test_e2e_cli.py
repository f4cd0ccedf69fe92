"""End to end: a real `ostrom daemon` process driven through the `ostrom` CLI."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from ostrom.crypto.cid import CID
from tests.daemons import Daemon, DaemonFactory

pytestmark = pytest.mark.slow


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_init_and_id_work_without_a_daemon(tmp_path: Path) -> None:
    daemon = Daemon(data_dir=tmp_path / "home", log_path=tmp_path / "log")
    first = daemon.json("init")
    assert first["created"] is True
    assert first["peer_id"].startswith("12D3KooW")
    assert stat.S_IMODE(os.stat(tmp_path / "home").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "home" / "identity.key").st_mode) == 0o600
    key_before = (tmp_path / "home" / "identity.key").read_bytes()
    again = daemon.json("init")
    assert again["created"] is False and again["peer_id"] == first["peer_id"]
    assert (tmp_path / "home" / "identity.key").read_bytes() == key_before
    shown = daemon.json("id")
    assert shown["peer_id"] == first["peer_id"]
    assert len(bytes.fromhex(shown["public_key"])) == 32


def test_commands_without_a_daemon_give_a_one_line_hint(tmp_path: Path) -> None:
    daemon = Daemon(data_dir=tmp_path / "home", log_path=tmp_path / "log")
    result = daemon.cli("status", check=False)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1
    assert "ostrom daemon" in result.stderr


def test_second_daemon_on_the_same_data_dir_is_refused(node: Daemon, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ostrom.cli", "--data-dir", str(node.data_dir), "daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78  # cannot start: a service manager must not retry
    assert "already running" in result.stderr
    assert node.cli("status").returncode == 0  # the first one is unharmed


def test_daemon_stops_cleanly_on_sigterm(daemons: DaemonFactory) -> None:
    node = daemons.make("n")
    assert node.stop() == 0
    assert not node.socket.exists()
    node.start()  # and starts again on the same data
    assert node.json("status")["store"]["projects"] == 0


def test_project_lifecycle_through_the_cli(node: Daemon, tmp_path: Path) -> None:
    created = node.json(
        "project",
        "create",
        "recipes",
        "--license",
        "cc-by-sa-4.0",
        "--description",
        "Shared cooking",
    )
    assert created["license"] == "CC-BY-SA-4.0"
    assert created["cid"].startswith("bafyrei")
    listed = node.json("project", "list")
    assert [p["name"] for p in listed] == ["recipes"]
    # By name, by full CID, by prefix.
    for ref in ("recipes", created["cid"], created["cid"][:14]):
        assert node.json("project", "show", ref)["cid"] == created["cid"]

    src = tmp_path / "src"
    _write(src / "soup.md", b"# Soup\nboil water\n")
    big = os.urandom(3 * 256 * 1024 + 123)
    _write(src / "bread" / "sourdough.bin", big)
    _write(src / "bread" / "notes" / "flour.txt", b"rye\n")
    tool = _write(src / "bake.sh", b"#!/bin/sh\necho bake\n")
    tool.chmod(0o755)
    contribution = node.json(
        "contribute",
        "recipes",
        str(src / "soup.md"),
        str(src / "bread"),
        str(tool),
        "--to",
        "mains",
        "-m",
        "Soup, bread and a script",
    )
    assert contribution["status"] == "accepted"  # the founder is a maintainer
    assert contribution["paths"] == 4

    tree = node.json("tree", "recipes")
    files = {f["path"]: f for f in tree["files"]}
    assert set(files) == {
        "mains/soup.md",
        "mains/sourdough.bin",
        "mains/notes/flour.txt",
        "mains/bake.sh",
    }
    assert files["mains/sourdough.bin"]["size"] == len(big)
    assert files["mains/bake.sh"]["exec"] is True
    assert tree["conflicts"] == []

    out = tmp_path / "out"
    checkout = node.json("checkout", "recipes", str(out))
    assert checkout["files"] == 4
    assert (out / "mains" / "sourdough.bin").read_bytes() == big
    assert (out / "mains" / "soup.md").read_bytes() == b"# Soup\nboil water\n"
    assert os.access(out / "mains" / "bake.sh", os.X_OK)

    # Re-contributing the same big file uploads nothing new: blocks are deduplicated.
    again = node.json(
        "contribute",
        "recipes",
        str(src / "bread" / "sourdough.bin"),
        "--to",
        "copies",
        "-m",
        "A copy",
    )
    assert again["uploaded_bytes"] < 1024
    assert again["deduplicated_bytes"] >= len(big)

    deleted = node.json("contribute", "recipes", "--delete", "copies/sourdough.bin", "-m", "Tidy")
    assert deleted["status"] == "accepted"
    assert "copies/sourdough.bin" not in {f["path"] for f in node.json("tree", "recipes")["files"]}

    log = node.json("log", "recipes")
    assert [e["type"] for e in log] == ["contribution"] * 3 + ["project"]
    assert all(e["status"] == "accepted" for e in log)
    assert log[-1]["cid"] == created["cid"]

    # The tree as of the first contribution still has the copy-free layout.
    at_first = node.json("tree", "recipes", "--at", contribution["cid"][:16])
    assert {f["path"] for f in at_first["files"]} == set(files)

    human = node.cli("log", "recipes").stdout
    assert "Soup, bread and a script" in human and "[accepted]" in human


def test_needs_comments_and_show(node: Daemon, tmp_path: Path) -> None:
    node.json("project", "create", "atlas", "--license", "ODbL-1.0")
    need = node.json("need", "create", "atlas", "Map of the river", "--body", "1:10000 please")
    needs = node.json("need", "list", "atlas")
    assert [(n["title"], n["status"]) for n in needs] == [("Map of the river", "open")]
    river = _write(tmp_path / "river.geojson", b'{"type": "FeatureCollection"}')
    made = node.json(
        "contribute", "atlas", str(river), "-m", "River map", "--resolves", need["cid"]
    )
    needs = node.json("need", "list", "atlas")
    assert needs[0]["status"] == "resolved"
    assert needs[0]["resolved_by"][0]["record"] == made["cid"]
    comment = node.json("comment", made["cid"], "Lovely work")
    shown = node.json("show", made["cid"])
    assert [c["text"] for c in shown["comments"]] == ["Lovely work"]
    assert shown["changes"][0]["path"] == "river.geojson"
    assert node.json("show", comment["cid"])["target"] == made["cid"]


def test_governance_changes_the_policy(node: Daemon, daemons: DaemonFactory) -> None:
    other = daemons.make("other")
    other_id = other.json("id")["peer_id"]
    node.json("project", "create", "gov", "--license", "MIT")
    added = node.json("governance", "gov", "add-maintainer", other_id)
    assert added["status"] == "accepted"
    shown = node.json("project", "show", "gov")
    assert {m["peer_id"] for m in shown["current_policy"]["maintainers"]} == {
        node.json("id")["peer_id"],
        other_id,
    }
    raised = node.json("governance", "gov", "set-quorum", "2")
    assert raised["status"] == "accepted"
    assert node.json("project", "show", "gov")["current_policy"]["quorum"] == 2
    refused = node.cli("governance", "gov", "set-quorum", "3", check=False)
    assert refused.returncode == 1 and "maintainer" in refused.stderr


def test_fork_and_lineage(node: Daemon, tmp_path: Path) -> None:
    node.json("project", "create", "upstream", "--license", "GPL-3.0-or-later")
    readme = _write(tmp_path / "README", b"v1\n")
    first = node.json("contribute", "upstream", str(readme), "-m", "v1")
    fork = node.json("fork", "upstream", "--name", "downstream")
    assert fork["fork_of"]["project"] == node.json("project", "show", "upstream")["cid"]
    assert fork["fork_of"]["heads"] == [first["cid"]]
    assert fork["license"] == "GPL-3.0-or-later"
    # The fork starts with upstream's tree.
    assert [f["path"] for f in node.json("tree", "downstream")["files"]] == ["README"]
    _write(readme, b"v2 in the fork\n")
    node.json("contribute", "downstream", str(readme), "-m", "fork change")
    assert node.json("tree", "upstream")["files"][0]["size"] == 3
    lineage = node.json("forks", "downstream")
    assert lineage["upstream"][0]["name"] == "upstream"
    down = node.json("forks", "upstream")
    assert [f["name"] for f in down["forks"]] == ["downstream"]


def test_bad_input_gets_clear_errors_and_the_node_lives_on(node: Daemon, tmp_path: Path) -> None:
    bad_license = node.cli("project", "create", "x", "--license", "MIT AND (", check=False)
    assert bad_license.returncode == 1 and "SPDX" in bad_license.stderr
    unknown_license = node.cli("project", "create", "x", "--license", "Not-A-License", check=False)
    assert unknown_license.returncode == 1 and "Not-A-License" in unknown_license.stderr
    node.json("project", "create", "p", "--license", "MIT")
    src = _write(tmp_path / "f.txt", b"x")
    escape = node.cli("contribute", "p", str(src), "--to", "../../etc", "-m", "m", check=False)
    assert escape.returncode == 1 and "escapes" in escape.stderr
    absolute = node.cli("contribute", "p", str(src), "--to", "/etc", "-m", "m", check=False)
    assert absolute.returncode == 1
    linkdir = tmp_path / "withlink"
    linkdir.mkdir()
    (linkdir / "passwd").symlink_to("/etc/passwd")
    symlink = node.cli("contribute", "p", str(linkdir), "-m", "m", check=False)
    assert symlink.returncode == 1 and "symlink" in symlink.stderr
    delete_missing = node.cli("contribute", "p", "--delete", "nope", "-m", "m", check=False)
    assert delete_missing.returncode == 1 and "not in the tree" in delete_missing.stderr
    unknown = node.cli("show", "bafyreiaaaaaaa", check=False)
    assert unknown.returncode == 1
    usage = node.cli("validate", "x", check=False)
    assert usage.returncode == 2
    # Checkout refuses to write through a symlink planted in the target directory.
    node.json("contribute", "p", str(src), "--to", "a", "-m", "m")
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "a").symlink_to(outside)
    planted = node.cli("checkout", "p", str(out), "--force", check=False)
    assert planted.returncode == 1
    assert list(outside.iterdir()) == []
    # Nothing of that hurt the daemon or its store.
    assert node.json("status")["store"]["projects"] == 1
    assert len(node.json("log", "p")) == 2


def _raw_call(sock: socket.socket, payload: bytes) -> list[object]:
    sock.sendall(payload)
    unpacker = msgpack.Unpacker(raw=False)
    sock.settimeout(10)
    while True:
        data = sock.recv(65536)
        assert data, "daemon closed the connection"
        unpacker.feed(data)
        for message in unpacker:
            return list(message)


def test_socket_survives_malformed_messages(node: Daemon) -> None:
    assert stat.S_IMODE(os.stat(node.socket).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(node.socket))
        garbage = _raw_call(sock, b"\xc1\xc1\xc1")
        assert garbage[0] == 1 and garbage[2]["code"] == "rpc_protocol"
        unknown = _raw_call(sock, msgpack.packb([0, 7, "no.such.method", []]))
        assert unknown[:2] == [1, 7] and unknown[2]["code"] == "method_not_found"
        wrong = _raw_call(sock, msgpack.packb([0, 8, "project.create", [{"name": 5}]]))
        assert wrong[2]["code"] == "invalid_params"
        extra = _raw_call(sock, msgpack.packb([0, 9, "node.id", [{"bogus": 1}]]))
        assert extra[2]["code"] == "invalid_params" and "bogus" in extra[2]["message"]
        shape = _raw_call(sock, msgpack.packb([0, 10, "node.id", "notalist"]))
        assert shape[2] is not None
        ok = _raw_call(sock, msgpack.packb([0, 11, "node.id", []]))
        assert ok[:3] == [1, 11, None] and ok[3]["peer_id"].startswith("12D3KooW")


def test_json_output_is_one_document(node: Daemon) -> None:
    result = node.cli("status", "--json")
    json.loads(result.stdout)
    error = node.cli("project", "show", "nothing-here", "--json", check=False)
    assert error.returncode == 1
    assert json.loads(error.stderr)["error"]["code"] == "not_found"


def test_follow_and_unfollow(node: Daemon) -> None:
    created = node.json("project", "create", "mine", "--license", "MIT")
    assert created["following"] == "full"  # a node follows what it creates
    unseen = str(CID.of_dag_cbor(b"a project from elsewhere"))
    followed = node.json("follow", unseen, "--records-only")
    assert followed == {"project": unseen, "mode": "records", "present": False}
    assert "not here yet" in node.cli("follow", unseen).stdout
    assert node.json("unfollow", "mine")["following"] is False
    assert node.json("project", "show", "mine")["following"] is None
    again = node.cli("unfollow", "mine", check=False)
    assert again.returncode == 1 and "does not follow" in again.stderr
    by_name = node.cli("follow", "no-such-name", check=False)
    assert by_name.returncode == 1 and "full CID" in by_name.stderr
    raw_block = node.cli("follow", str(CID.of_raw(b"x")), check=False)
    assert raw_block.returncode == 1 and "block" in raw_block.stderr


def test_events_of_an_unknown_type_are_refused_with_the_known_ones(node: Daemon) -> None:
    result = node.cli("events", "--type", "record.add", check=False)
    assert result.returncode != 0
    assert "unknown event type record.add" in result.stderr
    assert "record.added" in result.stderr
