"""What only the disk store has: its layout, crash leftovers, torn files and filesystem errors.

The CacheStore contract (round trips, ranges, expiry, overwrite, cancellation...) runs against
this store too, in test_cache_memory.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import trio

from resizer.cache.base import EntryMeta
from resizer.cache.disk import DiskCacheStore
from resizer.cache.leases import Lead
from resizer.options import key_digest
from tests.test_cache_memory import (
    ABANDON_WAYS,
    START,
    AbandonWay,
    FakeClock,
    abandon_writer,
    put,
    read,
    sample_bytes,
)

OLD = sample_bytes(5000, seed=1)
NEW = sample_bytes(7000, seed=2)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def disk(root: Path) -> DiskCacheStore:
    store = DiskCacheStore(root, clock=FakeClock())
    store.prepare()
    return store


def files_under(folder: Path) -> set[Path]:
    """Every regular file below ``folder``, relative to it."""
    return {path.relative_to(folder) for path in folder.rglob("*") if path.is_file()}


def meta_path(disk: DiskCacheStore, entry: EntryMeta) -> Path:
    data = data_path(disk, entry)
    return data.parent / f"{key_digest(entry.key)}.meta.json"


def data_path(disk: DiskCacheStore, entry: EntryMeta) -> Path:
    path = disk.data_path(entry)
    assert path is not None
    return path


def entry_files(disk: DiskCacheStore, entry: EntryMeta) -> set[Path]:
    """The two files a published entry consists of, relative to the store root."""
    return {
        meta_path(disk, entry).relative_to(disk.root),
        data_path(disk, entry).relative_to(disk.root),
    }


async def test_entry_is_one_meta_and_one_data_file_in_its_digest_folder(
    disk: DiskCacheStore,
) -> None:
    """A committed entry is <digest>.meta.json plus the data file it names, nothing in tmp/."""
    entry = await put(disk, "k", OLD)
    digest = key_digest("k")
    meta_file = disk.root / "entries" / digest[:2] / f"{digest}.meta.json"
    stored = json.loads(meta_file.read_bytes())
    assert EntryMeta.from_json(stored) == entry
    assert stored["data"] == data_path(disk, entry).name
    assert data_path(disk, entry).parent == meta_file.parent
    assert data_path(disk, entry).read_bytes() == OLD
    assert files_under(disk.root) == entry_files(disk, entry)


async def test_data_path_is_none_for_an_entry_this_store_did_not_write(
    disk: DiskCacheStore,
) -> None:
    """data_path only answers for ETags in this store's format."""
    entry = await put(disk, "k", OLD)
    assert disk.data_path(dataclasses.replace(entry, etag='W/"abc"')) is None


@pytest.mark.parametrize("way", ABANDON_WAYS)
async def test_abandoned_writer_leaves_no_files(disk: DiskCacheStore, way: AbandonWay) -> None:
    """Leaving a writer without commit removes its partial file, whatever ended the block."""
    old = await put(disk, "existing", OLD)
    await abandon_writer(disk, "existing", way)
    await abandon_writer(disk, "fresh", way)
    assert files_under(disk.root) == entry_files(disk, old)


async def test_overwrite_leaves_exactly_one_data_file(disk: DiskCacheStore) -> None:
    """After an overwrite only the new version's meta and data file remain."""
    await put(disk, "k", OLD)
    new = await put(disk, "k", NEW)
    assert files_under(disk.root) == entry_files(disk, new)


