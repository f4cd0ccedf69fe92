"""Decoding and verifying batches of records from outside (import, later the mesh).

Signature verification dominates the cost of taking in a record, and libsodium releases
the GIL while it verifies, so a batch is split across worker threads: on a 2-core machine
the two halves verify at the same time while the Python parts of decoding interleave.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import trio

from ostrom.errors import OstromError
from ostrom.protocol.records import SignedRecord, decode_record

# Below this many records a batch is decoded on one thread: the hand-off costs more than
# the parallel verification saves.
PARALLEL_THRESHOLD: Final = 64
# Verification threads per batch: one per core, which is what the GIL-free part can use.
WORKERS: Final = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the record at `index` of a batch was not taken."""

    index: int
    code: str
    message: str


def decode_slice(items: Sequence[bytes], start: int) -> list[SignedRecord | Refusal]:
    out: list[SignedRecord | Refusal] = []
    for offset, data in enumerate(items):
        try:
            out.append(decode_record(data))
        except OstromError as exc:
            out.append(Refusal(start + offset, exc.code, exc.message))
    return out


async def decode_batch(items: Sequence[bytes]) -> list[SignedRecord | Refusal]:
    """Decode and verify `items` in parallel; the result keeps their order."""
    if len(items) < PARALLEL_THRESHOLD or WORKERS == 1:
        return await trio.to_thread.run_sync(decode_slice, items, 0)
    step = -(-len(items) // WORKERS)
    parts: list[list[SignedRecord | Refusal]] = [[] for _ in range(WORKERS)]

    async def run(slot: int) -> None:
        start = slot * step
        parts[slot] = await trio.to_thread.run_sync(decode_slice, items[start : start + step], start)

    async with trio.open_nursery() as nursery:
        for slot in range(WORKERS):
            nursery.start_soon(run, slot)
    return [item for part in parts for item in part]
