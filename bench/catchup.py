"""Catch-up of a project from one peer: records/s beside the single-thread verify ceiling.

Daemon A gets an N-record project by `ostrom import` of a CAR built in process (signed
records from `bench.import_rate.make_records`). Daemon B, bootstrapped to A, follows the
project; the figure is N over the time from `follow` until B's store holds all N records.

Watching B must cost B little: `node.status` counts the whole store (about 30 ms at 100k
records, under the store's lock), so polling it every 50 ms took a third of a core from the
catch-up and stalled its writes. The wait instead polls `record.get` for the record with
the highest CID, which a pull from one peer asks for last, and then confirms the count once
with `node.status` (polling that if the count is still short, so the figure stays honest
whatever order the records arrive in).
The ceiling is PyNaCl's raw ed25519 verify rate on one thread over the same records,
measured in the same run right before the catch-up.

    python -m bench.catchup [--records N] [--out bench/results/catchup.json]

This module also holds `Daemon`, the small helper the other network benchmarks use to run
real daemon processes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine, write_car, write_result
from bench.import_rate import make_records, verify_ceiling
from ostrom.client import Client
from ostrom.errors import NotFound
from ostrom.protocol.records import SignedRecord

# Poll interval while waiting for a store to fill: small beside catch-ups of seconds.
POLL_S = 0.05


def wait_records(client: Client, count: int, timeout: float, last: str | None = None) -> float:
    """Seconds until the daemon's store holds `count` records (raises on timeout).

    With `last`, first wait (cheaply) until that record is stored; see the module docstring.
    """
    start = time.perf_counter()
    deadline = start + timeout
    while last is not None and time.perf_counter() < deadline:
        try:
            client.call("record.get", cids=[last])
            break
        except NotFound:
            time.sleep(POLL_S)
    while True:
        held = client.status()["store"]["records"]
        if held >= count:
            return time.perf_counter() - start
        if time.perf_counter() > deadline:
            raise TimeoutError(f"store holds {held} of {count} records after {timeout} s")
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
        first_wait = time.perf_counter() - start
        last = str(max(r.cid for r in records))
        elapsed = first_wait + wait_records(b.client, len(records), timeout, last)
        return {
            "ceiling": ceiling,
            "rate": len(records) / elapsed,
            "seconds": elapsed,
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
        "import_into_a_s": [round(r["import_into_a_s"], 2) for r in runs],
        "target_ratio": 0.65,
        "machine": machine(),
        "command": "python -m bench.catchup "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
