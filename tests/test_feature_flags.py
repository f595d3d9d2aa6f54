"""The rollback switches (design notes, "Rollback Plan"): each mechanism off means off.

Elsewhere: the circuit breaker (failure_threshold = 0) in tests/test_breaker.py, HLS
read-ahead (prefetch_segments = 0) in tests/test_hls_runs.py, first come, first served
order in tests/test_scheduling_queue.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from resizer.cache.disk import DiskCacheStore
from resizer.concurrency.coalescing import Subscription
from resizer.config import load_config
from resizer.options import cache_key, parse_options
from resizer.pipeline import Job, Service, open_service
from resizer.scheduling.queue import Priority
from resizer.scheduling.rules import classes_from_config, rules_from_config
from resizer.sources.fake import FakeSource
from resizer.targets import parse_target
from resizer.transform.fake import FakeTransformer
from tests.harness import PATH, fake_origins

OPTIONS = parse_options({"width": "320"})
KEY = cache_key(PATH, OPTIONS)


@asynccontextmanager
async def open_flagged(
    folder: Path, source: FakeSource, fake: FakeTransformer, settings: str
) -> AsyncIterator[Service]:
    """A service on the disk cache in ``folder``, its origin ``source``, with ``settings``
    (TOML lines of [cache] first, then any further tables)."""
    cache_root = folder / "cache"
    config = load_config(
        text=f"""
        [cache]
        path = "{cache_root}"
        {settings}
        [[origins]]
        name = "v"
        matcher = "^/v/(?P<path>.+)$"
        [[origins.sources]]
        type = "filesystem"
        root = "{folder}"
        """,
        env={},
    )
    cache = DiskCacheStore(cache_root)
    cache.prepare()
    async with open_service(
        config, cache=cache, transformer=fake, origins=fake_origins(source)
    ) as service:
        yield service


def a_source(folder: Path) -> FakeSource:
    spill = folder / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    return FakeSource(spill, {"clip.mp4": b"source" * 1000})


async def read_all(subscription: Subscription, bodies: list[bytes]) -> None:
    try:
        bodies.append(b"".join([chunk async for chunk in subscription.iter_bytes()]))
    finally:
        subscription.detach()


async def test_coalescing_off_gives_every_request_its_own_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """[coalescing] enabled = false: three identical concurrent requests get three Works,
    three fetches and three transforms, and no leases (on: one of each, and joins)."""
    source, fake = a_source(tmp_path), FakeTransformer(size=20_000, chunk_size=2_000)
    settings = "[coalescing]\nenabled = false"
    async with open_flagged(tmp_path, source, fake, settings) as service:
        job = Job(KEY, await service.origins.resolve(PATH), OPTIONS)
        subscriptions = [service.subscribe(job) for _ in range(3)]
        assert [s.joined for s in subscriptions] == [False] * 3
        assert len({id(s.work) for s in subscriptions}) == 3
        assert service.leases is None
        bodies: list[bytes] = []
        async with trio.open_nursery() as nursery:
            for subscription in subscriptions:
                nursery.start_soon(read_all, subscription, bodies)
        assert bodies == [fake.output_for(OPTIONS)] * 3
        assert (fake.runs_started, source.opens) == (3, 3)
        assert len(service.registry) == 0


async def test_speculative_resolution_off_asks_the_origin_only_after_a_miss(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """[cache] speculative_resolution = false: a hit read from disk asks the origin nothing
    (the default asks it during the lookup: the control, same steps); a miss still
    resolves."""
    target = parse_target(PATH, b"width=320")
    asked: dict[str, int] = {}
    for flag in ("true", "false"):
        folder = tmp_path / flag
        source, fake = a_source(folder), FakeTransformer(size=5_000)
        settings = f"speculative_resolution = {flag}"
        async with open_flagged(folder, source, fake, settings) as service:
            miss = await service.lookup_or_resolve(KEY, target)
            assert miss.entry is None
            assert miss.resolved is not None
            await read_all(service.subscribe(Job(KEY, miss.resolved, OPTIONS)), [])
        source.stats = 0
        # Another process on the folder: the entry is on disk, not in its memory.
        async with open_flagged(folder, source, fake, settings) as service:
            hit = await service.lookup_or_resolve(KEY, target)
            assert hit.entry is not None
        asked[flag] = source.stats
    assert asked == {"true": 1, "false": 0}


def test_priority_scheduling_off_puts_every_run_in_one_class() -> None:
    """[scheduling] enabled = false: frames, probes and prefetches are all medium, and the
    queue serves them in arrival order."""
    config = load_config(
        text='[scheduling]\nenabled = false\n[[origins]]\nname = "v"\nmatcher = "^/v/(.+)$"\n'
        '[[origins.sources]]\ntype = "filesystem"\nroot = "."\n',
        env={},
    )
    classes = classes_from_config(config)
    assert {classes.of(kind) for kind in ("frame", "probe", "prefetch")} == {Priority.MEDIUM}
    assert rules_from_config(config).ordered is False
