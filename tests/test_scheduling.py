"""Schedulers (resizer/scheduling/): claims in one process, and one machine's coordinator
shared by several connections (workers) over a real Unix socket."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from resizer.concurrency.coalescing import Work
from resizer.errors import ServiceUnavailable
from resizer.scheduling.claims import Claim, Scheduler, SlotRequest
from resizer.scheduling.coordinator import CoordinatedScheduler, Coordinator
from resizer.scheduling.local import LocalScheduler
from resizer.scheduling.queue import Priority, Rules
from tests.test_http_coalescing import poll_until

HIGH, MEDIUM, LOW = Priority.HIGH, Priority.MEDIUM, Priority.LOW


def request(priority: Priority, kind: str = "video", source: str = "") -> SlotRequest:
    return SlotRequest(priority, kind, source)


async def run(
    scheduler: Scheduler,
    slot_request: SlotRequest,
    log: list[str],
    name: str,
    hold: trio.Event,
    task_status: trio.TaskStatus[Claim] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Claim a slot, note when it started, hold it until ``hold`` is set."""
    claim = scheduler.claim(slot_request)
    task_status.started(claim)
    async with claim:
        log.append(name)
        await hold.wait()


async def test_a_frame_starts_before_ten_queued_long_transcodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One slot, busy; ten low runs queued; a high run (a frame) starts as soon as the slot
    is free, and finishes while the ten still wait."""
    scheduler = LocalScheduler(Rules(slots=1, aging=0))
    log: list[str] = []
    busy, longs, frame_done = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(run, scheduler, request(MEDIUM), log, "busy", busy)
        for index in range(10):
            await nursery.start(run, scheduler, request(LOW), log, f"low{index}", longs)
        await nursery.start(run, scheduler, request(HIGH, "frame"), log, "frame", frame_done)
        assert scheduler.snapshot().waiting == {HIGH: 1, MEDIUM: 0, LOW: 10}
        busy.set()
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["busy", "frame"]
        frame_done.set()
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["busy", "frame", "low0"]
        assert scheduler.snapshot().waiting[LOW] == 9
        longs.set()
    assert log[3:] == [f"low{i}" for i in range(1, 10)]
    assert scheduler.snapshot().busy == 0


async def test_aging_lets_a_starved_low_run_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A low run waiting 20 s (two aging periods of 10 s) goes before medium runs that kept
    arriving meanwhile."""
    scheduler = LocalScheduler(Rules(slots=1, aging=10))
    log: list[str] = []
    holds = [trio.Event() for _ in range(4)]
    async with trio.open_nursery() as nursery:
        await nursery.start(run, scheduler, request(MEDIUM), log, "m0", holds[0])
        await nursery.start(run, scheduler, request(LOW), log, "low", holds[3])
        await trio.sleep(5)
        await nursery.start(run, scheduler, request(MEDIUM), log, "m1", holds[1])
        await trio.sleep(16)  # the low run has waited 21 s: high now; m1 is still medium
        await nursery.start(run, scheduler, request(MEDIUM), log, "m2", holds[2])
        holds[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["m0", "low"]
        for hold in holds:
            hold.set()


async def test_a_high_joiner_raises_a_queued_low_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Priority inheritance: a Work's queued low claim, raised through the Work, starts
    before a medium claim that queued earlier."""
    scheduler = LocalScheduler(Rules(slots=1, aging=0))
    log: list[str] = []
    busy, rest = trio.Event(), trio.Event()
    work = Work("k")
    work.priority = LOW

    async def low_work(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        claim = scheduler.claim(request(work.priority))
        work.claims.add(claim)
        task_status.started()
        async with claim:
            log.append("work")
            await rest.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(run, scheduler, request(MEDIUM), log, "busy", busy)
        await nursery.start(run, scheduler, request(MEDIUM), log, "medium", rest)
        await nursery.start(low_work)
        work.raise_priority(HIGH)
        assert scheduler.snapshot().waiting[HIGH] == 1
        busy.set()
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["busy", "work"]
        rest.set()


async def test_a_cancelled_waiter_gives_its_place_back_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A queued claim whose task is cancelled leaves the queue in that step; its run never
    starts, and the next waiter gets the slot."""
    scheduler = LocalScheduler(Rules(slots=1, aging=0))
    log: list[str] = []
    busy, rest = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(run, scheduler, request(MEDIUM), log, "busy", busy)
        with trio.CancelScope() as leaving:
            leaving.cancel()
            async with scheduler.claim(request(HIGH)):
                log.append("cancelled run")  # never reached
        assert scheduler.snapshot().waiting[HIGH] == 0
        await nursery.start(run, scheduler, request(LOW), log, "next", rest)
        busy.set()
        await trio.testing.wait_all_tasks_blocked()
        rest.set()
    assert log == ["busy", "next"]
    assert scheduler.snapshot().busy == 0


async def test_a_full_queue_refuses_with_503_and_retry_after() -> None:
    """Beyond max_queue waiting runs of a class, a new claim raises ServiceUnavailable with
    Retry-After of one aging period."""
    scheduler = LocalScheduler(Rules(slots=1, aging=10, max_queue=1))
    log: list[str] = []
    hold = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(run, scheduler, request(MEDIUM), log, "running", hold)
        await nursery.start(run, scheduler, request(MEDIUM), log, "queued", hold)
        assert scheduler.overloaded() is False
        with pytest.raises(ServiceUnavailable) as refused:
            async with scheduler.claim(request(MEDIUM)):
                pass
        assert refused.value.headers() == {"Retry-After": "10"}
        hold.set()
    assert scheduler.snapshot().busy == 0


async def test_overloaded_while_the_high_queue_is_full() -> None:
    """overloaded() (what /readyz reports) is true while high runs fill their queue."""
    scheduler = LocalScheduler(Rules(slots=1, aging=0, max_queue=1))
    hold = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(run, scheduler, request(MEDIUM), [], "running", hold)
        await nursery.start(run, scheduler, request(HIGH), [], "queued", hold)
        assert scheduler.overloaded()
        hold.set()
    assert not scheduler.overloaded()


async def coordinated(path: Path, rules: Rules, nursery: trio.Nursery) -> CoordinatedScheduler:
    worker = CoordinatedScheduler(path, rules)
    await nursery.start(worker.serve)
    return worker


async def test_workers_share_the_machines_slots_through_the_coordinator(
    tmp_path: Path,
) -> None:
    """Two workers' schedulers connected to one coordinator (slots = 1): a second worker's
    run waits for the first worker's, across the socket; classes order them machine-wide."""
    rules = Rules(slots=1, aging=0)
    path = tmp_path / "slots.sock"
    log: list[str] = []
    first, rest = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(Coordinator(rules).serve, path)
        a = await coordinated(path, rules, nursery)
        b = await coordinated(path, rules, nursery)
        nursery.start_soon(run, a, request(MEDIUM), log, "a1", first)
        await wait_until(lambda: log == ["a1"])
        nursery.start_soon(run, a, request(LOW), log, "a-low", rest)
        nursery.start_soon(run, b, request(HIGH), log, "b-high", rest)
        await wait_until(lambda: b.snapshot().waiting == {HIGH: 1, MEDIUM: 0, LOW: 1})
        assert log == ["a1"]
        first.set()
        await wait_until(lambda: len(log) == 2)
        assert log == ["a1", "b-high"]
        rest.set()
        await wait_until(lambda: len(log) == 3)
        nursery.cancel_scope.cancel()


async def test_a_worker_that_goes_away_gives_its_slots_back(tmp_path: Path) -> None:
    """A worker's connection closing (it died) frees the slot it held and its places: the
    other worker's waiting run starts."""
    rules = Rules(slots=1, aging=0)
    path = tmp_path / "slots.sock"
    log: list[str] = []
    never, hold = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(Coordinator(rules).serve, path)
        survivor = await coordinated(path, rules, nursery)
        with trio.CancelScope() as dying:
            async with trio.open_nursery() as inner:
                doomed = await coordinated(path, rules, inner)
                inner.start_soon(run, doomed, request(MEDIUM), log, "doomed", never)
                await wait_until(lambda: log == ["doomed"])
                nursery.start_soon(run, survivor, request(MEDIUM), log, "survivor", hold)
                await wait_until(lambda: survivor.snapshot().waiting[MEDIUM] == 1)
                dying.cancel()
        await wait_until(lambda: log == ["doomed", "survivor"])
        hold.set()
        await wait_until(lambda: survivor.snapshot().busy == 0)
        nursery.cancel_scope.cancel()


async def test_the_coordinators_refusal_is_a_503(tmp_path: Path) -> None:
    """A worker's claim beyond the machine's queue bound is refused with Retry-After."""
    rules = Rules(slots=1, aging=7, max_queue=0)
    path = tmp_path / "slots.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(Coordinator(rules).serve, path)
        worker = await coordinated(path, rules, nursery)
        with pytest.raises(ServiceUnavailable) as refused:
            async with worker.claim(request(MEDIUM)):
                pass
        assert refused.value.headers() == {"Retry-After": "7"}
        nursery.cancel_scope.cancel()


async def test_a_worker_without_its_coordinator_schedules_alone(tmp_path: Path) -> None:
    """No coordinator at the path: the worker falls back to its own queue, same rules."""
    worker = CoordinatedScheduler(tmp_path / "missing.sock", Rules(slots=1, aging=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.serve)
        assert worker.fallback is not None
        async with worker.claim(request(MEDIUM)):
            assert worker.snapshot().running == 1
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll: what the coordinator decided arrives over a socket, with no event to wait on."""
    with trio.fail_after(5):
        await poll_until(predicate)
