"""Revalidation of expired entries without re-transcoding, and RFC 5861 stale windows."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from resizer.cache.base import EntryMeta
from resizer.cache.disk import DiskCacheStore
from resizer.cache.memory import MemoryCacheStore, _Entry
from resizer.config import Duration, OriginConfig, load_config
from resizer.errors import OriginFailed, TransformFailed
from resizer.options import cache_key, parse_options
from resizer.pipeline import Lookup, Service, open_service
from resizer.sources.base import SourceStat
from resizer.sources.fake import FakeSource
from resizer.sources.filesystem import FilesystemSource
from resizer.sources.origins import Origin, Origins
from resizer.targets import parse_target
from resizer.transform.fake import FakeTransformer
from resizer.transform.runner import FfmpegTransformer, resolve_ffmpeg
from tests.media import make_test_video

PATH = "/v/a.mp4"
OPTIONS = parse_options({"width": "320"})
KEY = cache_key(PATH, OPTIONS)
TARGET = parse_target(PATH, b"width=320")


class FlakySource(FakeSource):
    """A fake source whose existence check fails like an unreachable origin when told."""

    failing = False

    async def stat(self, path: str) -> SourceStat:
        if self.failing:
            raise OriginFailed("origin down")
        return await super().stat(path)


@asynccontextmanager
async def service_with(
    tmp_path: Path, *, swr: float = 0.0, sie: float = 0.0, transformer: FakeTransformer
) -> AsyncIterator[tuple[Service, FlakySource, MemoryCacheStore]]:
    source = FlakySource(tmp_path, {"a.mp4": b"source bytes"})
    origins = Origins([Origin.simple("v", r"^/v/(?P<path>.+)$", source)])
    cache = MemoryCacheStore()
    origin = OriginConfig(
        "v",
        r"^/v/(?P<path>.+)$",
        stale_while_revalidate=Duration(swr),
        stale_if_error=Duration(sie),
    )
    config = dataclasses.replace(load_config(env={}), origins=(origin,))
    async with open_service(
        config, cache=cache, transformer=transformer, origins=origins
    ) as service:
        yield service, source, cache


async def request(service: Service) -> tuple[Lookup, EntryMeta]:
    """What a GET does: look up, and on a miss subscribe and wait for the entry."""
    found = await service.lookup_or_resolve(KEY, TARGET)
    if found.entry is not None:
        return found, found.entry
    assert found.resolved is not None
    from resizer.pipeline import Job

    subscription = service.subscribe(Job(KEY, found.resolved, OPTIONS, TARGET))
    try:
        await subscription.wait_for(lambda p: p.state.value != "running")
        entry = subscription.work.entry
        assert entry is not None
        return found, entry
    finally:
        subscription.detach()


def age(cache: MemoryCacheStore, seconds: float) -> EntryMeta:
    """Make the entry of KEY as if it expired ``seconds`` ago; returns its metadata."""
    stored = cache._entries[KEY]
    meta = dataclasses.replace(stored.meta, created=time.time() - stored.meta.ttl - seconds)
    cache._entries[KEY] = _Entry(meta, stored.data)
    return meta


def revalidations(service: Service, outcome: str) -> float:
    return float(service.metrics.revalidations.labels(outcome)._value.get())


async def test_unchanged_source_refreshes_without_transform(tmp_path: Path) -> None:
    """An expired entry whose source is unchanged gets a new expiry, same ETag, no ffmpeg."""
    transformer = FakeTransformer()
    async with service_with(tmp_path, transformer=transformer) as (service, _, cache):
        _, first = await request(service)
        assert first.validators
        stale = age(cache, 10.0)
        found, refreshed = await request(service)
        assert not found.stale
        assert transformer.runs_started == 1
        assert refreshed.etag == first.etag
        assert refreshed.expires > stale.expires
        assert refreshed.is_fresh()
        assert await cache.lookup(KEY) == refreshed
        assert revalidations(service, "refreshed") == 1


async def test_changed_source_is_transcoded_again(tmp_path: Path) -> None:
    """An expired entry whose source changed (new size) is produced again by ffmpeg."""
    transformer = FakeTransformer()
    async with service_with(tmp_path, transformer=transformer) as (service, source, cache):
        _, first = await request(service)
        age(cache, 10.0)
        source.objects["a.mp4"] = b"new, longer source bytes"
        _, second = await request(service)
        assert transformer.runs_started == 2
        assert second.validators != first.validators
        assert revalidations(service, "changed") == 1


async def test_stale_while_revalidate_answers_at_once_and_revalidates_once(
    tmp_path: Path,
) -> None:
    """N concurrent requests for an entry inside the swr window are all answered stale at
    once, and exactly one background revalidation refreshes it (no transform)."""
    transformer = FakeTransformer()
    async with service_with(tmp_path, swr=60.0, transformer=transformer) as (
        service,
        source,
        cache,
    ):
        _, first = await request(service)
        age(cache, 10.0)
        stats_before = source.stats
        answers: list[Lookup] = []

        async def one() -> None:
            answers.append((await request(service))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
        # All answered from the cache (no Work): stale, or fresh once the refresh landed.
        assert all(found.entry is not None for found in answers)
        assert all(found.entry.etag == first.etag for found in answers if found.entry)
        assert any(found.stale for found in answers)
        await trio.testing.wait_all_tasks_blocked()
        assert not service.revalidating
        assert revalidations(service, "refreshed") == 1
        # Speculative resolution stats the source per request; the background adds one.
        assert source.stats - stats_before <= len(answers) + 1
        assert transformer.runs_started == 1
        found, entry = await request(service)
        assert not found.stale
        assert entry.etag == first.etag
        assert entry.is_fresh()


async def test_stale_while_revalidate_drops_entry_of_changed_source(tmp_path: Path) -> None:
    """A background revalidation finding the source changed drops the entry: next is a miss."""
    transformer = FakeTransformer()
    async with service_with(tmp_path, swr=60.0, transformer=transformer) as (
        service,
        source,
        cache,
    ):
        await request(service)
        age(cache, 10.0)
        source.objects["a.mp4"] = b"changed source"
        found, _ = await request(service)
        assert found.stale
        await trio.testing.wait_all_tasks_blocked()
        found, _ = await request(service)
        assert not found.stale
        assert transformer.runs_started == 2


async def test_stale_if_error_serves_when_origin_fails(tmp_path: Path) -> None:
    """With the origin down, an entry expired by less than stale_if_error is served; beyond
    the window, or without one, the error is raised."""
    transformer = FakeTransformer()
    async with service_with(tmp_path, sie=60.0, transformer=transformer) as (
        service,
        source,
        cache,
    ):
        _, first = await request(service)
        age(cache, 10.0)
        source.failing = True
        found, entry = await request(service)
        assert found.stale
        assert entry.etag == first.etag
        assert revalidations(service, "failed") == 1
        age(cache, 120.0)
        try:
            await request(service)
        except OriginFailed:
            pass
        else:
            raise AssertionError("served beyond stale_if_error")


async def test_stale_if_error_serves_when_transcode_fails(tmp_path: Path) -> None:
    """When producing a changed source again fails, the stale entry is served instead."""
    transformer = FakeTransformer()
    async with service_with(tmp_path, sie=60.0, transformer=transformer) as (
        service,
        source,
        cache,
    ):
        _, first = await request(service)
        age(cache, 10.0)
        source.objects["a.mp4"] = b"changed source"
        transformer.open_error = TransformFailed("ffmpeg failed")
        _, entry = await request(service)
        assert entry.etag == first.etag


async def test_disk_refresh_keeps_data_file_and_etag(tmp_path: Path) -> None:
    """The disk store's refresh republishes the metadata only: same data file, new expiry."""
    disk = DiskCacheStore(tmp_path)
    disk.prepare()
    async with disk.open_writer(
        "k", content_type="video/mp4", ttl=1.0, options="", validators="size=1;mtime=0.0"
    ) as writer:
        await writer.write(b"x")
        entry = await writer.commit()
    old = dataclasses.replace(entry, created=entry.created - 10)
    data = disk.data_path(entry)
    assert data is not None
    inode = data.stat().st_ino
    refreshed = await disk.refresh(old, created=entry.created + 100)
    assert refreshed is not None
    assert refreshed.etag == entry.etag
    assert refreshed.validators == entry.validators
    assert refreshed.created == entry.created + 100
    assert data.stat().st_ino == inode
    assert await disk.lookup_stale("k") == refreshed
    await disk.delete("k")
    assert await disk.refresh(entry) is None


