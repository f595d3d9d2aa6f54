"""An in-memory ``CacheStore`` with the disk store's semantics, for tests and small setups.

Like the disk store it publishes only on commit, computes the same strong ETag, answers no
expired entry from lookups (but keeps it for ``lookup_stale`` and ``refresh``), and lets a
reader that opened a version keep reading it after an overwrite or delete, while opening a
replaced version raises ``KeyError``. Every operation checkpoints,
so cancellation reaches callers at the same places as with real I/O.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from .base import (
    DEFAULT_READ_CHUNK,
    ChunkSize,
    EntryMeta,
    check_range,
    chunk_size_now,
    format_etag,
    new_etag_hasher,
)


@dataclass(frozen=True, slots=True)
class _Entry:
    meta: EntryMeta
    data: bytes


class MemoryCacheStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def recall(self, key: str) -> EntryMeta | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.meta.is_fresh(self._clock()):
            return None  # kept for revalidation (lookup_stale); a new version replaces it
        return entry.meta

    async def lookup(self, key: str) -> EntryMeta | None:
        await trio.lowlevel.checkpoint()
        return self.recall(key)

    async def lookup_stale(self, key: str) -> EntryMeta | None:
        await trio.lowlevel.checkpoint()
        entry = self._entries.get(key)
        return None if entry is None else entry.meta

    async def refresh(self, entry: EntryMeta, created: float | None = None) -> EntryMeta | None:
        await trio.lowlevel.checkpoint()
        stored = self._entries.get(entry.key)
        if stored is None or stored.meta.etag != entry.etag:
            return None
        meta = replace(stored.meta, created=self._clock() if created is None else created)
        self._entries[entry.key] = _Entry(meta, stored.data)
        return meta

    @asynccontextmanager
    async def open_range(
        self, entry: EntryMeta, start: int, stop: int, chunk_size: ChunkSize = DEFAULT_READ_CHUNK
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        check_range(entry.size, start, stop, chunk_size)
        await trio.lowlevel.checkpoint()
        stored = self._entries.get(entry.key)
        # The disk store names data files by content, so it opens exactly this version or
        # nothing; comparing ETags gives the same behaviour.
        if stored is None or stored.meta.etag != entry.etag:
            raise KeyError(entry.key)
        yield _MemoryChunks(memoryview(stored.data)[start:stop], chunk_size)

    @asynccontextmanager
    async def open_writer(
        self,
        key: str,
        *,
        content_type: str,
        ttl: float,
        options: str,
        source: str = "",
        validators: str = "",
    ) -> AsyncIterator[_MemoryWriter]:
        await trio.lowlevel.checkpoint()
        writer = _MemoryWriter(self, key, content_type=content_type, ttl=ttl, options=options)
        writer.source = source
        writer.validators = validators
        try:
            yield writer
        finally:
            writer.discard()

    async def delete(self, key: str) -> None:
        await trio.lowlevel.checkpoint()
        self._entries.pop(key, None)

    async def purge(self, keys: tuple[str, ...], prefixes: tuple[str, ...]) -> int:
        """Remove the entries of ``keys`` and of every key starting with one of ``prefixes``;
        returns how many were removed."""
        await trio.lowlevel.checkpoint()
        doomed = [k for k in self._entries if k in keys or (prefixes and k.startswith(prefixes))]
        for key in doomed:
            del self._entries[key]
        return len(doomed)


class _MemoryChunks:
    def __init__(self, data: memoryview, chunk_size: ChunkSize) -> None:
        self._data = data
        self._chunk_size = chunk_size
        self._offset = 0

    def __aiter__(self) -> _MemoryChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._offset >= len(self._data):
            raise StopAsyncIteration
        size = await chunk_size_now(self._chunk_size)
        await trio.lowlevel.checkpoint()
        chunk = bytes(self._data[self._offset : self._offset + size])
        self._offset += len(chunk)
        return chunk


class _MemoryWriter:
    def __init__(
        self, store: MemoryCacheStore, key: str, *, content_type: str, ttl: float, options: str
    ) -> None:
        self._store = store
        self._key = key
        self._content_type = content_type
        self._ttl = ttl
        self._options = options
        self.source = ""
        self.validators = ""
        self._buffer = bytearray()
        self._hasher = new_etag_hasher()
        self._finished: str | None = None  # why it no longer accepts calls

    @property
    def bytes_written(self) -> int:
        return len(self._buffer)

    async def write(self, data: bytes | bytearray) -> None:
        self._ensure_open()
        await trio.lowlevel.checkpoint()
        self._buffer += data
        self._hasher.update(data)

    def open_reader(self) -> _MemorySpoolReader:
        # The buffer only ever grows, so sharing it is safe.
        return _MemorySpoolReader(self._buffer)

    async def commit(self) -> EntryMeta:
        self._ensure_open()
        await trio.lowlevel.checkpoint()
        meta = EntryMeta(
            key=self._key,
            content_type=self._content_type,
            size=len(self._buffer),
            etag=format_etag(self._hasher),
            created=self._store._clock(),
            ttl=self._ttl,
            options=self._options,
            source=self.source,
            validators=self.validators,
        )
        self._store._entries[self._key] = _Entry(meta, bytes(self._buffer))
        self._finished = "committed"
        return meta

    def discard(self) -> None:
        if self._finished is None:
            self._finished = "discarded"

    def _ensure_open(self) -> None:
        if self._finished is not None:
            raise RuntimeError(f"cache writer already {self._finished}")


class _MemorySpoolReader:
    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    async def read_at(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return bytes(self._buffer[offset : offset + size])

    def clone(self) -> _MemorySpoolReader:
        return _MemorySpoolReader(self._buffer)

    def close(self) -> None:
        pass
