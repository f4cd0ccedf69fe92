"""Time for a new record to reach every node of a mesh of real daemons, p50 and p99.

NODES daemons on 127.0.0.1 in a random connected topology (node i bootstraps to up to two
random earlier nodes), all following one project in full. Node 0 makes RATE contributions
per second (one small file each; `--kind need`: needs, which carry no blocks and are not
judged) for SECONDS seconds; a thread per daemon streams its `record.added` events and
stamps each arrival with the shared monotonic clock. A record's time-to-all-nodes is the
last arrival among all nodes minus the moment just before the call that made it.

    python -m bench.gossip [--nodes 20] [--rate 20] [--seconds 15] [--kind contribution]
                           [--events record.added|all]

The probe subscribes to `record.added` only; with `--events all` it takes every event, as
`ostrom events` does, and every daemon then also judges each contribution for
`status.changed` and reports each block fetch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine, write_result
from ostrom.client import Client
from ostrom.errors import OstromError

# Seconds after the last publish to wait for stragglers (a sync covers lost gossip).
DRAIN_S = 15.0
# Seconds for gossipsub meshes to form after everyone follows (heartbeat is 1 s).
SETTLE_S = 5.0
# Connections count as settled once no node's peer count changed for this long (the DHT
# refreshes and lookups that add connections run within seconds of each other) ...
STABLE_S = 5.0
# ... or after this long in any case.
CONNECT_WAIT_S = 90.0


def listen(
    home: Path, arrivals: dict[str, float], ready: threading.Event, every_event: bool
) -> None:
    client = Client(home, timeout=None)
    # Only the events the probe reads, unless told otherwise: a subscriber of every event
    # also makes each daemon judge every record for `status.changed` and send it the
    # transfer events of every block fetch (`--events all` measures that).
    events = client.events(None if every_event else ["record.added"])
    ready.set()
    try:
        for event in events:
            if event.get("type") == "record.added":
                cid = event["record"]["cid"]
                arrivals.setdefault(cid, time.monotonic())
    except (OstromError, OSError):  # the daemon stopping ends the stream
        return


def poll_counts(home: Path, times: list[float], stop: threading.Event, interval: float) -> None:
    """Stamp the moment the node's record count first reaches each value (no subscription:
    a probe that sends the daemon nothing)."""
    client = Client(home, timeout=30)
    try:
        while not stop.is_set():
            count = client.status()["store"]["records"]
            now = time.monotonic()
            while len(times) < count:
                times.append(now)
            time.sleep(interval)
    finally:
        client.close()


def progress(message: str) -> None:
    """One line on stderr, so a profiler run beside the bench can tell the phases apart."""
    print(f"{time.strftime('%H:%M:%S')} bench.gossip: {message}", file=sys.stderr, flush=True)


def wait_connections_settled(daemons: list[Daemon]) -> list[int]:
    """Wait until no node's peer count changed for `STABLE_S` (at most `CONNECT_WAIT_S`).

    Each node first connects to its bootstrap peers; DHT lookups then connect it to most
    others. Every new connection costs both nodes an identify, DHT, mesh and sync exchange;
    measured during that churn, gossip would pay for the mesh forming, not for relaying.
    """
    deadline = time.monotonic() + CONNECT_WAIT_S
    last: list[int] = []
    since = time.monotonic()
    while time.monotonic() < deadline:
        counts = [d.client.status()["peers"] for d in daemons]
        if counts != last:
            last, since = counts, time.monotonic()
        elif time.monotonic() - since >= STABLE_S:
            break
        time.sleep(0.5)
    return last


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 of stat (utime, stime), counted after the ")" that ends the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int, int]:
    """The machine's CPU time so far, in clock ticks summed over its processors: (busy,
    steal, total), from the first line of /proc/stat (Linux). Idle and I/O wait are the
    time no task wanted a processor; steal is time the hypervisor gave to another guest."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0, 0
    # user, nice, system, idle, iowait, irq, softirq, steal
    idle, iowait, steal = fields[3], fields[4], fields[7]
    total = sum(fields)
    return total - idle - iowait - steal, steal, total


