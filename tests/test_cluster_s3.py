"""The shared result store's behaviour, against moto's S3 server (signatures checked) and the
in-memory fake alike: every test here runs on both (``store_kind``).

moto checks SigV4 signatures once IAM auth is on (POST /moto-api/reset-auth "0", as in
test_source_s3.py): the fixture creates a user allowed ``s3:*`` and the bucket with auth
off, turns auth on, and checks that an unknown key is refused. moto also enforces S3's
5 MiB minimum for every part but the last, so S3 tests use 5 MiB parts.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio
import trio.testing

from resizer.cache.base import EntryMeta
from resizer.cluster.memstore import MemoryBackend
from resizer.cluster.s3store import S3Backend
from resizer.cluster.store import (
    ObjectBackend,
    ObjectStore,
    SharedEntry,
    SharedStoreCorrupt,
    encode_manifest,
    manifest_name,
)
from resizer.sources.http import make_http_client
from resizer.sources.sigv4 import Credentials
from resizer.units import MiB
from tests.moto import enforce_auth, running_moto

REGION = "us-east-1"
BUCKET = "shared"
SETUP = Credentials("AKIASETUPSETUPSETUP0", "setup-secret")
PART = 5 * MiB  # S3's (and moto's) smallest part but the last


@dataclass(frozen=True)
class Moto:
    endpoint_url: str
    user: Credentials  # an IAM user allowed s3:*


def _boto(endpoint_url: str, service: str, credentials: Credentials) -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.session.Session(
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        region_name=REGION,
    ).client(service, endpoint_url=endpoint_url)


def _set_up(endpoint_url: str) -> Moto:
    iam = _boto(endpoint_url, "iam", SETUP)
    iam.create_user(UserName="cluster")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="cluster", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="cluster")["AccessKey"]
    _boto(endpoint_url, "s3", SETUP).create_bucket(Bucket=BUCKET)
    unknown = Credentials("AKIAUNKNOWNUNKNOWN00", "nope")
    enforce_auth(endpoint_url, f"{endpoint_url}/{BUCKET}/anything", unknown, REGION)
    return Moto(endpoint_url, Credentials(key["AccessKeyId"], key["SecretAccessKey"]))


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with running_moto(tmp_path_factory.mktemp("moto")) as endpoint_url:
        yield _set_up(endpoint_url)


class Gated:
    """Wraps a backend: counts ranged GETs; part uploads can be held at a gate."""

    def __init__(self, inner: ObjectBackend) -> None:
        self.inner = inner
        self.gets = 0
        self.gate: trio.Event | None = None
        self.part_entered = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def upload_part(
        self, name: str, upload_id: str, number: int, data: bytes, sha256: str
    ) -> str:
        self.part_entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.upload_part(name, upload_id, number, data, sha256)

    async def get_range(self, name: str, start: int, stop: int, if_match: str) -> bytes:
        self.gets += 1
        return await self.inner.get_range(name, start, stop, if_match)


@dataclass
class Harness:
    kind: str
    backend: Gated
    make: Callable[..., ObjectStore]
    # Replace an object's bytes behind the store's back (a new ETag, as S3 gives it).
    overwrite: Callable[[str, bytes], None]
    # Multipart uploads in progress (started, neither completed nor aborted).
    uploads: Callable[[], list[str]]
    # Every object name in the bucket.
    names: Callable[[], list[str]]


@pytest.fixture(params=["memory", "s3"])
async def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    prefix = f"t{time.monotonic_ns()}/"
    if request.param == "memory":
        memory = MemoryBackend(min_part_size=PART)
        gated = Gated(memory)

        def overwrite(name: str, data: bytes) -> None:
            memory.put(name, data)

        yield Harness(
            "memory",
            gated,
            lambda **kw: ObjectStore(gated, **{"prefix": prefix, "part_size": PART, **kw}),
            overwrite,
            lambda: [name for name, _ in memory.uploads.values()],
            lambda: sorted(memory.objects),
        )
        return
    moto: Moto = request.getfixturevalue("moto")
    s3 = _boto(moto.endpoint_url, "s3", moto.user)
    async with make_http_client(connect_timeout=5) as client:
        backend = S3Backend(
            client,
            bucket=BUCKET,
            region=REGION,
            endpoint_url=moto.endpoint_url,
            credentials=moto.user,
            request_timeout=30,
        )
        gated = Gated(backend)

        def uploads() -> list[str]:
            found = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
            return [u["Key"] for u in found.get("Uploads", [])]

        def names() -> list[str]:
            found = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
            return sorted(o["Key"] for o in found.get("Contents", []))

        yield Harness(
            "s3",
            gated,
            lambda **kw: ObjectStore(gated, **{"prefix": prefix, "part_size": PART, **kw}),
            lambda name, data: s3.put_object(Bucket=BUCKET, Key=name, Body=data) and None,
            uploads,
            names,
        )


KEY = "v1:/videos/a.mp4?width=640"
BODY = bytes(range(251)) * (PART * 5 // 2 // 251)  # 2.5 parts: 3 parts, the last short


def meta_for(key: str, size: int) -> EntryMeta:
    return EntryMeta(
        key=key,
        content_type="video/mp4",
        size=size,
        etag='"e"',
        created=time.time(),
        ttl=3600,
        options="width=640",
        source="videos:s3",
    )


async def upload(store: ObjectStore, key: str, body: bytes, chunk: int = 64 * 1024 + 3) -> None:
    async with store.open_upload(key) as writer:
        for start in range(0, len(body), chunk):
            await writer.write(body[start : start + chunk])
        await writer.commit(meta_for(key, len(body)))


async def read(store: ObjectStore, entry: SharedEntry, start: int, stop: int) -> bytes:
    async with store.read(entry, start, stop) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_round_trip_of_a_multipart_output(harness: Harness) -> None:
    """A 3-part output comes back byte-identical, whole and by ranges, with its metadata."""
    store = harness.make()
    await upload(store, KEY, BODY)
    entry = await store.lookup(KEY)
    assert entry is not None
    assert (entry.meta.key, entry.meta.content_type) == (KEY, "video/mp4")
    assert entry.meta.size == len(BODY)
    assert [p.size for p in entry.parts] == [PART, PART, len(BODY) - 2 * PART]
    assert await read(store, entry, 0, len(BODY)) == BODY
    for start, stop in [(0, 1), (PART - 7, PART + 9), (2 * PART, len(BODY)), (5, 5)]:
        assert await read(store, entry, start, stop) == BODY[start:stop]
    assert harness.uploads() == []


async def test_producer_waits_while_the_only_upload_slot_is_busy(harness: Harness) -> None:
    """With upload_concurrency 1, writing the second part blocks until the first is uploaded,
    and the upload never holds more than (1 + 1) parts."""
    store = harness.make(upload_concurrency=1)
    harness.backend.gate = gate = trio.Event()
    second_written = trio.Event()
    async with store.open_upload(KEY) as writer:
        await writer.write(BODY[:PART])  # handed to the (only) worker, held at the gate
        await harness.backend.part_entered.wait()

        async def second() -> None:
            await writer.write(BODY[PART : 2 * PART])
            second_written.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not second_written.is_set()  # backpressure: the producer waits
            assert writer.buffered_bytes == 2 * PART
            gate.set()
        assert second_written.is_set()
        await writer.write(BODY[2 * PART :])
        await writer.commit(meta_for(KEY, len(BODY)))
        assert writer.peak_buffered_bytes <= 2 * PART
    entry = await store.lookup(KEY)
    assert entry is not None
    assert await read(store, entry, 0, len(BODY)) == BODY


async def test_buffered_bytes_stay_within_concurrency_plus_one_parts(harness: Harness) -> None:
    """A 6-part output written with upload_concurrency 2 holds at most 3 parts at once."""
    store = harness.make(upload_concurrency=2)
    body = BODY * 2 + b"x" * PART  # 6 parts
    async with store.open_upload(KEY) as writer:
        for start in range(0, len(body), 1 * MiB):
            await writer.write(body[start : start + 1 * MiB])
        await writer.commit(meta_for(KEY, len(body)))
        assert PART <= writer.peak_buffered_bytes <= 3 * PART
    entry = await store.lookup(KEY)
    assert entry is not None
    assert len(entry.parts) == 6


async def test_readers_never_see_an_entry_before_commit(harness: Harness) -> None:
    """Until commit writes the manifest the key is a miss, and a block left without commit
    leaves no entry and no upload behind."""
    store = harness.make()
    async with store.open_upload(KEY) as writer:
        await writer.write(BODY)
        assert await store.lookup(KEY) is None
        await writer.write(b"")
        assert await store.lookup(KEY) is None
    assert await store.lookup(KEY) is None
    assert harness.uploads() == []
    async with store.open_upload(KEY) as writer:
        await writer.write(BODY)
        await writer.commit(meta_for(KEY, len(BODY)))
    assert await store.lookup(KEY) is not None


async def test_a_replaced_data_object_is_detected(harness: Harness) -> None:
    """Overwriting the data object (same length, other bytes) makes reads fail with
    SharedStoreCorrupt, partial ranges included (If-Match on the object's ETag)."""
    store = harness.make()
    await upload(store, KEY, BODY)
    entry = await store.lookup(KEY)
    assert entry is not None
    forged = bytearray(BODY)
    forged[PART + 1] ^= 0xFF
    await trio.to_thread.run_sync(
        harness.overwrite, store.prefix + entry.object_name, bytes(forged)
    )
    with pytest.raises(SharedStoreCorrupt):
        await read(store, entry, 0, len(BODY))
    with pytest.raises(SharedStoreCorrupt):
        await read(store, entry, 10, 20)


async def test_a_part_failing_its_checksum_is_detected(harness: Harness) -> None:
    """A whole part whose bytes do not hash to the manifest's sha256 raises
    SharedStoreCorrupt; parts before it are still delivered."""
    store = harness.make()
    await upload(store, KEY, BODY)
    entry = await store.lookup(KEY)
    assert entry is not None
    parts = list(entry.parts)
    parts[1] = replace(parts[1], sha256="0" * 64)
    bad = replace(entry, parts=tuple(parts))
    await store.backend.put_object(
        store.prefix + manifest_name(KEY), encode_manifest(bad), "", "application/json"
    )
    looked_up = await store.lookup(KEY)
    assert looked_up == bad
    received: list[bytes] = []

    async def read_all() -> None:
        async with store.read(bad, 0, len(BODY)) as chunks:
            async for chunk in chunks:
                received.append(chunk)

    with pytest.raises(SharedStoreCorrupt, match="part 2"):
        await read_all()
    assert received == [BODY[:PART]]
    assert await read(store, bad, 2 * PART, len(BODY)) == BODY[2 * PART :]


async def test_ranges_read_only_the_parts_they_need(harness: Harness) -> None:
    """A range inside one part is one GET; one across a boundary is two; the whole is three."""
    store = harness.make()
    await upload(store, KEY, BODY)
    entry = await store.lookup(KEY)
    assert entry is not None
    for (start, stop), gets in [
        ((PART + 10, PART + 20), 1),
        ((PART - 5, PART + 5), 2),
        ((2 * PART, len(BODY)), 1),
        ((0, len(BODY)), 3),
    ]:
        before = harness.backend.gets
        assert await read(store, entry, start, stop) == BODY[start:stop]
        assert harness.backend.gets - before == gets, (start, stop)


async def test_cancellation_mid_upload_aborts_the_multipart_upload(harness: Harness) -> None:
    """Cancelling the producer while a part upload is in flight aborts the upload: no
    multipart upload is left, no object, no entry."""
    store = harness.make(upload_concurrency=2)
    harness.backend.gate = trio.Event()  # the first part never finishes uploading
    with trio.CancelScope() as scope:
        async with store.open_upload(KEY) as writer:
            await writer.write(BODY[: PART + 100])
            await harness.backend.part_entered.wait()
            assert await trio.to_thread.run_sync(harness.uploads) != []
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert await trio.to_thread.run_sync(harness.uploads) == []
    assert await trio.to_thread.run_sync(harness.names) == []
    assert await store.lookup(KEY) is None


async def test_an_error_in_the_block_aborts_and_propagates(harness: Harness) -> None:
    """An exception inside the upload block leaves as itself, after the abort."""
    store = harness.make()

    async def fail() -> None:
        async with store.open_upload(KEY) as writer:
            await writer.write(BODY[: 2 * PART])
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail()
    assert await trio.to_thread.run_sync(harness.uploads) == []
    assert await store.lookup(KEY) is None


async def test_a_small_output_is_one_object(harness: Harness) -> None:
    """An output under one part (here empty and 3 bytes) is stored and read back whole."""
    store = harness.make()
    for body in (b"", b"abc"):
        await upload(store, KEY, body)
        entry = await store.lookup(KEY)
        assert entry is not None
        assert await read(store, entry, 0, len(body)) == body
    # The replaced version's data object was removed: one data object, one manifest.
    assert len(await trio.to_thread.run_sync(harness.names)) == 2


async def test_delete_and_delete_prefix_remove_entries(harness: Harness) -> None:
    """delete removes the named keys; delete_prefix every key under a prefix, and only those."""
    store = harness.make()
    keys = ["v1:/videos/2024/a.mp4?w=1", "v1:/videos/2024/b.mp4?w=1", "v1:/videos/2025/c.mp4?w=1"]
    for key in keys:
        await upload(store, key, b"data of " + key.encode())
    await store.delete([keys[0], "v1:/not/there"])
    assert await store.lookup(keys[0]) is None
    assert await store.delete_prefix("v1:/videos/2024/") == 1
    assert await store.lookup(keys[1]) is None
    assert await store.lookup(keys[2]) is not None
    assert await store.delete_prefix("v1:/videos/") == 1
    assert await trio.to_thread.run_sync(harness.names) == []