async def test_measure_revalidation_against_transcode(tmp_path: Path) -> None:
    """Prints the cost of refreshing an unchanged variant against re-transcoding it (real
    ffmpeg, small clip); asserts only that the refresh ran no ffmpeg."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "a.mp4", seconds=1.0)
    origins = Origins([Origin.simple("v", r"^/v/(?P<path>.+)$", FilesystemSource(media))])
    config = load_config(env={})
    config = dataclasses.replace(config, base_dir=tmp_path)
    cache = DiskCacheStore(tmp_path / "cache")
    cache.prepare()
    transformer = FfmpegTransformer(resolve_ffmpeg(None), kill_grace=1.0)
    async with open_service(
        config, cache=cache, transformer=transformer, origins=origins
    ) as service:
        began = time.perf_counter()
        _, first = await request(service)
        transcode = time.perf_counter() - began
        expired = dataclasses.replace(first, created=first.created - first.ttl - 1)
        await cache.refresh(first, created=expired.created)
        began = time.perf_counter()
        _, refreshed = await request(service)
        refresh = time.perf_counter() - began
        assert refreshed.etag == first.etag
        assert refreshed.is_fresh()
        assert service.metrics.transforms._value.get() == 1
    print(f"\nrevalidate+refresh {refresh * 1000:.1f} ms vs transcode {transcode * 1000:.1f} ms")
