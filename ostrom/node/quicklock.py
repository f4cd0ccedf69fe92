"""A task lock whose uncontended acquire does not yield to the scheduler.

`trio.Lock.acquire` is a full checkpoint even when the lock is free: it checks for
cancellation, registers the task as the lot's breaker, and reschedules the task
(`cancel_shielded_checkpoint`). py-libp2p takes four or five such locks for every frame it
writes or reads (the stream's state, Yamux's stream and window locks, the connection's write
lock, the socket's), nearly always free, so a relay paid four or five trips through trio's
run loop per gossip RPC for nothing: about a tenth of a relay's CPU in a 20-daemon profile.

`QuickLock` takes a free lock at once, without yielding; a task that finds it held parks
until the holder hands it over, first come first served, as `trio.Lock` does. Code that
used the free lock's acquire as its only checkpoint would no longer yield, so it is used only
for locks whose holders go on to a checkpoint of their own (a socket operation, or a wait for
data) or hold them for a synchronous section.
"""

from __future__ import annotations

from types import TracebackType

import trio


class QuickLock:
    """A mutex for trio tasks: `async with lock:`, fair when contended, no yield when free.

    Unlike `trio.Lock` it does not record its owner: `release` from a task that does not hold
    it is a bug it does not catch, and a holder that exits without releasing (impossible
    with `async with`) leaves it held.
    """

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    def acquire_nowait(self) -> None:
        """Take the lock if it is free; raise `trio.WouldBlock` if it is not."""
        if self._held:
            raise trio.WouldBlock
        self._held = True

    async def acquire(self) -> None:
        """Take the lock: at once if it is free, else after the tasks already waiting."""
        if not self._held:
            self._held = True
            return
        # `release` hands the lock to the task it unparks, so when `park` returns this task
        # holds it; a task cancelled while parked leaves the lot and never holds it.
        await self._lot.park()

    def release(self) -> None:
        """Give the lock to the longest-waiting task, or free it if none waits."""
        if not self._held:
            raise RuntimeError("release of a QuickLock that is not held")
        if self._lot:
            self._lot.unpark(count=1)
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def write_lock(self) -> QuickLock:
        """The lock itself: what `ReadWriteLock.write_lock()` returns, for the writers that
        take only that half of one (`YamuxStream.write`)."""
        return self
