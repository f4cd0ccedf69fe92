"""Block transfers under way: what `ostrom status` lists and `ostrom events` reports.

Every fetch of blocks from peers, whether the background completion of a followed project or
a checkout asking for the blocks of a records-only project, is tracked here while it runs.
Progress events are throttled per transfer, so a 256 MiB fetch (a thousand blocks) does not
flood the event stream, and a subscriber still sees the bar move.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ostrom.crypto.cid import CID
from ostrom.node.events import EventBus

# Seconds between two `blocks.progress` events of one transfer: often enough for a smooth
# progress bar, rare enough that a fast local transfer sends a handful, not thousands.
PROGRESS_INTERVAL_S: Final = 0.25

# What a transfer is for: the three phases of completing a followed project, and a fetch
# asked for by a client (a checkout of a records-only project).
Purpose = Literal["changesets", "manifests", "files", "on-demand"]

ProgressListener = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class Transfer:
    """One fetch of `wanted` blocks for `project`; `add` counts each block as it is stored."""

    id: int
    project: CID
    purpose: Purpose
    wanted: int
    started: float
    report: Callable[[Transfer, str], None]
    fetched: int = 0
    bytes: int = 0
    # Blocks no peer could deliver, known when the fetch ends.
    missing: int = 0
    last_report: float = field(default=-float("inf"))

    def add(self, nbytes: int) -> None:
        """Count one block of `nbytes` as fetched; the fetcher's progress callback."""
        self.fetched += 1
        self.bytes += nbytes
        self.report(self, "blocks.progress")

    def view(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 0.0)
        return {
            "id": self.id,
            "project": str(self.project),
            "purpose": self.purpose,
            "wanted": self.wanted,
            "fetched": self.fetched,
            "bytes": self.bytes,
            "missing": self.missing,
            "elapsed_s": round(elapsed, 3),
            "bytes_per_s": round(self.bytes / elapsed) if elapsed > 0 else 0,
        }


class Transfers:
    """The registry of running transfers, and the events they publish."""

    def __init__(self, events: EventBus, clock: Callable[[], float] = time.monotonic) -> None:
        self._events = events
        self._clock = clock
        self._running: dict[int, Transfer] = {}
        self._ids = itertools.count(1)

    @contextmanager
    def track(
        self,
        project: CID,
        purpose: Purpose,
        wanted: int,
        listener: ProgressListener | None = None,
    ) -> Iterator[Transfer]:
        """Register a transfer for the duration of the block; publish `blocks.progress`
        events (throttled) as it goes and one `blocks.done` at the end.

        `listener`, if given, receives the same views as the event bus (the RPC method of an
        on-demand fetch forwards them to its caller).
        """

        def report(transfer: Transfer, kind: str) -> None:
            now = self._clock()
            if kind == "blocks.progress":
                if now - transfer.last_report < PROGRESS_INTERVAL_S:
                    return
                transfer.last_report = now
            view = transfer.view(now)
            self._events.publish({"type": kind, **view})
            if listener is not None:
                listener(view)

        transfer = Transfer(next(self._ids), project, purpose, wanted, self._clock(), report)
        self._running[transfer.id] = transfer
        try:
            yield transfer
        finally:
            del self._running[transfer.id]
            report(transfer, "blocks.done")

    def running(self) -> list[dict[str, Any]]:
        """The transfers under way, oldest first."""
        now = self._clock()
        return [t.view(now) for t in self._running.values()]
