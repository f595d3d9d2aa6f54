"""Origin resolution: failover between sources, breakers, and the speculative lookup."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from resizer.cache.base import EntryMeta
from resizer.cache.memory import MemoryCacheStore
from resizer.concurrency.breaker import BreakerState
from resizer.config import load_config
from resizer.errors import (
    OriginFailed,
    OriginTimeout,
    ResizerError,
    ServiceUnavailable,
    SourceNotFound,
)
from resizer.options import cache_key, parse_options
from resizer.pipeline import Service, open_service
from resizer.sources.base import LocalSource, SourceStat
from resizer.sources.http import HttpSource
from resizer.sources.origins import Origin, Origins
from resizer.sources.s3 import S3Source
from resizer.targets import Target, parse_target
from resizer.transform.fake import FakeTransformer

PATTERN = r"^/v/(?P<path>.+)$"


class ScriptedSource:
    """A source whose stat answers from a script: a size, or an error to raise, or a hang."""

    kind = "fake"

    def __init__(self, answer: int | ResizerError | None, delay: float = 0.0) -> None:
        self.answer = answer  # None: never answers
        self.delay = delay
        self.stats = 0
        self.cancelled = 0

    async def stat(self, path: str) -> SourceStat:
        self.stats += 1
        try:
            await trio.sleep(self.delay)
            if self.answer is None:
                await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if isinstance(self.answer, ResizerError):
            raise self.answer
        assert self.answer is not None
        return SourceStat(size=self.answer, mtime=0.0)

    @asynccontextmanager
    async def open(self, path: str) -> AsyncIterator[LocalSource]:
        raise OriginFailed("not used here")
        yield LocalSource(Path(path), 0)  # pragma: no cover


def origins_of(*sources: ScriptedSource) -> Origins:
    return Origins([Origin.simple("v", PATTERN, *sources)])


async def test_sources_are_tried_in_priority_order_past_not_found_and_failures() -> None:
    """A 404, a 5xx and a timeout on earlier sources fall over to the one that has it."""
    missing = ScriptedSource(SourceNotFound("no"))
    broken = ScriptedSource(OriginFailed("503"))
    slow = ScriptedSource(OriginTimeout("slow"))
    good = ScriptedSource(1234)
    resolved = await origins_of(missing, broken, slow, good).resolve("/v/a.mp4")
    assert (resolved.source, resolved.path, resolved.stat.size) == (good, "a.mp4", 1234)
    assert resolved.origin == "v"
    assert [s.stats for s in (missing, broken, slow, good)] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([SourceNotFound("a"), SourceNotFound("b")], SourceNotFound),
        ([OriginFailed("a"), SourceNotFound("b")], OriginFailed),
        ([OriginFailed("a"), OriginTimeout("b")], OriginTimeout),
        ([OriginTimeout("a"), OriginFailed("b")], OriginFailed),
    ],
)
async def test_when_every_source_fails_the_error_says_why(
    answers: list[ResizerError], expected: type[ResizerError]
) -> None:
    """404 if all said not-found; otherwise the last failure decides: 504 timeout, else 502."""
    with pytest.raises(expected) as caught:
        await origins_of(*(ScriptedSource(a) for a in answers)).resolve("/v/a.mp4")
    assert type(caught.value) is expected
    assert caught.value.status in (404, 502, 504)


async def test_an_open_breaker_skips_its_source_then_fails_fast_with_503(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After 5 failures the source is not asked; alone it answers 503 with Retry-After."""
    broken = ScriptedSource(OriginFailed("down"))
    backup = ScriptedSource(10)
    origins = origins_of(broken, backup)
    for _ in range(5):
        assert (await origins.resolve("/v/a.mp4")).source is backup
    breaker = origins.origins[0].slots[0].breaker
    assert breaker.state is BreakerState.OPEN
    assert (await origins.resolve("/v/a.mp4")).source is backup
    assert broken.stats == 5  # skipped while open
    lonely = origins_of(broken)
    lonely.origins[0].slots[0].breaker._state = BreakerState.CLOSED
    for _ in range(5):
        with pytest.raises(OriginFailed):
            await lonely.resolve("/v/a.mp4")
    with pytest.raises(ServiceUnavailable) as caught:
        await lonely.resolve("/v/a.mp4")
    assert caught.value.headers() == {"Retry-After": "60"}


