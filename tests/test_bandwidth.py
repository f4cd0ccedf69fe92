"""Upload and download limits on the bytes our protocols move, on trio's mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ostrom.node.bandwidth import LIMIT_EVENT_INTERVAL_S, Bandwidth
from ostrom.node.events import EventBus
from tests.queued_events import queued_events


async def test_a_limited_upload_moves_at_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    meter = Bandwidth(bus, upload_rate=100_000, clock=trio.current_time)
    start = trio.current_time()
    for _ in range(40):
        await meter.sent(64 * 1024)
    elapsed = trio.current_time() - start
    moved = 40 * 64 * 1024
    # The first burst (64 KiB at this rate) is free; the rest costs its bytes at the rate.
    assert elapsed == pytest.approx((moved - 64 * 1024) / 100_000, rel=0.01)
    view = meter.view()
    assert view["upload"]["bytes"] == moved and view["upload"]["limit"] == 100_000
    assert 90_000 <= view["upload"]["bytes_per_s"] <= 110_000
    assert view["download"] == {"limit": 0, "bytes": 0, "bytes_per_s": 0}
    reached = [e for e in queued_events(subscription) if e["type"] == "limit.reached"]
    # The limit bit on almost every frame; the event came once per interval.
    assert 1 <= len(reached) <= elapsed / LIMIT_EVENT_INTERVAL_S + 1
    assert reached[0]["limit"] == "upload_rate"


async def test_limits_change_at_run_time_and_unlimited_never_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    meter = Bandwidth(EventBus(), download_rate=10_000, clock=trio.current_time)
    start = trio.current_time()
    await meter.received(100_000)
    assert trio.current_time() - start > 1
    meter.set_rates(upload_rate=0, download_rate=0)
    start = trio.current_time()
    for _ in range(100):
        await meter.received(1_000_000)
        await meter.sent(1_000_000)
    assert trio.current_time() == start
    # An idle meter's rate decays to nothing.
    await trio.sleep(60)
    assert meter.view()["download"]["bytes_per_s"] == 0
