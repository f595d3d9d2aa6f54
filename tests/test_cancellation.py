"""Cancel clients at every checkpoint of a scenario; nothing may be left behind."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from resizer.concurrency.coalescing import Subscription, WorkState
from resizer.errors import ResizerError
from resizer.scheduling.claims import SlotRequest
from resizer.scheduling.queue import Priority
from resizer.sources.fake import Script
from resizer.transform.fake import FakeTransformer
from tests.harness import (
    CancelAtStep,
    ClientResult,
    World,
    assert_clean,
    client,
    open_fds,
    open_world,
    settle,
)

FIRED: list[int] = []  # cancellations that landed in the last replay
MAX_STEPS = 400  # far beyond any scenario's length: the loops end when a run completes

ORIGIN_SCRIPTS = {
    "healthy": Script(),
    "stall": Script(stall=2.0),
    "slow-drip": Script(drip_chunk=1_000, drip_delay=0.5),
    "fail-after-bytes": Script(fail_after=3_000, drip_chunk=1_000),
    "hang-forever": Script(hang=True),
    "server-error": Script(server_error=True),
}


async def replay(
    tmp_path: Path,
    scenario: str,
    steps_for: list[int | None] | None,
    script: Script | None = None,
    transformer: FakeTransformer | None = None,
) -> World:
    """Run ``scenario`` once with clients cancelled at the given steps (None: never)."""
    instrument = CancelAtStep()
    FIRED.clear()
    trio.lowlevel.add_instrument(instrument)
    try:
        async with open_world(tmp_path, script=script, transformer=transformer) as world:
            fds_before = open_fds()  # the service's own (e.g. the range proxy's listener)
            steps = steps_for or [None]
            async with trio.open_nursery() as nursery:
                for index, step in enumerate(steps):
                    result = ClientResult()
                    world.results.append(result)
                    await nursery.start(client, world, instrument, step, result)
                    if scenario == "staggered" and index == 0:
                        await trio.sleep(0.1)  # the others join late (mock clock)
            await settle(world)
            await assert_clean(world, fds_before)
            FIRED.append(instrument.fired)
            return world
    finally:
        trio.lowlevel.remove_instrument(instrument)


@pytest.mark.parametrize("origin", list(ORIGIN_SCRIPTS))
async def test_single_client_cancelled_at_every_checkpoint(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, origin: str
) -> None:
    """One client, cancelled at step 1, 2, 3 ... until it completes: always clean."""
    script = ORIGIN_SCRIPTS[origin]
    for step in range(1, MAX_STEPS):
        world = await replay(tmp_path / str(step), "single", [step], script)
        result = world.results[0]
        if result.completed or result.error is not None or not FIRED[0]:
            break  # the scenario ran to its end before the cancellation could land
        if world.transformer.runs_finished == 0:  # cancelled before the output was complete
            assert await world.service.cache.lookup(world.job.key) is None
    else:
        pytest.fail("the scenario never completed")


async def test_first_of_two_leaving_never_disturbs_the_second(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Client A is cancelled at every step; client B always gets the whole body, then a HIT."""
    for step in range(1, MAX_STEPS):
        world = await replay(tmp_path / str(step), "two", [step, None])
        leaver, stayer = world.results
        assert (leaver.joined, stayer.joined) == (False, True)  # the leaver started the Work
        assert stayer.completed, (step, stayer.error, len(stayer.body), FIRED)
        assert await world.service.cache.lookup(world.job.key) is not None
        assert world.transformer.runs_started == 1
        if leaver.completed:
            break


async def test_ten_clients_leaving_in_random_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Ten clients cancelled at random steps, twelve times: one transform at most, clean."""
    rng = random.Random(20261127)
    for run in range(12):
        steps: list[int | None] = [rng.randint(1, 60) for _ in range(10)]
        world = await replay(tmp_path / str(run), "staggered", steps)
        # A second Work exists only if the first lost every client before the others
        # joined (the registry hands joiners the running one); each costs at most one run.
        works = len({id(result.work) for result in world.results})
        assert world.transformer.runs_started <= works
        assert world.source.opens <= works
        assert world.transformer.runs_finished <= 1


async def test_failure_mid_stream_at_every_checkpoint(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A transform failing mid-stream, with the client cancelled anywhere: clean, no entry."""
    for step in [*range(1, 40), None]:
        fake = FakeTransformer(size=20_000, chunk_size=2_000, fail_after=9_000)
        world = await replay(tmp_path / str(step), "single", [step], transformer=fake)
        assert await world.service.cache.lookup(world.job.key) is None
        result = world.results[0]
        assert not result.completed
        if step is None:
            assert result.error is not None


async def read_to_end(
    subscription: Subscription, instrument: CancelAtStep, steps: int | None, result: ClientResult
) -> None:
    """Read a subscription to its end in a task cancelled at its ``steps``-th step."""
    with trio.CancelScope() as scope:
        instrument.watch(steps, scope)
        try:
            async for chunk in subscription.iter_bytes(0, 4_096):
                result.body += chunk
            result.completed = True
        finally:
            subscription.detach()


