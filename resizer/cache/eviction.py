"""A bounded disk cache: a sweep removes expired entries, then the least recently used ones.

Every process (worker, instance) on one cache folder runs a ``Sweeper``; an ``flock`` on
``<root>/sweep.lock`` lets one of them sweep at a time (the others skip that round: the
folder is being swept). A sweep scans ``entries/``, asks ``plan_sweep`` (pure) which entries
to remove, and removes them:

- every expired entry (reason ``expired``);
- then, if the cache holds more than ``max_size`` bytes, the least recently used entries
  until it holds at most ``LOW_WATER`` of it (reason ``size``). The bytes of partial entries
  being written (``tmp/*.data``) count, but they are never touched.

Recency is shared through the filesystem: a hit sets its data file's atime (the disk store's
``_mark_used``, at most once a second per entry), and an entry's last use is the later of
its data file's atime and mtime (its publication).

An entry is removed under its key's lease (``LeaseBoard.claim``), like ``delete`` and
``prepare`` do, and only if its metadata is still what the sweep read: an entry being
produced or published (lease held) is "in use" and skipped, one republished since the scan
is fresh. Metadata goes first, then data, so a lookup never sees a torn entry; a reader that
opened the data file already keeps reading it to its end (POSIX unlink), and a hit that
looked up the entry but has not opened it yet finds it gone and answers as after a delete.

Besides every ``interval``, a sweep starts as soon as this process's commits push its
estimate of the cache's size (the last sweep's total plus what it committed since) over
``max_size``. With ``max_size`` 0 the bound is ``AUTO_FRACTION`` of the free space of the
folder's filesystem plus what the cache holds, measured by the first sweep at start-up.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
import trio

from ..config import Config
from ..metrics import Metrics
from .base import EntryMeta
from .disk import (
    _DATA_SUFFIX,
    _META_SUFFIX,
    DiskCacheStore,
    _file_identity,
    _parse_meta,
    _StoredMeta,
)

log = structlog.get_logger(__name__)

# A sweep that has to evict brings the cache down to this fraction of max_size, so that it
# does not run again at the very next commit.
LOW_WATER = 0.9
# max_size 0: this fraction of (free space + the cache's own bytes) at start-up.
AUTO_FRACTION = 0.5
SWEEP_LOCK = "sweep.lock"
EXPIRED, SIZE = "expired", "size"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A published entry as the sweep sees it."""

    digest: str
    size: int  # bytes on disk: data plus metadata
    last_use: float  # unix time
    expires: float  # unix time
    in_use: bool = False  # never removed (its key's lease is held)


@dataclass(frozen=True, slots=True)
class Plan:
    expired: list[Candidate]  # removed whatever the size
    evicted: list[Candidate]  # least recently used first
    total_after: int  # bytes left once both are removed (pinned bytes included)


def plan_sweep(
    entries: Iterable[Candidate],
    *,
    now: float,
    max_size: int,
    low_water: int,
    pinned: int = 0,
    retention: float = 0.0,
) -> Plan:
    """Which entries a sweep removes (pure).

    Every entry not in use that expired more than ``retention`` ago (within it, an expired
    entry is kept: revalidation can refresh it without transcoding); then, if what is left
    (plus ``pinned`` bytes that cannot be removed, such as partial files) exceeds
    ``max_size``, the expired entries first, then the least recently used, all not in use,
    until at most ``low_water`` is left (or nothing removable is).
    """
    kept: list[Candidate] = []
    expired: list[Candidate] = []
    total = pinned
    for entry in entries:
        if entry.expires + retention <= now and not entry.in_use:
            expired.append(entry)
        else:
            kept.append(entry)
            total += entry.size
    evicted: list[Candidate] = []
    if total > max_size:
        removable = sorted(
            (e for e in kept if not e.in_use),
            key=lambda e: (e.expires > now, e.last_use, e.digest),  # expired ones first
        )
        for entry in removable:
            if total <= low_water:
                break
            evicted.append(entry)
            total -= entry.size
    return Plan(expired, evicted, total)


