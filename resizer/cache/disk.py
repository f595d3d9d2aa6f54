"""The disk cache store: one data file and one small JSON metadata file per entry.

Layout under ``root``::

    entries/<d[0:2]>/<digest>.meta.json        published metadata: EntryMeta plus "data"
    entries/<d[0:2]>/<digest>.<etag>.data      the entry's bytes, named by their content hash
    tmp/<digest>.<token>.data / .meta.json     partial writes
    tmp/<digest>.lock                          cross-process lease (see ``leases``)

A commit writes the data to tmp/, renames it into entries/, writes the metadata to tmp/ and
``os.replace``s it onto ``<digest>.meta.json`` (the one commit point), and only then removes
the previous version's data file. A ``kill -9`` anywhere therefore leaves the old entry or the
new one, plus at most some unreferenced files that lookups never serve and ``prepare()``
removes. Both renames happen under the key's lease (see ``leases``), which ``prepare()`` claims
before deciding about a key's files, so a process starting up never mistakes the data file
another process is publishing for a leftover. Without ``fsync=True`` a power loss (not a
process crash) can leave published metadata with short data; lookups compare sizes and drop
such entries.

Naming data files by content hash means metadata can only point at the bytes it describes, and
``open_range`` opens exactly the version it is handed: once that version is replaced or
deleted it raises ``KeyError`` instead of silently serving other bytes. A reader that already
opened a data file keeps reading it after a concurrent overwrite or delete (POSIX unlink).

Hits record their use in the data file's atime (``_mark_used``), for the least-recently-used
eviction that ``eviction.Sweeper`` runs over the folder; ``on_publish`` tells it of commits.

Errors: lookups never raise for filesystem problems (logged, treated as a miss); opening a
writer, writing, committing and deleting let ``OSError`` propagate, because a cache that cannot
write is an operational problem the caller must see rather than a client error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import structlog
import trio

from ..errors import ResizerError
from ..options import key_digest
from ..units import MILLISECONDS, SECONDS
from .base import (
    DEFAULT_READ_CHUNK,
    ChunkSize,
    EntryMeta,
    check_range,
    chunk_size_now,
    format_etag,
    new_etag_hasher,
)
from .leases import Lead, LeaseBoard

log = structlog.get_logger(__name__)

# Bounds the shielded cleanup after an abandoned write, so a stalled disk cannot hang shutdown.
CLEANUP_TIMEOUT = 5 * SECONDS
# How often a commit retries a key's lease that another process holds (to clean up or publish
# it, for milliseconds; or to produce it, when processes sharing the folder disagree on
# cross_process).
PUBLISH_RETRY = 5 * MILLISECONDS

_META_SUFFIX = ".meta.json"
_DATA_SUFFIX = ".data"
_ETAG_RE = re.compile(r'"([0-9a-f]+)"')
# Entries recall() can answer from memory (about 0.5 KiB each).
_RECENT_ENTRIES = 2048
# A hit records its use (for LRU eviction) at most this often per entry.
TOUCH_INTERVAL = 1 * SECONDS


class _AsyncBinaryWriter(Protocol):
    """The part of ``trio.open_file(..., "xb")`` the writer uses (trio does not export the type)."""

    async def write(self, data: bytes | memoryview, /) -> int: ...

    async def flush(self) -> None: ...

    def fileno(self) -> int: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _StoredMeta:
    meta: EntryMeta
    data_name: str


def _data_name(digest: str, etag: str) -> str | None:
    """The data file name of the version with ``etag``; None if this store never wrote it."""
    match = _ETAG_RE.fullmatch(etag)
    return None if match is None else f"{digest}.{match[1]}{_DATA_SUFFIX}"


def _parse_meta(raw: bytes, digest: str) -> _StoredMeta | None:
    """The metadata in ``raw``, or None when it is not exactly what ``_publish_sync`` writes."""
    try:
        fields = json.loads(raw)
        meta = EntryMeta.from_json(fields)
        data_name = fields["data"]
    except (ValueError, KeyError, TypeError):
        return None
    if data_name != _data_name(digest, meta.etag):
        return None
    return _StoredMeta(meta, data_name)


def _referenced_data_name(raw: bytes, digest: str) -> str | None:
    """The data file that possibly corrupt metadata names, if it is safely one of ours."""
    try:
        fields = json.loads(raw)
        etag = fields["etag"]
    except (ValueError, KeyError, TypeError):
        return None
    return _data_name(digest, etag) if isinstance(etag, str) else None


def _file_identity(stat: os.stat_result) -> tuple[int, ...]:
    """Changes whenever a metadata file is replaced (a commit renames a new file over it)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


