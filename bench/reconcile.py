"""Set reconciliation (`/ostrom/sync/1.0.0`): bytes and time of a whole exchange, in process.

Two replicas of one project of N record ids (100,000 by default) differ by a few ids; two
`Reconciler`s exchange messages through `encode_message` / `decode_message` until both are
done, and we count every byte both ways and the wall time of the whole loop (both sides' CPU:
processing, encoding, decoding). The index build is timed separately: a node builds it once
per project and keeps it up to date with `add`.

Ceilings, measured in the same run:
- bytes: the naive exchange, one side sending all its ids (N * 36 bytes);
- time: hashing N ids (sha256 of each) and sorting N ids, the least a node spends to touch
  every id once.

The issue's target: 100,000 vs 100,000 differing by 10 ids (5 on each side, or 10 on one
side) in at most 16 KiB and 0.5 s. A sweep of the branching factor and the leaf size shows
why the defaults are what they are (docs/SYNC.md).

    python -m bench.reconcile [--records N] [--repeats R] [--out bench/results/reconcile.json]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from typing import Any

from bench.common import machine, write_result
from ostrom.crypto.cid import CID
from ostrom.protocol.reconcile import (
    BRANCHING,
    DEFAULT_MAX_MESSAGE_BYTES,
    ID_LENGTH,
    LEAF_SIZE,
    Message,
    ReconcileIndex,
    Reconciler,
    decode_message,
    encode_message,
)

# The targets for a 10-id difference between two 100,000-record replicas.
TARGET_BYTES = 16 * 1024
TARGET_SECONDS = 0.5
# A session that has not ended after this many messages is a bug, not a slow exchange.
MAX_MESSAGES = 100_000


def record_ids(count: int, salt: bytes) -> list[bytes]:
    """`count` distinct record ids, as real records have: dag-cbor CIDs of distinct bytes."""
    return [CID.of_dag_cbor(salt + i.to_bytes(8, "big")).raw for i in range(count)]


def exchange(a: ReconcileIndex, b: ReconcileIndex, **settings: int) -> tuple[dict[str, Any], float]:
    """Run one session, A initiating; return its figures and its wall time in seconds."""
    start = time.perf_counter()
    alice = Reconciler(a, initiator=True, **settings)
    bob = Reconciler(b, initiator=False, **settings)
    sent = {"initiator": 0, "responder": 0}
    largest = 0
    messages = 0
    message: Message | None = alice.start()
    receiver, sender_name = bob, "initiator"
    while message is not None:
        data = encode_message(message)
        sent[sender_name] += len(data)
        largest = max(largest, len(data))
        messages += 1
        if messages > MAX_MESSAGES:
            raise RuntimeError("the session did not end")
        message = receiver.receive(decode_message(data))
        receiver = alice if receiver is bob else bob
        sender_name = "responder" if sender_name == "initiator" else "initiator"
    elapsed = time.perf_counter() - start
    assert alice.done and bob.done
    assert alice.need == bob.have and alice.have == bob.need
    figures = {
        "bytes": sent["initiator"] + sent["responder"],
        "bytes_initiator": sent["initiator"],
        "bytes_responder": sent["responder"],
        "largest_message": largest,
        "messages": messages,
        "initiator_needs": len(alice.need),
        "responder_needs": len(bob.need),
    }
    return figures, elapsed


def ceilings(ids: list[bytes], repeats: int) -> dict[str, Any]:
    """The naive exchange's bytes and the time to touch every id once."""
    hash_times, sort_times = [], []
    shuffled = sorted(ids, key=lambda i: i[::-1])  # an order unrelated to the sorted one
    for _ in range(repeats):
        start = time.perf_counter()
        for i in ids:
            hashlib.sha256(i).digest()
        hash_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        sorted(shuffled)
        sort_times.append(time.perf_counter() - start)
    return {
        "naive_bytes": len(ids) * ID_LENGTH,
        "hash_ids_s": round(statistics.median(hash_times), 4),
        "sort_ids_s": round(statistics.median(sort_times), 4),
    }


def run_case(
    name: str, shared: list[bytes], only_a: list[bytes], only_b: list[bytes], repeats: int
) -> dict[str, Any]:
    start = time.perf_counter()
    a = ReconcileIndex.build(shared + only_a)
    build_a = time.perf_counter() - start
    start = time.perf_counter()
    b = ReconcileIndex.build(shared + only_b)
    build_b = time.perf_counter() - start
    times = []
    figures: dict[str, Any] = {}
    for _ in range(repeats):
        figures, elapsed = exchange(a, b)
        times.append(elapsed)
    assert figures["initiator_needs"] == len(only_b) and figures["responder_needs"] == len(only_a)
    return {
        "case": name,
        "initiator_ids": len(a),
        "responder_ids": len(b),
        "difference": len(only_a) + len(only_b),
        **figures,
        "exchange_s": round(statistics.median(times), 4),
        "exchange_s_all": [round(t, 4) for t in times],
        "index_build_s": [round(build_a, 4), round(build_b, 4)],
    }


