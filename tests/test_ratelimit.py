"""The token bucket behind the owner's rate limits, on a simulated clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.errors import InvalidInput
from ostrom.protocol.ratelimit import MIN_BURST, TokenBucket


def send(bucket: TokenBucket, sizes: list[int], start: float = 0.0) -> list[float]:
    """Move frames of `sizes` one after another as a node would; return when each moved."""
    now, times = start, []
    for size in sizes:
        now += bucket.reserve(now, size)
        times.append(now)
    return times


def test_unlimited_never_waits() -> None:
    bucket = TokenBucket()
    assert send(bucket, [10**9] * 5) == [0.0] * 5
    assert bucket.available(0.0) == math.inf


def test_a_long_transfer_moves_at_the_rate() -> None:
    bucket = TokenBucket(rate=1_000_000)
    times = send(bucket, [256 * 1024] * 100)
    moved = 256 * 1024 * 100
    # After the first burst, every byte costs 1/rate seconds.
    assert times[-1] == pytest.approx((moved - bucket.burst) / 1_000_000, rel=1e-9)


def test_concurrent_senders_share_the_rate_in_the_order_they_asked() -> None:
    bucket = TokenBucket(rate=100_000)
    first = bucket.reserve(0.0, 200_000)
    second = bucket.reserve(0.0, 100_000)
    assert 0 < first < second
    assert second - first == pytest.approx(1.0)


def test_an_idle_bucket_allows_one_burst_not_more() -> None:
    bucket = TokenBucket(rate=1_000_000)
    send(bucket, [1_000_000])
    assert bucket.available(3600.0) == bucket.burst
    assert bucket.reserve(3600.0, bucket.burst) == 0.0
    assert bucket.reserve(3600.0, 1) > 0


def test_the_rate_changes_at_run_time() -> None:
    bucket = TokenBucket(rate=1_000)
    assert bucket.burst == MIN_BURST
    bucket.reserve(0.0, 2 * MIN_BURST)
    bucket.set_rate(0, now=1.0)
    assert bucket.reserve(1.0, 10**9) == 0.0
    bucket.set_rate(4_000_000, now=2.0)
    assert bucket.burst == 1_000_000
    with pytest.raises(InvalidInput):
        bucket.set_rate(-1)
    with pytest.raises(InvalidInput):
        bucket.reserve(2.0, -5)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(min_value=1_000, max_value=50_000_000),
    sizes=st.lists(st.integers(min_value=0, max_value=2 * 1024 * 1024), min_size=1, max_size=60),
    gaps=st.lists(st.floats(min_value=0, max_value=2.0), min_size=60, max_size=60),
)
def test_bytes_moved_never_exceed_burst_plus_rate_times_time(
    rate: int, sizes: list[int], gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate)
    now, moved = 0.0, 0
    for size, gap in zip(sizes, gaps, strict=False):
        now += gap
        now += bucket.reserve(now, size)
        moved += size
        # Once its wait is over, a frame has been paid for at the rate.
        assert moved <= bucket.burst + rate * now * (1 + 1e-9) + 1
