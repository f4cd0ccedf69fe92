"""The registry of block transfers: what `ostrom status` lists and the events it publishes."""

from __future__ import annotations

from typing import Any

import pytest

from ostrom.crypto.cid import CID
from ostrom.node.events import EventBus
from ostrom.node.transfers import PROGRESS_INTERVAL_S, Transfers
from tests.queued_events import queued_events

PROJECT = CID.of_raw(b"a project")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_transfer_is_listed_while_it_runs_and_reports_when_done() -> None:
    bus, clock = EventBus(), FakeClock()
    transfers = Transfers(bus, clock)
    subscription = bus.subscribe()
    heard: list[dict[str, Any]] = []
    with transfers.track(PROJECT, "on-demand", 3, heard.append) as transfer:
        transfer.add(1000)
        clock.now += 2.0
        [running] = transfers.running()
        assert running["purpose"] == "on-demand" and running["project"] == str(PROJECT)
        assert (running["fetched"], running["wanted"], running["bytes"]) == (1, 3, 1000)
        assert running["bytes_per_s"] == 500
        transfer.missing = 2
    assert transfers.running() == []
    events = queued_events(subscription)
    assert [e["type"] for e in events] == ["blocks.progress", "blocks.done"]
    assert events[-1]["missing"] == 2 and events[-1]["fetched"] == 1
    assert [v["fetched"] for v in heard] == [1, 1]


def test_progress_events_are_throttled_per_transfer() -> None:
    bus, clock = EventBus(), FakeClock()
    transfers = Transfers(bus, clock)
    subscription = bus.subscribe()
    with transfers.track(PROJECT, "files", 1000) as transfer:
        for _ in range(1000):
            transfer.add(256 * 1024)
            clock.now += PROGRESS_INTERVAL_S / 10
    events = queued_events(subscription)
    progress = [e for e in events if e["type"] == "blocks.progress"]
    # Ten blocks per interval: one event per interval, not one per block.
    assert 95 <= len(progress) <= 105
    assert events[-1] == {**events[-1], "type": "blocks.done", "fetched": 1000}


def test_a_failed_transfer_is_still_closed() -> None:
    transfers = Transfers(EventBus(), FakeClock())
    with pytest.raises(KeyError), transfers.track(PROJECT, "changesets", 5):
        raise KeyError("the fetch failed")
    assert transfers.running() == []
