"""HLS segment runs with the fake transformer: sharing, read-ahead, idling, seeks, aborts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from resizer.cache.memory import MemoryCacheStore
from resizer.config import load_config
from resizer.errors import InvalidOption
from resizer.options import INIT_SEGMENT, cache_key
from resizer.pipeline import Job, Service, open_service
from resizer.responsive import resolve_options
from resizer.sources.base import LocalSource, SourceStat
from resizer.sources.origins import Origin, Origins, Resolved
from resizer.targets import parse_target
from resizer.transform.base import MediaInfo
from resizer.transform.fake import FakeTransformer, fake_hls_init, fake_hls_segment
from tests.harness import CancelAtStep

PATH = "/v/clip.mp4"
INFO = MediaInfo(  # 40 s: ten 4-second segments
    duration_ms=40_000, width=640, height=360, has_audio=True, video_codec="h264", fps=25.0
)
IDLE = 20.0
PREFETCH = 3
MAX_STEPS = 200


@dataclass
class HlsWorld:
    service: Service
    transformer: FakeTransformer
    cache: MemoryCacheStore
    resolved: Resolved

    def job(self, segment: int) -> Job:
        target = parse_target(PATH, b"width=320&format=hls")
        options = resolve_options(target.params, {}, self.service.policy).options
        options = replace(options, segment=segment)
        return Job(cache_key(PATH, options), self.resolved, options, target)

    async def fetch(self, segment: int) -> bytes:
        """What a client asking for ``segment`` receives (subscribe, read, detach)."""
        subscription = self.service.subscribe(self.job(segment))
        try:
            return b"".join([chunk async for chunk in subscription.iter_bytes(0, 4_096)])
        finally:
            subscription.detach()

    def expected(self, segment: int) -> bytes:
        options = self.job(segment).options
        if segment == INIT_SEGMENT:
            return fake_hls_init(options)
        return fake_hls_segment(options, segment)

    def runs(self) -> list[tuple[int, int]]:
        """(start, next segment to publish) of every live run."""
        return [
            (run.start, run.position) for runs in self.service.hls._runs.values() for run in runs
        ]


class LocalFile:
    """A source already on disk: opening it does no I/O, so the mock clock never runs ahead
    of a worker thread (every wait in these tests is a timer or an event)."""

    kind = "fake"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opens = 0
        self.open_now = 0

    async def stat(self, path: str) -> SourceStat:
        await trio.lowlevel.checkpoint()
        return SourceStat(size=self.path.stat().st_size, mtime=0.0)

    @asynccontextmanager
    async def open(self, path: str) -> AsyncIterator[LocalSource]:
        await trio.lowlevel.checkpoint()
        self.opens += 1
        self.open_now += 1
        try:
            yield LocalSource(path=self.path, size=self.path.stat().st_size)
        finally:
            self.open_now -= 1


@asynccontextmanager
async def open_hls_world(
    tmp_path: Path, transformer: FakeTransformer | None = None, prefetch: int = PREFETCH
) -> AsyncIterator[HlsWorld]:
    config = load_config(
        text=f"""
        [hls]
        segment_seconds = "4s"
        prefetch_segments = {prefetch}
        idle_timeout = "{IDLE}s"
        [[origins]]
        name = "v"
        matcher = "^/v/(?P<path>.+)$"
        [[origins.sources]]
        type = "filesystem"
        root = "{tmp_path}"
        """,
        env={},
    )
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"source" * 100)
    source = LocalFile(clip)
    fake = transformer or FakeTransformer(info=INFO)
    cache = MemoryCacheStore()
    async with open_service(
        config,
        cache=cache,
        transformer=fake,
        origins=Origins([Origin.simple("v", r"^/v/(?P<path>.+)$", source)]),
    ) as service:
        yield HlsWorld(service, fake, cache, await service.origins.resolve(PATH))


async def until(condition: Callable[[], bool], step: float = 0.001) -> None:
    """Poll in small steps of (mock) time: worker threads finish long before a timer fires
    (a run's state has no event to wait on from outside)."""
    with trio.fail_after(max(5, 100 * step)):
        while True:
            if condition():
                return
            await trio.sleep(step)


async def test_one_run_serves_consecutive_segments_and_reads_ahead(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Segments 0, 1, 2 come from one run, which keeps prefetch_segments ahead, then pauses
    holding no transform slot."""
    async with open_hls_world(tmp_path) as world:
        for segment in (0, 1, 2):
            assert await world.fetch(segment) == world.expected(segment)
        assert await world.fetch(INIT_SEGMENT) == world.expected(INIT_SEGMENT)
        assert world.transformer.runs_started == 1
        await until(lambda: world.runs() == [(0, 2 + PREFETCH + 1)])
        await until(lambda: world.service.scheduler.snapshot().busy == 0)
        assert world.transformer.running == 1  # paused, not ended
        published = [await world.cache.lookup(world.job(i).key) for i in range(10)]
        assert [entry is not None for entry in published] == [True] * 6 + [False] * 4


async def test_prefetch_off_publishes_only_what_was_asked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """prefetch_segments = 0 switches read-ahead off: asked for segment 0, the run publishes
    it and pauses there, nothing beyond."""
    async with open_hls_world(tmp_path, prefetch=0) as world:
        assert await world.fetch(0) == world.expected(0)
        await until(lambda: world.runs() == [(0, 1)])
        await until(lambda: world.service.scheduler.snapshot().busy == 0)
        published = [await world.cache.lookup(world.job(i).key) for i in range(4)]
        assert [entry is not None for entry in published] == [True, False, False, False]


async def test_a_run_nobody_asks_of_stops_after_the_idle_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Paused and unasked for idle_timeout, a run ends: ffmpeg gone, no run left."""
    async with open_hls_world(tmp_path) as world:
        await world.fetch(0)
        await until(lambda: world.runs() == [(0, PREFETCH + 1)])
        started = trio.current_time()
        await until(lambda: world.runs() == [], step=0.5)
        assert trio.current_time() - started >= IDLE - 1
        assert world.transformer.running == 0
        assert world.runs() == []
        assert world.service.scheduler.snapshot().busy == 0
        assert world.service.origin_limiter.borrowed_tokens == 0


async def test_a_seek_far_ahead_starts_its_own_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Segment 8 while a run sits at 4 starts a run at 8; their segments and init match."""
    async with open_hls_world(tmp_path) as world:
        await world.fetch(0)
        await until(lambda: world.runs() == [(0, PREFETCH + 1)])
        assert await world.fetch(8) == world.expected(8)
        assert [options.segment for options in world.transformer.started] == [0, 8]
        assert await world.fetch(9) == world.expected(9)  # from the run at 8
        assert world.transformer.runs_started == 2
        assert await world.fetch(INIT_SEGMENT) == world.expected(INIT_SEGMENT)


async def test_concurrent_requests_for_one_segment_share_its_work(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Five clients asking for segment 5 at once: one Work, one run, identical bytes."""
    async with open_hls_world(tmp_path) as world, trio.open_nursery() as nursery:
        bodies: list[bytes] = []

        async def client() -> None:
            bodies.append(await world.fetch(5))

        for _ in range(5):
            nursery.start_soon(client)
    assert bodies == [world.expected(5)] * 5
    assert world.transformer.runs_started == 1


async def test_a_segment_beyond_the_last_is_400(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """segment=10 of ten segments names nothing: InvalidOption."""
    async with open_hls_world(tmp_path) as world:
        with pytest.raises(InvalidOption, match="beyond the last segment"):
            await world.fetch(10)


async def test_a_run_abandoned_mid_segment_publishes_nothing_partial(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The client of segment 0 leaves while the run writes segment 1: after the idle
    timeout the run ends, no ffmpeg is left, segment 1 was never published."""
    stall = trio.Event()

    async def stall_inside_segment_one(index: int) -> None:
        if index == 5:  # init and segment 0 are out; segment 1 is half written
            await stall.wait()

    fake = FakeTransformer(info=INFO, chunk_size=1_000, before_chunk=stall_inside_segment_one)
    async with open_hls_world(tmp_path, fake) as world:
        await world.fetch(0)
        assert world.transformer.running == 1
        await until(lambda: world.runs() == [], step=0.5)  # the stall is never released
        assert world.transformer.running == 0
        assert await world.cache.lookup(world.job(1).key) is None
        assert world.runs() == []
        assert world.service.scheduler.snapshot().busy == 0
        assert len(world.service.registry) == 0


def no_runs(world: HlsWorld) -> bool:
    return world.runs() == []


async def fetch_cancelled_at(
    world: HlsWorld, segment: int, instrument: CancelAtStep, steps: int, result: list[bytes]
) -> None:
    """Fetch ``segment`` in a task cancelled at its ``steps``-th step."""
    with trio.CancelScope() as scope:
        instrument.watch(steps, scope)
        result.append(await world.fetch(segment))


async def test_a_segment_client_cancelled_at_every_checkpoint_leaves_nothing_behind(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A client of segment 1 cancelled at step 1, 2, 3 ... (mid-run, mid-segment, while
    paused): once idle, no run, no ffmpeg, no token, no Work; every entry is whole."""
    for step in range(1, MAX_STEPS):
        instrument = CancelAtStep()
        trio.lowlevel.add_instrument(instrument)
        try:
            folder = tmp_path / str(step)
            folder.mkdir()
            async with open_hls_world(folder) as world:
                result: list[bytes] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fetch_cancelled_at, world, 1, instrument, step, result)
                await until(partial(no_runs, world), step=0.5)
                service = world.service
                assert world.transformer.running == 0
                assert service.scheduler.snapshot().busy == 0
                assert service.origin_limiter.borrowed_tokens == 0
                assert len(service.registry) == 0
                for index in (INIT_SEGMENT, *range(10)):
                    entry = await world.cache.lookup(world.job(index).key)
                    if entry is not None:
                        async with world.cache.open_range(entry, 0, entry.size) as chunks:
                            body = b"".join([chunk async for chunk in chunks])
                        assert body == world.expected(index), index
        finally:
            trio.lowlevel.remove_instrument(instrument)
        if result or not instrument.fired:
            assert result == [world.expected(1)]
            break
    else:
        pytest.fail("the client never completed")
