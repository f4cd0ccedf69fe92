"""The node's event bus: what `events.subscribe` and `ostrom events` stream.

Publishing never blocks the daemon: each subscriber has a bounded queue, and a subscriber
that falls that far behind is dropped with a last `events.lost` event.
"""

from __future__ import annotations

from typing import Any, Final

import trio

# Events a subscriber may fall behind by before it is dropped: a burst of one large import
# (1,000 records) fits; a client that stopped reading does not hold memory forever.
SUBSCRIBER_BUFFER: Final = 4096

Event = dict[str, Any]


class Subscription:
    """One subscriber's stream of events; iterate it, close it when done."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._send, self._receive = trio.open_memory_channel[Event](SUBSCRIBER_BUFFER)
        self.lost = False

    def _offer(self, event: Event) -> bool:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.lost = True
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        self._bus._subscribers.discard(self)
        self._send.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.lost:
                self.lost = False
                return {"type": "events.lost", "reason": "the subscriber fell too far behind"}
            raise StopAsyncIteration from None


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        for subscription in list(self._subscribers):
            if not subscription._offer(event):
                subscription.close()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