@pytest.fixture
def break_meta_publication(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """A switch making every later metadata publication (os.replace onto *.meta.json) fail."""
    real_replace = os.replace

    def replace_failing_on_meta(src: Path, dst: Path) -> None:
        if str(dst).endswith(".meta.json"):
            raise OSError(errno.EIO, "simulated I/O error")
        real_replace(src, dst)

    return lambda: monkeypatch.setattr(os, "replace", replace_failing_on_meta)


async def test_failed_publication_keeps_the_old_entry(
    disk: DiskCacheStore, break_meta_publication: Callable[[], None]
) -> None:
    """If publishing the metadata fails, commit raises and the old entry stays intact."""
    old = await put(disk, "k", OLD)
    break_meta_publication()
    with pytest.raises(OSError, match="simulated"):
        await put(disk, "k", NEW)
    assert await disk.lookup("k") == old
    assert await read(disk, old) == OLD
    assert files_under(disk.root) == entry_files(disk, old)


async def test_writer_is_unusable_after_a_failed_commit(
    disk: DiskCacheStore, break_meta_publication: Callable[[], None]
) -> None:
    """After commit raised, the writer refuses to write or commit and leaves no files."""
    break_meta_publication()
    async with disk.open_writer("k", content_type="video/mp4", ttl=60.0, options="") as writer:
        await writer.write(OLD)
        with pytest.raises(OSError, match="simulated"):
            await writer.commit()
        with pytest.raises(RuntimeError, match="failed"):
            await writer.commit()
        with pytest.raises(RuntimeError, match="failed"):
            await writer.write(NEW)
    assert files_under(disk.root) == set()


def crash_during_write(
    disk: DiskCacheStore, old: EntryMeta, staging: DiskCacheStore, new: EntryMeta
) -> None:
    (disk.root / "tmp" / f"{key_digest('k')}.0123abcd.data").write_bytes(NEW[:100])


def crash_after_data_rename(
    disk: DiskCacheStore, old: EntryMeta, staging: DiskCacheStore, new: EntryMeta
) -> None:
    # The new data file is in place; its metadata is written to tmp/ but not yet published.
    shutil.copy(data_path(staging, new), data_path(disk, old).parent)
    tmp_meta = disk.root / "tmp" / f"{key_digest('k')}.0123abcd.meta.json"
    shutil.copy(meta_path(staging, new), tmp_meta)


def crash_before_old_data_removal(
    disk: DiskCacheStore, old: EntryMeta, staging: DiskCacheStore, new: EntryMeta
) -> None:
    # The new version is published; the old data file has not been removed yet.
    folder = data_path(disk, old).parent
    shutil.copy(data_path(staging, new), folder)
    shutil.copy(meta_path(staging, new), folder)


CrashPoint = Callable[[DiskCacheStore, EntryMeta, DiskCacheStore, EntryMeta], None]


@pytest.mark.parametrize(
    ("crash", "survivor"),
    [
        (crash_during_write, "old"),
        (crash_after_data_rename, "old"),
        (crash_before_old_data_removal, "new"),
    ],
)
async def test_crash_leftovers_are_never_served_and_prepare_removes_them(
    root: Path, crash: CrashPoint, survivor: str
) -> None:
    """A kill -9 at any point of an overwrite leaves one whole version; prepare() tidies up."""
    disk = DiskCacheStore(root, clock=FakeClock())
    disk.prepare()
    old = await put(disk, "k", OLD)
    # The files a complete overwrite would produce, made by a second store.
    staging = DiskCacheStore(root.parent / "staging", clock=FakeClock())
    staging.prepare()
    new = await put(staging, "k", NEW)

    crash(disk, old, staging, new)

    expected, expected_bytes = (old, OLD) if survivor == "old" else (new, NEW)
    assert await disk.lookup("k") == expected
    assert await read(disk, expected) == expected_bytes
    assert disk.prepare() >= 1
    assert files_under(root) == entry_files(disk, expected)
    assert await read(disk, expected) == expected_bytes


def remove_data(disk: DiskCacheStore, entry: EntryMeta) -> None:
    data_path(disk, entry).unlink()


def truncate_data(disk: DiskCacheStore, entry: EntryMeta) -> None:
    data_path(disk, entry).write_bytes(OLD[:-1])


def extend_data(disk: DiskCacheStore, entry: EntryMeta) -> None:
    data_path(disk, entry).write_bytes(OLD + b"!")


def garble_meta(disk: DiskCacheStore, entry: EntryMeta) -> None:
    meta_path(disk, entry).write_bytes(b'{"key": "k", "size": ')


def point_meta_at_other_data(disk: DiskCacheStore, entry: EntryMeta) -> None:
    path = meta_path(disk, entry)
    stored = json.loads(path.read_bytes())
    stored["data"] = "../elsewhere.data"
    path.write_text(json.dumps(stored))


@pytest.mark.parametrize(
    "tear",
    [remove_data, truncate_data, extend_data, garble_meta, point_meta_at_other_data],
)
async def test_torn_entry_is_a_miss_and_its_metadata_is_removed(
    disk: DiskCacheStore, tear: Callable[[DiskCacheStore, EntryMeta], None]
) -> None:
    """Metadata whose data is missing, of the wrong size or not ours is never served."""
    entry = await put(disk, "k", OLD)
    tear(disk, entry)
    assert await disk.lookup("k") is None
    assert not meta_path(disk, entry).exists()


@pytest.mark.parametrize("tear", [remove_data, truncate_data, garble_meta])
async def test_prepare_removes_torn_entries(
    disk: DiskCacheStore, tear: Callable[[DiskCacheStore, EntryMeta], None]
) -> None:
    """prepare() removes torn entries it finds, leaving sound ones alone."""
    torn = await put(disk, "torn", OLD)
    sound = await put(disk, "sound", NEW)
    tear(disk, torn)
    assert disk.prepare() >= 1
    assert files_under(disk.root) == entry_files(disk, sound)


async def test_data_without_metadata_is_never_served(disk: DiskCacheStore) -> None:
    """A data file whose metadata is gone is a miss, and prepare() removes it."""
    entry = await put(disk, "k", OLD)
    meta_path(disk, entry).unlink()
    assert await disk.lookup("k") is None
    assert disk.prepare() == 1
    assert files_under(disk.root) == set()


async def test_prepare_keeps_sound_entries_and_is_repeatable(disk: DiskCacheStore) -> None:
    """prepare() on a healthy store removes nothing and entries stay served."""
    entry = await put(disk, "k", OLD)
    assert disk.prepare() == 0
    assert disk.prepare() == 0
    assert await disk.lookup("k") == entry


# Bounds the tests' waits on worker threads, so a broken interleaving fails instead of hanging.
THREAD_WAIT = 10.0


class PausedPublish:
    """Pauses the next commit, in its worker thread, between its data and metadata renames."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paused = threading.Event()
        self.resume = threading.Event()
        real_replace = os.replace

        def replace(src: Path, dst: Path) -> None:
            real_replace(src, dst)
            if str(dst).endswith(".data") and not self.paused.is_set():
                self.paused.set()
                self.resume.wait(THREAD_WAIT)

        monkeypatch.setattr(os, "replace", replace)

    async def wait_paused(self) -> None:
        await trio.to_thread.run_sync(self.paused.wait, THREAD_WAIT, abandon_on_cancel=True)


async def put_into(into: list[EntryMeta], store: DiskCacheStore, key: str, data: bytes) -> None:
    into.append(await put(store, key, data))


async def assert_serves(root: Path, key: str, entry: EntryMeta, data: bytes) -> None:
    """Another process (a fresh store) finds ``entry`` under ``key`` and reads all of it."""
    reader = DiskCacheStore(root, clock=FakeClock())
    assert await reader.lookup(key) == entry
    assert await read(reader, entry) == data


async def test_prepare_spares_an_entry_a_leader_publishes_during_the_scan(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process starting up while another takes a lease and publishes leaves the entry whole."""
    leader = DiskCacheStore(root, clock=FakeClock())
    leader.prepare()
    await put(leader, "k", OLD)
    publish = PausedPublish(monkeypatch)
    starter = DiskCacheStore(root, clock=FakeClock())
    tmp_scanned = threading.Event()
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        # The starter has tidied tmp/ (nobody led "k" then); it scans the entries only once
        # the leader's commit is between its two renames.
        if self == root / "entries":
            tmp_scanned.set()
            publish.paused.wait(THREAD_WAIT)
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)

    async def start_up() -> None:
        await trio.to_thread.run_sync(starter.prepare)
        publish.resume.set()

    published: list[EntryMeta] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_up)
        await trio.to_thread.run_sync(tmp_scanned.wait, THREAD_WAIT, abandon_on_cancel=True)
        lead = leader.leases.acquire("k")
        assert isinstance(lead, Lead)
        try:
            with trio.fail_after(THREAD_WAIT):  # e.g. if the commit waited for its own lease
                await put_into(published, leader, "k", NEW)
        finally:
            lead.release()
    await assert_serves(root, "k", published[0], NEW)


