"""The node's event bus: what `events.subscribe` and `ostrom events` stream.

Publishing never blocks the daemon: each subscriber has a bounded queue, and a subscriber
that falls that far behind is dropped with a last `events.lost` event. A subscriber may ask
for some types only; the node skips the work behind a type nobody asked for (it judges
gossiped records for `status.changed` only while someone listens for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import trio

from ostrom.errors import InvalidInput

# Events a subscriber may fall behind by before it is dropped: a burst of one large import
# (1,000 records) fits; a client that stopped reading does not hold memory forever.
SUBSCRIBER_BUFFER: Final = 4096

Event = dict[str, Any]

# Every type of event the node publishes (docs/RPC.md, "Events"): a subscription naming
# another is refused, rather than silently never receiving anything.
EVENT_TYPES: Final = frozenset(
    {
        "record.added",
        "status.changed",
        "project.created",
        "follow.changed",
        "sync.completed",
        "blocks.progress",
        "blocks.done",
        "blocks.evicted",
        "mesh.joined",
        "mesh.left",
        "mesh.members",
        "peer.dropped",
        "peer.refused",
        "limit.reached",
        "limits.changed",
        "events.lost",
    }
)


class Subscription:
    """One subscriber's stream of events (of `types` only, if given); iterate it, close it
    when done. `events.lost` comes whatever the types."""

    def __init__(self, bus: EventBus, types: frozenset[str] | None) -> None:
        self._bus = bus
        self.types = types
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

    def subscribe(self, types: Iterable[str] | None = None) -> Subscription:
        """A new subscription to every event, or to those of `types` (`InvalidInput` for a
        type the node never publishes)."""
        wanted = None if types is None else frozenset(types)
        if wanted is not None:
            unknown = sorted(wanted - EVENT_TYPES)
            if unknown:
                raise InvalidInput(
                    f"unknown event type {', '.join(unknown)}; the types are "
                    f"{', '.join(sorted(EVENT_TYPES))}"
                )
        subscription = Subscription(self, wanted)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        kind = event["type"]
        for subscription in list(self._subscribers):
            if subscription.types is not None and kind not in subscription.types:
                continue
            if not subscription._offer(event):
                subscription.close()

    def wants(self, kind: str) -> bool:
        """Whether some subscriber would receive an event of type `kind`: what builds one
        can be skipped otherwise."""
        return any(s.types is None or kind in s.types for s in self._subscribers)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
