"""Memory of daemons under steady gossip: does a node's RSS grow over half an hour?

Three daemons in a chain (A - B - C) follow one project. A script on A contributes a small
file at a steady rate; B relays each record to C. The resident memory of every daemon
(process and children) is sampled throughout, split into anonymous memory (heap, malloc
arenas, SQLite's page cache) and file-backed memory (mapped code and libraries).

Growth is the mean of the last tenth of the samples over the mean of the first tenth after
the warm-up; the same is reported from the very start of the run (warm-up included), and as
a slope: KiB of RSS per record taken in, fitted by least squares over the samples after the
warm-up. Each record is also checked to have reached C, so the run measures a mesh that
keeps up, not one that fell behind.

Target (issue 4): no growth beyond 5% over 30 minutes.

    python -m bench.soak [--minutes 30] [--rate 2] [--warmup 2]
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
_MIB = 1024 * 1024


def wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.2)


def _status_kib(pid: int, field: str) -> int:
    """A `field:  N kB` line of /proc/PID/status, in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _growth(values: list[float]) -> float:
    """Percent from the mean of the first tenth of `values` to the mean of the last tenth."""
    tenth = max(1, len(values) // 10)
    first, last = statistics.mean(values[:tenth]), statistics.mean(values[-tenth:])
    return round(100 * (last - first) / first, 2)


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope


def summarise(points: list[dict[str, float]], warmup_min: float) -> dict[str, Any]:
    """Growth figures of one daemon's samples (minute, records so far, rss, anon, file)."""
    counted = [p for p in points if p["minute"] >= warmup_min] or points
    tenth = max(1, len(counted) // 10)
    rss = [p["rss"] for p in counted]
    return {
        "first_mib": round(statistics.mean(rss[:tenth]) / _MIB, 1),
        "last_mib": round(statistics.mean(rss[-tenth:]) / _MIB, 1),
        "growth_percent": _growth(rss),
        "growth_percent_from_start": _growth([p["rss"] for p in points]),
        "anon_growth_mib": round(
            (
                statistics.mean(p["anon"] for p in counted[-tenth:])
                - statistics.mean(p["anon"] for p in counted[:tenth])
            )
            / _MIB,
            1,
        ),
        "kib_per_record": round(_slope([p["records"] for p in counted], rss) / 1024, 2),
        "samples_mib": [round(p["rss"] / _MIB, 1) for p in points],
        "anon_samples_mib": [round(p["anon"] / _MIB, 1) for p in points],
    }


def run(minutes: float, rate: float, warmup_min: float, workdir: Path) -> dict[str, Any]:
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
        series: dict[str, list[dict[str, float]]] = {name: [] for name in daemons}
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
                    pid = node.proc.pid
                    series[name].append(
                        {
                            "minute": (now - start) / 60,
                            "records": made,
                            "rss": sample(pid)["tree_rss"],
                            "anon": _status_kib(pid, "RssAnon") * 1024,
                        }
                    )
                next_sample += SAMPLE_EVERY_S
            time.sleep(max(0.0, start + made / rate - time.monotonic()))
        wait_for(lambda: c.client.project(project)["record_count"] >= made + 1, 120)
        nodes = {name: summarise(points, warmup_min) for name, points in series.items()}
        return {
            "benchmark": "soak",
            "machine": machine(),
            "minutes": minutes,
            "rate_per_s": rate,
            "warmup_minutes": warmup_min,
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
    parser.add_argument("--warmup", type=float, default=WARMUP_MIN, help="minutes not counted")
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ostrom-soak-") as tmp:
        result = run(args.minutes, args.rate, args.warmup, Path(tmp))
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