def sweep(shared: list[bytes], only_a: list[bytes], only_b: list[bytes]) -> list[dict[str, Any]]:
    """Bytes and messages of one exchange for each branching factor and leaf size."""
    a = ReconcileIndex.build(shared + only_a)
    b = ReconcileIndex.build(shared + only_b)
    rows = []
    for branching in (4, 8, 16, 32):
        for leaf_size in (4, 8, 16, 32, 64):
            figures, _ = exchange(a, b, branching=branching, leaf_size=leaf_size)
            rows.append(
                {
                    "records": len(shared),
                    "branching": branching,
                    "leaf_size": leaf_size,
                    "bytes": figures["bytes"],
                    "messages": figures["messages"],
                }
            )
    return rows


def incremental(ids: list[bytes], extra: list[bytes]) -> dict[str, Any]:
    """Cost of keeping the index up to date: add ids one by one, then fingerprint once."""
    index = ReconcileIndex.build(ids)
    start = time.perf_counter()
    for i in extra:
        index.add(i)
    added = time.perf_counter() - start
    start = time.perf_counter()
    index.fingerprint(b"", b"\xff" * (ID_LENGTH + 1))
    first = time.perf_counter() - start
    return {
        "index_ids": len(ids),
        "added": len(extra),
        "add_us_each": round(added / len(extra) * 1e6, 2),
        "first_fingerprint_after_adds_ms": round(first * 1000, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/reconcile.json")
    args = parser.parse_args(argv)
    n, repeats = args.records, args.repeats

    shared = record_ids(n, b"shared")
    a_only = record_ids(1_000, b"a")
    b_only = record_ids(1_000, b"b")
    cases = [
        ("identical", shared, [], []),
        ("differ by 10: 5 on each side", shared, a_only[:5], b_only[:5]),
        ("differ by 10: 10 on the initiator's side", shared, a_only[:10], []),
        ("differ by 10: 10 on the responder's side", shared, [], b_only[:10]),
        ("differ by 100: 50 on each side", shared, a_only[:50], b_only[:50]),
        ("differ by 100: 100 on one side", shared, a_only[:100], []),
        ("differ by 1,000: 500 on each side", shared, a_only[:500], b_only[:500]),
        ("differ by 1,000: 1,000 on one side", shared, a_only, []),
        ("all vs nothing (the initiator has all)", [], shared, []),
        ("nothing vs all (the responder has all)", [], [], shared),
    ]
    results = [run_case(name, s, x, y, repeats) for name, s, x, y in cases]
    for row in results:
        print(
            f"{row['case']:<42} {row['bytes']:>10,} B {row['messages']:>4} msgs "
            f"{row['exchange_s'] * 1000:>9.1f} ms"
        )
    ceiling = ceilings(shared, repeats)
    print(
        f"ceiling: naive {ceiling['naive_bytes']:,} B; sha256 of {n:,} ids "
        f"{ceiling['hash_ids_s'] * 1000:.1f} ms; sort {ceiling['sort_ids_s'] * 1000:.1f} ms"
    )
    target_rows = [r for r in results if r["difference"] == 10 and n >= 100_000]
    targets = {
        "bytes_at_most": TARGET_BYTES,
        "seconds_at_most": TARGET_SECONDS,
        "met": all(
            r["bytes"] <= TARGET_BYTES and r["exchange_s"] <= TARGET_SECONDS for r in target_rows
        )
        if target_rows
        else None,
    }
    print(f"target (10 differences, <= 16 KiB, <= 0.5 s): {targets['met']}")
    sweeps = sweep(shared, a_only[:5], b_only[:5]) + sweep(shared[: n // 3], a_only[:5], b_only[:5])
    result = {
        "benchmark": "reconcile",
        "records": n,
        "settings": {
            "branching": BRANCHING,
            "leaf_size": LEAF_SIZE,
            "max_message_bytes": DEFAULT_MAX_MESSAGE_BYTES,
        },
        "ceiling": ceiling,
        "target": targets,
        "cases": results,
        "incremental_index": incremental(shared, a_only),
        "sweep_5_each_side": sweeps,
        "machine": machine(),
        "command": f"python -m bench.reconcile --records {n} --repeats {repeats}",
    }
    return write_result(result, args.out, show=False)


if __name__ == "__main__":
    main()
