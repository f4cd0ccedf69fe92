"""Reading what an event bus queued for a subscriber, in tests that run no trio loop of
their own for it."""

from __future__ import annotations

from typing import Any

import trio

from ostrom.node.events import Subscription


def queued_events(subscription: Subscription) -> list[dict[str, Any]]:
    """The events queued for `subscription` so far; the subscription is closed."""
    events = []
    subscription.close()
    while True:
        try:
            events.append(subscription._receive.receive_nowait())
        except trio.EndOfChannel:
            return events
