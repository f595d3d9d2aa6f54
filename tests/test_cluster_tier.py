"""The shared store as a second tier (resizer/cluster/tier.py): write-through, shared hits,
and a store that fails never failing a request."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from resizer.cache.disk import DiskCacheStore
from resizer.cluster.memleases import MemoryLeaseHub, MemoryLeases
from resizer.cluster.memstore import MemoryBackend
from resizer.cluster.store import ObjectStore, SharedStoreError
from resizer.cluster.tier import SharedTier
from resizer.options import cache_key, parse_options
from resizer.pipeline import Job, Service, open_service
from resizer.sources.fake import FakeSource
from resizer.transform.fake import FakeTransformer
from tests.harness import PATH, fake_origin_config, fake_origins
from tests.media import make_test_video
from tests.server import server_config, server_config_text, start_server
from tests.test_cluster_leases import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.test_cluster_s3 import BUCKET, Moto, moto  # noqa: F401 - the fixture
from tests.test_http_coalescing import poll_until
from tests.test_http_scheduling import ffmpeg_descendants
from tests.test_workers import running_supervised

OPTIONS = parse_options({"width": "320"})
KEY = cache_key(PATH, OPTIONS)
PART = 4_096


class FailingBackend(MemoryBackend):
    """A store whose uploads (or lookups) fail, as S3 down would."""

    def __init__(self, *, fail_uploads: bool = False, fail_lookups: bool = False) -> None:
        super().__init__()
        self.fail_uploads, self.fail_lookups = fail_uploads, fail_lookups

    async def upload_part(
        self, name: str, upload_id: str, number: int, data: bytes, sha256: str
    ) -> str:
        if self.fail_uploads:
            raise SharedStoreError("S3 is down")
        return await super().upload_part(name, upload_id, number, data, sha256)

    async def put_object(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        if self.fail_uploads:
            raise SharedStoreError("S3 is down")
        return await super().put_object(name, data, sha256, content_type)

    async def get_object(self, name: str) -> bytes | None:
        if self.fail_lookups:
            raise SharedStoreError("S3 is down")
        return await super().get_object(name)


def shared_store(backend: MemoryBackend) -> ObjectStore:
    return ObjectStore(backend, prefix="t/", part_size=PART, upload_concurrency=2)


@asynccontextmanager
async def instance(
    folder: Path, store: ObjectStore, fake: FakeTransformer, hub: MemoryLeaseHub | None = None
) -> AsyncIterator[Service]:
    """One resizer instance: its own disk cache in ``folder``, the shared ``store``."""
    cache_root = folder / "cache"
    spill = folder / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    source = FakeSource(spill, {"clip.mp4": b"source" * 1000})
    cache = DiskCacheStore(cache_root)
    cache.prepare()
    async with open_service(
        fake_origin_config(cache_root),
        cache=cache,
        transformer=fake,
        origins=fake_origins(source),
        shared=SharedTier(store),
        cluster=MemoryLeases(hub) if hub is not None else None,
    ) as service:
        yield service


async def until_shared(store: ObjectStore) -> None:
    """Poll (mock time) until the store has the test key's manifest: nothing to wait on."""
    with trio.fail_after(60):
        while await store.lookup(KEY) is None:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def fetch(service: Service) -> tuple[bytes, str | None]:
    """The whole body of the test key through ``service``, and its Work's tier."""
    job = Job(KEY, await service.origins.resolve(PATH), OPTIONS)
    subscription = service.subscribe(job)
    try:
        body = b"".join([chunk async for chunk in subscription.iter_bytes()])
        return body, subscription.work.tier
    finally:
        subscription.detach()


