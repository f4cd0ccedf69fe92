"""Python's switch interval, shortened while a worker thread does the node's store work.

The store's reads and writes, and the hashing of fetched blocks, run on a worker thread in
C calls (SQLite, SHA-256) that each give up Python's lock and take it back after. While the
network thread runs Python code, taking it back waits until the switch interval forces
that thread to yield: at the interpreter's 5 ms, a thread storing 256 MiB (thousands of
such calls) spent most of its time waiting. Every store call is made of such calls, so each
runs with the interval shortened too. The setting is the process's, so it is shortened only
while such work runs: the network thread then yields more often, which costs it a few more
thread switches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

# The switch interval while store work runs: a tenth of the interpreter's 5 ms, which cut a
# fetch's storing thread's waits tenfold.
SHORT_SWITCH_INTERVAL_S: Final = 0.0005


class _SwitchInterval:
    """`SHORT_SWITCH_INTERVAL_S` for as long as any user of `shortened` runs; the interval
    found before the first is restored after the last."""

    def __init__(self) -> None:
        self._users = 0
        self._saved = 0.0

    @contextmanager
    def shortened(self) -> Iterator[None]:
        if not self._users:
            self._saved = sys.getswitchinterval()
            sys.setswitchinterval(min(self._saved, SHORT_SWITCH_INTERVAL_S))
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                sys.setswitchinterval(self._saved)


# Used from the event loop's thread only (trio's tasks), so its counter needs no lock.
switch_interval = _SwitchInterval()
