"""Integration: the priority scheduler through the real server (HTTP), and across workers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from resizer.options import Mode, TransformOptions
from resizer.scheduling.queue import Priority
from resizer.transform.base import MediaInfo, MediaInput
from resizer.transform.fake import FakeOutput, FakeTransformer
from tests.media import make_test_video
from tests.server import server_config, server_config_text, start_server
from tests.test_http_coalescing import poll_until
from tests.test_workers import running_supervised

pytestmark = pytest.mark.integration

ONE_SLOT = """
[limits]
max_concurrent_transforms = 1
[scheduling]
aging = "1h"
max_queue = 20
"""


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    make_test_video(folder / "clip.mp4", 320, 240, seconds=2)
    return folder


@dataclass
class HeldVideos(FakeTransformer):
    """Video runs hold their slot until the test releases their width; frames run at once.
    ``granted`` lists the runs in the order they got a slot."""

    holds: dict[int, trio.Event] = field(default_factory=dict)
    granted: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def open_output(
        self, source: MediaInput, info: MediaInfo, options: TransformOptions
    ) -> AsyncIterator[FakeOutput]:
        if options.mode is Mode.FRAME:
            self.granted.append("frame")
        else:
            assert options.width is not None
            self.granted.append(f"video {options.width}")
            await self.holds.setdefault(options.width, trio.Event()).wait()
        async with super().open_output(source, info, options) as out:
            yield out


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(20):
        await poll_until(predicate)


async def test_a_frame_goes_before_ten_queued_low_transcodes(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """One slot, held by a transcode; ten prefetch transcodes (low) queue behind it; a frame
    request (high) arriving last gets the slot next and is answered while the ten wait."""
    fake = HeldVideos(size=5_000)
    config = server_config(media, tmp_path / "cache", ONE_SLOT)
    server = await start_server(nursery, config, fake)
    scheduler = server.service.scheduler
    answers: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def get(name: str, query: str, headers: dict[str, str] | None = None) -> None:
            response = await client.get(f"/videos/clip.mp4?{query}", headers=headers)
            answers[name] = response.status_code

        async with trio.open_nursery() as clients:
            clients.start_soon(get, "first", "width=100")
            await until(lambda: fake.granted == ["video 100"])
            for width in range(110, 210, 10):
                prefetch = {"Sec-Purpose": "prefetch"}
                clients.start_soon(get, f"low {width}", f"width={width}", prefetch)
            await until(lambda: scheduler.snapshot().waiting[Priority.LOW] == 10)
            clients.start_soon(get, "frame", "mode=frame&time=1s&width=64")
            await until(lambda: scheduler.snapshot().waiting[Priority.HIGH] == 1)
            fake.holds[100].set()
            await until(lambda: "frame" in answers)
            assert answers["frame"] == 200
            assert fake.granted[:2] == ["video 100", "frame"]
            assert scheduler.snapshot().waiting[Priority.LOW] >= 9  # the ten still wait
            for width in range(110, 210, 10):
                fake.holds.setdefault(width, trio.Event()).set()
    assert set(answers.values()) == {200}
    assert len(answers) == 12


async def test_a_new_key_beyond_the_queue_bound_gets_503_with_retry_after(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """max_queue = 1: with the slot busy and one run waiting, a third key is refused with a
    JSON 503 and Retry-After; the waiting one is served once the slot frees."""
    fake = HeldVideos(size=5_000)
    extra = '[limits]\nmax_concurrent_transforms = 1\n[scheduling]\naging = "30s"\nmax_queue = 1'
    server = await start_server(nursery, server_config(media, tmp_path / "cache", extra), fake)
    scheduler = server.service.scheduler
    answers: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def get(width: int) -> None:
            answers[str(width)] = await client.get(f"/videos/clip.mp4?width={width}")

        async with trio.open_nursery() as clients:
            clients.start_soon(get, 100)
            await until(lambda: fake.granted == ["video 100"])
            clients.start_soon(get, 110)
            await until(lambda: sum(scheduler.snapshot().waiting.values()) == 1)
            refused = await client.get("/videos/clip.mp4?width=120")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "30"
            assert refused.json()["error"] == "unavailable"
            fake.holds[100].set()
            fake.holds.setdefault(110, trio.Event()).set()
    assert answers["100"].status_code == answers["110"].status_code == 200


def ffmpeg_descendants(pid: int) -> list[int]:
    """ffmpeg processes anywhere below ``pid`` (the supervisor: its workers' children)."""
    children: dict[int, list[int]] = {}
    names: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        names[int(entry)] = raw[raw.index(b"(") + 1 : raw.rindex(b")")]
        parent = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            if b"ffmpeg" in names.get(child, b""):
                found.append(child)
    return found


async def test_two_workers_never_run_more_ffmpeg_than_the_machines_slots(
    media: Path, tmp_path: Path
) -> None:
    """Two workers, one slot for the machine: eight different misses spread over both
    workers (a new connection each) never have two ffmpeg processes at once, and all
    succeed."""
    slot = "[limits]\nmax_concurrent_transforms = 1"
    config = server_config_text(media, tmp_path / "cache", slot)
    most = 0
    statuses: list[int] = []
    async with running_supervised(config, tmp_path) as server:

        async def get(width: int) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                response = await client.get(f"/videos/clip.mp4?width={width}&compression=low")
                statuses.append(response.status_code)

        async with trio.open_nursery() as clients:
            for width in range(96, 224, 16):
                clients.start_soon(get, width)
            while len(statuses) < 8:
                most = max(most, len(ffmpeg_descendants(server.process.pid)))
                await trio.sleep(0.005)
    assert statuses == [200] * 8
    assert most == 1, f"{most} ffmpeg processes ran at once with one slot"
