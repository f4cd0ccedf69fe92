"""An idle daemon's memory and CPU, beside a bare py-libp2p host measured in the same run.

The daemon hosts (follows) 100 projects of 1,000 records each, imported from a CAR file, and
is restarted before it is measured, so the figure is what a node costs after a reboot, not
after an import. The ceiling is a bare py-libp2p host (`libp2p.new_host()` listening on
127.0.0.1, nothing else) started at the same time. Both are sampled over the same window:
resident memory (VmRSS, of the process and of its children, e.g. the verification pool's
fork server) and CPU time (user + system) per second of wall time.

Targets (issue 4): idle RSS at most the bare host's plus 25 MiB; idle CPU under 1%.

    python -m bench.idle [--projects 100] [--records 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine, write_car, write_result
from bench.import_rate import make_records

# Seconds a freshly started process is left alone before the window opens: start-up work
# (imports, the first DHT and sync attempts) is not idle work.
SETTLE_S = 15.0
# Samples per window: enough to see a trend, few enough not to disturb what is measured.
SAMPLES = 12
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# A bare py-libp2p host: what any libp2p node in Python costs before it does anything.
_BARE_HOST = """
import sys, trio, multiaddr
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair

async def main():
    host = new_host(key_pair=create_new_key_pair())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        print("ready", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its own, not its children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


def sample(pid: int) -> dict[str, float]:
    tree = [pid, *_children(pid)]
    return {
        "rss": _rss(pid),
        "tree_rss": sum(_rss(p) for p in tree),
        "cpu_s": sum(_cpu_s(p) for p in tree),
        "t": time.monotonic(),
    }


def measure(pids: dict[str, int], seconds: float) -> dict[str, dict[str, Any]]:
    """Sample every process in `pids` over the same window."""
    series: dict[str, list[dict[str, float]]] = {name: [] for name in pids}
    for i in range(SAMPLES + 1):
        for name, pid in pids.items():
            series[name].append(sample(pid))
        if i < SAMPLES:
            time.sleep(seconds / SAMPLES)
    out: dict[str, dict[str, Any]] = {}
    mib = 1024 * 1024
    for name, points in series.items():
        first, last = points[0], points[-1]
        out[name] = {
            "rss_mib": round(last["rss"] / mib, 1),
            "tree_rss_mib": round(last["tree_rss"] / mib, 1),
            "max_tree_rss_mib": round(max(p["tree_rss"] for p in points) / mib, 1),
            "cpu_percent": round(
                100 * (last["cpu_s"] - first["cpu_s"]) / (last["t"] - first["t"]), 3
            ),
        }
    return out


def run(projects: int, records: int, seconds: float, workdir: Path) -> dict[str, Any]:
    car = workdir / "hosted.car"
    everything = []
    for i in range(projects):
        everything += make_records(records, name=f"project-{i:03}")
    write_car(car, everything)
    genesis = [str(r.cid) for r in everything if r.type == "project"]
    home = workdir / "node"
    daemon = Daemon(home)
    try:
        daemon.wait_ready()
        daemon.client.import_car(car)
        for cid in genesis:
            daemon.client.follow(cid)
    finally:
        daemon.stop()
    del everything

    daemon = Daemon(home)
    bare = subprocess.Popen(
        [sys.executable, "-c", _BARE_HOST], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        daemon.wait_ready()
        assert bare.stdout is not None and bare.stdout.readline().strip() == b"ready"
        status = daemon.client.status()
        daemon.client.close()
        time.sleep(SETTLE_S)
        figures = measure({"daemon": daemon.proc.pid, "bare_host": bare.pid}, seconds)
    finally:
        bare.terminate()
        bare.wait(20)
        daemon.stop()
    d, b = figures["daemon"], figures["bare_host"]
    return {
        "benchmark": "idle",
        "machine": machine(),
        "projects": status["store"]["projects"],
        "records": status["store"]["records"],
        "window_s": seconds,
        "daemon": d,
        "bare_host": b,
        "rss_over_bare_mib": round(d["rss_mib"] - b["rss_mib"], 1),
        "tree_rss_over_bare_mib": round(d["tree_rss_mib"] - b["tree_rss_mib"], 1),
        "targets": {
            "rss_over_bare_mib_at_most": 25,
            "cpu_percent_below": 1.0,
            "rss_met": d["tree_rss_mib"] - b["tree_rss_mib"] <= 25,
            "cpu_met": d["cpu_percent"] < 1.0,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--projects", type=int, default=100)
    parser.add_argument("--records", type=int, default=1000, help="records per project")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window")
    parser.add_argument("--out", default="bench/results/idle.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ostrom-idle-") as tmp:
        result = run(args.projects, args.records, args.seconds, Path(tmp))
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
