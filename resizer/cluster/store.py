"""The shared result store: outputs in an object store, written while they are produced.

An entry is two kinds of object under the store's ``prefix``::

    manifests/<quoted key>          JSON: the EntryMeta fields, the data object's name and
                                    ETag, the part size, each part's size and sha256
    data/<key digest>/<random>      the bytes, uploaded as a multipart upload

The manifest is written last, after the multipart upload is complete, so a reader that finds
one finds complete bytes: a partial entry is never visible. Data objects get a fresh name per
upload, so two uploads of one key never mix parts; the manifest's last writer wins.

``ObjectStore`` is the engine; it runs over an ``ObjectBackend`` (a handful of object
operations): ``s3store.S3Backend`` for S3-compatible stores, ``memstore.MemoryBackend`` as
the in-memory fake. The engine owns the concurrency:

- Writing: ``write`` fills one part buffer; a full part goes through a memory channel of
  capacity 0 to one of ``upload_concurrency`` worker tasks (in a nursery the upload's
  context manager owns). When every worker is busy, ``write`` waits: backpressure. At most
  ``upload_concurrency + 1`` parts are held at any time (one per worker plus the one being
  handed over), never the whole output. An output smaller than one part is a single PUT.
- Leaving the upload without ``commit`` (error, cancellation, or just leaving) aborts the
  multipart upload, shielded from cancellation with a short deadline.
- Reading: ``read`` fetches the parts covering a range with ``read_ahead`` ranged GETs in
  flight and yields them in order; it holds at most ``read_ahead`` parts. A part that
  fails is raised when the reader reaches it, after every byte before it.

Integrity on read: a part read whole is hashed and compared with the manifest's sha256.
A part read only partly (the first and last part of a range) cannot be hashed without
fetching all of it, so instead every ranged GET carries ``If-Match`` with the data object's
ETag: an object replaced or rewritten since the manifest was written answers 412. Both
failures raise ``SharedStoreCorrupt``. (Silent bit rot inside a partly read part is left to
the object store's own checksums; reading whole parts to hash them would cost up to two
extra parts per range.)
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote

import structlog
import trio

from ..cache.base import EntryMeta
from ..concurrency.groups import unwrap_single_exception
from ..errors import ResizerError
from ..options import key_digest
from ..units import SECONDS, MiB

log = structlog.get_logger(__name__)

MANIFEST_FORMAT = 1
MANIFESTS = "manifests/"
DATA = "data/"
# S3 object names are at most 1024 bytes; longer quoted keys are cut (at an escape
# boundary) and get "!<digest>" appended. "!" never occurs in quote()'s output.
MAX_QUOTED_KEY = 700
_CUT_MARK = "!"
# Abandoned multipart uploads are aborted within this long, even when cancelled.
ABORT_TIMEOUT = 5 * SECONDS


class SharedStoreError(ResizerError):
    """The shared store failed or could not be reached."""

    status = 502
    code = "shared_store_failed"


class SharedStoreTimeout(SharedStoreError):
    status = 504
    code = "shared_store_timeout"


class SharedStoreCorrupt(SharedStoreError):
    """An entry's bytes do not match its manifest (checksum, size or object ETag)."""

    code = "shared_store_corrupt"


class SharedEntryGone(SharedStoreError):
    """The entry's data object vanished (purged or replaced) while it was being read."""

    code = "shared_entry_gone"


@dataclass(frozen=True, slots=True)
class PartRecord:
    size: int
    sha256: str  # hex


