"""Verifying large batches of records in worker processes.

Taking in a record costs about 60 us of ed25519 verification and 30-40 us of Python
decoding and checking. Threads do not help: the Python part holds the GIL, and on small
machines the hand-offs between two threads cost as much as they save. Worker processes
do help: each decodes and verifies its slice of a batch on its own core, and the daemon
only unpickles the verified records (about 10 us each) and stores them.

The pool starts on the first batch large enough to need it and stops again after a quiet
spell, so an idle daemon carries no extra processes. Small batches (a user's own records,
a gossip message) are decoded on a thread, with no hand-off to another process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from ostrom.errors import InternalError
from ostrom.node.ingest import (
    Block,
    RecordRow,
    Refusal,
    decode_row_slice,
    decode_section_slice,
    decode_slice,
)
from ostrom.protocol.records import SignedRecord

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

# Below this many items a batch is decoded on a thread in the daemon: shipping it to
# another process and back costs more than it saves.
PROCESS_THRESHOLD: Final = 256
# One worker per core; the daemon's own thread needs little CPU while workers verify.
DEFAULT_WORKERS: Final = max(1, min(8, os.cpu_count() or 1))
# Workers are stopped after this long without a large batch; starting them again costs
# about half a second, which only a large import pays.
IDLE_SHUTDOWN_S: Final = 60.0
# How often the reaper looks for an idle pool.
REAP_INTERVAL_S: Final = 10.0


class VerifierPool:
    """Decode-and-verify for large batches, in worker processes owned by this object.

    Use it as a context manager (the daemon does) so the workers are always shut down, and
    run `serve_reaper` in the daemon's nursery to stop idle workers.
    """

    def __init__(self, workers: int = DEFAULT_WORKERS) -> None:
        self._workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._last_used = 0.0

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._executor is not None

    def _executor_now(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # forkserver: forking this process (threads, sockets, SQLite) would be unsafe,
            # and a fork server preloaded with the decoder starts workers quickly.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["ostrom.node.ingest"])
            self._executor = ProcessPoolExecutor(max_workers=self._workers, mp_context=context)
            log.info("started %d verification worker(s)", self._workers)
        self._last_used = time.monotonic()
        return self._executor

    async def warm(self) -> None:
        """Start the worker processes now, ahead of a large batch known to be coming."""
        if self._workers < 2:
            return
        executor = self._executor_now()
        # Each submission starts one more worker while none is idle; empty slices cost
        # nothing to run.
        futures = [executor.submit(decode_row_slice, [], 0) for _ in range(self._workers)]

        def started() -> None:
            for future in futures:
                future.result()

        try:
            await trio.to_thread.run_sync(started)
        except BrokenProcessPool:
            self._executor = None
            raise InternalError("a verification worker died while starting") from None

    async def _run(
        self, fn: Callable[[Sequence[Any], int], list[T]], items: Sequence[Any]
    ) -> list[T]:
        if len(items) < PROCESS_THRESHOLD or self._workers < 2:
            return await trio.to_thread.run_sync(fn, items, 0)
        executor = self._executor_now()
        step = -(-len(items) // self._workers)
        try:
            futures: list[Future[list[T]]] = [
                executor.submit(fn, items[start : start + step], start)
                for start in range(0, len(items), step)
            ]
        except BrokenProcessPool:
            self._executor = None
            raise InternalError("a verification worker died; the batch was not stored") from None

        def collect() -> list[T]:
            return [item for future in futures for item in future.result()]

        try:
            return await trio.to_thread.run_sync(collect)
        except BrokenProcessPool:
            self._executor = None
            raise InternalError("a verification worker died; the batch was not stored") from None
        finally:
            self._last_used = time.monotonic()

    async def decode_records(self, items: Sequence[bytes]) -> list[SignedRecord | Refusal]:
        """Decode and verify records; each result is the record or why it was refused."""
        return await self._run(decode_slice, items)

    async def decode_rows(self, items: Sequence[bytes]) -> list[RecordRow | Refusal]:
        """`decode_records`, giving each good record as its store row (cheaper to send
        back from a worker; see `ostrom.node.ingest`)."""
        return await self._run(decode_row_slice, items)

    async def decode_sections(
        self, items: Sequence[Sequence[object]]
    ) -> list[SignedRecord | Block | Refusal]:
        """Decode and verify CAR sections (`[cid, bytes]`), in order."""
        return await self._run(decode_section_slice, items)

    async def serve_reaper(
        self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stop the workers whenever they have been idle for `IDLE_SHUTDOWN_S`."""
        task_status.started()
        while True:
            await trio.sleep(REAP_INTERVAL_S)
            if self._executor is not None and time.monotonic() - self._last_used > IDLE_SHUTDOWN_S:
                log.info("stopping idle verification workers")
                await trio.to_thread.run_sync(self.shutdown)
