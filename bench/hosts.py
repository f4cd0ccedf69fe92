"""Hosts for a benchmark: network namespaces joined by links of a given rate.

`Hosts(holders, mbit)` makes one fetching host and `holders` holding hosts. Each holder has a
link of its own to the fetcher (a veth pair), and what a holder sends on it is shaped to
`mbit` megabits per second by a token bucket (`tbf`); what the fetcher sends back (wants,
acknowledgements) is not shaped. That is a fetcher with a fast downlink and holders each
limited by their uplink, as home connections are, so that holders' uplinks add up.

A link's round trip is what veth gives (tens of microseconds): this machine's kernel has no
`netem` to add delay. `mbit=0` leaves the links unshaped (the namespaces alone).

Addresses: holder i is 10.77.i.2, the fetcher's end of its link 10.77.i.1. Every process
on a host is started through `Host.command` (`ip netns exec`), which runs the program in
place: the process's pid is the program's. Needs root and iproute2; everything made is
removed on leaving, including after a failure part way.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

# Seconds any one `ip`/`tc` call may take (each is a few milliseconds).
SETUP_TIMEOUT_S = 30.0
# A token bucket holds this many milliseconds of the link's rate as its burst: at least a
# timer tick's worth at the rate, which `tbf` needs to reach it (a kernel at 250 Hz ticks
# every 4 ms), without letting a holder send much above its rate for long.
BURST_MS = 5
# Bytes a token bucket's burst holds at the least: a full segment of 64 KiB that veth passes
# whole (segmentation offload) must fit, or the bucket never lets it through.
MIN_BURST_BYTES = 128 * 1024
# Milliseconds a packet may wait in a link's queue before `tbf` drops it: a queue of a few
# milliseconds at the rate, as a router's would be, not one that hides the rate.
QUEUE_MS = 20


@dataclass(frozen=True, slots=True)
class Host:
    # None: this machine's own namespace (`LOOPBACK`).
    namespace: str | None
    # The address other hosts reach this host at (the fetcher's, on link 0).
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host."""
        if self.namespace is None:
            return list(argv)
        return ["ip", "netns", "exec", self.namespace, *argv]


# Every process on this machine's loopback: where benchmarks run without `Hosts`.
LOOPBACK: Final = Host(None, "127.0.0.1")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")


class Hosts:
    def __init__(self, holders: int, mbit: int) -> None:
        if not 1 <= holders <= 200:
            raise ValueError("holders: 1 to 200")
        if mbit < 0:
            raise ValueError("mbit: 0 (unshaped) or more")
        self._mbit = mbit
        tag = f"{os.getpid() % 100000}"
        # The namespaces, fetcher's first: named here, since a `Host`'s may be None.
        self._namespaces = [f"ostrom-bench-{tag}-f"]
        self._namespaces += [f"ostrom-bench-{tag}-h{i}" for i in range(holders)]
        self.fetcher = Host(self._namespaces[0], "10.77.0.1")
        self.holders = [
            Host(namespace, f"10.77.{i}.2") for i, namespace in enumerate(self._namespaces[1:])
        ]
        # veth names live in the first namespace until moved: unique on this machine.
        self._links = [(f"obf{tag}x{i}", f"obh{tag}x{i}") for i in range(holders)]
        self._made: list[str] = []
        # A veth pair made but not yet moved into its namespaces, which deleting them leaves.
        self._unmoved: str | None = None

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _make(self) -> None:
        for namespace in self._namespaces:
            _run("ip", "netns", "add", namespace)
            self._made.append(namespace)
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
        fetcher_ns, *holder_namespaces = self._namespaces
        links = zip(self.holders, holder_namespaces, self._links, strict=True)
        for i, (holder, holder_ns, (near, far)) in enumerate(links):
            self._unmoved = near
            _run("ip", "link", "add", near, "type", "veth", "peer", "name", far)
            _run("ip", "link", "set", near, "netns", fetcher_ns)
            self._unmoved = far
            _run("ip", "link", "set", far, "netns", holder_ns)
            self._unmoved = None
            _run("ip", "-n", fetcher_ns, "addr", "add", f"10.77.{i}.1/24", "dev", near)
            _run("ip", "-n", holder_ns, "addr", "add", f"{holder.address}/24", "dev", far)
            _run("ip", "-n", fetcher_ns, "link", "set", near, "up")
            _run("ip", "-n", holder_ns, "link", "set", far, "up")
            if self._mbit:
                rate_bytes_s = self._mbit * 1_000_000 // 8
                burst = max(MIN_BURST_BYTES, rate_bytes_s * BURST_MS // 1000)
                _run(
                    "tc", "-n", holder_ns, "qdisc", "add", "dev", far, "root", "tbf",
                    "rate", f"{self._mbit}mbit", "burst", str(burst), "latency", f"{QUEUE_MS}ms",
                )  # fmt: skip

    def _remove(self) -> None:
        # Deleting a namespace deletes the veth ends in it, and with them their peers; a
        # pair a failure left unmoved is deleted by its name.
        if self._unmoved is not None:
            subprocess.run(
                ["ip", "link", "del", self._unmoved], capture_output=True, timeout=SETUP_TIMEOUT_S
            )
            self._unmoved = None
        for namespace in reversed(self._made):
            subprocess.run(
                ["ip", "netns", "del", namespace], capture_output=True, timeout=SETUP_TIMEOUT_S
            )
        self._made.clear()
