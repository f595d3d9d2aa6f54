"""The shared store's pure parts (manifest, object names, part spans), its configuration, and
engine behaviour easiest to pin down on the in-memory fake (read-ahead, failures, staleness).
The behaviour shared with S3 is in test_cluster_s3.py, which runs on both."""

from __future__ import annotations

import re
import time

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from resizer.cache.base import EntryMeta
from resizer.cluster.memstore import MemoryBackend, memory_store
from resizer.cluster.store import (
    MAX_QUOTED_KEY,
    ObjectStore,
    PartRecord,
    SharedEntry,
    SharedStoreError,
    decode_manifest,
    encode_manifest,
    key_of_manifest,
    manifest_name,
    parts_for_range,
    quote_key,
)
from resizer.config import DEFAULT_CONFIG_TOML, load_config
from resizer.errors import ConfigError, ResizerError
from resizer.units import MiB

PART = 1000


def meta_for(key: str, size: int, ttl: float = 3600) -> EntryMeta:
    return EntryMeta(key, "video/mp4", size, '"e"', time.time(), ttl, "w=1", "videos:fs")


async def upload(store: ObjectStore, key: str, body: bytes, ttl: float = 3600) -> None:
    async with store.open_upload(key) as writer:
        for start in range(0, len(body), 333):
            await writer.write(body[start : start + 333])
        await writer.commit(meta_for(key, len(body), ttl))


@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=8),
    data=st.data(),
)
def test_part_spans_cover_exactly_the_range(sizes: list[int], data: st.DataObject) -> None:
    """parts_for_range returns, in order, exactly the parts overlapping [start, stop), and
    their spans put together are the range; `whole` marks spans that are entire parts."""
    parts = tuple(PartRecord(size, "") for size in sizes)
    total = sum(sizes)
    start = data.draw(st.integers(0, total))
    stop = data.draw(st.integers(start, total))
    body = bytes(i % 256 for i in range(total))
    spans = parts_for_range(parts, start, stop)
    assert b"".join(body[s.offset + s.start : s.offset + s.stop] for s in spans) == body[start:stop]
    assert all(s.stop > s.start for s in spans)
    assert [s.index for s in spans] == sorted({s.index for s in spans})
    for span in spans:
        assert span.whole == (span.start == 0 and span.stop == sizes[span.index])


def test_part_spans_reject_ranges_outside_the_object() -> None:
    """A range beyond the object is a caller bug: ValueError."""
    with pytest.raises(ValueError, match="not within"):
        parts_for_range((PartRecord(10, ""),), 5, 11)


def test_manifest_round_trip_and_rejects() -> None:
    """A manifest decodes to the entry it encodes; other JSON (wrong format, sizes that do
    not add up, not an object) is rejected with ValueError."""
    entry = SharedEntry(
        meta_for("k", 15), "data/x/y", '"etag"', 10, (PartRecord(10, "a"), PartRecord(5, "b"))
    )
    assert decode_manifest(encode_manifest(entry)) == entry
    for raw in (
        b"[]",
        b"{}",
        b"not json",
        encode_manifest(entry).replace(b'"format":1', b'"format":2'),
        encode_manifest(entry).replace(b'"size":15', b'"size":16'),
    ):
        with pytest.raises(ValueError, match="not a manifest"):
            decode_manifest(raw)


@given(st.text(max_size=50), st.text(max_size=50))
def test_quoted_keys_keep_prefixes(prefix: str, rest: str) -> None:
    """Object names preserve key prefixes (what delete_prefix lists by) and decode back
    (when not cut; 50 characters never are, 100 may be)."""
    key = prefix + rest
    assert quote_key(key).startswith(quote_key(prefix))
    if "!" not in quote_key(key):
        assert key_of_manifest(manifest_name(key)) == key


def test_long_keys_are_cut_within_s3_limits() -> None:
    """A key too long for an object name is cut at an escape boundary plus its digest; two
    long keys with one beginning get different names."""
    a, b = "v1:/" + "é" * 400 + "a", "v1:/" + "é" * 400 + "b"
    assert quote_key(a) != quote_key(b)
    assert len(manifest_name(a).encode()) < 1024 - 100
    assert key_of_manifest(manifest_name(a)) is None
    kept = quote_key(a).split("!")[0]
    assert len(kept) <= MAX_QUOTED_KEY
    assert re.fullmatch(r"(%[0-9A-F]{2}|[A-Za-z0-9_.~-])*", kept)


async def test_long_keys_round_trip_and_purge_by_prefix() -> None:
    """Entries of cut keys are found by lookup and removed by a prefix purge (which reads
    their manifests to learn the keys)."""
    store = memory_store(part_size=PART)
    long_a, long_b = "v1:/a/" + "x" * 900, "v1:/b/" + "x" * 900
    for key in (long_a, long_b):
        await upload(store, key, b"body")
    assert await store.lookup(long_a) is not None
    assert await store.delete_prefix("v1:/a/" + "x" * 800) == 1
    assert await store.lookup(long_a) is None
    assert await store.lookup(long_b) is not None


