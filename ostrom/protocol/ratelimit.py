"""A token bucket for the owner's upload and download limits, with the time as an argument.

The node asks `reserve(now, n)` before it moves `n` bytes and sleeps for the delay it gets
back. Reservations may run the bucket into debt: each caller waits its turn behind the bytes
reserved before it, so concurrent streams share the rate in the order they asked, and a
frame larger than the burst still goes through (after the time it costs at the rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from ostrom.errors import InvalidInput

# Seconds of traffic at the full rate that may pass at once after an idle spell: enough to
# send a 256 KiB block in one go at 1 MiB/s, short enough that a limit reads as a limit on
# any one-second window a user would look at.
DEFAULT_BURST_S: Final = 0.25
# The smallest burst in bytes, whatever the rate: one full frame of the block protocol
# passes without being cut into waits.
MIN_BURST: Final = 64 * 1024


@dataclass(slots=True)
class TokenBucket:
    """`rate` bytes per second (0: unlimited) with bursts up to `burst` bytes."""

    rate: int = 0
    burst: int = field(default=0)
    _tokens: float = field(default=0.0, repr=False)
    _last: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.set_rate(self.rate)

    def set_rate(self, rate: int, now: float | None = None) -> None:
        """Change the limit (0 turns it off); bytes already reserved keep their place."""
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
            raise InvalidInput(f"a rate is a whole number of bytes per second, got {rate!r}")
        if now is not None:
            self._refill(now)
        self.rate = rate
        self.burst = max(MIN_BURST, int(rate * DEFAULT_BURST_S)) if rate else 0
        self._tokens = min(self._tokens, float(self.burst)) if self._last is not None else 0.0

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._tokens = float(self.burst)
        elif self.rate:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now if self._last is None else max(self._last, now)

    def reserve(self, now: float, n: int) -> float:
        """Reserve `n` bytes at time `now`; return the seconds to wait before moving them."""
        if n < 0:
            raise InvalidInput("cannot reserve a negative number of bytes")
        if not self.rate:
            return 0.0
        self._refill(now)
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate

    def available(self, now: float) -> float:
        """Bytes that could move right now without waiting (inf when unlimited)."""
        if not self.rate:
            return math.inf
        self._refill(now)
        return max(self._tokens, 0.0)