async def test_prepare_spares_an_entry_published_without_a_lease(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process starting while another's unleased commit is between its renames spares it."""
    writer = DiskCacheStore(root, clock=FakeClock())
    writer.prepare()
    await put(writer, "k", OLD)
    publish = PausedPublish(monkeypatch)
    published: list[EntryMeta] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_into, published, writer, "k", NEW)
        await publish.wait_paused()
        DiskCacheStore(root, clock=FakeClock()).prepare()
        publish.resume.set()
    await assert_serves(root, "k", published[0], NEW)


async def test_an_unleased_commit_waits_while_another_process_holds_the_key(
    disk: DiskCacheStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing waits, without blocking the event loop, until the key's lease is free."""
    held = DiskCacheStore(root).leases.claim(key_digest("k"))
    assert held is not None
    refusals: list[str] = []
    refused_twice = trio.Event()
    real_claim = disk.leases.claim

    def claim(digest: str) -> Lead | None:
        lease = real_claim(digest)
        if lease is None:
            refusals.append(digest)
            if len(refusals) == 2:
                refused_twice.set()
        return lease

    monkeypatch.setattr(disk.leases, "claim", claim)
    published: list[EntryMeta] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_into, published, disk, "k", NEW)
        # Real clock: the autojump clock would fire this deadline while the writer's threads run.
        with trio.fail_after(THREAD_WAIT):
            await refused_twice.wait()  # it retried, and still waits
        assert published == []
        assert await disk.lookup("k") is None
        held.release()
    await assert_serves(root, "k", published[0], NEW)


