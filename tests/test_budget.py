"""Adaptive chunk sizes under a shared byte budget (a byte-counting limiter)."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from resizer.concurrency.budget import AdaptiveChunks, ByteBudget, LoopLag
from resizer.units import KiB, MiB


async def test_fast_clients_grow_to_the_maximum_and_slow_ones_shrink_to_the_minimum() -> None:
    """Quick sends double the chunk up to max; slow sends halve it down to min."""
    chunks = AdaptiveChunks(ByteBudget(64 * MiB), start=64 * KiB, minimum=16 * KiB, maximum=1 * MiB)
    sizes = []
    for _ in range(6):
        sizes.append(await chunks.next_size())
        chunks.sent(0.001)
    assert sizes == [64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 1 * MiB]
    for _ in range(8):
        await chunks.next_size()
        chunks.sent(0.2)
    assert await chunks.next_size() == 16 * KiB
    chunks.sent(0.02)  # in between: unchanged
    assert await chunks.next_size() == 16 * KiB


async def test_streams_wait_in_turn_while_the_budget_is_spent() -> None:
    """Beyond the budget a stream waits (FIFO) for bytes another gives back, then gets them."""
    budget = ByteBudget(1 * MiB)
    first, second, third = (AdaptiveChunks(budget, start=512 * KiB) for _ in range(3))
    assert [await first.next_size(), await second.next_size()] == [512 * KiB, 512 * KiB]
    assert await third.next_size() == 16 * KiB  # its first chunk: the minimum, over budget
    third.sent(0.02)
    granted: list[int] = []

    async def third_stream() -> None:
        granted.append(await third.next_size())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third_stream)
        await trio.testing.wait_all_tasks_blocked()
        assert (granted, budget.waiting, budget.used) == ([], 1, 1 * MiB)
        first.sent(0.02)  # gives its 512 KiB back: the waiting stream takes them
    assert granted == [512 * KiB]
    assert (budget.used, budget.peak, budget.overdrafts) == (1 * MiB, 1 * MiB + 16 * KiB, 1)
    first.release()
    second.release()
    third.release()
    third.release()  # idempotent
    assert (budget.used, budget.streams) == (0, 0)


async def test_a_new_stream_starts_at_once_however_spent_the_budget_is() -> None:
    """A first chunk never queues: the minimum over budget, even with others waiting."""
    budget = ByteBudget(64 * KiB)
    holder = AdaptiveChunks(budget, start=64 * KiB)
    assert await holder.next_size() == 64 * KiB  # holds the whole budget
    queued = AdaptiveChunks(budget, start=64 * KiB)
    assert await queued.next_size() == 16 * KiB  # first chunk: over budget, at once
    queued.sent(0.02)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queued.next_size)  # its second chunk queues
        await trio.testing.wait_all_tasks_blocked()
        assert budget.waiting == 1
        newcomer = AdaptiveChunks(budget, start=256 * KiB)
        with trio.fail_after(1):
            assert await newcomer.next_size() == 16 * KiB
        assert (budget.waiting, budget.used, budget.overdrafts) == (1, 80 * KiB, 2)
        newcomer.release()
        holder.release()  # the budget is free again: the queued chunk goes
    assert (budget.waiting, budget.used) == (0, 64 * KiB)
    queued.release()
    assert (budget.used, budget.streams) == (0, 0)


async def test_a_slow_client_gets_what_it_drains_not_a_halving_at_a_time() -> None:
    """A slow send sizes the next chunk to the client's drain rate (at least halving it)."""
    chunks = AdaptiveChunks(ByteBudget(64 * MiB), start=1 * MiB, minimum=16 * KiB)
    assert await chunks.next_size() == 1 * MiB
    chunks.sent(10.0)  # 100 KiB/s: 5 KiB in the 50 ms slow threshold, so the minimum
    assert await chunks.next_size() == 16 * KiB
    quick = AdaptiveChunks(ByteBudget(64 * MiB), start=1 * MiB, minimum=16 * KiB)
    await quick.next_size()
    quick.sent(0.06)  # barely slow: drains 853 KiB in 50 ms, but it halves at least
    assert await quick.next_size() == 512 * KiB


