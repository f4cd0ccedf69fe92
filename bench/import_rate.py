"""Records verified and stored per second through the import path, beside the verify ceiling.

The ceiling is PyNaCl's raw ed25519 verification rate, on one thread, over the signing
payloads of the very records imported. The measured path is the whole import a user runs:
`ostrom import FILE.car` against a real daemon process, i.e. reading the CAR file, sending
its sections over the RPC socket, decoding, checking and verifying each record, and storing
it durably in SQLite. A second figure isolates the daemon's side (decode + verify + store,
in process) to show where time goes.

    python -m bench.import_rate [--records N] [--out bench/results/import.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.bindings

from bench.common import Daemon, machine, write_car, write_result
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.crypto.signing import RECORD_DOMAIN
from ostrom.protocol.records import (
    Contribution,
    Policy,
    Project,
    SignedRecord,
    Validation,
    sign,
    signing_payload,
)

# Authors in the synthetic project: enough that keys vary like in a real community.
AUTHORS = 8
# Repetitions of each timing; the median is reported.
REPEATS = 5


def make_records(count: int, name: str = "bench") -> list[SignedRecord]:
    """A project of `count` records: a chain of contributions with validations beside them.

    Projects of different `name`s are different projects (their genesis records differ)."""
    authors = [Identity.from_seed(bytes([i]) * 32) for i in range(AUTHORS)]
    founder = authors[0]
    genesis = sign(
        Project(
            author=founder.public_key,
            ts=1_700_000_000_000,
            name=name,
            license="MIT",
            policy=Policy((founder.public_key,), 1),
        ),
        founder,
    )
    records = [genesis]
    head = genesis.cid
    changeset = CID.of_dag_cbor(b"changeset placeholder")
    ts = genesis.ts
    while len(records) < count:
        ts += 1
        author = authors[len(records) % AUTHORS]
        c = sign(
            Contribution(
                author=author.public_key,
                ts=ts,
                project=genesis.cid,
                parents=(head,),
                changes=(changeset,),
                message=f"change number {len(records)}",
            ),
            author,
        )
        records.append(c)
        head = c.cid
        if len(records) < count:
            ts += 1
            records.append(
                sign(
                    Validation(
                        author=founder.public_key,
                        ts=ts,
                        project=genesis.cid,
                        target=c.cid,
                        verdict="accept",
                    ),
                    founder,
                )
            )
    return records


def verify_ceiling(records: list[SignedRecord]) -> float:
    """Raw ed25519 verifications per second on one thread (PyNaCl / libsodium)."""
    items = [(r.sig + RECORD_DOMAIN + signing_payload(r.body), r.author) for r in records]
    start = time.perf_counter()
    for signed, key in items:
        nacl.bindings.crypto_sign_open(signed, key)
    return len(items) / (time.perf_counter() - start)


def in_process_rates(records: list[SignedRecord], workdir: Path) -> list[tuple[float, float]]:
    """(ceiling, rate) pairs: decode + verify + durable store, in process, in batches.

    Each repeat measures the verify ceiling right before its own run, so the two figures
    of a pair share the machine's state; shared machines drift by tens of percent.
    """
    import trio

    from ostrom.node.store import Store
    from ostrom.node.verifier import VerifierPool

    payloads = [r.data for r in records]
    pairs = []
    for repeat in range(REPEATS):
        ceiling = verify_ceiling(records)
        store = Store.open(workdir / f"inproc{repeat}.sqlite")

        async def run(store: Store = store) -> None:
            with VerifierPool() as pool:
                await _ingest_all(pool, store)

        async def _ingest_all(pool: VerifierPool, store: Store) -> None:
            for i in range(0, len(payloads), 1024):
                decoded = await pool.decode_records(payloads[i : i + 1024])
                good = [d for d in decoded if isinstance(d, SignedRecord)]
                assert len(good) == len(decoded), "every benchmark record must verify"
                await trio.to_thread.run_sync(store.put_records, good)

        start = time.perf_counter()
        trio.run(run)
        pairs.append((ceiling, len(records) / (time.perf_counter() - start)))
        store.close()
    return pairs


def daemon_import_rates(
    records: list[SignedRecord], workdir: Path
) -> tuple[list[tuple[float, float]], int]:
    """(ceiling, rate) pairs for `ostrom import` of a CAR file into a fresh real daemon."""
    car = workdir / "bench.car"
    write_car(car, records)
    pairs = []
    for repeat in range(REPEATS):
        daemon = Daemon(workdir / f"home{repeat}")
        try:
            daemon.wait_ready()
            ceiling = verify_ceiling(records)
            start = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "ostrom.cli", "--json", "import", str(car)],
                env=dict(os.environ, OSTROM_HOME=str(daemon.home)),
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            pairs.append((ceiling, len(records) / (time.perf_counter() - start)))
            summary = json.loads(result.stdout)
            assert summary["stored"] == len(records), summary
        finally:
            daemon.stop()
    return pairs, car.stat().st_size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--out", default="bench/results/import.json")
    args = parser.parse_args(argv)
    records = make_records(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        inproc = in_process_rates(records, workdir)
        daemon, car_bytes = daemon_import_rates(records, workdir)

    def summary(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        return {
            "ratio_median": round(statistics.median(rate / ceiling for ceiling, rate in pairs), 3),
            "records_per_s": [round(rate) for _, rate in pairs],
            "verify_ceiling_per_s": [round(ceiling) for ceiling, _ in pairs],
        }

    result = {
        "benchmark": "import_rate",
        "records": len(records),
        "car_bytes": car_bytes,
        "daemon_import": summary(daemon),
        "in_process": summary(inproc),
        "target_ratio": 0.65,
        "machine": machine(),
        "command": "python -m bench.import_rate --records " + str(args.records),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