async def test_expired_entry_files_are_kept_for_revalidation(root: Path) -> None:
    """An expired entry is a miss for lookup but stays on disk for lookup_stale (the sweep
    removes expired entries)."""
    clock = FakeClock()
    disk = DiskCacheStore(root, clock=clock)
    disk.prepare()
    entry = await put(disk, "k", OLD, ttl=5.0)
    before = files_under(root)
    clock.now = START + 5.0
    assert await disk.lookup("k") is None
    assert files_under(root) == before
    assert await disk.lookup_stale("k") == entry


async def test_metadata_of_another_key_is_not_served(disk: DiskCacheStore) -> None:
    """Metadata recording a different key (a digest collision) is a miss for this key."""
    entry = await put(disk, "k", OLD)
    path = meta_path(disk, entry)
    stored = json.loads(path.read_bytes())
    stored["key"] = "another key"
    path.write_text(json.dumps(stored))
    assert await disk.lookup("k") is None


async def test_unreadable_metadata_is_a_miss_not_an_error(
    disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup hitting EACCES logs and returns None instead of failing the request."""
    await put(disk, "k", OLD)

    def refuse(path: Path, mode: str) -> NoReturn:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("resizer.cache.disk.open", refuse, raising=False)
    assert await disk.lookup("k") is None


async def test_deleted_entry_leaves_no_files(disk: DiskCacheStore) -> None:
    """delete removes both the metadata and the data file."""
    await put(disk, "k", OLD)
    await disk.delete("k")
    assert files_under(disk.root) == set()


async def test_fsync_mode_publishes_the_same_way(root: Path) -> None:
    """With fsync=True entries round-trip and leave the same files."""
    disk = DiskCacheStore(root, fsync=True, clock=FakeClock())
    disk.prepare()
    await put(disk, "k", OLD)
    entry = await put(disk, "k", NEW)
    assert await disk.lookup("k") == entry
    assert await read(disk, entry, 100, 6000, chunk_size=999) == NEW[100:6000]
    assert files_under(root) == entry_files(disk, entry)


async def test_recall_answers_only_for_entries_lookup_validated(disk: DiskCacheStore) -> None:
    """recall() knows an entry once lookup() read it, and forgets it when it is replaced."""
    entry = await put(disk, "k", OLD)
    assert disk.recall("k") is None  # never looked up: recall does no reading of its own
    assert await disk.lookup("k") == entry
    assert disk.recall("k") == entry
    newer = await put(disk, "k", NEW)
    assert disk.recall("k") is None  # the metadata file was replaced
    assert await disk.lookup("k") == newer
    assert disk.recall("k") == newer


async def test_recall_forgets_deleted_and_expired_entries(root: Path) -> None:
    """A recalled entry is dropped when deleted (by any process) or once its TTL passes."""
    clock = FakeClock()
    disk = DiskCacheStore(root, clock=clock)
    disk.prepare()
    other_process = DiskCacheStore(root, clock=clock)
    await put(disk, "gone", OLD)
    await put(disk, "old", OLD)  # put() stores a 60 s TTL
    assert await disk.lookup("gone") is not None
    assert await disk.lookup("old") is not None
    await other_process.delete("gone")
    assert disk.recall("gone") is None
    clock.now += 61
    assert disk.recall("old") is None
    assert await disk.lookup("old") is None


async def test_recall_is_bounded(disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the most recently used entries are remembered."""
    monkeypatch.setattr("resizer.cache.disk._RECENT_ENTRIES", 2)
    for key in ("a", "b", "c"):
        await put(disk, key, OLD)
        assert await disk.lookup(key) is not None
    assert [disk.recall(key) is not None for key in ("a", "b", "c")] == [False, True, True]


@pytest.mark.parametrize(
    "failure",
    [BlockingIOError(errno.EAGAIN, "not cached"), OSError(errno.EOPNOTSUPP, "unsupported")],
)
async def test_reads_that_would_block_go_to_a_thread(
    disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch, failure: OSError
) -> None:
    """When the page cache cannot answer without blocking, chunks are read in a thread."""
    entry = await put(disk, "k", OLD)
    threaded: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counting_run_sync(fn: Callable[..., bytes], *args: object) -> bytes:
        threaded.append(fn)
        return await run_sync(fn, *args)

    def refuse(*args: object) -> NoReturn:
        raise failure

    monkeypatch.setattr("resizer.cache.disk._nowait_reads", True)  # restored afterwards
    monkeypatch.setattr(os, "preadv", refuse)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    assert await read(disk, entry, 10, 4010, chunk_size=1000) == OLD[10:4010]
    assert threaded == [os.pread] * 4


async def test_cached_reads_stay_in_the_event_loop(
    disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of a file in the page cache are read without worker threads (Linux)."""
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("preadv(RWF_NOWAIT) is Linux-only")
    entry = await put(disk, "k", OLD)
    await read(disk, entry)  # now surely in the page cache

    async def no_threads(*args: object) -> NoReturn:
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    assert await read(disk, entry, 0, 5000, chunk_size=999) == OLD