async def test_a_partial_grant_goes_to_the_first_waiter() -> None:
    """What comes back is handed out in arrival order, at least the floor each."""
    budget = ByteBudget(100)
    assert budget.take_nowait(100, 10) == 100
    results: dict[str, int] = {}

    async def waiter(name: str, wanted: int) -> None:
        results[name] = await budget.take(wanted, 10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a", 50)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "b", 50)
        await trio.testing.wait_all_tasks_blocked()
        budget.give_back(60)  # a gets 50, b gets the remaining 10 (its floor)
    assert results == {"a": 50, "b": 10}
    assert budget.used == 100


async def test_after_its_patience_a_stream_gets_the_floor_over_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Clients that stopped reading hold the budget: a waiter proceeds after `patience`."""
    budget = ByteBudget(64 * KiB, patience=1.0)
    assert budget.take_nowait(64 * KiB, 16 * KiB) == 64 * KiB
    started = trio.current_time()
    assert await budget.take(256 * KiB, 16 * KiB) == 16 * KiB
    assert trio.current_time() - started == 1.0
    assert (budget.used, budget.waiting, budget.overdrafts) == (80 * KiB, 0, 1)


async def test_a_cancelled_waiter_leaves_the_queue_and_returns_a_grant() -> None:
    """Cancelling a waiting stream removes it; a grant that raced the cancel comes back."""
    budget = ByteBudget(100)
    budget.take_nowait(100, 10)
    with trio.move_on_after(0.01):
        await budget.take(50, 10)
    assert (budget.waiting, budget.used) == (0, 100)

    async def granted_then_cancelled(scope: trio.CancelScope) -> None:
        with scope:
            await budget.take(50, 10)
        assert scope.cancelled_caught

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(granted_then_cancelled, scope)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # the waiter is rescheduled with Cancelled...
        budget.give_back(50)  # ...and, before it runs, granted: it must give the grant back
    assert (budget.waiting, budget.used) == (0, 50)


async def test_a_floor_larger_than_the_budget_never_waits_forever() -> None:
    """An empty budget grants even a floor above its total (misconfiguration-proof)."""
    budget = ByteBudget(8 * KiB)
    with trio.fail_after(1):
        assert await budget.take(64 * KiB, 16 * KiB) == 16 * KiB


async def test_sends_slowed_by_a_busy_loop_do_not_shrink_chunks() -> None:
    """With the loop itself 20 ms behind, a 40 ms send is quick; a 400 ms one is slow."""
    lag = LoopLag()
    for _ in range(50):
        lag.observe(0.020)
    assert lag.current == pytest.approx(0.020, rel=0.01)
    chunks = AdaptiveChunks(ByteBudget(64 * MiB), start=64 * KiB, lag=lag)
    await chunks.next_size()
    chunks.sent(0.040)
    assert await chunks.next_size() == 128 * KiB
    chunks.sent(0.400)  # 128 KiB in 400 ms drains 67 KiB in the 210 ms slow threshold
    assert await chunks.next_size() == 64 * KiB
    idle = AdaptiveChunks(ByteBudget(64 * MiB), start=64 * KiB)  # no lag: 40 ms is slow
    await idle.next_size()
    idle.sent(0.060)
    assert await idle.next_size() == 32 * KiB


async def test_the_loop_lag_monitor_measures_how_late_wakeups_run() -> None:
    """A loop blocked for 50 ms shows up as lag, the estimate decays, and idle means asleep."""
    lag = LoopLag(interval=0.005, smoothing=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(lag.serve)
        lag.wanted()
        await trio.sleep(0.002)
        time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop on purpose
        await trio.testing.wait_all_tasks_blocked()  # the monitor woke (late) and measured
        assert lag.current > 0.01
        for _ in range(40):
            lag.wanted()
            await trio.sleep(0.006)
        await trio.sleep(0.05)  # the last measurement asked for is done
        assert lag.current < 0.005
        measured = lag.current
        await trio.sleep(0.1)  # nobody asks: no measurements
        assert lag.current == measured
        nursery.cancel_scope.cancel()
