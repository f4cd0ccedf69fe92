"""A large artifact between daemons, beside a raw py-libp2p stream between the same hosts.

Ceiling: two processes, each a `ostrom.node.mesh.Mesh` on 127.0.0.1 (Noise + Yamux, as the
daemon uses). As in the fetch, the fetching side dials, opens a stream (with the 16 MiB
receive window a fetch's streams open) and reads; the holding side writes SIZE bytes in
1 MiB writes and closes; MB/s (MB = 10^6 bytes) from `open_stream` to the end of the stream.
Measured before and after the fetches; the higher of the two is the ceiling. Last, the
same stream with every read also written to a new file (synced at its end): not the
ceiling, but what writing the bytes costs on this machine, which a fetch pays and the raw
stream does not.
Measured: daemon A contributes a SIZE random file to a project; daemon B, bootstrapped to A,
follows it in full; MB/s is the file size over the time from `follow` until B's
`block_bytes` reaches A's. Then three holders A1..A3 (A2, A3 `ostrom import` A1's CAR
export) and a fresh B bootstrapped to all three.

    python -m bench.artifact [--mib 256] [--out bench/results/artifact.json]
                             [--link-mbit MBIT] [--profile DIR [--py-spy PATH]]

`--link-mbit MBIT` puts every process on a host of its own (`bench.hosts`: network
namespaces, root only): the fetcher, and each holder with its own link to the fetcher whose
holder-to-fetcher direction runs at MBIT megabits per second (0: unshaped). The raw stream
runs on the first holder's link, and so does the one-peer fetch; with three peers, each
sends on its own link. On 127.0.0.1 (the default) every process shares the loopback, and on
this 2-core machine the fetch and the raw stream are bound by CPU, not by a link.

`--profile DIR` samples the fetching daemon and every holder with py-spy while each fetch
runs, and writes their collapsed stacks (`b1-b.txt`, `b1-a0.txt`, `b3-b.txt`, ...) there;
the figures of a profiled run are not comparable with the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine, write_result
from bench.hosts import LOOPBACK, Host, Hosts
from ostrom.client import Client
from ostrom.errors import OstromError

# The raw stream's write size: what the brief fixes for the ceiling.
WRITE_BYTES = 1 << 20
RAW_PROTOCOL = "/ostrom-bench/raw/1.0.0"
# CPU seconds the receiving side of each raw stream measurement used, and the sending side.
RAW_CPU: list[float] = []
RAW_CPU_SENDER: list[float] = []
# The receiving side's CPU seconds when it also wrote what it read to a new file.
RAW_TO_FILE_CPU: list[float] = []
# Status polling while a fetch runs, besides a check after each fetch that ends (its
# `blocks.done` event): a status call costs the daemon a few milliseconds of CPU, which
# polling every 50 ms took from the fetch it measured.
POLL_S = 1.0
# Samples per second py-spy takes when profiling (its default is 100): fewer samples cost the
# profiled daemons less, and a fetch of a few seconds still yields a few hundred per thread.
PROFILE_RATE = 100


class Profiles:
    """py-spy sampling the daemons of one fetch (`--profile`); does nothing without a dir."""

    def __init__(self, out: Path | None, py_spy: str) -> None:
        self._out = out
        self._py_spy = py_spy
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, daemons: dict[str, Daemon]) -> None:
        if self._out is None:
            return
        self._out.mkdir(parents=True, exist_ok=True)
        for label, daemon in daemons.items():
            self._procs.append(
                subprocess.Popen(
                    [
                        self._py_spy,
                        "record",
                        "--pid",
                        str(daemon.proc.pid),
                        "--threads",
                        "--rate",
                        str(PROFILE_RATE),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "-o",
                        str(self._out / f"{name}-{label}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            proc.wait(30)
        self._procs.clear()


async def _raw_holder(listen: str) -> None:
    """The ceiling's sending side: a Mesh that answers each stream with the number of bytes
    asked for (an 8-byte request), in WRITE_BYTES writes, then closes."""
    import trio

    from ostrom.node.mesh import Mesh, MeshConfig, MeshStream

    mesh = Mesh(os.urandom(32), MeshConfig(listen=(listen,), mdns=False, dht=False))
    payload = os.urandom(WRITE_BYTES)

    async def handle(stream: MeshStream) -> None:
        request = b""
        while len(request) < 8:
            chunk = await stream.read(8 - len(request))
            if not chunk:
                return
            request += chunk
        for _ in range(struct.unpack(">Q", request)[0] // WRITE_BYTES):
            await stream.write(payload)
        await stream.close()

    mesh.set_stream_handler(RAW_PROTOCOL, handle)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        print(mesh.advertised_addrs[0], flush=True)
        await trio.sleep_forever()


async def _raw_fetch(addr: str, size: int, into: Path | None = None) -> float:
    """The ceiling's receiving side: dial the holder, ask for `size` bytes and read them to
    the end of the stream; seconds from opening the stream to its end. With `into`, each
    read is also written to that new file, synced at the end (and the file removed)."""
    import trio

    from ostrom.node.mesh import Mesh, MeshConfig

    mesh = Mesh(os.urandom(32), MeshConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, dht=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.serve)
        peer = await mesh.connect(addr)
        start = time.perf_counter()
        cpu_start = time.process_time()
        # With the receive window a fetch's streams open (16 MiB): py-libp2p's default of
        # 256 KiB, grown only now and then, holds a stream to 256 KiB per round trip, which
        # a link's queue of a few milliseconds already makes a few MB/s.
        stream = await mesh.open_stream(peer.peer_id, RAW_PROTOCOL, bulk_receive=True)
        await stream.write(struct.pack(">Q", size))
        received = 0
        fd = None if into is None else os.open(into, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            while chunk := await stream.read(WRITE_BYTES):
                received += len(chunk)
                if fd is not None:
                    os.write(fd, chunk)
            if fd is not None:
                os.fsync(fd)
        finally:
            if fd is not None:
                os.close(fd)
                os.unlink(str(into))
        elapsed = time.perf_counter() - start
        (RAW_CPU if into is None else RAW_TO_FILE_CPU).append(time.process_time() - cpu_start)
        assert received == size, (received, size)
        await stream.finish()
        nursery.cancel_scope.cancel()
    return elapsed


def raw_stream_mb_s(
    size: int, holder_host: Host, fetcher_host: Host, into: Path | None = None
) -> float:
    """The raw stream's MB/s, from a process on `holder_host` to one on `fetcher_host`."""
    listen = f"/ip4/{holder_host.address}/tcp/0"
    holder = subprocess.Popen(
        holder_host.command(
            [sys.executable, "-m", "bench.artifact", "--raw-holder", "--raw-listen", listen]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None
        addr = holder.stdout.readline().strip()
        before = cpu_s(holder.pid)
        elapsed = _raw_fetch_on(fetcher_host, addr, size, into)
        if into is None:
            RAW_CPU_SENDER.append(cpu_s(holder.pid) - before)
        return size / elapsed / 1e6
    finally:
        holder.terminate()
        holder.wait(20)


def _raw_fetch_on(host: Host, addr: str, size: int, into: Path | None) -> float:
    """`_raw_fetch` in a process of its own on `host`; its CPU seconds go to `RAW_CPU` (or
    `RAW_TO_FILE_CPU`)."""
    argv = [sys.executable, "-m", "bench.artifact", "--raw-fetch", addr, "--raw-bytes", str(size)]
    if into is not None:
        argv += ["--raw-into", str(into)]
    done = subprocess.run(host.command(argv), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the raw stream's reader failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    (RAW_CPU if into is None else RAW_TO_FILE_CPU).append(figures["cpu_s"])
    return float(figures["elapsed_s"])


def cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) process `pid`, or its thread `tid`, has used so far
    (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def collect_fetches(home: Path, out: list[dict[str, Any]], ended: threading.Event) -> None:
    """Record the `blocks.done` events of `home`'s daemon; set `ended` at each."""
    client = Client(home, timeout=None)
    try:
        for event in client.events():
            if event.get("type") == "blocks.done":
                out.append({**event, "at": time.perf_counter()})
                ended.set()
    except (OstromError, OSError):  # the daemon stopping ends the stream
        return


def wait_bytes(daemon: Daemon, target: int, timeout: float, ended: threading.Event) -> float:
    """Seconds until the daemon holds `target` bytes of blocks: checked when a fetch ends,
    and every POLL_S."""
    start = time.perf_counter()
    while True:
        held = daemon.client.status()["store"]["block_bytes"]
        if held >= target:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{held} of {target} block bytes after {timeout} s")
        ended.wait(POLL_S)
        ended.clear()


def wait_peers(daemon: Daemon, count: int) -> None:
    deadline = time.monotonic() + 30
    while daemon.client.status()["peers"] < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} peers after 30 s")
        time.sleep(0.05)


def fetch_mb_s(
    holders: list[Daemon],
    home: Path,
    project: str,
    target: int,
    size: int,
    timeout: float,
    profiles: Profiles,
    fetcher_host: Host,
) -> dict[str, Any]:
    b = Daemon(home, bootstrap=[h.addr() for h in holders], host=fetcher_host)
    fetched: list[dict[str, Any]] = []
    try:
        b.wait_ready()
        wait_peers(b, len(holders))
        ended = threading.Event()
        threading.Thread(target=collect_fetches, args=(b.home, fetched, ended), daemon=True).start()
        time.sleep(0.3)
        profiles.start(home.name, {"b": b, **{f"a{i}": h for i, h in enumerate(holders)}})
        cpu_before = [cpu_s(d.proc.pid) for d in (b, *holders)]
        main_before = [cpu_s(d.proc.pid, d.proc.pid) for d in (b, *holders)]
        start = time.perf_counter()
        b.client.follow(project)
        elapsed = (time.perf_counter() - start) + wait_bytes(b, target, timeout, ended)
        profiles.stop()
        main = [
            cpu_s(d.proc.pid, d.proc.pid) - before
            for d, before in zip((b, *holders), main_before, strict=True)
        ]
        cpu = [
            after - before
            for after, before in zip(
                [cpu_s(d.proc.pid) for d in (b, *holders)], cpu_before, strict=True
            )
        ]
        time.sleep(1.0)  # let the fetch tasks report
        phases = {e["purpose"]: round(e["at"] - start, 2) for e in fetched if e.get("fetched")}
        return {
            "seconds": round(elapsed, 2),
            "mb_s": round(size / elapsed / 1e6, 1),
            # CPU seconds the fetching daemon and the holders used from `follow` to the end:
            # what the machine's load does not change much, unlike MB/s.
            "cpu_s_fetcher": round(cpu[0], 2),
            # Of these, the main (trio) threads': the rest is SQLite, hashing and the hand-offs.
            "cpu_s_fetcher_main": round(main[0], 2),
            "cpu_s_holders_main": round(sum(main[1:]), 2),
            "cpu_s_holders": round(sum(cpu[1:]), 2),
            # Sum over B's `blocks.done` events: above the artifact's size means the
            # same blocks were downloaded more than once.
            "bytes_fetched_reported": sum(e.get("bytes", 0) for e in fetched),
            "fetch_events": len(fetched),
            # When each phase's fetch ended, in seconds after `follow`: the changesets and
            # manifests phases end once sync has brought the records.
            "phase_done_s": phases,
        }
    finally:
        b.stop()


def run(
    size: int,
    workdir: Path,
    timeout: float,
    profiles: Profiles,
    holder_hosts: list[Host],
    fetcher_host: Host,
) -> dict[str, Any]:
    raw = raw_stream_mb_s(size, holder_hosts[0], fetcher_host)
    artifact = workdir / "artifact.bin"
    with open(artifact, "wb") as f:
        for _ in range(size // WRITE_BYTES):
            f.write(os.urandom(WRITE_BYTES))
    holders = [Daemon(workdir / f"a{i}", host=host) for i, host in enumerate(holder_hosts)]
    try:
        for h in holders:
            h.wait_ready()
        a = holders[0]
        project = a.client.create_project("artifact", license="MIT")["cid"]
        t0 = time.perf_counter()
        a.client.contribute(project, [artifact], message="artifact")
        contribute_s = time.perf_counter() - t0
        target = a.client.status()["store"]["block_bytes"]
        one = fetch_mb_s(
            [a], workdir / "b1", project, target, size, timeout, profiles, fetcher_host
        )
        car = workdir / "project.car"
        a.client.export_car(project, car)
        t0 = time.perf_counter()
        for h in holders[1:]:
            h.client.import_car(car)
            assert h.client.status()["store"]["block_bytes"] >= target
        import_s = (time.perf_counter() - t0) / 2
        three = fetch_mb_s(
            holders, workdir / "b3", project, target, size, timeout, profiles, fetcher_host
        )
        raw_after = raw_stream_mb_s(size, holder_hosts[0], fetcher_host)
        to_file = raw_stream_mb_s(size, holder_hosts[0], fetcher_host, workdir / "raw-stream.bin")
    finally:
        for h in holders:
            h.stop()
    return {
        "raw_stream_mb_s": [round(raw, 1), round(raw_after, 1)],
        "raw_stream_cpu_s_receiver": [round(c, 2) for c in RAW_CPU],
        "raw_stream_cpu_s_sender": [round(c, 2) for c in RAW_CPU_SENDER],
        "raw_stream_to_file_mb_s": round(to_file, 1),
        "raw_stream_to_file_cpu_s_receiver": round(RAW_TO_FILE_CPU[0], 2),
        "one_peer": one,
        "three_peers": three,
        "contribute_into_a_s": round(contribute_s, 2),
        "import_car_s": round(import_s, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default="bench/results/artifact.json")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of the daemons here")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy command (with --profile)")
    parser.add_argument(
        "--link-mbit",
        type=int,
        help="run each process on a host of its own, holders' links at this rate (0: unshaped)",
    )
    parser.add_argument("--raw-holder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw-listen", default="/ip4/127.0.0.1/tcp/0", help=argparse.SUPPRESS)
    parser.add_argument("--raw-fetch", metavar="ADDR", help=argparse.SUPPRESS)
    parser.add_argument("--raw-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--raw-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_holder:
        import trio

        trio.run(_raw_holder, args.raw_listen)
        return {}
    if args.raw_fetch:
        import trio

        elapsed = trio.run(_raw_fetch, args.raw_fetch, args.raw_bytes, args.raw_into)
        print(json.dumps({"elapsed_s": elapsed, "cpu_s": (RAW_CPU or RAW_TO_FILE_CPU)[0]}))
        return {}
    size = args.mib << 20
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        holder_hosts, fetcher_host = [LOOPBACK] * 3, LOOPBACK
        if args.link_mbit is not None:
            hosts = stack.enter_context(Hosts(3, args.link_mbit))
            holder_hosts, fetcher_host = hosts.holders, hosts.fetcher
        profiles = Profiles(args.profile, args.py_spy)
        figures = run(size, Path(tmp), args.timeout, profiles, holder_hosts, fetcher_host)
    raw = max(figures["raw_stream_mb_s"])
    result = {
        "benchmark": "artifact",
        "bytes": size,
        **figures,
        "ratio_one_peer": round(figures["one_peer"]["mb_s"] / raw, 3),
        "ratio_three_peers": round(figures["three_peers"]["mb_s"] / raw, 3),
        # Beside the ceiling: what the stream reaches when its bytes go to a new
        # file, as a fetch's must (not a target; it says what storing costs this machine).
        "ratio_one_peer_to_stream_to_file": round(
            figures["one_peer"]["mb_s"] / figures["raw_stream_to_file_mb_s"], 3
        ),
        "three_faster_than_one": figures["three_peers"]["mb_s"] > figures["one_peer"]["mb_s"],
        # Where the processes ran: all on 127.0.0.1, or each on a host of its own whose
        # link to the fetcher sends at `link_mbit` (None: loopback; 0: unshaped links).
        "link_mbit": args.link_mbit,
        "target_ratio": 0.8,
        "machine": machine(),
        "command": "python -m bench.artifact "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