async def test_a_transcode_is_written_through_and_another_instance_serves_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Instance A transcodes (a multi-part output reaches the store); instance B, with an
    empty disk, serves the same bytes from the store without transcoding, fills its local
    cache once, and its next request is a local hit."""
    store = shared_store(MemoryBackend())
    fake_a = FakeTransformer(size=20_000, chunk_size=1_000)
    async with instance(tmp_path / "a", store, fake_a) as a:
        body, tier = await fetch(a)
        await until_shared(store)  # the upload completes just after the body
    assert (tier, fake_a.runs_started) == (None, 1)
    shared = await store.lookup(KEY)
    assert shared is not None
    assert len(shared.parts) == 5
    fake_b = FakeTransformer(size=20_000, chunk_size=1_000)
    async with instance(tmp_path / "b", store, fake_b) as b:
        got, tier = await fetch(b)
        assert (got, tier) == (body, "shared")
        assert (fake_b.runs_started, fake_b.probes) == (0, 0)
        local = await b.cache.lookup(KEY)
        assert local is not None
        assert (local.etag, local.size) == (shared.meta.etag, len(body))
        assert b.metrics.shared_hits._value.get() == 1


async def test_twenty_identical_misses_on_two_instances_cost_one_transcode(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Ten clients on each of two instances sharing the store and the leases: one instance
    leads and transcodes once; the other's Work waits for its lease, then serves what it
    published. Twenty identical bodies."""
    store, hub = shared_store(MemoryBackend()), MemoryLeaseHub()
    fakes = [FakeTransformer(size=20_000, chunk_size=1_000, delay=0.01) for _ in range(2)]
    bodies: list[bytes] = []
    async with (
        instance(tmp_path / "a", store, fakes[0], hub) as a,
        instance(tmp_path / "b", store, fakes[1], hub) as b,
        trio.open_nursery() as clients,
    ):

        async def client(service: Service) -> None:
            body, _ = await fetch(service)
            bodies.append(body)

        for service in (a, b) * 10:
            clients.start_soon(client, service)
    assert sum(fake.runs_started for fake in fakes) == 1
    assert bodies == [fakes[0].output_for(OPTIONS)] * 20
    follows = [service.metrics.cluster_follows._value.get() for service in (a, b)]
    assert sorted(follows) == [0, 1]


