"""Acceptance: what one new contribution costs the node that keeps its project's state.

A node that has evaluated a project (its own, or one someone asked the status of) moves the
state forward by each record it stores (`acceptance.advance`) instead of evaluating the
project again. This bench builds a project of N contributions in a line, evaluates it once,
then times `advance` for each of `--steps` more contributions (the median is reported).

Ceiling, measured in the same run: `evaluate` of the whole project, what the node would do
without `advance`. The ratio advance / evaluate should fall as N grows: the cost of a step
is meant to follow the new records, not the project.

    python -m bench.advance [--records 1000,10000,100000] [--steps 21]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.common import machine, write_result
from ostrom.crypto.keys import Identity
from ostrom.protocol.acceptance import advance, evaluate
from ostrom.protocol.records import Contribution, Policy, Project, SignedRecord, sign

# Record times a millisecond apart from a fixed start: each contribution comes after every
# record already judged, as on a busy project's head.
START_TS = 1_700_000_000_000


def contributions(
    author: Identity, genesis: SignedRecord, head: SignedRecord, n: int, ts: int
) -> list[SignedRecord]:
    """`n` contributions in a line on `head`, timed from `ts` on."""
    line: list[SignedRecord] = []
    for i in range(n):
        head = sign(
            Contribution(
                author=author.public_key,
                ts=ts + i,
                project=genesis.cid,
                parents=(head.cid,),
                changes=(),
                message=f"revision {i}",
            ),
            author,
        )
        line.append(head)
    return line


def run(n: int, steps: int) -> dict[str, Any]:
    author = Identity.from_seed(bytes(32))
    genesis = sign(
        Project(
            author=author.public_key,
            ts=START_TS,
            name="bench",
            license="MIT",
            policy=Policy(maintainers=(author.public_key,), quorum=1),
        ),
        author,
    )
    records = [genesis, *contributions(author, genesis, genesis, n, START_TS + 1)]
    start = time.perf_counter()
    state = evaluate(genesis, records)
    evaluate_s = time.perf_counter() - start
    times = []
    for record in contributions(author, genesis, records[-1], steps, START_TS + 1 + n):
        start = time.perf_counter()
        advanced = advance(state, [record])
        times.append(time.perf_counter() - start)
        if advanced is None:
            raise RuntimeError("a contribution on the head did not advance the state")
        state = advanced[0]
    step_s = statistics.median(times)
    return {
        "records": n,
        "advance_ms_median": round(1000 * step_s, 3),
        "evaluate_ms": round(1000 * evaluate_s, 1),
        "ratio_advance_to_evaluate": round(step_s / evaluate_s, 6),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", default="1000,10000,100000")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--out", default="bench/results/advance.json")
    args = parser.parse_args(argv)
    rows = [run(int(n), args.steps) for n in args.records.split(",")]
    for row in rows:
        print(
            f"{row['records']:>8,} records: advance {row['advance_ms_median']:8.3f} ms, "
            f"evaluate {row['evaluate_ms']:9.1f} ms"
        )
    return write_result(
        {
            "benchmark": "advance",
            "rows": rows,
            "machine": machine(),
            "command": "python -m bench.advance " + " ".join(argv or []),
        },
        args.out,
        show=False,
    )


if __name__ == "__main__":
    main()
