"""The shared result store as a second cache tier, behind each instance's local cache.

A Work that transcodes writes its output through to the shared store while it produces it
(``write_through``): the bytes go to the local writer and, through a channel of capacity 0,
to the store's multipart upload, whose ``upload_concurrency`` parts in flight push back on
the producer. A Work whose key misses locally but hits the shared store fills the local
cache from it once (``fill_from_shared``), however many clients it has, and serves them as
the bytes arrive: ``X-Cache-Status: HIT-SHARED``.

The shared layer never makes a request fail (issue 16, degraded modes): a lookup that fails
or takes longer than ``LOOKUP_TIMEOUT`` is a shared miss; an upload that fails is dropped
(the local entry is kept); a shared read that fails before any byte went out falls back to
transcoding. Each such event is logged and counted (``resizer_shared_store_errors_total``).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import structlog
import trio

from ..cache.base import EntryMeta
from ..units import SECONDS
from .store import SharedEntry, SharedStore, SharedStoreError

log = structlog.get_logger(__name__)

# A shared lookup slower than this counts as a miss: a slow store must not slow every miss.
LOOKUP_TIMEOUT = 2 * SECONDS


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


@dataclass
class WriteThrough:
    """The producer's side of one write-through upload (see ``SharedTier.write_through``)."""

    _send: trio.MemorySendChannel[bytes | EntryMeta] | None = None
    failed: bool = False
    committed: bool = False
    entry: SharedEntry | None = None
    _done: trio.Event = field(default_factory=trio.Event)

    async def write(self, data: bytes | bytearray) -> None:
        """Hand ``data`` to the upload; waits while its parts in flight are all busy."""
        if self._send is not None and not self.failed:
            try:
                await self._send.send(bytes(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.failed = True

    async def commit(self, meta: EntryMeta) -> None:
        """Complete the upload (the manifest last) with the local entry's metadata."""
        if self._send is not None and not self.failed:
            try:
                await self._send.send(meta)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.failed = True
                return
            await self._done.wait()


class SharedTier:
    def __init__(self, store: SharedStore, errors: _Counter | None = None) -> None:
        self.store = store
        self.errors = errors  # counts each failure (the service sets its metric)

    def _failed(self, what: str, key: str, exc: BaseException | None) -> None:
        log.warning("shared store unavailable", op=what, key=key, error=str(exc or "timeout"))
        if self.errors is not None:
            self.errors.inc()

    async def lookup(self, key: str) -> SharedEntry | None:
        """The shared entry for ``key``; None on a miss, and when the store fails."""
        with trio.move_on_after(LOOKUP_TIMEOUT):
            try:
                return await self.store.lookup(key)
            except SharedStoreError as exc:
                self._failed("lookup", key, exc)
                return None
        self._failed("lookup", key, None)
        return None

    @asynccontextmanager
    async def write_through(self, key: str) -> AsyncIterator[WriteThrough]:
        """An upload of ``key`` fed by the producer; leaving without ``commit`` discards it.

        The upload runs in a task of this block's nursery, so its failure never fails the
        producer: it is logged, and the producer's later writes are dropped.
        """
        send, receive = trio.open_memory_channel[bytes | EntryMeta](0)
        through = WriteThrough(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upload, key, receive, through)
            try:
                yield through
            finally:
                send.close()  # synchronous: the upload ends (and discards, if uncommitted)

    async def _upload(
        self,
        key: str,
        receive: trio.MemoryReceiveChannel[bytes | EntryMeta],
        through: WriteThrough,
    ) -> None:
        try:
            async with receive, self.store.open_upload(key) as upload:
                async for item in receive:
                    if isinstance(item, EntryMeta):
                        through.entry = await upload.commit(item)
                        through.committed = True
                        return
                    await upload.write(item)
        except SharedStoreError as exc:
            through.failed = True
            self._failed("upload", key, exc)
        finally:
            through._done.set()


def remaining_ttl(meta: EntryMeta, now: float) -> float:
    """Seconds ``meta`` stays fresh from ``now`` (at least 1: it was fresh when looked up)."""
    return max(1.0, meta.created + meta.ttl - now) if math.isfinite(meta.ttl) else meta.ttl