class DiskCacheStore:
    """``CacheStore`` on a local filesystem; call ``prepare()`` once before use."""

    def __init__(
        self, root: Path, *, fsync: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = root
        self._entries_dir = root / "entries"
        self._entries_prefix = f"{self._entries_dir}{os.sep}"  # hot paths format strings
        self._tmp_dir = root / "tmp"
        self._fsync = fsync
        self._clock = clock
        # Serialises the swap of a key's metadata and the removal of the data it replaced, so
        # concurrent commits, deletes and lookups dropping a torn entry never remove live data.
        # Held only inside worker threads, for a few syscalls.
        self._publish_lock = threading.Lock()
        # Lets the processes sharing this folder produce each key once (see leases.py).
        self.leases = LeaseBoard(self._tmp_dir)
        # digest -> (identity of the metadata file when read, its entry), for recall(); an
        # LRU bounded to a few hundred KiB. Written from worker threads (dict operations are
        # atomic under the GIL; a lost race only costs a later thread round trip).
        self._recent: OrderedDict[str, tuple[tuple[int, ...], EntryMeta]] = OrderedDict()
        # Recency for the LRU eviction every process on the folder shares (eviction.py): a
        # hit sets its data file's atime to now (mtime kept), at most once per
        # ``touch_interval`` per entry (digest -> monotonic time of the next touch). The
        # metadata file is never touched: recall() identifies it by its stat.
        self.touch_interval = TOUCH_INTERVAL
        self._next_touch: dict[str, float] = {}
        # Told of every entry this process publishes (the eviction sweep's size estimate).
        self.on_publish: Callable[[EntryMeta], None] | None = None

    def prepare(self) -> int:
        """Create the folders and remove what a crash left behind; returns the files removed.

        Blocking; call it at start-up before this process runs any writer. Other processes
        may share the folder: it decides about each key's files holding the key's lease, and
        leaves the keys whose lease another process holds (it is producing or publishing
        them; a later start-up tidies what that leaves).
        """
        self._entries_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = self._tidy_keys(self._tmp_dir, self._remove_partials)
        for folder in self._entries_dir.iterdir():
            if folder.is_dir():
                removed += self._tidy_keys(folder, self._remove_unreferenced)
        if removed:
            log.info("cache_leftovers_removed", root=str(self.root), files=removed)
        return removed

    def _tidy_keys(self, folder: Path, tidy: Callable[[Path, str, list[str]], int]) -> int:
        """Run ``tidy(folder, digest, file names)`` for each key with files in ``folder``,
        holding the key's lease; returns the files removed."""
        names: dict[str, list[str]] = {}
        for path in folder.iterdir():
            names.setdefault(path.name.split(".", 1)[0], []).append(path.name)
        removed = 0
        for digest, key_names in names.items():
            lease = self.leases.claim(digest)
            if lease is None:
                continue  # another process is producing or publishing this key
            try:
                removed += tidy(folder, digest, key_names)
            finally:
                lease.release()
        return removed

    def _remove_partials(self, folder: Path, digest: str, names: list[str]) -> int:
        """Nobody leads the key: its partial files are a dead process's."""
        lock_name = self.leases.lock_path_of(digest).name
        return sum(_unlink(folder / name) for name in names if name != lock_name)

    def data_file(self, entry: EntryMeta) -> str | None:
        """``data_path`` as a string, without building paths (the zero-copy hit path)."""
        digest = key_digest(entry.key)
        name = _data_name(digest, entry.etag)
        return None if name is None else f"{self._entries_prefix}{digest[:2]}{os.sep}{name}"

    def data_path(self, entry: EntryMeta) -> Path | None:
        """Where ``entry``'s bytes live, for sendfile or an X-Accel-Redirect; None if the entry
        did not come from this store. No I/O: the file may vanish when a newer version or a
        delete replaces it, so open it and keep the descriptor rather than re-resolving."""
        digest = key_digest(entry.key)
        name = _data_name(digest, entry.etag)
        return None if name is None else self._entry_dir(digest) / name

    def recall(self, key: str) -> EntryMeta | None:
        """A recently validated entry whose metadata file is still the same file (one
        ``stat``, inline: the hot entries' inodes are in the kernel's cache)."""
        digest = key_digest(key)
        remembered = self._recent.get(digest)
        if remembered is None:
            return None
        identity, meta = remembered
        try:
            meta_path = f"{self._entries_prefix}{digest[:2]}{os.sep}{digest}{_META_SUFFIX}"
            unchanged = _file_identity(os.stat(meta_path)) == identity
        except OSError:
            unchanged = False
        if not unchanged or meta.key != key or not meta.is_fresh(self._clock()):
            # Replaced, deleted or expired: lookup() reads (and tidies) it again.
            self._recent.pop(digest, None)
            return None
        with contextlib.suppress(KeyError):  # a worker thread trimmed it meanwhile
            self._recent.move_to_end(digest)
        if self._next_touch.get(digest, 0.0) <= time.monotonic():
            self._mark_used(digest, meta)
        return meta

    def _mark_used(self, digest: str, meta: EntryMeta) -> None:
        """Record a use of the entry for LRU eviction (any thread; a lost race only costs a
        second touch)."""
        if len(self._next_touch) > 4 * _RECENT_ENTRIES:
            self._next_touch.clear()
        self._next_touch[digest] = time.monotonic() + self.touch_interval
        name = _data_name(digest, meta.etag)
        if name is None:
            return
        path = f"{self._entries_prefix}{digest[:2]}{os.sep}{name}"
        with contextlib.suppress(OSError):  # evicted or replaced meanwhile
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))

    async def lookup(self, key: str) -> EntryMeta | None:
        # In a thread: a cold entry means reading files, and a slow disk would stall every
        # request. Entries found here are remembered for recall().
        return await trio.to_thread.run_sync(self._lookup_sync, key)

    async def lookup_stale(self, key: str) -> EntryMeta | None:
        """The complete entry even if expired (lookups leave expired entries in place for
        revalidation; the eviction sweep removes them)."""
        return await trio.to_thread.run_sync(partial(self._lookup_sync, key, stale=True))

    async def refresh(self, entry: EntryMeta, created: float | None = None) -> EntryMeta | None:
        """Republish ``entry``'s metadata with a new ``created`` (same data file, same ETag):
        a new metadata file renamed over the old one under the key's lease, like a commit.
        None when the key no longer holds that version."""
        digest = key_digest(entry.key)
        lease = await self._lease_for_publish(digest)
        try:
            return await trio.to_thread.run_sync(self._refresh_sync, digest, entry, created)
        finally:
            if lease is not None:
                lease.release()

    def _refresh_sync(
        self, digest: str, entry: EntryMeta, created: float | None
    ) -> EntryMeta | None:
        meta_path = self._meta_path(digest)
        tmp_meta = self._tmp_dir / f"{digest}.{secrets.token_hex(8)}{_META_SUFFIX}"
        try:
            with self._publish_lock:
                try:
                    stored = _parse_meta(meta_path.read_bytes(), digest)
                except FileNotFoundError:
                    return None
                if stored is None or stored.meta.key != entry.key:
                    return None
                if stored.meta.etag != entry.etag:
                    return None  # replaced by another version meanwhile
                if not _has_size(meta_path.parent / stored.data_name, stored.meta.size):
                    return None  # torn: lookups drop it
                when = self._clock() if created is None else created
                meta = dataclasses.replace(stored.meta, created=when)
                payload = json.dumps({**meta.to_json(), "data": stored.data_name}).encode()
                self._write_small_file(tmp_meta, payload)
                os.replace(tmp_meta, meta_path)  # the one commit point, as in _publish_sync
                if self._fsync:
                    self._fsync_dir(meta_path.parent)
        finally:
            tmp_meta.unlink(missing_ok=True)
        self._recent.pop(digest, None)  # recall() reads the new file (its identity changed)
        return meta

    def open_spool(self, entry: EntryMeta) -> DiskSpoolReader:
        """A spool reader over a published entry's data (raises ``KeyError`` once it is gone)."""
        path = self.data_path(entry)
        if path is None:
            raise KeyError(entry.key)
        try:
            return DiskSpoolReader(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError as exc:
            raise KeyError(entry.key) from exc

    @asynccontextmanager
    async def open_range(
        self, entry: EntryMeta, start: int, stop: int, chunk_size: ChunkSize = DEFAULT_READ_CHUNK
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        check_range(entry.size, start, stop, chunk_size)
        path = self.data_path(entry)
        if path is None:
            raise KeyError(entry.key)
        # Opened and closed synchronously (microseconds, no thread round trips: a hit is
        # dominated by per-request overhead); the reads themselves go to a thread.
        await trio.lowlevel.checkpoint()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise KeyError(entry.key) from exc
        try:
            yield _FileChunks(fd, path, start, stop, chunk_size)
        finally:
            os.close(fd)

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
    ) -> AsyncIterator[DiskWriter]:
        digest = key_digest(key)
        # The random token keeps concurrent writers of one key apart.
        tmp_path = self._tmp_dir / f"{digest}.{secrets.token_hex(8)}{_DATA_SUFFIX}"
        # Unbuffered: a write is in the kernel when it returns, so spool readers see it.
        # Opened synchronously (creating a file in our tmp folder takes microseconds): with
        # a thread, a cancellation arriving as the thread returns would orphan the new file
        # before the cleanup below is in place (the cancellation harness found this).
        await trio.lowlevel.checkpoint()
        file = trio.wrap_file(open(tmp_path, "xb", buffering=0))  # noqa: ASYNC230, SIM115
        writer = DiskWriter(
            self,
            key=key,
            digest=digest,
            tmp_path=tmp_path,
            file=file,
            content_type=content_type,
            ttl=ttl,
            options=options,
        )
        writer.source = source
        writer.validators = validators
        try:
            yield writer
        finally:
            # Shielded so that the cancellation that may have ended the block cannot also skip
            # removing the partial file.
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await writer.discard()

    async def _lease_for_publish(self, digest: str) -> Lead | None:
        """The key's lease for publishing it: None if this process leads the key already, else
        claimed as soon as no other process holds it (polling: flock cannot wait cancellably)."""
        while not self.leases.leads(digest):
            lease = self.leases.claim(digest)
            if lease is not None:
                return lease
            await trio.sleep(PUBLISH_RETRY)
        return None

    async def delete(self, key: str) -> None:
        await trio.to_thread.run_sync(self._delete_sync, key_digest(key))

    async def purge(self, keys: tuple[str, ...], prefixes: tuple[str, ...]) -> int:
        """Remove the entries of ``keys`` and of every key starting with one of ``prefixes``
        (a scan of the metadata files, in a thread); returns how many were removed."""
        return await trio.to_thread.run_sync(self._purge_sync, keys, prefixes)

    def _purge_sync(self, keys: tuple[str, ...], prefixes: tuple[str, ...]) -> int:
        removed = 0
        for key in keys:
            removed += self._purge_meta(self._meta_path(key_digest(key)), key.__eq__)
        if prefixes:
            for meta_path in self._entries_dir.glob(f"*/*{_META_SUFFIX}"):
                removed += self._purge_meta(meta_path, lambda key: key.startswith(prefixes))
        return removed

    def _purge_meta(self, meta_path: Path, wanted: Callable[[str], bool]) -> int:
        """Unpublish the entry of ``meta_path`` if its key is ``wanted``; 1 if it did."""
        digest = meta_path.name.removesuffix(_META_SUFFIX)
        try:
            raw = meta_path.read_bytes()
            key = json.loads(raw).get("key")
        except (OSError, ValueError, AttributeError):
            return 0  # gone meanwhile, or not ours (lookups and prepare() tidy it)
        if not isinstance(key, str) or not wanted(key):
            return 0
        self._recent.pop(digest, None)
        try:
            with self._publish_lock:
                if meta_path.read_bytes() != raw:
                    return 0  # replaced since it was read: a newer entry, not purged
                self._unpublish_locked(meta_path, raw, digest)
        except FileNotFoundError:
            return 0
        return 1

    def _entry_dir(self, digest: str) -> Path:
        return self._entries_dir / digest[:2]

    def _meta_path(self, digest: str) -> Path:
        return self._entry_dir(digest) / f"{digest}{_META_SUFFIX}"

    def _lookup_sync(self, key: str, *, stale: bool = False) -> EntryMeta | None:
        digest = key_digest(key)
        meta_path = self._meta_path(digest)
        try:
            with open(meta_path, "rb") as file:
                identity = _file_identity(os.fstat(file.fileno()))
                raw = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache_lookup_failed", key=key, error=str(exc))
            return None
        stored = _parse_meta(raw, digest)
        if stored is None:
            self._unpublish_if_unchanged(digest, raw, reason="corrupt metadata")
            return None
        if stored.meta.key != key:
            # A sha256 collision: the entry belongs to the other key, so leave it alone.
            log.warning("cache_key_collision", key=key, stored_key=stored.meta.key)
            return None
        fresh = stored.meta.is_fresh(self._clock())
        if not fresh and not stale:
            return None  # kept for revalidation (lookup_stale); the sweep removes it
        try:
            size: int | None = (meta_path.parent / stored.data_name).stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            log.warning("cache_lookup_failed", key=key, error=str(exc))
            return None
        if size != stored.meta.size:
            self._unpublish_if_unchanged(digest, raw, reason="torn")
            return None
        if not fresh:
            return stored.meta
        self._remember(digest, identity, stored.meta)
        if self._next_touch.get(digest, 0.0) <= time.monotonic():
            self._mark_used(digest, stored.meta)
        return stored.meta

    def _remember(self, digest: str, identity: tuple[int, ...], meta: EntryMeta) -> None:
        with contextlib.suppress(KeyError):  # another thread may be trimming too
            self._recent[digest] = (identity, meta)
            self._recent.move_to_end(digest)
            while len(self._recent) > _RECENT_ENTRIES:
                self._recent.popitem(last=False)

    def _unpublish_if_unchanged(self, digest: str, seen: bytes, *, reason: str) -> None:
        """Drop the entry whose metadata read as ``seen``, unless a commit replaced it since."""
        meta_path = self._meta_path(digest)
        try:
            with self._publish_lock:
                if meta_path.read_bytes() != seen:
                    return
                self._unpublish_locked(meta_path, seen, digest)
        except FileNotFoundError:
            return
        except OSError as exc:
            # The entry is not served either way; prepare() retries the removal at start-up.
            log.warning("cache_unpublish_failed", digest=digest, reason=reason, error=str(exc))
            return
        log.debug("cache_entry_dropped", digest=digest, reason=reason)

    def _delete_sync(self, digest: str) -> None:
        meta_path = self._meta_path(digest)
        with self._publish_lock:
            try:
                raw = meta_path.read_bytes()
            except FileNotFoundError:
                return
            self._unpublish_locked(meta_path, raw, digest)

    @staticmethod
    def _unpublish_locked(meta_path: Path, raw: bytes, digest: str) -> None:
        # Metadata first: a crash in between leaves an orphaned data file, never a torn entry.
        meta_path.unlink(missing_ok=True)
        data_name = _referenced_data_name(raw, digest)
        if data_name is not None:
            (meta_path.parent / data_name).unlink(missing_ok=True)

    def _publish_sync(self, digest: str, tmp_data: Path, meta: EntryMeta) -> None:
        """Move a complete data file into place and publish its metadata (worker thread)."""
        data_name = _data_name(digest, meta.etag)
        assert data_name is not None, "etags come from format_etag"
        folder = self._entry_dir(digest)
        folder.mkdir(exist_ok=True)
        data_path = folder / data_name
        meta_path = self._meta_path(digest)
        tmp_meta = tmp_data.with_name(tmp_data.name.removesuffix(_DATA_SUFFIX) + _META_SUFFIX)
        payload = json.dumps({**meta.to_json(), "data": data_name}).encode()
        try:
            self._write_small_file(tmp_meta, payload)
            with self._publish_lock:
                try:
                    previous = _referenced_data_name(meta_path.read_bytes(), digest)
                except FileNotFoundError:
                    previous = None
                # Identical content has an identical name: the rename then swaps equal bytes.
                os.replace(tmp_data, data_path)
                published = False
                try:
                    os.replace(tmp_meta, meta_path)
                    published = True
                finally:
                    if not published and previous != data_name:
                        data_path.unlink(missing_ok=True)
                if self._fsync:
                    self._fsync_dir(folder)
                if previous is not None and previous != data_name:
                    (folder / previous).unlink(missing_ok=True)
        finally:
            tmp_meta.unlink(missing_ok=True)

    def _write_small_file(self, path: Path, payload: bytes) -> None:
        with path.open("xb") as file:
            file.write(payload)
            if self._fsync:
                file.flush()
                os.fsync(file.fileno())

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        """Make the renames into ``folder`` durable."""
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_unreferenced(self, folder: Path, digest: str, names: list[str]) -> int:
        """Remove the key's unusable metadata and the data files it does not point at
        (under the key's lease: no publish of it is halfway)."""
        meta_path = folder / f"{digest}{_META_SUFFIX}"
        removed = 0
        keep = ""
        with contextlib.suppress(FileNotFoundError):
            stored = _parse_meta(meta_path.read_bytes(), digest)
            if stored is not None and _has_size(folder / stored.data_name, stored.meta.size):
                keep = stored.data_name
            else:
                removed += _unlink(meta_path)
        unreferenced = [n for n in names if n.endswith(_DATA_SUFFIX) and n != keep]
        return removed + sum(_unlink(folder / name) for name in unreferenced)


def _unlink(path: Path) -> int:
    """Remove ``path``; 1 if it existed, else 0."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


_nowait_reads = hasattr(os, "RWF_NOWAIT")
# One scratch buffer for every inline read: reads happen in the event loop's thread with no
# checkpoint between filling it and copying out. (A fresh zero-filled bytearray per chunk
# measured 9x slower than the read itself.)
_scratch = memoryview(bytearray(0))


def read_cached(fd: int, size: int, offset: int) -> bytes | None:
    """Up to ``size`` bytes at ``offset`` if the page cache has them, else None, never
    blocking on the disk (``preadv(RWF_NOWAIT)``, Linux). Hot cached files are read inline:
    a worker-thread round trip per chunk cost more CPU than the read itself, and the
    threads' GIL hand-offs halved hit throughput under load (BENCHMARKS.md).

    Call it from one thread only (the event loop's): it reads into a shared buffer.
    """
    global _nowait_reads, _scratch
    if not _nowait_reads:
        return None
    if len(_scratch) < size:
        _scratch = memoryview(bytearray(size))
    window = _scratch[:size]
    try:
        got = os.preadv(fd, [window], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None  # not in the page cache (yet): the caller reads in a thread
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _nowait_reads = False  # this kernel or filesystem cannot: always use threads
        return None
    if got == 0 and size > 0:
        return None  # let the blocking read tell end-of-file from "nothing cached"
    return bytes(window[:got])


class _FileChunks:
    """Reads bytes ``start`` to ``stop`` of an open file, one positional read per chunk."""

    def __init__(self, fd: int, path: Path, start: int, stop: int, chunk_size: ChunkSize) -> None:
        self._fd = fd
        self._path = path
        self._offset = start
        self._stop = stop
        self._chunk_size = chunk_size

    def __aiter__(self) -> _FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._offset >= self._stop:
            raise StopAsyncIteration
        size = min(await chunk_size_now(self._chunk_size), self._stop - self._offset)
        chunk = read_cached(self._fd, size, self._offset)
        if chunk is None:
            await trio.lowlevel.cancel_shielded_checkpoint()  # checkpoint before return
            chunk = await trio.to_thread.run_sync(os.pread, self._fd, size, self._offset)
        else:
            await trio.lowlevel.checkpoint()
        if not chunk:
            # Published data files are never modified, so this is outside interference.
            raise ResizerError(f"cache data file {self._path.name} is shorter than its entry")
        self._offset += len(chunk)
        return chunk


class DiskWriter:
    """Streams into a tmp file while hashing; ``commit`` hands it to the store to publish."""

    def __init__(
        self,
        store: DiskCacheStore,
        *,
        key: str,
        digest: str,
        tmp_path: Path,
        file: _AsyncBinaryWriter,
        content_type: str,
        ttl: float,
        options: str,
    ) -> None:
        self._store = store
        self._key = key
        self._digest = digest
        self._tmp_path = tmp_path
        self._file = file
        self._content_type = content_type
        self._ttl = ttl
        self._options = options
        self.source = ""
        self.validators = ""
        self._hasher = new_etag_hasher()
        self._size = 0
        self._finished: str | None = None  # why it no longer accepts calls

    @property
    def bytes_written(self) -> int:
        return self._size

    @property
    def partial_path(self) -> Path:
        """The partial file being written (followers in other processes tail it)."""
        return self._tmp_path

    async def write(self, data: bytes | bytearray) -> None:
        self._ensure_open()
        # If the write fails or is cancelled, file and hash may disagree: refuse to commit.
        self._finished = "failed"
        view = memoryview(data)
        while view:  # a raw write may be partial
            written = await self._file.write(view)
            view = view[written:]
        self._hasher.update(data)
        self._size += len(data)
        self._finished = None

    def open_reader(self) -> DiskSpoolReader:
        self._ensure_open()
        # Its own descriptor: it keeps reading after the rename at commit or the unlink at
        # discard (POSIX), so the reader never depends on the writer's lifetime.
        return DiskSpoolReader(os.open(self._tmp_path, os.O_RDONLY | os.O_CLOEXEC))

    async def commit(self) -> EntryMeta:
        self._ensure_open()
        self._finished = "failed"  # until published; the cleanup then removes the tmp file
        if self._store._fsync:
            await self._file.flush()
            await trio.to_thread.run_sync(os.fsync, self._file.fileno())
        await self._file.aclose()
        meta = EntryMeta(
            key=self._key,
            content_type=self._content_type,
            size=self._size,
            etag=format_etag(self._hasher),
            created=self._store._clock(),
            ttl=self._ttl,
            options=self._options,
            source=self.source,
            validators=self.validators,
        )
        # Under the key's lease from the data rename to the metadata rename: otherwise another
        # process's prepare() could see the new data file unreferenced and remove it.
        lease = await self._store._lease_for_publish(self._digest)
        try:
            await trio.to_thread.run_sync(
                self._store._publish_sync, self._digest, self._tmp_path, meta
            )
        finally:
            if lease is not None:
                lease.release()
        self._finished = "committed"
        if self._store.on_publish is not None:
            self._store.on_publish(meta)
        return meta

    async def discard(self) -> None:
        """Close the file and, unless committed, remove it. Idempotent."""
        if self._finished is None:
            self._finished = "discarded"
        if self._finished != "committed":
            # First, and synchronously: unlinking a file in our own tmp folder takes
            # microseconds, and doing it before the (threaded) close means no cleanup deadline
            # can leave a partial file behind. POSIX lets us unlink an open file.
            self._tmp_path.unlink(missing_ok=True)
        await self._file.aclose()

    def _ensure_open(self) -> None:
        if self._finished is not None:
            raise RuntimeError(f"cache writer already {self._finished}")


class DiskSpoolReader:
    """Positional reads from a descriptor it owns (any file: partial, published, followed)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def read_at(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self._fd, size, offset)

    def clone(self) -> DiskSpoolReader:
        return DiskSpoolReader(os.dup(self._fd))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
