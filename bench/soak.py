"""Memory of daemons under steady gossip: does a node's RSS grow over half an hour?

Three daemons in a chain (A - B - C) follow one project. A script on A contributes a small
file at a steady rate; B relays each record to C. The resident memory of every daemon
(process and children) is sampled throughout. Growth is the mean of the last tenth of the
samples over the mean of the first tenth after the warm-up. Each record is also checked to
have reached C, so the run measures a mesh that keeps up, not one that fell behind.

Target (issue 4): no growth beyond 5% over 30 minutes.

    python -m bench.soak [--minutes 30] [--rate 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine, write_result
from bench.idle import sample

# Minutes of the run whose samples are not counted: imports, the first syncs, caches filling.
WARMUP_MIN = 2.0
# Seconds between two memory samples.
SAMPLE_EVERY_S = 15.0


def wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.2)


def run(minutes: float, rate: float, workdir: Path) -> dict[str, Any]:
    a = Daemon(workdir / "a")
    a.wait_ready()
    b = Daemon(workdir / "b", bootstrap=[a.addr()])
    b.wait_ready()
    c = Daemon(workdir / "c", bootstrap=[b.addr()])
    c.wait_ready()
    daemons = {"a": a, "b": b, "c": c}
    try:
        project = a.client.create_project("soak", license="CC0-1.0")["cid"]
        for node in (b, c):
            node.client.follow(project)
        wait_for(lambda: c.client.projects(), 60)
        page = workdir / "page.md"
        series: dict[str, list[tuple[float, float]]] = {name: [] for name in daemons}
        start = time.monotonic()
        end = start + minutes * 60
        next_sample = start
        made = 0
        while time.monotonic() < end:
            page.write_text(f"revision {made}\n" + "x" * 512)
            a.client.contribute(project, [page], message=f"revision {made}")
            made += 1
            now = time.monotonic()
            if now >= next_sample:
                for name, node in daemons.items():
                    series[name].append(((now - start) / 60, sample(node.proc.pid)["tree_rss"]))
                next_sample += SAMPLE_EVERY_S
            time.sleep(max(0.0, start + made / rate - time.monotonic()))
        wait_for(lambda: c.client.project(project)["record_count"] >= made + 1, 120)
        mib = 1024 * 1024
        nodes: dict[str, Any] = {}
        for name, points in series.items():
            counted = [rss for minute, rss in points if minute >= WARMUP_MIN]
            tenth = max(1, len(counted) // 10)
            first = statistics.mean(counted[:tenth])
            last = statistics.mean(counted[-tenth:])
            nodes[name] = {
                "first_mib": round(first / mib, 1),
                "last_mib": round(last / mib, 1),
                "growth_percent": round(100 * (last - first) / first, 2),
                "samples_mib": [round(rss / mib, 1) for _, rss in points],
            }
        return {
            "benchmark": "soak",
            "machine": machine(),
            "minutes": minutes,
            "rate_per_s": rate,
            "records": made,
            "nodes": nodes,
            "target_growth_percent_at_most": 5,
            "met": all(n["growth_percent"] <= 5 for n in nodes.values()),
        }
    finally:
        for node in daemons.values():
            node.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=2.0, help="contributions per second")
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ostrom-soak-") as tmp:
        result = run(args.minutes, args.rate, Path(tmp))
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