@dataclass(slots=True)
class SweepResult:
    """What one sweep found and did."""

    max_size: int
    size: int = 0  # bytes of published entries after the sweep
    entries: int = 0  # published entries after the sweep
    pinned: int = 0  # bytes of partial files
    removed: dict[str, int] = field(default_factory=lambda: {EXPIRED: 0, SIZE: 0})
    skipped: int = 0  # chosen, but in use (or republished) when the sweep came to it

    @property
    def total(self) -> int:
        return self.size + self.pinned


@dataclass(frozen=True, slots=True)
class _Seen:
    """A scanned entry: its candidate and the metadata bytes the removal compares."""

    candidate: Candidate
    raw: bytes


class Sweeper:
    """Keeps one process's view of a disk cache folder within ``max_size`` (see module doc)."""

    def __init__(
        self,
        store: DiskCacheStore,
        *,
        max_size: int = 0,
        interval: float = 30.0,
        retention: float = 0.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,  # for expiry; default: the store's
    ) -> None:
        self.store = store
        self.interval = interval
        self.retention = retention  # expired entries kept this long, for revalidation
        self.metrics = metrics
        self.max_size = max_size  # resolved by the first sweep when 0 ("auto")
        self._clock = clock or store._clock
        self._estimate = 0  # bytes: the last sweep's total plus this process's commits since
        self._wanted = trio.Event()
        self._stuck = False  # the last sweep could not get under max_size (entries in use)
        self.sweeps = 0  # sweeps this process ran (skipped ones not counted)
        # digest -> (identity of its metadata file, what it said), so a sweep reads only the
        # metadata files that changed since the last one.
        self._known: dict[str, tuple[tuple[int, ...], bytes, _StoredMeta]] = {}

    @classmethod
    def from_config(cls, config: Config, store: DiskCacheStore, metrics: Metrics) -> Sweeper:
        """The sweeper of ``config``'s ``[cache]``, told of ``store``'s commits."""
        sweeper = cls(
            store,
            max_size=config.cache.max_size,
            interval=config.cache.sweep_interval,
            retention=config.cache.expired_retention,
            metrics=metrics,
        )
        store.on_publish = sweeper.committed
        return sweeper

    @property
    def lock_path(self) -> Path:
        return self.store.root / SWEEP_LOCK

    def committed(self, entry: EntryMeta) -> None:
        """This process published ``entry``: sweep soon if that puts the cache over its bound."""
        self._estimate += entry.size
        if self.max_size and self._estimate > self.max_size and not self._stuck:
            self._wanted.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep now, then every ``interval`` and whenever commits ask for it."""
        task_status.started()
        while True:
            try:
                await self.sweep()
            except OSError as exc:  # a disk problem must not end the service: try again later
                log.warning("cache_sweep_failed", root=str(self.store.root), error=str(exc))
            except Exception:  # nor a bug here: the cache only grows until the next sweep
                log.exception("cache_sweep_crashed", root=str(self.store.root))
            with trio.move_on_after(self.interval):
                await self._wanted.wait()
            self._wanted = trio.Event()

    async def sweep(self) -> SweepResult | None:
        """One sweep in a worker thread; None when another process was sweeping."""
        return await trio.to_thread.run_sync(self.sweep_sync)

    def sweep_sync(self) -> SweepResult | None:
        """One sweep (blocking); None when another process holds the sweep lock."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            return self._sweep_locked()
        finally:
            os.close(fd)  # releases the lock

    def _sweep_locked(self) -> SweepResult:
        started = time.monotonic()
        seen, pinned = self._scan()
        if not self.max_size:
            self.max_size = self._auto_size(sum(s.candidate.size for s in seen.values()) + pinned)
            log.info("cache_max_size", root=str(self.store.root), max_size=self.max_size)
        result = SweepResult(self.max_size, pinned=pinned)
        busy: set[str] = set()
        while True:
            plan = plan_sweep(
                (
                    replace(s.candidate, in_use=True) if digest in busy else s.candidate
                    for digest, s in seen.items()
                ),
                now=self._clock(),
                max_size=self.max_size,
                low_water=int(self.max_size * LOW_WATER),
                pinned=pinned,
                retention=self.retention,
            )
            newly_busy = False
            for reason, victims in ((EXPIRED, plan.expired), (SIZE, plan.evicted)):
                for victim in victims:
                    outcome = self._remove(victim.digest, seen[victim.digest].raw)
                    if outcome == "busy":
                        busy.add(victim.digest)
                        newly_busy = True
                        result.skipped += 1
                        continue
                    del seen[victim.digest]
                    self._known.pop(victim.digest, None)
                    if outcome == "removed":
                        result.removed[reason] += 1
            if not newly_busy:
                break
        self.sweeps += 1
        result.size = sum(s.candidate.size for s in seen.values())
        result.entries = len(seen)
        self._estimate = result.total
        self._stuck = result.total > self.max_size
        if self.metrics is not None:
            self.metrics.cache_swept(result.size, result.entries, result.removed)
        if any(result.removed.values()) or result.skipped:
            log.info(
                "cache_swept",
                root=str(self.store.root),
                expired=result.removed[EXPIRED],
                evicted=result.removed[SIZE],
                skipped=result.skipped,
                size=result.size,
                entries=result.entries,
                max_size=self.max_size,
                seconds=round(time.monotonic() - started, 3),
            )
        return result

    def _auto_size(self, cache_bytes: int) -> int:
        stat = os.statvfs(self.store.root)
        return int(AUTO_FRACTION * (stat.f_bavail * stat.f_frsize + cache_bytes))

    def _scan(self) -> tuple[dict[str, _Seen], int]:
        """The published entries by digest, and the bytes of partial files."""
        seen: dict[str, _Seen] = {}
        entries_dir = self.store.root / "entries"
        for folder in _subfolders(entries_dir):
            names: dict[str, list[str]] = {}
            try:
                listing = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in listing:
                names.setdefault(name.split(".", 1)[0], []).append(name)
            for digest, key_names in names.items():
                entry = self._scan_entry(Path(folder), digest, key_names)
                if entry is not None:
                    seen[digest] = entry
        known = self._known
        for digest in [d for d in known if d not in seen]:
            del known[digest]
        return seen, _partial_bytes(self.store.root / "tmp")

    def _scan_entry(self, folder: Path, digest: str, names: Sequence[str]) -> _Seen | None:
        meta_name = f"{digest}{_META_SUFFIX}"
        if meta_name not in names:
            return None  # data files without metadata: a publish under way, or leftovers
        meta_path = folder / meta_name
        try:
            meta_stat = os.stat(meta_path)
            identity = _file_identity(meta_stat)
            known = self._known.get(digest)
            if known is not None and known[0] == identity:
                _, raw, stored = known
            else:
                raw = meta_path.read_bytes()
                parsed = _parse_meta(raw, digest)
                if parsed is None:
                    return None  # corrupt: lookups drop it, prepare() removes it
                stored = parsed
                self._known[digest] = (identity, raw, stored)
            data = os.stat(folder / stored.data_name)
        except FileNotFoundError:
            return None  # removed meanwhile (or torn: lookups drop it)
        if data.st_size != stored.meta.size:
            return None  # torn: the next lookup drops it
        last_use = max(data.st_atime, data.st_mtime)
        size = data.st_size + meta_stat.st_size
        return _Seen(Candidate(digest, size, last_use, stored.meta.expires), raw)

    def _remove(self, digest: str, raw: bytes) -> str:
        """Remove the entry whose metadata read as ``raw``: "removed", "gone" (someone else
        removed it) or "busy" (its lease is held, or it was republished since)."""
        store = self.store
        lease = store.leases.claim(digest)
        if lease is None:
            return "busy"  # being produced, published or tidied
        try:
            meta_path = store._meta_path(digest)
            with store._publish_lock:
                try:
                    current = meta_path.read_bytes()
                except FileNotFoundError:
                    return "gone"
                if current != raw:
                    return "busy"  # a newer version: it is fresh
                # Metadata first, then data: a lookup never finds a torn entry.
                store._unpublish_locked(meta_path, raw, digest)
        finally:
            lease.release()
        return "removed"


def _subfolders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as scan:
            return [item.path for item in scan if item.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _partial_bytes(tmp_dir: Path) -> int:
    """Bytes of the partial entries being written (never removed by a sweep)."""
    total = 0
    try:
        with os.scandir(tmp_dir) as scan:
            for item in scan:
                if item.name.endswith(_DATA_SUFFIX):
                    try:
                        total += item.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
    except FileNotFoundError:
        return 0
    return total