@pytest.mark.parametrize("cross_process", [True, False], ids=["leases", "one-process"])
async def test_a_request_arriving_as_the_work_finishes_reads_the_published_entry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, cross_process: bool
) -> None:
    """Subscribing in the step a Work finishes (its last reader gone) gets the whole entry,
    read from the cache, cancelled at any checkpoint or not: one transform, clean."""
    for step in [*range(1, MAX_STEPS), None]:
        instrument = CancelAtStep()
        trio.lowlevel.add_instrument(instrument)
        try:
            async with open_world(tmp_path / str(step), cross_process=cross_process) as world:
                fds_before = open_fds()
                first = world.service.subscribe(world.job)
                await first.wait_for(lambda p: False)  # woken in the step the Work finished
                first.detach()  # its last reader leaves: a finished Work closes its spool
                late = world.service.subscribe(world.job)  # same step: nothing ran between
                assert not late.joined, "joined a Work that is no longer running"
                result = ClientResult(work=late.work)
                world.results.append(result)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_to_end, late, instrument, step, result)
                await settle(world)
                await assert_clean(world, fds_before)
                assert world.transformer.runs_started == 1, "the late request transcoded again"
        finally:
            trio.lowlevel.remove_instrument(instrument)
        if step is None or result.completed:
            assert result.completed
            assert result.body == world.expected
            break
    else:
        pytest.fail("the late reader never completed")


async def test_a_range_whose_bytes_exist_survives_the_work_failing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``bytes=0-3999`` of output produced before the Work failed is served in full."""
    fake = FakeTransformer(size=20_000, chunk_size=2_000, fail_after=9_000)
    async with open_world(tmp_path, transformer=fake) as world:
        subscription = world.service.subscribe(world.job)
        try:
            failed = await subscription.work.wait_progress(lambda p: p.state is WorkState.FAILED)
            assert failed.produced >= 4_000
            # The range's bytes were there before the failure: neither call may raise.
            progress = await subscription.wait_for(lambda p: p.produced > 3_999)
            assert progress.state is WorkState.FAILED
            body = b"".join([chunk async for chunk in subscription.iter_bytes(0, 1_500, 4_000)])
            assert body == world.expected[:4_000]
            # Beyond what exists, the failure still reaches the reader.
            with pytest.raises(ResizerError):
                async for _ in subscription.iter_bytes(0, 1_500, 15_000):
                    pass
        finally:
            subscription.detach()


async def leaving_client(
    world: World,
    result: ClientResult,
    waiting_after: list[int],
    task_status: trio.TaskStatus[trio.CancelScope],
) -> None:
    """A client whose scope the test cancels (reported once it has subscribed); notes how
    many runs wait for a slot in the step right after it left."""
    with trio.CancelScope() as scope:
        subscription = world.service.subscribe(world.job)
        result.work = subscription.work
        task_status.started(scope)
        try:
            await subscription.wait_first_bytes()
            async for chunk in subscription.iter_bytes(0, 4_096):
                result.body += chunk
            result.completed = True
        except ResizerError as exc:
            result.error = exc
        finally:
            subscription.detach()
            waiting_after.append(sum(world.service.scheduler.snapshot().waiting.values()))


async def hold_a_slot(
    world: World, release: trio.Event, task_status: trio.TaskStatus[None]
) -> None:
    """Another run holding an ffmpeg slot until ``release`` is set."""
    async with world.service.scheduler.claim(SlotRequest(Priority.HIGH, "video")):
        task_status.started()
        await release.wait()


async def test_a_run_cancelled_while_queued_gives_its_place_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The one ffmpeg slot is held by another run, so the client's Work queues for it. The
    client leaves at every checkpoint of its Work up to the queue: each time the place is
    back in that step (only the other run holds anything), no run starts for the Work once
    the slot frees, and everything is clean."""
    left_runs = 0
    for step in range(1, MAX_STEPS):
        instrument = CancelAtStep()
        trio.lowlevel.add_instrument(instrument)
        try:
            extra = "[limits]\nmax_concurrent_transforms = 1"
            async with open_world(tmp_path / str(step), extra_config=extra) as world:
                fds_before = open_fds()
                scheduler = world.service.scheduler
                release = trio.Event()
                result = ClientResult()
                world.results.append(result)
                async with trio.open_nursery() as nursery:
                    await nursery.start(hold_a_slot, world, release)
                    waiting_after: list[int] = []
                    scope = await nursery.start(leaving_client, world, result, waiting_after)
                    (work_task,) = world.service.registry._nursery.child_tasks
                    instrument.watch_task(work_task, step, scope)
                    waiting = scheduler.snapshot().waiting
                    while not instrument.fired and not sum(waiting.values()):
                        await trio.sleep(0.001)  # the Work's source opens in a thread
                        waiting = scheduler.snapshot().waiting
                    await trio.testing.wait_all_tasks_blocked()
                    left = instrument.fired > 0
                    if left:  # gone before, or while, it waited: nothing of it queued
                        assert waiting_after == [0], "its place outlived the client's step"
                        assert scheduler.snapshot().waiting == dict.fromkeys(Priority, 0)
                        assert scheduler.snapshot().running == 1
                        left_runs += 1
                    release.set()
                await settle(world)
                await assert_clean(world, fds_before)
                if left:
                    assert world.transformer.runs_started == 0
                    assert world.transformer.probes == 0
        finally:
            trio.lowlevel.remove_instrument(instrument)
        if not left:  # its Work waits in the queue, past every step to cancel at
            break
    else:
        pytest.fail("the Work never reached the queue")
    assert left_runs > 1, "the client never left before the run could start"
