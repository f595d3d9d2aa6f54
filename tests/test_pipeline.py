"""The pipeline with in-memory parts: streaming, sharing, abandonment and failure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from resizer.cache.memory import MemoryCacheStore
from resizer.concurrency.coalescing import WorkState
from resizer.config import load_config
from resizer.errors import TransformFailed, UndecodableSource
from resizer.options import cache_key, parse_options
from resizer.pipeline import Job, Service, open_service
from resizer.sources.fake import FakeSource
from resizer.sources.origins import Origin, Origins
from resizer.transform.fake import FakeTransformer

PATH = "/v/a.mp4"


@asynccontextmanager
async def fake_service(
    tmp_path: Path, transformer: FakeTransformer
) -> AsyncIterator[tuple[Service, FakeSource, MemoryCacheStore]]:
    source = FakeSource(tmp_path, {"a.mp4": b"source bytes"})
    origins = Origins([Origin.simple("v", r"^/v/(?P<path>.+)$", source)])
    cache = MemoryCacheStore()
    config = load_config(env={})
    async with open_service(
        config, cache=cache, transformer=transformer, origins=origins
    ) as service:
        yield service, source, cache


async def make_job(service: Service, query: dict[str, str] | None = None) -> Job:
    options = parse_options(query or {"width": "320"})
    return Job(cache_key(PATH, options), await service.origins.resolve(PATH), options)


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_first_bytes_arrive_before_the_transform_ends(tmp_path: Path) -> None:
    """A subscriber reads the first chunk while the transform is still producing."""
    release = trio.Event()

    async def hold_after_first(index: int) -> None:
        if index >= 1:
            await release.wait()

    fake = FakeTransformer(before_chunk=hold_after_first)
    async with fake_service(tmp_path, fake) as (service, _, cache):
        job = await make_job(service)
        subscription = service.subscribe(job)
        await subscription.wait_first_bytes()
        chunks = subscription.iter_bytes()
        first = await chunks.__anext__()
        assert first == fake.output_for(job.options)[: len(first)]
        assert subscription.work.state is WorkState.RUNNING
        release.set()
        rest = await read_all(chunks)
        subscription.detach()
        assert first + rest == fake.output_for(job.options)
        entry = await cache.lookup(job.key)
        assert entry is not None
        assert entry.size == fake.size
        assert len(service.registry) == 0


async def test_identical_requests_share_one_transform(tmp_path: Path) -> None:
    """Three subscribers to one key cost one source fetch and one transform."""
    gate = trio.Event()
    fake = FakeTransformer(gate=gate)
    async with fake_service(tmp_path, fake) as (service, source, _):
        job = await make_job(service)
        subscriptions = [service.subscribe(job) for _ in range(3)]
        assert [s.joined for s in subscriptions] == [False, True, True]
        results: list[bytes] = []

        async def consume(index: int) -> None:
            results.append(await read_all(subscriptions[index].iter_bytes()))
            subscriptions[index].detach()

        async with trio.open_nursery() as nursery:
            for index in range(3):
                nursery.start_soon(consume, index)
            await fake.wait_started()
            gate.set()
        assert results == [fake.output_for(job.options)] * 3
        assert (fake.runs_started, source.opens) == (1, 1)
        assert service.metrics.coalesced._value.get() == 2


async def test_last_client_leaving_cancels_the_work(tmp_path: Path) -> None:
    """When the only subscriber detaches mid-stream, the transform stops and nothing is cached."""
    stall = trio.Event()

    async def stall_after_first(index: int) -> None:
        if index >= 1:
            await stall.wait()

    fake = FakeTransformer(before_chunk=stall_after_first)
    async with fake_service(tmp_path, fake) as (service, _, cache):
        job = await make_job(service)
        subscription = service.subscribe(job)
        await subscription.wait_first_bytes()
        subscription.detach()
        assert len(service.registry) == 0  # unregistered in the same step
        await subscription.work.wait_progress(lambda p: p.state is not WorkState.RUNNING)
        assert subscription.work.state is WorkState.FAILED
        assert (fake.running, fake.runs_abandoned) == (0, 1)
        assert await cache.lookup(job.key) is None
        assert subscription.work.spool is None  # closed once nobody reads it


async def test_one_of_two_leaving_does_not_disturb_the_other(tmp_path: Path) -> None:
    """The first client leaving leaves the work running for the second, which completes."""
    gate = trio.Event()
    fake = FakeTransformer(gate=gate)
    async with fake_service(tmp_path, fake) as (service, _, cache):
        job = await make_job(service)
        first, second = service.subscribe(job), service.subscribe(job)
        first.detach()
        gate.set()
        body = await read_all(second.iter_bytes())
        second.detach()
        assert body == fake.output_for(job.options)
        assert await cache.lookup(job.key) is not None


async def test_failure_reaches_every_subscriber_and_caches_nothing(tmp_path: Path) -> None:
    """A transform failing mid-stream raises in each reader; the next request starts afresh."""
    fake = FakeTransformer(fail_after=3_000)
    async with fake_service(tmp_path, fake) as (service, _, cache):
        job = await make_job(service)
        subscription = service.subscribe(job)
        with pytest.raises(TransformFailed):
            await read_all(subscription.iter_bytes())
        subscription.detach()
        assert await cache.lookup(job.key) is None
        assert len(service.registry) == 0
        fake.fail_after = None
        retry = service.subscribe(job)
        assert not retry.joined
        assert await read_all(retry.iter_bytes()) == fake.output_for(job.options)
        retry.detach()


async def test_probe_error_surfaces_before_any_byte(tmp_path: Path) -> None:
    """An undecodable source fails wait_first_bytes, so the client gets a JSON error."""
    fake = FakeTransformer(probe_error=UndecodableSource("not media"))
    async with fake_service(tmp_path, fake) as (service, _, _):
        subscription = service.subscribe(await make_job(service))
        with pytest.raises(UndecodableSource):
            await subscription.wait_first_bytes()
        subscription.detach()
        assert fake.runs_started == 0
