"""The store survives `kill -9` at any moment: nothing acknowledged is lost, nothing corrupt served.

A writer process puts records and blocks in a loop and prints each CID only after the put
returned. The test kills it with SIGKILL after a random delay, reopens the store, and checks
that every printed CID is there and reads back verified. Several rounds share one store, so
later rounds also start from a store that was killed mid-write.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ostrom.crypto.cid import CID
from ostrom.node.store import Store

ROUNDS = 5
# The kill lands somewhere in the first half second of writing: long enough for dozens of
# committed batches and usually in the middle of one.
MAX_DELAY = 0.5
# A writer that has not opened its store in this long is broken, not slow.
START_TIMEOUT = 10.0

WRITER = r"""
import os, sys
from pathlib import Path
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.node.store import Store
from ostrom.protocol.records import Contribution, Policy, Project, Validation, sign

path, round_no = Path(sys.argv[1]), int(sys.argv[2])
me = Identity.from_seed(bytes([7]) * 32)
store = Store.open(path)
g = sign(Project(author=me.public_key, ts=round_no, name=f"round {round_no}",
                 license="MIT", policy=Policy(maintainers=(me.public_key,))), me)
store.put_records([g])
print("r", g.cid, flush=True)
parent = g.cid
for i in range(100_000):  # bounded; the test kills the writer long before the end
    batch = []
    for j in range(1 + i % 20):
        c = sign(Contribution(author=me.public_key, ts=1_000 + i * 100 + j, project=g.cid,
                              parents=(parent,), changes=(g.cid,), message=f"{i}.{j}"), me)
        batch.append(c)
        batch.append(sign(Validation(author=me.public_key, ts=c.body.ts, project=g.cid,
                                     target=c.cid, verdict="accept"), me))
        parent = c.cid
    store.put_records(batch)
    print("\n".join(f"r {r.cid}" for r in batch), flush=True)
    data = os.urandom(1024 * (1 + i % 64))
    store.put_blocks([(CID.of_raw(data), data)])
    print("b", CID.of_raw(data), flush=True)
"""


def _acknowledged(output: bytes) -> tuple[list[CID], list[CID]]:
    """The CIDs on complete lines of the writer's output (a cut-off last line is not one)."""
    records: list[CID] = []
    blocks: list[CID] = []
    for line in output.decode().split("\n")[:-1]:
        kind, text = line.split()
        (records if kind == "r" else blocks).append(CID.parse(text))
    return records, blocks


def _run_and_kill(path: Path, round_no: int, delay: float) -> bytes:
    """Run a writer, SIGKILL it `delay` seconds after its first acknowledgement, return stdout.

    Its stdout goes to a file, not a pipe, so the writer never blocks on printing and is
    killed while it writes to the store.
    """
    out_path = path.with_name(f"writer-{round_no}.out")
    with out_path.open("wb") as out:
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(round_no)],
            stdout=out,
            stderr=subprocess.PIPE,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while b"\n" not in out_path.read_bytes():
            if writer.poll() is not None or time.monotonic() > deadline:
                _, err = writer.communicate(timeout=START_TIMEOUT)
                pytest.fail(f"the writer did not start writing: {err.decode()}")
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.communicate(timeout=START_TIMEOUT)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=START_TIMEOUT)
    assert writer.returncode == -signal.SIGKILL
    return out_path.read_bytes()


@pytest.mark.slow
def test_nothing_acknowledged_is_lost_and_nothing_corrupt_is_served(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    all_records: list[CID] = []
    all_blocks: list[CID] = []
    for round_no in range(ROUNDS):
        delay = rng.uniform(0.0, MAX_DELAY)
        records, blocks = _acknowledged(_run_and_kill(path, round_no, delay))
        all_records += records
        all_blocks += blocks
        context = f"seed {seed}, round {round_no}, killed after {delay:.3f} s"

        with Store.open(path) as store:
            assert store.has_records(all_records) == set(all_records), context
            assert store.has_blocks(all_blocks) == set(all_blocks), context
            # Reading verifies every byte against its CID; a torn write would raise here.
            found = store.get_records(all_records)
            assert set(found) == set(all_records), context
            for cid in all_blocks:
                assert store.get_block(cid) is not None, context
            # Everything stored, acknowledged or not, reads back whole.
            for project in store.projects():
                store.project_records(project.cid)
            assert store.stats().projects == round_no + 1, context
    assert len(all_records) > ROUNDS  # the writer did get past its genesis in some round
