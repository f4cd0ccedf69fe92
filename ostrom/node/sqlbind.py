"""CID lists bound to SQLite `IN (...)` queries, a slice at a time (the record store and the
block file both look CIDs up this way).

Blobs are bound as `bytearray`: CPython's sqlite3 sends `bytes` parameters through its
adapter lookup (about 0.4 us each) and binds `bytearray` directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

# CIDs per `IN (...)` query: far below SQLite's bound on parameters (32766 since 3.32), and
# large enough that a batch of 1,000 costs two queries.
IN_CHUNK: Final = 500


def in_chunks(items: Sequence[bytes]) -> Iterator[list[bytearray]]:
    """`items` in slices of at most `IN_CHUNK`, ready to bind."""
    for start in range(0, len(items), IN_CHUNK):
        yield [bytearray(raw) for raw in items[start : start + IN_CHUNK]]


def placeholders(n: int) -> str:
    """`?,?,...`: the parameters of an `IN (...)` of `n` values."""
    return ",".join("?" * n)