async def test_a_recovered_source_closes_its_breaker_after_the_reset_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half-open after reset_timeout: the probe succeeds and the source serves again."""
    flaky = ScriptedSource(OriginFailed("down"))
    origins = origins_of(flaky)
    for _ in range(5):
        with pytest.raises(OriginFailed):
            await origins.resolve("/v/a.mp4")
    flaky.answer = 99
    with pytest.raises(ServiceUnavailable):
        await origins.resolve("/v/a.mp4")
    await trio.sleep(60)
    assert (await origins.resolve("/v/a.mp4")).stat.size == 99
    assert origins.origins[0].slots[0].breaker.state is BreakerState.CLOSED


@asynccontextmanager
async def service_with(source: ScriptedSource, cache: MemoryCacheStore) -> AsyncIterator[Service]:
    config = load_config(env={})
    async with open_service(
        config, cache=cache, transformer=FakeTransformer(), origins=origins_of(source)
    ) as service:
        yield service


class ColdCache(MemoryCacheStore):
    """Knows nothing without I/O: every lookup takes the speculative path."""

    def recall(self, key: str) -> None:
        return None

    async def lookup(self, key: str) -> EntryMeta | None:
        await trio.sleep(0.1)
        return super().recall(key)


async def cached_target(cache: MemoryCacheStore) -> tuple[Target, str]:
    """A target whose variant ``cache`` holds, and its key."""
    target = parse_target("/v/a.mp4", b"width=320")
    key = cache_key(target.source, parse_options(target.params))
    async with cache.open_writer(key, content_type="video/mp4", ttl=60, options="") as writer:
        await writer.write(b"cached")
        await writer.commit()
    return target, key


async def test_a_hit_never_waits_for_the_origin(autojump_clock: trio.testing.MockClock) -> None:
    """With the entry cached, a hanging origin is cancelled, not awaited."""
    hanging = ScriptedSource(None)
    cache = ColdCache()
    target, key = await cached_target(cache)
    async with service_with(hanging, cache) as service:
        with trio.fail_after(1):
            found = await service.lookup_or_resolve(key, target)
    assert found.entry is not None
    assert (hanging.stats, hanging.cancelled) == (1, 1)


async def test_a_hot_entry_starts_no_origin_check() -> None:
    """An entry the cache recalls from memory answers without asking the origin at all."""
    hanging = ScriptedSource(None)
    cache = MemoryCacheStore()
    target, key = await cached_target(cache)
    async with service_with(hanging, cache) as service:
        found = await service.lookup_or_resolve(key, target)
        assert service.metrics.cache_hits._value.get() == 1
    assert found.entry is not None
    assert (hanging.stats, hanging.cancelled) == (0, 0)


async def test_a_miss_overlaps_the_lookup_and_the_resolution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 1 s lookup and a 1 s origin answer cost 1 s together, not 2 s."""
    slow_origin = ScriptedSource(100, delay=1.0)

    class SlowCache(MemoryCacheStore):
        async def lookup(self, key: str) -> None:
            await trio.sleep(1.0)

    target = parse_target("/v/a.mp4", b"width=320")
    key = cache_key(target.source, parse_options(target.params))
    async with service_with(slow_origin, SlowCache()) as service:
        started = trio.current_time()
        found = await service.lookup_or_resolve(key, target)
        assert trio.current_time() - started == pytest.approx(1.0)
    assert found.resolved is not None
    assert found.resolved.stat.size == 100


async def test_a_resolution_error_only_counts_on_a_miss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A source that says 404 does not spoil a hit, and is the answer on a miss."""
    missing = ScriptedSource(SourceNotFound("gone"))
    target = parse_target("/v/a.mp4", b"width=320")
    key = cache_key(target.source, parse_options(target.params))
    async with service_with(missing, MemoryCacheStore()) as service:
        with pytest.raises(SourceNotFound):
            await service.lookup_or_resolve(key, target)


async def test_source_timeouts_from_the_configuration_reach_the_sources(tmp_path: Path) -> None:
    """``idle_timeout`` of http and s3 sources is applied, not only parsed."""
    config = load_config(
        text="""
        [[origins]]
        name = "web"
        matcher = "^/w/(?P<path>.+)$"
        [[origins.sources]]
        type = "http"
        base_url = "https://media.example.com/"
        idle_timeout = "7s"
        [[origins.sources]]
        type = "s3"
        bucket = "b"
        region = "us-east-1"
        idle_timeout = "9s"
        """,
        env={},
    )
    async with httpx.AsyncClient() as client:
        origins = Origins.from_config(config, client=client, spill_dir=tmp_path, env={})
        http, s3 = (slot.source for slot in origins.origins[0].slots)
        assert isinstance(http, HttpSource)
        assert isinstance(s3, S3Source)
        assert (http.idle_timeout, s3._http.idle_timeout) == (7, 9)