def share(before: tuple[int, int, int], after: tuple[int, int, int], index: int) -> float | None:
    """The share of the machine's time between two `machine_ticks` that went to `index`."""
    total = after[2] - before[2]
    return round((after[index] - before[index]) / total, 3) if total > 0 else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    nodes: int,
    rate: float,
    seconds: float,
    workdir: Path,
    seed: int,
    topology: str,
    probe: str,
    poll_s: float,
    kind: str = "contribution",
    every_event: bool = False,
) -> dict[str, Any]:
    rng = random.Random(seed)
    daemons: list[Daemon] = []
    try:
        first = Daemon(workdir / "n0")
        first.wait_ready()
        daemons.append(first)
        addrs = [first.addr()]
        for i in range(1, nodes):
            boot = [addrs[-1]] if topology == "chain" else rng.sample(addrs, min(2, len(addrs)))
            d = Daemon(workdir / f"n{i}", bootstrap=boot)
            d.wait_ready()
            daemons.append(d)
            addrs.append(d.addr())
        project = first.client.create_project("gossip", license="MIT")["cid"]
        for d in daemons[1:]:
            d.client.follow(project)
        deadline = time.monotonic() + 60
        while any(d.client.status()["store"]["records"] < 1 for d in daemons[1:]):
            if time.monotonic() > deadline:
                raise TimeoutError("not every node got the project record")
            time.sleep(0.2)
        progress("every node has the project; waiting for the connections to settle")
        peers = wait_connections_settled(daemons)
        progress(f"connections settled: {sum(peers)} in all, {min(peers)}-{max(peers)} per node")
        time.sleep(SETTLE_S)
        arrivals: list[dict[str, float]] = [{} for _ in daemons]
        counts: list[list[float]] = [[] for _ in daemons]
        base = [d.client.status()["store"]["records"] for d in daemons]
        stop = threading.Event()
        for d, arr, cnt in zip(daemons, arrivals, counts, strict=True):
            if probe == "events":
                ready = threading.Event()
                threading.Thread(
                    target=listen, args=(d.home, arr, ready, every_event), daemon=True
                ).start()
                ready.wait(10)
            else:
                threading.Thread(
                    target=poll_counts, args=(d.home, cnt, stop, poll_s), daemon=True
                ).start()
        time.sleep(0.5)
        cpu_before = [cpu_seconds(d.proc.pid) for d in daemons]
        bench_cpu_before = time.process_time()
        sent: dict[str, float] = {}
        # A contribution of one small file: every follower also fetches its changeset,
        # manifest and file block (they follow in full), as they would for real work.
        page = workdir / "page.md"
        interval = 1.0 / rate
        progress("publishing")
        ticks_before = machine_ticks()
        start = time.monotonic()
        for k in range(int(rate * seconds)):
            target = start + k * interval
            now = time.monotonic()
            if target > now:
                time.sleep(target - now)
            t = time.monotonic()
            if kind == "contribution":
                page.write_text(f"revision {k}\n" + "x" * 256)
                cid = first.client.contribute(project, [page], message=f"revision {k}")["cid"]
            else:
                cid = first.client.create_need(project, f"need {k}")["cid"]
            sent[cid] = t
        publish_s = time.monotonic() - start
        ticks_after = machine_ticks()
        cpu_published = [
            cpu_seconds(d.proc.pid) - b for d, b in zip(daemons, cpu_before, strict=True)
        ]
        progress("published; waiting for every node to hold every record")
        order = list(sent)

        def fill_from_counts() -> None:
            # The k-th new record on a node is taken to be the k-th published (gossip keeps
            # one publisher's order on each link; a reordering shifts stamps by a poll).
            for arr, cnt, b in zip(arrivals, counts, base, strict=True):
                for k, cid in enumerate(order):
                    if b + k < len(cnt):
                        arr[cid] = cnt[b + k]

        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            if probe == "count":
                fill_from_counts()
            if all(all(c in arr for arr in arrivals) for c in sent):
                break
            time.sleep(0.2)
        stop.set()
        cpu = [cpu_seconds(d.proc.pid) - b for d, b in zip(daemons, cpu_before, strict=True)]
        bench_cpu = time.process_time() - bench_cpu_before
        if probe == "count":
            fill_from_counts()
        latencies = []
        in_order: list[float | None] = []
        # Per record, in send order: ms from the call to the author's own event, and the
        # node that got it last (what to look at when a stretch of records comes late).
        origin_in_order: list[float | None] = []
        last_node_in_order: list[int | None] = []
        from_origin = []
        incomplete = 0
        for cid, t in sent.items():
            times = [arr.get(cid) for arr in arrivals]
            if any(x is None for x in times):
                incomplete += 1
                in_order.append(None)
                origin_in_order.append(None)
                last_node_in_order.append(None)
                continue
            last = max(x for x in times if x is not None)
            latencies.append(last - t)
            in_order.append(round(1000 * (last - t)))
            origin_in_order.append(round(1000 * (arrivals[0][cid] - t)))
            last_node_in_order.append(times.index(last))
            from_origin.append(last - arrivals[0][cid])
        rss = []
        for d in daemons:
            try:
                with open(f"/proc/{d.proc.pid}/status") as f:
                    rss += [int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS")]
            except OSError:
                pass
        return {
            "records": len(sent),
            "publish_rate_achieved": round(len(sent) / publish_s, 1),
            "incomplete_after_drain": incomplete,
            "p50_ms": round(1000 * percentile(latencies, 0.5), 1) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1) if latencies else None,
            "max_ms": round(1000 * max(latencies), 1) if latencies else None,
            "p50_from_origin_event_ms": round(1000 * percentile(from_origin, 0.5), 1)
            if from_origin
            else None,
            "p99_from_origin_event_ms": round(1000 * percentile(from_origin, 0.99), 1)
            if from_origin
            else None,
            "latencies_ms_in_send_order": in_order,
            "author_event_ms_in_send_order": origin_in_order,
            "last_node_in_send_order": last_node_in_order,
            # Per node, per record in send order: ms until that node's event (None: never).
            # A stretch of late records shows which nodes it held back, and whether they got
            # the stretch together (one link or node held it) or one by one (load).
            "node_ms_in_send_order": [
                [
                    None if arr.get(cid) is None else round(1000 * (arr[cid] - t))
                    for cid, t in sent.items()
                ]
                for arr in arrivals
            ],
            "daemon_rss_mb_median": sorted(rss)[len(rss) // 2] if rss else None,
            # CPU each daemon spent from the first publish until every record arrived (or the
            # drain ran out), per record: what one record costs a relaying node.
            "daemon_cpu_ms_per_record_median": round(
                1000 * sorted(cpu[1:])[len(cpu[1:]) // 2] / len(sent), 2
            )
            if len(cpu) > 1
            else None,
            "publisher_cpu_ms_per_record": round(1000 * cpu[0] / len(sent), 2),
            # The ceiling: the machine's CPU shared by every daemon for every record, if
            # nothing else ran. A median above it means the mesh cannot keep up.
            "cpu_budget_ms_per_record": round(1000 * (os.cpu_count() or 1) / (nodes * rate), 2),
            "bench_process_cpu_s": round(bench_cpu, 1),
            # How loaded the machine was while node 0 published: the share of all its
            # processors' time that some task used (anything on the machine), and the share
            # the daemons used. Near 1.0 every node waits its turn for a processor at each
            # hop, and the tail follows the load more than the code.
            "machine_busy_while_publishing": share(ticks_before, ticks_after, 0),
            "machine_stolen_while_publishing": share(ticks_before, ticks_after, 1),
            "daemons_share_while_publishing": round(
                sum(cpu_published) / ((os.cpu_count() or 1) * publish_s), 3
            ),
            "peers_per_node": f"{min(peers)}-{max(peers)}" if peers else None,
        }
    finally:
        for d in daemons:
            d.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe", choices=["events", "count"], default="events")
    parser.add_argument(
        "--kind",
        choices=["contribution", "need"],
        default="contribution",
        help="the records node 0 makes (needs: no blocks, no acceptance; earlier figures)",
    )
    parser.add_argument(
        "--events",
        choices=["record.added", "all"],
        default="record.added",
        help="what the probe subscribes to (all: every daemon also judges every record)",
    )
    parser.add_argument("--poll-s", type=float, default=0.05)
    parser.add_argument("--topology", choices=["random", "chain"], default="random")
    parser.add_argument("--out", default="bench/results/gossip.json")
    parser.add_argument(
        "--keep-dir", help="run the daemons in this directory and keep it (logs, profiles)"
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.keep_dir:
            Path(args.keep_dir).mkdir(parents=True, exist_ok=True)
            tmp = args.keep_dir
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
        figures = run(
            args.nodes,
            args.rate,
            args.seconds,
            Path(tmp),
            args.seed,
            args.topology,
            args.probe,
            args.poll_s,
            args.kind,
            args.events == "all",
        )
    result = {
        "benchmark": "gossip",
        "nodes": args.nodes,
        "topology": args.topology
        if args.topology == "chain"
        else "random: node i bootstraps to 2 random earlier nodes",
        "probe": args.probe,
        "kind": args.kind,
        "events": args.events,
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        **figures,
        "target_p99_ms": 300,
        "machine": machine(),
        "command": "python -m bench.gossip " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
