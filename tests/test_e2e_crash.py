"""The store survives `kill -9` of the daemon at any moment.

A writer process creates records and contributions with files as fast as the daemon takes
them and prints each CID once the daemon acknowledged it. The daemon is killed with SIGKILL
at a random moment; after a restart every acknowledged record must be there, verify, and
its files must check out byte for byte.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.daemons import DaemonFactory

pytestmark = pytest.mark.slow

# Rounds of write-and-kill; each is bounded by the kill delay plus a restart.
ROUNDS = 3
# The kill lands somewhere in this window (seconds after the writer starts writing).
KILL_WINDOW = (0.3, 1.5)

WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ostrom.client import Client
    from ostrom.errors import OstromError

    data_dir, project, scratch, prefix = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    scratch.mkdir(parents=True, exist_ok=True)
    print("ready", flush=True)
    try:
        with Client(data_dir, timeout=10) as node:
            for i in range(100000):
                if i % 3 == 0:
                    f = scratch / f"file{i}.bin"
                    f.write_bytes(os.urandom(1000 + i * 97 % 300000))
                    to = f"{prefix}/r{i % 7}"
                    c = node.contribute(project, [f], to=to, message=f"c{i}")
                    print("contribution", c["cid"], f"{to}/{f.name}", f, flush=True)
                else:
                    n = node.create_need(project, f"need {i}")
                    print("need", n["cid"], flush=True)
    except (OstromError, OSError) as exc:
        print("stopped", type(exc).__name__, flush=True)
    """
)


def test_kill_9_loses_nothing_acknowledged(daemons: DaemonFactory, tmp_path: Path) -> None:
    node = daemons.make("crash")
    project = node.json("project", "create", "durable", "--license", "MIT")["cid"]
    acknowledged: list[list[str]] = []
    rng = random.Random(1234)
    for round_number in range(ROUNDS):
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(node.data_dir),
                project,
                str(tmp_path / f"scratch{round_number}"),
                f"round{round_number}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(*KILL_WINDOW))
            node.kill9()
            out, _ = writer.communicate(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(10)
        lines = [line.split() for line in out.splitlines()]
        acknowledged.extend(line for line in lines if line[0] in ("need", "contribution"))
        node.start()

    assert len(acknowledged) > 5, "the writer should have got some work acknowledged"
    with node.client() as client:
        for kind, cid, *_rest in acknowledged:
            shown = client.show(cid)
            assert shown["type"] == kind
        tree = {f["path"]: f for f in client.tree(project, at=None)["files"]}
    contributions = [line for line in acknowledged if line[0] == "contribution"]
    assert contributions
    out_dir = tmp_path / "out"
    node.json("checkout", project, str(out_dir))
    # Every contribution wrote a path of its own, so each acknowledged file is in the tree.
    for _, _, tree_path, source in contributions:
        assert tree_path in tree
        assert (out_dir / tree_path).read_bytes() == Path(source).read_bytes()
