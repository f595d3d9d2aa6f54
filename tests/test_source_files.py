"""The shared cache of downloaded source files."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from resizer.cache.sources import SourceFileCache
from resizer.sources.base import SourceStat
from resizer.sources.fake import FakeSource, Script

STAT = SourceStat(size=6000, mtime=1.0)


def make(
    tmp_path: Path, max_bytes: int = 1 << 20, script: Script | None = None
) -> tuple[SourceFileCache, FakeSource]:
    spill = tmp_path / "spill"
    spill.mkdir()
    objects = {name: name.encode() * 1000 for name in ("a.mp4", "b.mp4", "c.mp4")}
    source = FakeSource(spill, objects, {name: script or Script() for name in objects})
    files = SourceFileCache(tmp_path / "files", max_bytes)
    files.prepare()
    return files, source


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_a_source_is_downloaded_once_for_every_variant(tmp_path: Path) -> None:
    """Opening the same object twice reuses the first download, bytes intact."""
    files, source = make(tmp_path)
    async with files.open(source, "a.mp4", STAT) as first:
        first_bytes = first.path.read_bytes()
    async with files.open(source, "a.mp4", STAT) as second:
        assert second.path.read_bytes() == first_bytes == b"a.mp4" * 1000
    assert (source.opens, files.downloads, files.reuses) == (1, 1, 1)
    assert names(tmp_path / "spill") == []  # the source's own temp file is gone


async def test_changed_validators_download_again(tmp_path: Path) -> None:
    """A new Last-Modified or size is a new object: it is fetched again."""
    files, source = make(tmp_path)
    for mtime in (1.0, 2.0):
        async with files.open(source, "a.mp4", SourceStat(6000, mtime)):
            pass
    assert source.opens == 2


async def test_concurrent_openers_share_one_download(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Five variants starting together cause one download."""
    files, source = make(tmp_path, script=Script(stall=1.0))
    sizes: list[int] = []

    async def variant() -> None:
        async with files.open(source, "a.mp4", STAT) as local:
            sizes.append(local.size)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(variant)
    assert (source.opens, sizes) == (1, [5000] * 5)


async def test_a_cancelled_downloader_hands_over_to_the_next_opener(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The first opener leaves mid-download; a waiting one downloads itself; nothing leaks."""
    files, source = make(tmp_path, script=Script(stall=1.0))
    got: list[bytes] = []

    async def patient() -> None:
        async with files.open(source, "a.mp4", STAT) as local:
            got.append(local.path.read_bytes())

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.5):
            nursery.start_soon(patient)
            async with files.open(source, "a.mp4", STAT):
                raise AssertionError("the stalled download finished early")
    assert got == [b"a.mp4" * 1000]
    assert source.opens == 2
    assert len(names(files.folder)) == 1
    assert names(tmp_path / "spill") == []


def test_start_up_removes_only_the_folders_of_dead_processes(tmp_path: Path) -> None:
    """Another live process's downloads survive our start-up; a dead one's are removed."""
    live = tmp_path / "files" / f"{os.getppid()}-aaaa"
    dead = tmp_path / "files" / "999999999-bbbb"
    for folder in (live, dead):
        folder.mkdir(parents=True)
        (folder / "x.mp4").write_bytes(b"x")
    files, _ = make(tmp_path)
    assert (live / "x.mp4").exists()
    assert not dead.exists()
    assert files.folder.is_dir()


async def test_least_recently_used_unread_files_are_evicted(tmp_path: Path) -> None:
    """Over the byte budget, the oldest file nobody reads goes; one being read stays."""
    files, source = make(tmp_path, max_bytes=10_000)
    async with files.open(source, "a.mp4", STAT) as held:
        async with files.open(source, "b.mp4", STAT):
            pass
        async with files.open(source, "c.mp4", STAT):
            pass
        assert held.path.exists()  # a (in use) stays even though it is the oldest
    assert files.total_bytes <= 10_000
    async with files.open(source, "c.mp4", STAT):
        pass
    assert files.reuses >= 1
    assert len(names(files.folder)) == 2
