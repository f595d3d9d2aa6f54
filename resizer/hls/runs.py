"""HLS segments on demand: one ffmpeg run per stretch of consecutive segments.

Every segment is its own cache key, so a request for one is an ordinary Work in the
coalescing registry (one per key per process: a segment being produced is joined, never
produced twice). That Work does not run ffmpeg itself: it asks ``SegmentRuns`` for a run that
will reach its segment, waits until the run has published it, then serves the entry.

A run starts at the segment asked for (a seek starts one there), publishes the init segment
if the cache lacks it, then each segment the moment its ``mdat`` is complete. It keeps
``prefetch_segments`` ahead of the newest segment asked for and then pauses: it stops reading
ffmpeg's output (the pipe's back-pressure stops ffmpeg) and gives its transform slot back. It
ends at the end of the rendition, when it reaches a segment that is already cached (another
run was there first), or when nobody has asked for one of its segments for ``idle_timeout``:
leaving its cancel scope kills ffmpeg and discards the segment being written.

Runs of different start points splice: keyframes are forced at every segment boundary,
ffmpeg offsets each run's timestamps to its first segment's start, and the init segment is
the same for every run of more than a few frames (see ``transform.argv.hls_run_args``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio
from trio_util import AsyncValue

from ..cache.base import CacheWriter
from ..concurrency.coalescing import Work
from ..concurrency.groups import unwrap_single_exception
from ..errors import InvalidOption, ResizerError, TransformFailed
from ..options import INIT_SEGMENT, TransformOptions, cache_key
from ..scheduling.claims import Claim, SlotRequest
from ..transform.argv import output_span_ms
from ..transform.base import MediaInfo
from ..transform.checks import check_options, check_source
from .fmp4 import BoxSplitter, Part
from .playlist import Segments

if TYPE_CHECKING:
    from ..pipeline import Job, Service

log = structlog.get_logger(__name__)

# A run that will publish segment p next (or reads ahead up to p) also takes requests up to
# this many beyond; a request further ahead is a seek and starts its own run there.
_JOIN_SLACK = 2
# A segment Work that saw its run end without its segment tries a new run this many times.
_ATTEMPTS = 3
# See _cut: a run with less output than this left never publishes the init segment.
_INIT_MIN_SPAN_MS = 1_000


def rendition_options(options: TransformOptions) -> TransformOptions:
    """The options of the rendition a segment belongs to (its media playlist)."""
    return replace(options, segment=None)


def segmentation(options: TransformOptions, info: MediaInfo, max_output_seconds: float) -> Segments:
    assert options.segment_ms is not None  # set for every format=hls request
    return Segments(output_span_ms(options, info, max_output_seconds), options.segment_ms)


@dataclass(eq=False)
class Run:
    """One ffmpeg run producing a rendition's segments from ``start`` on."""

    rendition: str
    start: int
    wanted_until: int  # produce up to this segment, then pause
    last_wanted: float  # when a segment of this run was last asked for (trio clock)
    published: AsyncValue[int] = field(init=False)  # next segment it will publish
    init_ready: trio.Event = field(default_factory=trio.Event)  # the init entry exists
    wanted: trio.Event = field(default_factory=trio.Event)  # set when wanted_until grows
    ended: trio.Event = field(default_factory=trio.Event)
    error: ResizerError | None = None
    waiting: int = 0  # segment Works waiting on this run
    # Its claim on an ffmpeg slot while it waits for one or runs (given back while paused).
    claim: Claim | None = None

    def __post_init__(self) -> None:
        self.published = AsyncValue(self.start)

    @property
    def position(self) -> int:
        return int(self.published.value)

    def reached(self, index: int) -> Callable[[], Awaitable[object]]:
        """A wait for segment ``index`` (or the init segment) to be published."""
        if index == INIT_SEGMENT:
            return self.init_ready.wait
        return partial(self.published.wait_value, lambda position: position > index)

    def want(self, index: int, prefetch: int, now: float) -> None:
        self.last_wanted = now
        if index + prefetch > self.wanted_until:
            self.wanted_until = index + prefetch
            self.wanted.set()