async def test_read_ahead_bounds_the_gets_in_flight() -> None:
    """With read_ahead 2 and a reader that takes nothing yet, only 2 part GETs start; each
    part taken lets one more start."""
    store = memory_store(part_size=PART, read_ahead=2)
    body = bytes(range(200)) * 25  # 5 parts
    await upload(store, "k", body)
    entry = await store.lookup("k")
    assert entry is not None
    backend = store.backend
    assert isinstance(backend, MemoryBackend)
    before = backend.requests["get_range"]
    async with store.read(entry, 0, len(body)) as chunks:
        await trio.testing.wait_all_tasks_blocked()
        assert backend.requests["get_range"] - before == 2
        first = await chunks.__anext__()
        await trio.testing.wait_all_tasks_blocked()
        assert backend.requests["get_range"] - before == 3
        rest = [chunk async for chunk in chunks]
    assert first + b"".join(rest) == body


async def test_a_failed_part_upload_fails_the_writer_and_aborts() -> None:
    """A part upload the store refuses surfaces as that SharedStoreError (not wrapped in a
    group) and the multipart upload is aborted."""
    store = memory_store(part_size=PART)
    backend = store.backend
    assert isinstance(backend, MemoryBackend)

    async def refuse(name: str, upload_id: str, number: int, data: bytes, sha: str) -> str:
        await trio.lowlevel.checkpoint()
        raise SharedStoreError("refused")

    async def produce() -> None:
        async with store.open_upload("k") as writer:
            for _ in range(10):
                await writer.write(b"x" * PART)
            await writer.commit(meta_for("k", 10 * PART))

    backend.upload_part = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(SharedStoreError, match="refused"):
        await produce()
    assert backend.uploads == {}
    assert backend.requests["abort_multipart"] == 1
    assert await store.lookup("k") is None


async def test_commit_checks_the_meta_and_a_small_output_skips_multipart() -> None:
    """commit refuses a meta of another key or size; an output under one part is a single
    PUT (no multipart upload at all)."""
    store = memory_store(part_size=PART)
    backend = store.backend
    assert isinstance(backend, MemoryBackend)

    async def commit_wrong_size() -> None:
        async with store.open_upload("k") as writer:
            await writer.write(b"abc")
            await writer.commit(meta_for("k", 4))

    with pytest.raises(ValueError, match="does not describe"):
        await commit_wrong_size()
    await upload(store, "k", b"abc")
    assert backend.requests["create_multipart"] == 0
    assert await store.lookup("k") is not None


async def test_stale_entries_only_on_request() -> None:
    """An expired entry is a miss for lookup, but include_stale returns it (revalidation)."""
    store = memory_store(part_size=PART)
    await upload(store, "k", b"abc", ttl=0)
    assert await store.lookup("k") is None
    stale = await store.lookup("k", include_stale=True)
    assert stale is not None
    assert stale.meta.size == 3


async def test_an_invalid_manifest_is_a_miss() -> None:
    """A manifest that does not parse is treated as absent (logged), never raised."""
    store = memory_store(part_size=PART)
    backend = store.backend
    assert isinstance(backend, MemoryBackend)
    backend.put(store.prefix + manifest_name("k"), b"{garbage")
    assert await store.lookup("k") is None


def test_store_errors_are_resizer_errors() -> None:
    """Shared-store failures carry HTTP statuses like every ResizerError leaf."""
    assert issubclass(SharedStoreError, ResizerError)
    assert SharedStoreError("x").status == 502


def test_cluster_s3_config_defaults_env_and_validation() -> None:
    """[cluster.s3] parses as a nested table with defaults, takes RESIZER_CLUSTER_S3_*
    overrides, and rejects parts under 5 MiB, zero concurrency and unknown keys."""
    config = load_config(
        text=DEFAULT_CONFIG_TOML + '[cluster.s3]\nbucket = "b"\npart_size = "16MiB"\n',
        env={"RESIZER_CLUSTER_S3_UPLOAD_CONCURRENCY": "2"},
    )
    s3 = config.cluster.s3
    assert (s3.bucket, s3.part_size, s3.upload_concurrency, s3.read_ahead) == ("b", 16 * MiB, 2, 3)
    assert load_config(text=DEFAULT_CONFIG_TOML, env={}).cluster.s3.part_size == 8 * MiB
    bad = '[cluster.s3]\nbucket = "b"\npart_size = "1MiB"\nupload_concurrency = 0\nnope = 1\n'
    with pytest.raises(ConfigError) as caught:
        load_config(text=DEFAULT_CONFIG_TOML + bad, env={})
    keys = {key for key, _ in caught.value.problems}
    assert {"cluster.s3.part_size", "cluster.s3.upload_concurrency", "cluster.s3.nope"} <= keys
