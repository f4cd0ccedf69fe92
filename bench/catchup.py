"""Catch-up of a project from one peer: records/s beside the single-thread verify ceiling.

Daemon A gets an N-record project by `ostrom import` of a CAR built in process (signed
records from `bench.import_rate.make_records`). Daemon B, bootstrapped to A, follows the
project; the figure is N over the time from `follow` until B's store holds all N records.
The ceiling is PyNaCl's raw ed25519 verify rate on one thread over the same records,
measured in the same run right before the catch-up.

How the end is seen. Once a sync brings records, B looks for the blocks they name, and that
walk of the project's history holds B's store lock for seconds on a 100k-record chain (about
7 s here), so every RPC waits behind it: a `node.status` poll returns whenever the walk
ends, not when the last record was stored. (Polling `node.status` also cost B a third of a
core: it counts the whole store, about 30 ms at 100k records, under the same lock.) So the
benchmark watches B's store file itself, read-only, with `SELECT count(*)` every 50 ms, which
takes none of B's locks (SQLite in WAL mode lets a reader in while the daemon writes). That
gives `seconds`, the catch-up. It then also waits for B's RPC to report all N records, and
records that time as `rpc_seconds`: what a user polling `ostrom status` would see. The
store file is opened only here, only to count, and only for measurement.

    python -m bench.catchup [--records N] [--repeats R] [--out bench/results/catchup.json]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine, write_car, write_result
from bench.import_rate import make_records, verify_ceiling
from ostrom.client import Client
from ostrom.datadir import DataDir
from ostrom.protocol.records import SignedRecord

# Poll interval while waiting for a store to fill: small beside catch-ups of seconds.
POLL_S = 0.05


def wait_stored(store: Path, count: int, deadline: float) -> None:
    """Return once the store file at `store` holds `count` records (read-only peeks)."""
    while True:
        try:
            with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
                while True:
                    held = conn.execute("SELECT count(*) FROM records").fetchone()[0]
                    if held >= count:
                        return
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"the store holds {held} of {count} records")
                    time.sleep(POLL_S)
        except sqlite3.OperationalError:  # not created yet, or the table not yet there
            if time.perf_counter() > deadline:
                raise
            time.sleep(POLL_S)


def wait_reported(client: Client, count: int, deadline: float) -> None:
    """Return once the daemon's `node.status` reports `count` records."""
    while True:
        held = client.status()["store"]["records"]
        if held >= count:
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the daemon reports {held} of {count} records")
        time.sleep(POLL_S)


def catchup(records: list[SignedRecord], workdir: Path, timeout: float) -> dict[str, Any]:
    car = workdir / "project.car"
    write_car(car, records, [])
    a = Daemon(workdir / "a")
    b: Daemon | None = None
    try:
        a.wait_ready()
        t0 = time.perf_counter()
        summary = a.client.import_car(car)
        import_s = time.perf_counter() - t0
        assert summary["stored"] == len(records), summary
        b = Daemon(workdir / "b", bootstrap=[a.addr()])
        b.wait_ready()
        # Wait for the connection so the figure is catch-up, not dialling.
        deadline = time.monotonic() + 30
        while b.client.status()["peers"] < 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)
        ceiling = verify_ceiling(records)
        project = str(records[0].cid)
        start = time.perf_counter()
        b.client.follow(project)
        wait_stored(DataDir(b.home).database, len(records), start + timeout)
        elapsed = time.perf_counter() - start
        wait_reported(b.client, len(records), start + timeout)
        return {
            "ceiling": ceiling,
            "rate": len(records) / elapsed,
            "seconds": elapsed,
            "rpc_seconds": time.perf_counter() - start,
            "import_into_a_s": import_s,
        }
    finally:
        if b is not None:
            b.stop()
        a.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default="bench/results/catchup.json")
    args = parser.parse_args(argv)
    records = make_records(args.records)
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(catchup(records, Path(tmp), args.timeout))
    ratios = sorted(r["rate"] / r["ceiling"] for r in runs)
    result = {
        "benchmark": "catchup",
        "records": len(records),
        "ratio_median": round(ratios[len(ratios) // 2], 3),
        "records_per_s": [round(r["rate"]) for r in runs],
        "verify_ceiling_per_s": [round(r["ceiling"]) for r in runs],
        "seconds": [round(r["seconds"], 2) for r in runs],
        "rpc_seconds": [round(r["rpc_seconds"], 2) for r in runs],
        "import_into_a_s": [round(r["import_into_a_s"], 2) for r in runs],
        "target_ratio": 0.65,
        "machine": machine(),
        "command": "python -m bench.catchup "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