class SegmentRuns:
    """The runs of this process, in a nursery of their own (``serve``)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._runs: dict[str, list[Run]] = {}
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return sum(len(runs) for runs in self._runs.values())

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def produce(self, work: Work, job: Job) -> None:
        """The producer of segment ``job``'s Work: a run publishes it, the Work serves it."""
        service = self._service
        index = job.options.segment
        assert index is not None
        for _ in range(_ATTEMPTS):
            if await service.finish_from_cache(work, job.key):
                return
            # Decided synchronously: two segment Works never start two runs for one place.
            run = self._covering(job, index) or self._start(job, index)
            run.want(max(0, index), service.config.hls.prefetch_segments, trio.current_time())
            run.waiting += 1
            if run.claim is not None:  # a player waits on it now: no longer read-ahead
                run.claim.promote(work.priority)
            try:
                await _first(run.reached(index), run.ended.wait)
            finally:
                run.waiting -= 1
            published = run.init_ready.is_set() if index == INIT_SEGMENT else run.position > index
            if not published and run.error is not None:
                raise run.error
        if await service.finish_from_cache(work, job.key):
            return
        raise TransformFailed(f"no run could produce HLS segment {index} of {job.key}")

    def _covering(self, job: Job, index: int) -> Run | None:
        """A running run of this rendition that will reach ``index`` soon, if any."""
        for run in self._runs.get(_rendition_key(job), []):
            if run.ended.is_set():
                continue
            if index == INIT_SEGMENT:
                if run.start == 0 and not run.init_ready.is_set():
                    return run
            elif run.start <= index and run.position <= index <= (
                max(run.position, run.wanted_until) + _JOIN_SLACK
            ):
                return run
        return None

    def _start(self, job: Job, index: int) -> Run:
        assert self._nursery is not None, "SegmentRuns is not serving"
        rendition = _rendition_key(job)
        start = max(0, index)
        run = Run(rendition, start, start - 1, trio.current_time())
        self._runs.setdefault(rendition, []).append(run)
        self._nursery.start_soon(self._run, run, job, name=f"hls run {rendition} from {start}")
        return run

    def _forget(self, run: Run) -> None:
        runs = self._runs.get(run.rendition, [])
        if run in runs:
            runs.remove(run)
        if not runs:
            self._runs.pop(run.rendition, None)

    async def _run(self, run: Run, job: Job) -> None:
        try:
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._end_when_idle, run, nursery.cancel_scope)
                    await self._produce_segments(run, job)
                    nursery.cancel_scope.cancel()
        except ResizerError as exc:
            run.error = exc
            log.info("hls run failed", rendition=run.rendition, error=exc.message)
        except Exception as exc:
            log.exception("hls run crashed", rendition=run.rendition)
            run.error = TransformFailed(f"internal error while producing segments: {exc!r}")
        finally:
            # In one step: no segment Work picks this run once it is over.
            self._forget(run)
            run.ended.set()

    async def _produce_segments(self, run: Run, job: Job) -> None:
        service = self._service
        async with service.origin_slot(), service.open_input(job) as (media, size):
            probe = self._slot_request(job, "probe" if run.waiting else "prefetch")
            async with service.scheduler.claim(probe):
                info = await service.transformer.probe(media)
            check_source(info, size, service.source_limits)
            check_options(job.options, info)
            segments = segmentation(job.options, info, service.config.limits.max_duration)
            if run.start >= segments.count:
                raise InvalidOption(
                    "segment",
                    f"{run.start} is beyond the last segment ({segments.count - 1})",
                )
            await self._take_slot(run, job)
            try:
                async with service.transformer.open_output(
                    media, info, replace(job.options, segment=run.start)
                ) as out:
                    service.metrics.transforms.inc()
                    service.metrics.transforms_running.inc()
                    try:
                        await self._cut(run, job, out, segments)
                    finally:
                        service.metrics.transforms_running.dec()
            finally:
                self._give_slot_back(run)  # unless a pause did already

    def _slot_request(self, job: Job, kind: str) -> SlotRequest:
        priority = self._service.classes.of(kind)
        return SlotRequest(priority, kind, f"{job.source.origin}:{job.source.path}")

    async def _take_slot(self, run: Run, job: Job) -> None:
        """Wait for a slot: as a segment a player waits for, or as read-ahead."""
        claim = self._service.scheduler.claim(
            self._slot_request(job, "segment" if run.waiting else "prefetch")
        )
        run.claim = claim  # while it waits too: a player asking promotes it
        granted = False
        try:
            await claim.__aenter__()
            granted = True
        finally:
            if not granted:
                run.claim = None

    def _give_slot_back(self, run: Run) -> None:
        if run.claim is not None:
            run.claim.release()
            run.claim = None

    async def _cut(
        self,
        run: Run,
        job: Job,
        out: trio.abc.ReceiveStream,
        segments: Segments,
    ) -> None:
        """Publish what ffmpeg writes: the init segment, then one entry per fragment."""
        service = self._service
        splitter = BoxSplitter()
        init = bytearray()
        index = run.start
        # A run of a few frames writes another init (no B-frame delay, maybe no audio
        # samples): only a run long enough to look like every other may publish it.
        remaining = segments.span_ms - segments.start_ms(run.start)
        publishes_init = run.start == 0 or remaining >= _INIT_MIN_SPAN_MS
        async with AsyncExitStack() as stack:
            writer: CacheWriter | None = None
            while data := await out.receive_some(service.config.cache.read_chunk):
                for piece in splitter.feed(data):
                    if piece.part is Part.INIT:
                        init += piece.data
                        if piece.init_complete and publishes_init:
                            await self._publish(job, INIT_SEGMENT, bytes(init))
                            run.init_ready.set()
                        continue
                    if writer is None:
                        if await service.cache.lookup(self._key(job, index)) is not None:
                            return  # another run was here first: it (or the cache) has the rest
                        writer = await stack.enter_async_context(self._open_writer(job, index))
                    await writer.write(piece.data)
                    if piece.segment_complete:
                        await writer.commit()
                        await stack.aclose()
                        writer = None
                        index += 1
                        run.published.value = index
                        if index < segments.count:
                            await self._pause_if_ahead(run, job)
        if not splitter.idle or index < segments.count:
            raise TransformFailed(
                f"ffmpeg ended after {index} of {segments.count} segments of {run.rendition}"
            )

    async def _pause_if_ahead(self, run: Run, job: Job) -> None:
        """Wait while ``prefetch_segments`` are ready beyond the newest segment asked for."""
        if run.position <= run.wanted_until:
            return
        self._give_slot_back(run)  # ffmpeg blocks on its full pipe: no CPU used
        while run.position > run.wanted_until:
            run.wanted = trio.Event()
            await run.wanted.wait()
        await self._take_slot(run, job)

    async def _end_when_idle(self, run: Run, scope: trio.CancelScope) -> None:
        """Cancel the run once nobody waits on it and nobody asked for ``idle_timeout``,
        whether it is paused or stuck producing (a stalled origin, a hung ffmpeg)."""
        idle_timeout = self._service.config.hls.idle_timeout
        while True:
            now = trio.current_time()
            deadline = (now if run.waiting else run.last_wanted) + idle_timeout
            if now >= deadline:
                break
            await trio.sleep_until(deadline)  # asks move last_wanted: look again then
        log.info("hls run idle", rendition=run.rendition, position=run.position)
        scope.cancel()

    def _key(self, job: Job, index: int) -> str:
        assert job.target is not None
        return cache_key(job.target.source, replace(job.options, segment=index))

    def _open_writer(self, job: Job, index: int) -> AbstractAsyncContextManager[CacheWriter]:
        options = replace(job.options, segment=index)
        return self._service.cache.open_writer(
            self._key(job, index),
            content_type=options.content_type,
            ttl=(job.source.ttl or {}).get("ok", self._service.config.cache.ttl),
            options=options.canonical(),
            source=f"{job.source.origin}:{job.source.source.kind}",
        )

    async def _publish(self, job: Job, index: int, data: bytes) -> None:
        """Write a small entry (the init segment) unless the cache has it already."""
        key = self._key(job, index)
        if await self._service.cache.lookup(key) is not None:
            return
        async with self._open_writer(job, index) as writer:
            await writer.write(data)
            await writer.commit()


def _rendition_key(job: Job) -> str:
    assert job.target is not None
    return cache_key(job.target.source, rendition_options(job.options))


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:
        for wait in waits:
            nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
