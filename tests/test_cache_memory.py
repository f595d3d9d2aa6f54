"""The CacheStore contract, run against both stores, plus what is specific to the memory store.

The memory store is the fake that tests of the surrounding stages use, so the contract lives
here: running every contract test against the disk store too keeps the fake from drifting away
from the real adapter. Disk-only behaviour (layout, crash leftovers, torn files) is tested in
test_cache_disk.py, which reuses the helpers below.
"""

from __future__ import annotations

import random
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resizer.cache.base import DEFAULT_READ_CHUNK, CacheStore, EntryMeta
from resizer.cache.disk import DiskCacheStore
from resizer.cache.memory import MemoryCacheStore

START = 1_000_000.0
TTL = 60.0
CONTENT_TYPE = "video/mp4"
OPTIONS = "w=320"


class FakeClock:
    """A clock tests move by hand, so expiry needs no sleeping."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    """Raised inside a writer block to abandon it."""


def sample_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def put(
    store: CacheStore,
    key: str,
    data: bytes,
    *,
    ttl: float = TTL,
    piece_size: int | None = None,
) -> EntryMeta:
    """Write and commit ``data`` under ``key``, in pieces of ``piece_size`` if given."""
    step = piece_size or max(len(data), 1)
    async with store.open_writer(
        key, content_type=CONTENT_TYPE, ttl=ttl, options=OPTIONS
    ) as writer:
        for offset in range(0, len(data), step):
            await writer.write(data[offset : offset + step])
        return await writer.commit()


async def read_chunks(
    store: CacheStore,
    entry: EntryMeta,
    start: int = 0,
    stop: int | None = None,
    chunk_size: int = DEFAULT_READ_CHUNK,
) -> list[bytes]:
    end = entry.size if stop is None else stop
    async with store.open_range(entry, start, end, chunk_size) as chunks:
        return [chunk async for chunk in chunks]


async def read(
    store: CacheStore,
    entry: EntryMeta,
    start: int = 0,
    stop: int | None = None,
    chunk_size: int = DEFAULT_READ_CHUNK,
) -> bytes:
    return b"".join(await read_chunks(store, entry, start, stop, chunk_size))


AbandonWay = Literal["exception", "cancel_mid_write", "cancel_before_commit", "no_commit"]
ABANDON_WAYS: list[AbandonWay] = [
    "exception",
    "cancel_mid_write",
    "cancel_before_commit",
    "no_commit",
]


async def abandon_writer(store: CacheStore, key: str, way: AbandonWay) -> None:
    """Open a writer for ``key``, write something, and leave the block without committing."""

    async def write_then_leave(scope: trio.CancelScope) -> None:
        async with store.open_writer(
            key, content_type=CONTENT_TYPE, ttl=TTL, options=OPTIONS
        ) as writer:
            await writer.write(b"partial ")
            if way == "exception":
                raise Boom
            if way == "cancel_mid_write":
                scope.cancel()
                await writer.write(b"never lands")
            elif way == "cancel_before_commit":
                scope.cancel()
                await writer.commit()
            # "no_commit" just leaves the block; for the others, reaching here fails below.

    with trio.CancelScope() as scope:
        if way == "exception":
            with pytest.raises(Boom):
                await write_then_leave(scope)
        else:
            await write_then_leave(scope)
    assert scope.cancelled_caught == way.startswith("cancel")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> CacheStore:
    if request.param == "memory":
        return MemoryCacheStore(clock=clock)
    disk = DiskCacheStore(tmp_path / "cache", clock=clock)
    disk.prepare()
    return disk


# -- contract: both stores --------------------------------------------------------------------


async def test_committed_entry_is_found_with_its_metadata(store: CacheStore) -> None:
    """A committed entry is found by lookup, with the metadata commit returned."""
    data = sample_bytes(3000)
    entry = await put(store, "k", data, piece_size=1000)
    assert entry.key == "k"
    assert entry.size == len(data)
    assert (entry.content_type, entry.options, entry.ttl) == (CONTENT_TYPE, OPTIONS, TTL)
    assert entry.created == START
    assert await store.lookup("k") == entry
    assert await read(store, entry) == data


async def test_unknown_key_is_a_miss(store: CacheStore) -> None:
    """Looking up a key never written returns None."""
    await put(store, "other", b"x")
    assert await store.lookup("missing") is None


@pytest.mark.parametrize(
    ("start", "stop", "chunk_size", "chunk_lengths"),
    [
        (0, 1024, DEFAULT_READ_CHUNK, [1024]),  # whole entry in one chunk
        (0, 1024, 256, [256, 256, 256, 256]),  # exact chunk boundaries
        (0, 1024, 300, [300, 300, 300, 124]),  # short last chunk
        (0, 10, 4, [4, 4, 2]),  # start of the entry
        (500, 600, 1000, [100]),  # middle, chunk larger than the range
        (1014, 1024, 3, [3, 3, 3, 1]),  # end of the entry
        (255, 257, 1, [1, 1]),  # across a 256-byte boundary, byte by byte
        (7, 7, 5, []),  # empty range
    ],
)
async def test_range_reads_return_the_slice_in_bounded_chunks(
    store: CacheStore, start: int, stop: int, chunk_size: int, chunk_lengths: list[int]
) -> None:
    """A range read yields exactly data[start:stop], in chunks of at most chunk_size."""
    data = sample_bytes(1024)
    entry = await put(store, "k", data)
    chunks = await read_chunks(store, entry, start, stop, chunk_size)
    assert [len(chunk) for chunk in chunks] == chunk_lengths
    assert b"".join(chunks) == data[start:stop]


# Examples reuse one store and overwrite one key, so the function-scoped fixture is harmless.
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(max_size=300), draw=st.data())
async def test_any_range_read_equals_slicing(
    store: CacheStore, content: bytes, draw: st.DataObject
) -> None:
    """For any content, start, stop and chunk size, a range read equals slicing the bytes."""
    entry = await put(store, "k", content)
    start = draw.draw(st.integers(0, len(content)), label="start")
    stop = draw.draw(st.integers(start, len(content)), label="stop")
    chunk_size = draw.draw(st.integers(1, 64), label="chunk_size")
    chunks = await read_chunks(store, entry, start, stop, chunk_size)
    assert all(0 < len(chunk) <= chunk_size for chunk in chunks)
    assert b"".join(chunks) == content[start:stop]


async def test_empty_entry_round_trips(store: CacheStore) -> None:
    """A zero-byte entry can be committed, found and read."""
    entry = await put(store, "k", b"")
    assert entry.size == 0
    assert await store.lookup("k") == entry
    assert await read_chunks(store, entry) == []


async def test_range_outside_the_entry_is_rejected(store: CacheStore) -> None:
    """Reads past the end, reversed ranges and empty chunks are programming errors."""
    entry = await put(store, "k", b"0123456789")
    with pytest.raises(ValueError, match="not within"):
        await read(store, entry, 5, 11)
    with pytest.raises(ValueError, match="not within"):
        await read(store, entry, 6, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        await read(store, entry, 0, 5, chunk_size=0)


async def test_nothing_is_visible_before_commit(store: CacheStore) -> None:
    """Written bytes stay invisible to lookups until commit."""
    async with store.open_writer("k", content_type=CONTENT_TYPE, ttl=TTL, options=OPTIONS) as w:
        await w.write(b"some bytes")
        assert w.bytes_written == len(b"some bytes")
        assert await store.lookup("k") is None
        entry = await w.commit()
    assert await store.lookup("k") == entry


@pytest.mark.parametrize("way", ABANDON_WAYS)
async def test_abandoned_writer_publishes_nothing(store: CacheStore, way: AbandonWay) -> None:
    """Leaving a writer without commit (error, cancellation, plain exit) changes no entry."""
    old = await put(store, "existing", b"old bytes")
    await abandon_writer(store, "existing", way)
    await abandon_writer(store, "fresh", way)
    assert await store.lookup("existing") == old
    assert await read(store, old) == b"old bytes"
    assert await store.lookup("fresh") is None


async def test_overwrite_serves_the_old_entry_until_the_new_one_commits(
    store: CacheStore,
) -> None:
    """During an overwrite readers get the old entry; after commit only the new one."""
    old = await put(store, "k", b"old version")
    async with store.open_writer("k", content_type=CONTENT_TYPE, ttl=TTL, options=OPTIONS) as w:
        await w.write(b"new version, longer")
        assert await store.lookup("k") == old
        assert await read(store, old) == b"old version"
        new = await w.commit()
    assert await store.lookup("k") == new
    assert await read(store, new) == b"new version, longer"
    with pytest.raises(KeyError):
        await read(store, old)


async def test_rewriting_identical_content_keeps_the_entry_readable(store: CacheStore) -> None:
    """Committing the same bytes again yields the same ETag and the old handle still reads."""
    first = await put(store, "k", b"same bytes")
    second = await put(store, "k", b"same bytes")
    assert second.etag == first.etag
    assert await store.lookup("k") == second
    assert await read(store, first) == b"same bytes"


async def test_expired_entry_is_a_miss_but_kept_stale(store: CacheStore, clock: FakeClock) -> None:
    """An entry is served until created + ttl, then missed, but lookup_stale still finds it."""
    entry = await put(store, "k", b"data", ttl=10.0)
    clock.now = START + 9.999
    assert await store.lookup("k") is not None
    clock.now = START + 10.0
    assert await store.lookup("k") is None
    assert await store.lookup_stale("k") == entry


async def test_delete_is_idempotent(store: CacheStore) -> None:
    """Deleting removes the entry; deleting again or deleting an unknown key is harmless."""
    entry = await put(store, "k", b"data")
    await store.delete("never-written")
    await store.delete("k")
    await store.delete("k")
    assert await store.lookup("k") is None
    with pytest.raises(KeyError):
        await read(store, entry)


@pytest.mark.parametrize("change", ["delete", "overwrite"])
async def test_open_reader_keeps_reading_its_version(store: CacheStore, change: str) -> None:
    """A reader that opened a range reads the original bytes even if the entry changes."""
    old_data = sample_bytes(200_000, seed=1)  # larger than any read-ahead buffer
    entry = await put(store, "k", old_data)
    async with store.open_range(entry, 0, entry.size, chunk_size=4096) as chunks:
        first = await anext(chunks)
        if change == "delete":
            await store.delete("k")
        else:
            await put(store, "k", sample_bytes(200_000, seed=2))
        rest = [chunk async for chunk in chunks]
    assert first + b"".join(rest) == old_data


async def test_etag_depends_only_on_the_content(store: CacheStore) -> None:
    """Same bytes give the same strong ETag (whatever key or write pattern); others differ."""
    data = sample_bytes(5000)
    whole = await put(store, "a", data)
    pieces = await put(store, "b", data, piece_size=7)
    other = await put(store, "c", data + b"!")
    assert re.fullmatch(r'"[0-9a-f]{32}"', whole.etag)
    assert whole.etag == pieces.etag
    assert whole.etag != other.etag


async def test_writer_refuses_use_after_commit(store: CacheStore) -> None:
    """Writing after commit or committing twice raises RuntimeError."""
    async with store.open_writer("k", content_type=CONTENT_TYPE, ttl=TTL, options=OPTIONS) as w:
        await w.write(b"data")
        await w.commit()
        with pytest.raises(RuntimeError, match="committed"):
            await w.write(b"more")
        with pytest.raises(RuntimeError, match="committed"):
            await w.commit()


async def test_writer_refuses_use_after_its_block(store: CacheStore) -> None:
    """A writer whose block ended without commit cannot write or commit any more."""
    async with store.open_writer("k", content_type=CONTENT_TYPE, ttl=TTL, options=OPTIONS) as w:
        await w.write(b"data")
    with pytest.raises(RuntimeError, match="discarded"):
        await w.write(b"more")
    with pytest.raises(RuntimeError, match="discarded"):
        await w.commit()
    assert await store.lookup("k") is None


async def test_every_operation_is_a_checkpoint(store: CacheStore) -> None:
    """Each async operation yields to trio, so callers can always be cancelled there."""
    with trio.testing.assert_checkpoints():
        entry = await put(store, "k", b"data")
    with trio.testing.assert_checkpoints():
        await store.lookup("k")
    with trio.testing.assert_checkpoints():
        await read(store, entry)
    with trio.testing.assert_checkpoints():
        await store.delete("k")


# -- memory store only ------------------------------------------------------------------------


async def test_memory_store_defaults_to_wall_clock() -> None:
    """Without an injected clock, entries are stamped with time.time()."""
    store = MemoryCacheStore()
    before = time.time()
    entry = await put(store, "k", b"data")
    assert before <= entry.created <= time.time()
    assert await store.lookup("k") == entry


@pytest.mark.parametrize("ending", ["commit", "abandon"])
async def test_spool_reader_follows_the_write_and_outlives_it(
    store: CacheStore, ending: str
) -> None:
    """A spool reader sees each write as soon as it returns and keeps reading afterwards."""
    data = sample_bytes(3000)
    reader = None
    with pytest.raises(Boom) if ending == "abandon" else nullcontext():
        async with store.open_writer(
            "k", content_type=CONTENT_TYPE, ttl=TTL, options=OPTIONS
        ) as writer:
            reader = writer.open_reader()
            await writer.write(data[:1000])
            assert await reader.read_at(0, 5000) == data[:1000]
            await writer.write(bytearray(data[1000:]))
            assert await reader.read_at(2500, 100) == data[2500:2600]
            if ending == "commit":
                await writer.commit()
            else:
                raise Boom
    assert reader is not None
    clone = reader.clone()
    reader.close()
    assert await clone.read_at(0, 3000) == data  # the writer is gone; the bytes are not
    clone.close()
