"""The cache stage: a small protocol with a disk adapter and an in-memory fake beside it.

An entry is published only once completely written; readers never see partial data. The
protocol is deliberately tiny (look up, open a range, write, delete) so that key-value and
object stores (manifest + fixed-size chunks) can implement it later.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ..units import KiB

DEFAULT_READ_CHUNK = 64 * KiB


def new_etag_hasher() -> hashlib.blake2b:
    """Hash an entry's bytes while they are written; ``format_etag`` turns it into the ETag."""
    # 16 bytes (32 hex chars): collisions between versions of one key are out of the question.
    return hashlib.blake2b(digest_size=16)


def format_etag(hasher: hashlib.blake2b) -> str:
    """The strong, quoted ETag of everything ``hasher`` has seen."""
    return f'"{hasher.hexdigest()}"'


# A fixed chunk size, or a function giving the size of each next read (adaptive streams,
# which may wait for their turn in a byte budget).
ChunkSize = int | Callable[[], Awaitable[int]]


async def chunk_size_now(chunk_size: ChunkSize) -> int:
    return await chunk_size() if callable(chunk_size) else chunk_size


def check_range(size: int, start: int, stop: int, chunk_size: ChunkSize) -> None:
    """Reject a read outside the entry; clients' ranges are clamped before they get here."""
    if not 0 <= start <= stop <= size:
        raise ValueError(f"range [{start}, {stop}) is not within [0, {size}]")
    if not callable(chunk_size) and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """What a published entry is; the disk store keeps it as a small JSON file."""

    key: str
    content_type: str
    size: int
    etag: str  # strong validator, already quoted: '"<hex>"'
    created: float  # unix time of publication
    ttl: float  # seconds the entry stays fresh
    options: str  # canonical options, for humans and tooling
    source: str = ""  # "<origin>:<source kind>" it was made from (X-Origin, X-Source)
    # The source's validators when it was made (``source_validators``): an expired entry
    # whose source still has them is refreshed instead of transcoded again. "" = unknown.
    validators: str = ""

    @property
    def expires(self) -> float:
        return self.created + self.ttl

    def is_fresh(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EntryMeta:
        return cls(
            key=str(data["key"]),
            content_type=str(data["content_type"]),
            size=int(data["size"]),
            etag=str(data["etag"]),
            created=float(data["created"]),
            ttl=float(data["ttl"]),
            options=str(data["options"]),
            source=str(data.get("source", "")),
            validators=str(data.get("validators", "")),
        )

    def stale_for(self, now: float | None = None) -> float:
        """Seconds since it expired (negative while fresh)."""
        return (time.time() if now is None else now) - self.expires


def source_validators(size: int, mtime: float, etag: str = "") -> str:
    """A source's validators as one comparable string: its size, its modification time (a
    file's mtime, an HTTP Last-Modified) and its ETag when the origin gives one."""
    text = f"size={size};mtime={mtime!r}"
    return f"{text};etag={etag}" if etag else text


class SpoolReader(Protocol):
    """Reads what a writer has written so far, while it is still being written.

    A reader outlives its writer (after commit, discard or failure it keeps reading the bytes
    it could see), so subscribers to in-flight work can finish at their own pace.
    """

    async def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``; only bytes already written are read."""
        ...

    def clone(self) -> SpoolReader:
        """An independent reader of the same bytes (synchronous: no await, no race)."""
        ...

    def close(self) -> None: ...


class PublishedSpool:
    """A ``SpoolReader`` over a published entry of any store, read through ``open_range``."""

    def __init__(self, store: CacheStore, entry: EntryMeta) -> None:
        self._store = store
        self._entry = entry

    async def read_at(self, offset: int, size: int) -> bytes:
        stop = min(self._entry.size, offset + size)
        if offset >= stop:
            return b""
        try:
            async with self._store.open_range(self._entry, offset, stop, stop - offset) as chunks:
                return b"".join([chunk async for chunk in chunks])
        except KeyError:
            return b""  # replaced or deleted meanwhile: the reader reports a short spool

    def clone(self) -> PublishedSpool:
        return PublishedSpool(self._store, self._entry)

    def close(self) -> None:
        pass


class CacheWriter(Protocol):
    """Receives an entry's bytes in order. Nothing is visible until ``commit``."""

    @property
    def bytes_written(self) -> int: ...

    async def write(self, data: bytes | bytearray) -> None:
        """Append ``data``; once this returns, ``open_reader`` readers can read it."""
        ...

    def open_reader(self) -> SpoolReader:
        """A reader of the bytes written so far and later (synchronous)."""
        ...

    async def commit(self) -> EntryMeta:
        """Publish atomically and return the entry's metadata (size, strong ETag)."""
        ...


class CacheStore(Protocol):
    def recall(self, key: str) -> EntryMeta | None:
        """The fresh entry for ``key`` when the store can tell without waiting on I/O (hot
        entries); None means "ask ``lookup``". Lets a hit skip thread round trips, which
        dominated the hit path's CPU under load."""
        ...

    async def lookup(self, key: str) -> EntryMeta | None:
        """The fresh, complete entry for ``key``, or None (absent, expired or torn)."""
        ...

    def open_range(
        self, entry: EntryMeta, start: int, stop: int, chunk_size: ChunkSize = DEFAULT_READ_CHUNK
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Bytes ``start`` (inclusive) to ``stop`` (exclusive) of ``entry``, in chunks of at
        most ``chunk_size`` (asked again before each read when it is a function). Raises
        ``KeyError`` when the entry vanished meanwhile."""
        ...

    def open_writer(
        self,
        key: str,
        *,
        content_type: str,
        ttl: float,
        options: str,
        source: str = "",
        validators: str = "",
    ) -> AbstractAsyncContextManager[CacheWriter]:
        """A writer for a new entry. Leaving the block without ``commit`` (error or
        cancellation) removes every partial file; an existing entry stays untouched."""
        ...

    async def lookup_stale(self, key: str) -> EntryMeta | None:
        """The complete entry for ``key`` even if expired (for revalidation), or None.
        Lookups leave expired entries in place; the disk cache's sweep removes them."""
        ...

    async def refresh(self, entry: EntryMeta, created: float | None = None) -> EntryMeta | None:
        """Republish ``entry`` (same bytes, same ETag) with a new ``created`` (default: the
        store's clock now), hence a new expiry; None when the key no longer holds that
        version (replaced or deleted)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the entry if present (idempotent)."""
        ...
