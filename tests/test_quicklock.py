"""QuickLock: a mutex for trio tasks that takes a free lock without yielding."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ostrom.node.quicklock import QuickLock


async def test_a_free_lock_is_taken_without_letting_another_task_run() -> None:
    lock = QuickLock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with lock:
            # trio.Lock would have rescheduled this task here, and "other" would have run.
            assert ran == []
            assert lock.locked()
    assert ran == ["other"]
    assert not lock.locked()


async def test_holders_exclude_each_other_and_waiters_go_first_come_first_served() -> None:
    lock = QuickLock()
    inside = 0
    order: list[int] = []

    async def hold(n: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1
            order.append(n)
            await trio.sleep(0.01)  # hold it across a yield, so the others must wait
            inside -= 1

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(hold, n)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()


async def test_a_waiter_cancelled_while_parked_never_holds_the_lock() -> None:
    lock = QuickLock()
    got: list[str] = []

    async def wait_for(name: str) -> None:
        async with lock:
            got.append(name)

    await lock.acquire()
    async with trio.open_nursery() as nursery:
        cancelled = trio.CancelScope()

        async def cancellable() -> None:
            with cancelled:
                await wait_for("cancelled")

        nursery.start_soon(cancellable)
        nursery.start_soon(wait_for, "next")
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        lock.release()
    # The cancelled waiter left the line: the lock went to the task behind it.
    assert got == ["next"]
    assert not lock.locked()


async def test_acquire_nowait_and_release_refuse_what_a_lock_cannot_do() -> None:
    lock = QuickLock()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()
    lock.acquire_nowait()
    with pytest.raises(trio.WouldBlock):
        lock.acquire_nowait()
    lock.release()
    lock.acquire_nowait()
    lock.release()
    assert not lock.locked()


async def test_an_exception_inside_releases_the_lock() -> None:
    lock = QuickLock()
    with pytest.raises(ValueError, match="boom"):
        async with lock.write_lock():
            raise ValueError("boom")
    assert not lock.locked()