async def test_a_store_that_fails_uploads_never_fails_the_request(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """S3 down while writing through: the client gets the whole body, the local entry is
    published, the store has nothing, the failure is counted."""
    store = shared_store(FailingBackend(fail_uploads=True))
    fake = FakeTransformer(size=20_000, chunk_size=1_000)
    async with instance(tmp_path, store, fake) as service:
        body, _ = await fetch(service)
        with trio.fail_after(60):  # mock time: the failed upload is counted just after
            while not service.metrics.shared_store_errors._value.get():  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert body == fake.output_for(OPTIONS)
        assert await service.cache.lookup(KEY) is not None
    assert await shared_store(MemoryBackend()).lookup(KEY) is None


async def test_a_store_that_fails_lookups_means_a_transcode(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """S3 down on a local miss: resizer transcodes as if there were no shared tier."""
    store = shared_store(FailingBackend(fail_lookups=True))
    fake = FakeTransformer(size=5_000)
    async with instance(tmp_path, store, fake) as service:
        body, tier = await fetch(service)
        assert (body, tier, fake.runs_started) == (fake.output_for(OPTIONS), None, 1)


@pytest.mark.integration
async def test_a_restarted_instance_with_an_empty_disk_answers_from_s3(
    moto: Moto,  # noqa: F811 - the fixture
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two real servers on moto's S3 (signatures checked) with separate disks: the second
    answers the first's variant as HIT-SHARED, byte-identical, with no ffmpeg run; then HIT."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.user.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.user.secret_access_key)
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"not decoded by the fake transformer")
    shared = f"""
    [cluster.s3]
    bucket = "{BUCKET}"
    prefix = "tier-test/"
    endpoint_url = "{moto.endpoint_url}"
    part_size = "5MiB"
    """
    url = "/videos/clip.mp4?width=320"
    first_fake = FakeTransformer(size=6_000_000, chunk_size=64_000)
    first = await start_server(nursery, server_config(media, tmp_path / "a", shared), first_fake)
    async with httpx.AsyncClient(timeout=60) as client:
        made = await client.get(first.url + url)
        assert made.headers["X-Cache-Status"] == "MISS"
        # The upload completes just after the body: its manifest is written last.
        tier = first.service.shared
        assert tier is not None
        key = cache_key("/videos/clip.mp4", OPTIONS)
        with trio.fail_after(20):
            while await tier.store.lookup(key) is None:  # noqa: ASYNC110 - S3: no event
                await trio.sleep(0.05)
        second_fake = FakeTransformer(size=6_000_000, chunk_size=64_000)
        second = await start_server(
            nursery, server_config(media, tmp_path / "b", shared), second_fake
        )
        # A closed range reads only its parts (here part 2 of 2): 206 with the total, and
        # nothing is cached locally for it.
        part = await client.get(second.url + url, headers={"Range": "bytes=5300000-5300999"})
        assert part.status_code == 206
        assert part.headers["X-Cache-Status"] == "HIT-SHARED"
        assert part.headers["Content-Range"] == f"bytes 5300000-5300999/{len(made.content)}"
        assert part.content == made.content[5_300_000:5_301_000]
        assert await second.service.cache.lookup(key) is None
        shared_hit = await client.get(second.url + url)
        assert shared_hit.headers["X-Cache-Status"] == "HIT-SHARED"
        assert shared_hit.content == made.content
        assert second_fake.runs_started == 0
        again = await client.get(second.url + url)
        assert again.headers["X-Cache-Status"] == "HIT"
        # Same bytes, same validator on both instances.
        first_hit = await client.head(first.url + url)
        assert again.headers["ETag"] == first_hit.headers["ETag"]


@pytest.mark.integration
async def test_two_real_instances_on_redis_and_s3_transcode_once(
    moto: Moto,  # noqa: F811 - the fixture
    redis_server: RedisServer,  # noqa: F811 - the fixture
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servers with separate disks, one real redis-server, moto's S3: 20 concurrent
    identical misses split across both cost one transcode in all, and 20 identical bodies."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.user.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.user.secret_access_key)
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"not decoded by the fake transformer")
    cluster = f"""
    [cluster]
    redis_url = "redis://127.0.0.1:{redis_server.port}"
    lease_ttl = "2s"
    [cluster.s3]
    bucket = "{BUCKET}"
    prefix = "lease-test/"
    endpoint_url = "{moto.endpoint_url}"
    part_size = "5MiB"
    """
    fakes = [FakeTransformer(size=300_000, chunk_size=10_000, delay=0.02) for _ in range(2)]
    servers = [
        await start_server(nursery, server_config(media, tmp_path / name, cluster), fake)
        for name, fake in zip(("a", "b"), fakes, strict=True)
    ]
    results: list[tuple[int, bytes]] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def get(base: str) -> None:
            response = await client.get(base + "/videos/clip.mp4?width=320")
            results.append((response.status_code, response.content))

        async with trio.open_nursery() as clients:
            for server in servers * 10:
                clients.start_soon(get, server.url)
    assert sum(fake.runs_started for fake in fakes) == 1
    assert results == [(200, fakes[0].output_for(OPTIONS))] * 20


@pytest.mark.integration
async def test_killing_the_leader_mid_transcode_lets_the_other_instance_take_over(
    moto: Moto,  # noqa: F811 - the fixture
    redis_server: RedisServer,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Two `resizer serve` processes (real ffmpeg) on one Redis and one S3: instance A leads
    a slow transcode, B's request for the same URL waits on A's lease; A is killed (SIGKILL)
    mid-transcode: A's client fails visibly, the lease expires, B transcodes and answers."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "clip.mp4", 640, 360, seconds=30)
    cluster = f"""
    [cluster]
    redis_url = "redis://127.0.0.1:{redis_server.port}"
    lease_ttl = "1s"
    [cluster.s3]
    bucket = "{BUCKET}"
    prefix = "takeover/"
    endpoint_url = "{moto.endpoint_url}"
    access_key_id = "{moto.user.access_key_id}"
    secret_access_key = "{moto.user.secret_access_key}"
    """
    url = "/videos/clip.mp4?width=640&compression=high"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        running_supervised(
            server_config_text(media, tmp_path / "a" / "cache", cluster), tmp_path / "a"
        ) as a,
        running_supervised(
            server_config_text(media, tmp_path / "b" / "cache", cluster), tmp_path / "b"
        ) as b,
        httpx.AsyncClient(timeout=120) as client,
    ):
        outcomes: dict[str, tuple[int, int] | httpx.HTTPError] = {}

        async def get(name: str, base: str) -> None:
            try:
                response = await client.get(base + url)
                outcomes[name] = (response.status_code, len(response.content))
            except httpx.HTTPError as exc:  # the dead leader's client: a visible failure
                outcomes[name] = exc

        async with trio.open_nursery() as clients:
            clients.start_soon(get, "a", a.url)
            with trio.fail_after(30):
                await poll_until(lambda: bool(ffmpeg_descendants(a.process.pid)) or "a" in outcomes)
            assert "a" not in outcomes, outcomes
            clients.start_soon(get, "b", b.url)
            await trio.sleep(0.5)  # B waits on A's lease: no ffmpeg of its own yet
            assert ffmpeg_descendants(b.process.pid) == []
            for worker in a.workers():  # the whole instance dies at once: no release
                os.kill(worker, signal.SIGKILL)
            a.process.kill()
        assert isinstance(outcomes["a"], httpx.HTTPError)
        answer = outcomes["b"]
        assert not isinstance(answer, httpx.HTTPError), answer
        assert answer[0] == 200
        assert answer[1] > 100_000