@dataclass(frozen=True, slots=True)
class SharedEntry:
    """A published entry of the shared store, as its manifest describes it."""

    meta: EntryMeta
    object_name: str  # the data object, relative to the store's prefix
    object_etag: str  # as the store returned it (quoted)
    part_size: int
    parts: tuple[PartRecord, ...]

    @property
    def size(self) -> int:
        return self.meta.size

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            **self.meta.to_json(),
            "object": self.object_name,
            "object_etag": self.object_etag,
            "part_size": self.part_size,
            "parts": [{"size": p.size, "sha256": p.sha256} for p in self.parts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SharedEntry:
        """Parse a manifest; raises ValueError (or KeyError/TypeError) when it is not one."""
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        parts = tuple(
            PartRecord(size=int(p["size"]), sha256=str(p["sha256"])) for p in data["parts"]
        )
        entry = cls(
            meta=EntryMeta.from_json(data),
            object_name=str(data["object"]),
            object_etag=str(data["object_etag"]),
            part_size=int(data["part_size"]),
            parts=parts,
        )
        if sum(p.size for p in parts) != entry.meta.size:
            raise ValueError("the parts' sizes do not add up to the entry's size")
        if any(p.size < 0 or p.size > entry.part_size for p in parts):
            raise ValueError("a part is larger than the part size")
        return entry


def encode_manifest(entry: SharedEntry) -> bytes:
    return json.dumps(entry.to_json(), separators=(",", ":"), sort_keys=True).encode()


def decode_manifest(raw: bytes) -> SharedEntry:
    """Raises ValueError when ``raw`` is not a valid manifest."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return SharedEntry.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a manifest: {exc!r}") from exc


def quote_key(key: str) -> str:
    """A cache key as (part of) an object name, preserving prefixes: if ``p`` is a prefix of
    ``k``, ``quote_key(p)`` is a prefix of ``quote_key(k)`` (up to the cut of long keys)."""
    quoted = quote(key, safe="")
    if len(quoted) <= MAX_QUOTED_KEY:
        return quoted
    cut = MAX_QUOTED_KEY
    # Never cut inside a %XX escape.
    if "%" in quoted[cut - 2 : cut]:
        cut = quoted.rindex("%", cut - 2, cut)
    return f"{quoted[:cut]}{_CUT_MARK}{key_digest(key)}"


def manifest_name(key: str) -> str:
    return f"{MANIFESTS}{quote_key(key)}"


def data_folder(key: str) -> str:
    return f"{DATA}{key_digest(key)}/"


def key_of_manifest(name: str) -> str | None:
    """The key a manifest name stands for, or None when the name was cut (read the
    manifest to learn the key)."""
    quoted = name.removeprefix(MANIFESTS)
    if _CUT_MARK in quoted:
        return None
    return unquote(quoted)


@dataclass(frozen=True, slots=True)
class PartSpan:
    """Bytes ``[start, stop)`` of part ``index`` (offsets within the part)."""

    index: int
    offset: int  # of the part within the object
    start: int
    stop: int
    whole: bool  # the span is the entire part (so its sha256 can be checked)


def parts_for_range(parts: tuple[PartRecord, ...], start: int, stop: int) -> list[PartSpan]:
    """The part spans covering bytes ``[start, stop)`` of an object made of ``parts``."""
    total = sum(p.size for p in parts)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"range [{start}, {stop}) is not within [0, {total}]")
    spans: list[PartSpan] = []
    if start == stop:
        return spans
    offset = 0
    for index, part in enumerate(parts):
        end = offset + part.size
        if end > start and offset < stop:
            lo, hi = max(start, offset) - offset, min(stop, end) - offset
            spans.append(PartSpan(index, offset, lo, hi, lo == 0 and hi == part.size))
        offset = end
        if offset >= stop:
            break
    return spans


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectBackend(Protocol):
    """Object operations the engine needs. Names are full object names. Every method
    raises a ``SharedStoreError`` leaf on failure."""

    async def create_multipart(self, name: str) -> str:
        """Start a multipart upload; returns its upload id."""
        ...

    async def upload_part(
        self, name: str, upload_id: str, number: int, data: bytes, sha256: str
    ) -> str:
        """Upload part ``number`` (from 1); returns its ETag."""
        ...

    async def complete_multipart(self, name: str, upload_id: str, etags: list[str]) -> str:
        """Complete the upload from its parts' ETags in order; returns the object's ETag."""
        ...

    async def abort_multipart(self, name: str, upload_id: str) -> None: ...

    async def put_object(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        """Store a whole object; returns its ETag."""
        ...

    async def get_object(self, name: str) -> bytes | None:
        """A whole (small) object, or None when it does not exist."""
        ...

    async def get_range(self, name: str, start: int, stop: int, if_match: str) -> bytes:
        """Bytes ``[start, stop)`` of an object whose ETag must still be ``if_match``.
        Raises SharedEntryGone when it is missing, SharedStoreCorrupt when its ETag
        differs."""
        ...

    async def list_names(self, prefix: str) -> list[str]:
        """Every object name starting with ``prefix``."""
        ...

    async def delete_objects(self, names: list[str]) -> None:
        """Delete these objects (missing ones are not an error)."""
        ...


class SharedUpload(Protocol):
    """Receives an output's bytes in order; nothing is visible before ``commit``."""

    @property
    def bytes_written(self) -> int: ...

    # Bytes this upload holds now (part buffer + parts not yet uploaded), and at most so far.
    @property
    def buffered_bytes(self) -> int: ...

    @property
    def peak_buffered_bytes(self) -> int: ...

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; waits while every upload slot is busy (backpressure)."""
        ...

    async def commit(self, meta: EntryMeta) -> SharedEntry:
        """Finish the upload, then publish the manifest (the commit point)."""
        ...


class SharedStore(Protocol):
    def open_upload(self, key: str) -> AbstractAsyncContextManager[SharedUpload]:
        """An upload for ``key``. Leaving the block without ``commit`` (error, cancellation
        or not) aborts the upload; an existing entry stays untouched."""
        ...

    async def lookup(self, key: str, *, include_stale: bool = False) -> SharedEntry | None:
        """The complete entry for ``key`` (fresh only, unless ``include_stale``), or None."""
        ...

    def read(
        self, entry: SharedEntry, start: int, stop: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Bytes ``[start, stop)`` of ``entry``, one chunk per part span, in order."""
        ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove these entries (manifest first, then data); idempotent."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with ``prefix``; returns how many."""
        ...


class _Upload:
    """One output being uploaded (see ``ObjectStore.open_upload``)."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._store = store
        self.key = key
        self.object_name = f"{store.prefix}{data_folder(key)}{secrets.token_hex(12)}"
        self._buffer = bytearray()
        self._written = 0
        self._number = 0  # parts handed to the workers so far
        self._records: dict[int, tuple[PartRecord, str]] = {}  # number -> (record, etag)
        self.upload_id: str | None = None
        self.completed = False  # the data object exists (commit got past completing)
        self.committed = False
        self._send: trio.MemorySendChannel[tuple[int, bytes]] | None = None
        self._workers_done = trio.Event()
        self._workers_left = 0
        # Bytes held: the part buffer plus parts handed over and not yet uploaded.
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0

    @property
    def bytes_written(self) -> int:
        return self._written

    def start(self, nursery: trio.Nursery) -> None:
        send, receive = trio.open_memory_channel[tuple[int, bytes]](0)
        self._send = send
        self._workers_left = self._store.upload_concurrency
        with receive:
            for _ in range(self._store.upload_concurrency):
                nursery.start_soon(self._worker, receive.clone())

    def _account(self, delta: int) -> None:
        self.buffered_bytes += delta
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.committed:
            raise RuntimeError("write after commit")
        view = memoryview(data).cast("B")
        part_size = self._store.part_size
        while view:
            room = part_size - len(self._buffer)
            piece = view[:room]
            self._buffer += piece
            self._written += len(piece)
            self._account(len(piece))
            view = view[room:]
            if len(self._buffer) == part_size:
                await self._hand_over(bytes(self._buffer))
                # The copy replaced the buffer (same count): ``buffered_bytes`` unchanged.
                self._buffer = bytearray()

    async def _hand_over(self, part: bytes) -> None:
        assert self._send is not None
        if self.upload_id is None:
            self.upload_id = await self._store.backend.create_multipart(self.object_name)
        self._number += 1
        await self._send.send((self._number, part))

    async def _worker(self, receive: trio.MemoryReceiveChannel[tuple[int, bytes]]) -> None:
        try:
            async with receive:
                async for number, part in receive:
                    assert self.upload_id is not None
                    digest = await trio.to_thread.run_sync(sha256_hex, part)
                    etag = await self._store.backend.upload_part(
                        self.object_name, self.upload_id, number, part, digest
                    )
                    self._records[number] = (PartRecord(len(part), digest), etag)
                    self._account(-len(part))
        finally:
            self._workers_left -= 1
            if self._workers_left == 0:
                self._workers_done.set()

    async def commit(self, meta: EntryMeta) -> SharedEntry:
        if self.committed or self._send is None:
            raise RuntimeError("commit twice or outside open_upload")
        if meta.key != self.key or meta.size != self._written:
            raise ValueError(
                f"meta ({meta.key!r}, {meta.size} bytes) does not describe this upload "
                f"({self.key!r}, {self._written} bytes)"
            )
        backend = self._store.backend
        tail = bytes(self._buffer)
        if self.upload_id is None:
            # Smaller than one part: a single PUT, no multipart upload.
            self._send.close()
            digest = await trio.to_thread.run_sync(sha256_hex, tail)
            etag = await backend.put_object(self.object_name, tail, digest, meta.content_type)
            parts: tuple[PartRecord, ...] = (PartRecord(len(tail), digest),)
        else:
            if tail:
                await self._hand_over(tail)
            self._buffer = bytearray()
            self._send.close()
            await self._workers_done.wait()
            numbers = range(1, self._number + 1)
            etag = await backend.complete_multipart(
                self.object_name, self.upload_id, [self._records[n][1] for n in numbers]
            )
            parts = tuple(self._records[n][0] for n in numbers)
        self.completed = True
        entry = SharedEntry(
            meta=meta,
            object_name=self.object_name.removeprefix(self._store.prefix),
            object_etag=etag,
            part_size=self._store.part_size,
            parts=parts,
        )
        previous = await self._store.lookup(self.key, include_stale=True)
        name = f"{self._store.prefix}{manifest_name(self.key)}"
        await backend.put_object(name, encode_manifest(entry), "", "application/json")
        self.committed = True
        if previous is not None and previous.object_name != entry.object_name:
            # Readers still on the old version get SharedEntryGone from now on.
            try:
                await backend.delete_objects([f"{self._store.prefix}{previous.object_name}"])
            except SharedStoreError as exc:
                log.warning("shared_store_cleanup_failed", key=self.key, error=str(exc))
        return entry

    async def discard(self) -> None:
        """Undo an upload that was not committed (shielded, bounded)."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + ABORT_TIMEOUT
            backend = self._store.backend
            try:
                if self.completed:
                    await backend.delete_objects([self.object_name])
                elif self.upload_id is not None:
                    await backend.abort_multipart(self.object_name, self.upload_id)
            except SharedStoreError as exc:
                log.warning("shared_store_abort_failed", key=self.key, error=str(exc))
        if scope.cancelled_caught:
            log.warning("shared_store_abort_timed_out", key=self.key)


class ObjectStore:
    """A ``SharedStore`` over any ``ObjectBackend``."""

    def __init__(
        self,
        backend: ObjectBackend,
        *,
        prefix: str = "",
        part_size: int = 8 * MiB,
        upload_concurrency: int = 5,
        read_ahead: int = 3,
    ) -> None:
        if part_size < 1 or upload_concurrency < 1 or read_ahead < 1:
            raise ValueError("part_size, upload_concurrency and read_ahead must be positive")
        self.backend = backend
        self.prefix = prefix
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.read_ahead = read_ahead

    @asynccontextmanager
    async def open_upload(self, key: str) -> AsyncIterator[SharedUpload]:
        upload = _Upload(self, key)
        try:
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    upload.start(nursery)
                    yield upload
                    # Left without commit: stop the part uploads still running.
                    nursery.cancel_scope.cancel()
        finally:
            if not upload.committed:
                await upload.discard()

    async def lookup(self, key: str, *, include_stale: bool = False) -> SharedEntry | None:
        raw = await self.backend.get_object(f"{self.prefix}{manifest_name(key)}")
        if raw is None:
            return None
        try:
            entry = decode_manifest(raw)
        except ValueError as exc:
            log.warning("shared_manifest_invalid", key=key, error=str(exc))
            return None
        if entry.meta.key != key:
            log.warning("shared_manifest_mismatch", key=key, manifest_key=entry.meta.key)
            return None
        if not include_stale and not entry.meta.is_fresh():
            return None
        return entry

    @asynccontextmanager
    async def read(
        self, entry: SharedEntry, start: int, stop: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        spans = parts_for_range(entry.parts, start, stop)
        name = f"{self.prefix}{entry.object_name}"
        # One slot per span, filled by a fetch task; at most read_ahead fetched, unconsumed.
        tokens = trio.Semaphore(self.read_ahead)
        Slot = bytes | SharedStoreError
        send, receive = trio.open_memory_channel[tuple[trio.Event, list[Slot]]](len(spans))

        async def fetch(span: PartSpan) -> bytes:
            data = await self.backend.get_range(
                name, span.offset + span.start, span.offset + span.stop, entry.object_etag
            )
            if len(data) != span.stop - span.start:
                raise SharedStoreCorrupt(
                    f"part {span.index + 1} of {entry.meta.key!r}: got {len(data)} bytes, "
                    f"expected {span.stop - span.start}"
                )
            if span.whole:
                digest = await trio.to_thread.run_sync(sha256_hex, data)
                if digest != entry.parts[span.index].sha256:
                    raise SharedStoreCorrupt(
                        f"part {span.index + 1} of {entry.meta.key!r} fails its sha256 check"
                    )
            return data

        async def fill(span: PartSpan, done: trio.Event, result: list[Slot]) -> None:
            # A store error is kept for the reader, who raises it when it reaches this
            # part: every byte before a bad part is delivered first.
            try:
                result.append(await fetch(span))
            except SharedStoreError as exc:
                result.append(exc)
            done.set()

        async def launch(nursery: trio.Nursery) -> None:
            async with send:
                for span in spans:
                    await tokens.acquire()
                    done, result = trio.Event(), list[Slot]()
                    nursery.start_soon(fill, span, done, result)
                    send.send_nowait((done, result))

        async def chunks() -> AsyncGenerator[bytes, None]:
            with receive:
                async for done, result in receive:
                    await done.wait()
                    data = result.pop()
                    tokens.release()
                    if isinstance(data, SharedStoreError):
                        raise data
                    yield data

        iterator = chunks()
        try:
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(launch, nursery)
                    yield iterator
                    nursery.cancel_scope.cancel()
        finally:
            await iterator.aclose()

    async def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        await self.backend.delete_objects([f"{self.prefix}{manifest_name(k)}" for k in keys])
        data: list[str] = []
        for key in keys:
            data += await self.backend.list_names(f"{self.prefix}{data_folder(key)}")
        if data:
            await self.backend.delete_objects(data)

    async def delete_prefix(self, prefix: str) -> int:
        listed = f"{self.prefix}{MANIFESTS}"
        # A long prefix was cut like a long key: list by what is left, check each key.
        names = await self.backend.list_names(listed + quote_key(prefix).split(_CUT_MARK)[0])
        keys: list[str] = []
        for name in names:
            key = key_of_manifest(name.removeprefix(self.prefix))
            if key is None:  # a cut name: the manifest knows the key
                raw = await self.backend.get_object(name)
                try:
                    key = decode_manifest(raw).meta.key if raw is not None else None
                except ValueError:
                    key = None
            if key is not None and key.startswith(prefix):
                keys.append(key)
        await self.delete(keys)
        return len(keys)
