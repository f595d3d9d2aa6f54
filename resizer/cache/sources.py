"""A bounded local cache of downloaded source files, shared by every variant made from them.

ffmpeg needs a seekable local file (an MP4 with its ``moov`` atom at the end cannot be read
from a pipe), so remote sources are downloaded whole. Without sharing, ten variants of one
video (sizes, a frame, a spritesheet) would download it ten times. Here each download is kept,
keyed by the source and its validators (size, Last-Modified), and reused while it fits the
byte budget; the least recently used files nobody is reading are evicted first.

Concurrent openers of one key wait for the single download in progress (a per-key lock):
if the downloader is cancelled, the next waiter downloads instead, so no request depends on
another request's lifetime.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from ..sources.base import LocalSource, Source, SourceStat

log = structlog.get_logger(__name__)


@dataclass
class _Entry:
    path: Path
    size: int
    readers: int = 0


class SourceFileCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        # Several processes may share the cache folder; each keeps its files in its own
        # subfolder ("<pid>-<token>"), since each tracks (and evicts) only what it knows.
        self.root = root
        self.folder = root / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, oldest first
        self._locks: dict[str, trio.Lock] = {}
        self.downloads = 0
        self.reuses = 0

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def prepare(self) -> None:
        """Create our folder; remove those of processes that are gone (blocking, start-up)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self.root.iterdir():
            pid = folder.name.split("-", 1)[0]
            if folder.is_dir() and not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(folder, ignore_errors=True)
        self.folder.mkdir()

    def holds(self, source: Source, path: str, stat: SourceStat) -> bool:
        """Whether a valid copy is cached already (then reading it beats any network)."""
        return _key(source, path, stat) in self._entries

    @asynccontextmanager
    async def open(self, source: Source, path: str, stat: SourceStat) -> AsyncIterator[LocalSource]:
        """``source.open(path)``, downloading only if no valid copy is cached."""
        key = _key(source, path, stat)
        entry = self._entries.get(key)
        if entry is None:
            lock = self._locks.setdefault(key, trio.Lock())
            try:
                async with lock:
                    entry = self._entries.get(key)  # a concurrent opener may have downloaded it
                    if entry is None:
                        entry = await self._download(key, source, path)
            finally:
                if not lock.statistics().tasks_waiting and not lock.locked():
                    self._locks.pop(key, None)
        else:
            self.reuses += 1
        # Synchronous from here to the yield: the entry cannot be evicted under us.
        entry.readers += 1
        self._entries.move_to_end(key)
        try:
            yield LocalSource(path=entry.path, size=entry.size)
        finally:
            entry.readers -= 1
            self._evict()

    async def _download(self, key: str, source: Source, path: str) -> _Entry:
        name = hashlib.sha256(key.encode()).hexdigest()[:32] + Path(path).suffix[:9]
        target = self.folder / name
        async with source.open(path) as local:
            # A hard link keeps the download after the source removes its temp file (both
            # live under the cache folder: one filesystem). Linked and registered in one
            # synchronous step, so no cancellation can orphan the file.
            target.unlink(missing_ok=True)
            os.link(local.path, target)
            entry = _Entry(target, local.size)
            self._entries[key] = entry
        self.downloads += 1
        return entry

    def _evict(self) -> None:
        total = self.total_bytes
        for key, entry in list(self._entries.items()):
            if total <= self.max_bytes:
                break
            if entry.readers:
                continue
            del self._entries[key]
            total -= entry.size
            entry.path.unlink(missing_ok=True)  # synchronous: microseconds, never orphaned


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _key(source: Source, path: str, stat: SourceStat) -> str:
    return f"{source.kind}\0{id(source)}\0{path}\0{stat.size}\0{stat.mtime}"
