"""Integration: one transcode per key, over HTTP against the real server.

Identical concurrent misses, late joiners, clients leaving, the in-flight limit, ranges of
output still being produced, and several server processes sharing one disk cache.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from resizer.options import cache_key, parse_options
from resizer.transform.fake import FakeTransformer, fake_output
from tests.media import ffmpeg_banner, make_test_video
from tests.server import RunningServer, scrape, server_config, server_config_text, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"  # 640x360, 6 s, with audio: long enough to join while it runs


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("coalescing-media")
    make_test_video(folder / "clip.mp4", 640, 360, seconds=6, audio=True)
    return folder


async def poll_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate``: state in another process (or a counter) has no event to wait on."""
    while True:
        if predicate():
            return
        await trio.sleep(0.01)


def ffmpeg_children() -> list[int]:
    """Pids of ffmpeg processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # it exited meanwhile
        comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")]
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and b"ffmpeg" in comm:
            found.append(int(entry))
    return found


def metric(server: RunningServer, name: str) -> float:
    """The current value of one of the server's counters (e.g. ``transforms``)."""
    return float(getattr(server.service.metrics, name)._value.get())


async def test_twenty_identical_misses_cost_one_fetch_and_one_ffmpeg_run(
    clips: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """20 concurrent requests for one uncached key: 1 origin fetch, 1 ffmpeg, identical bodies."""
    server = await start_server(nursery, server_config(clips, tmp_path / "cache"))
    results: list[tuple[int, str, bytes]] = []
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

        async def fetch() -> None:
            response = await client.get(f"{CLIP}?width=320")
            results.append(
                (response.status_code, response.headers["X-Cache-Status"], response.content)
            )

        async with trio.open_nursery() as clients:
            for _ in range(20):
                clients.start_soon(fetch)
    statuses = [status for _, status, _ in results]
    assert {code for code, _, _ in results} == {200}
    assert statuses.count("MISS") == 1
    assert set(statuses) <= {"MISS", "COALESCED", "HIT"}
    assert metric(server, "origin_fetches") == 1
    assert metric(server, "transforms") == 1
    assert metric(server, "coalesced") == statuses.count("COALESCED") >= 10
    bodies = {body for _, _, body in results}
    assert len(bodies) == 1
    assert "320x180" in ffmpeg_banner_of(bodies.pop(), tmp_path)


def ffmpeg_banner_of(data: bytes, tmp_path: Path) -> str:
    target = tmp_path / "out.mp4"
    target.write_bytes(data)
    return ffmpeg_banner(target)


async def test_a_late_joiner_gets_the_whole_body(
    clips: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A request arriving mid-transcode gets every byte from 0, while the first keeps going."""
    server = await start_server(nursery, server_config(clips, tmp_path / "cache"))
    url = f"{CLIP}?width=480"
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
        client.stream("GET", url) as first,
    ):
        assert first.headers["X-Cache-Status"] == "MISS"
        chunks = first.aiter_raw()
        head = await chunks.__anext__()
        # The first client does not read while the late one is served: it must not matter.
        late = await client.get(url)
        rest = b"".join([chunk async for chunk in chunks])
    assert late.headers["X-Cache-Status"] == "COALESCED"
    assert late.content == head + rest
    assert metric(server, "transforms") == 1
    assert "480x270" in ffmpeg_banner_of(late.content, tmp_path)


async def test_the_only_client_leaving_stops_ffmpeg_within_a_second(
    clips: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Disconnecting mid-body: ffmpeg gone within 1 s, no entry; the next request is a MISS."""
    server = await start_server(nursery, server_config(clips, tmp_path / "cache"))
    # Slow to produce (veryslow preset, big frames), so it is surely still running.
    url = f"{CLIP}?width=640&compression=high"
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        async with client.stream("GET", url) as response:
            async for _ in response.aiter_raw():
                break
            assert ffmpeg_children(), "ffmpeg should be running mid-body"
        left_at = trio.current_time()
        with trio.fail_after(1.0):
            await poll_until(lambda: not ffmpeg_children())
        gone_after = trio.current_time() - left_at
        print(f"disconnect -> ffmpeg exit: {gone_after:.3f} s")  # the closing note quotes it
        with trio.fail_after(5):
            # The Work leaves the registry when cancelled; its clean-up ends with its task.
            await poll_until(lambda: not server.service.registry._nursery.child_tasks)
        assert not list((tmp_path / "cache" / "tmp").iterdir())
        assert await server.service.cache.lookup(_only_key(url)) is None
        again = await client.get(url)
    assert again.headers["X-Cache-Status"] == "MISS"
    assert "640x360" in ffmpeg_banner_of(again.content, tmp_path)
    assert metric(server, "stream_aborts") == 1


def _only_key(url: str) -> str:
    path, _, query = url.partition("?")
    params = dict(pair.split("=") for pair in query.split("&"))
    return cache_key(path, parse_options(params))


async def test_one_of_two_leaving_does_not_disturb_the_other(
    clips: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Client A leaves mid-body; B gets a complete, decodable video; the next request HITs."""
    server = await start_server(nursery, server_config(clips, tmp_path / "cache"))
    url = f"{CLIP}?width=400"
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        async with client.stream("GET", url) as stayer:
            async with client.stream("GET", url) as leaver:
                async for _ in leaver.aiter_raw():
                    break
            assert leaver.headers["X-Cache-Status"] == "COALESCED"
            body = await stayer.aread()
        hit = await client.get(url)
    assert hit.headers["X-Cache-Status"] == "HIT"
    assert hit.content == body
    assert "400x224" in ffmpeg_banner_of(body, tmp_path)
    assert metric(server, "transforms") == 1
    assert metric(server, "stream_aborts") == 1


async def test_new_keys_beyond_the_in_flight_limit_get_503(
    clips: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """With max_concurrent_origins = 1, a second key waits, then 503; joining is always free."""
    gate = trio.Event()
    fake = FakeTransformer(gate=gate)
    extra = '[limits]\nmax_concurrent_origins = 1\norigin_queue_timeout = "300ms"'
    server = await start_server(nursery, server_config(clips, tmp_path / "cache", extra), fake)
    responses: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

        async def fetch(url: str) -> None:
            responses.append(await client.get(url))

        async with trio.open_nursery() as clients:
            clients.start_soon(fetch, f"{CLIP}?width=320")
            await fake.wait_started()
            refused = await client.get(f"{CLIP}?width=240")
            clients.start_soon(fetch, f"{CLIP}?width=320")  # attaches: needs no slot
            with trio.fail_after(10):
                await poll_until(lambda: metric(server, "coalesced") == 1)
            gate.set()
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"] == "unavailable"
        assert sorted(r.headers["X-Cache-Status"] for r in responses) == ["COALESCED", "MISS"]
        assert fake.runs_started == 1
        assert server.service.origin_limiter.borrowed_tokens == 0
        later = await client.get(f"{CLIP}?width=240")
    assert (later.status_code, later.headers["X-Cache-Status"]) == (200, "MISS")


async def test_ranges_of_a_key_in_flight_come_from_its_output(
    clips: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Range requests during a miss: a closed range is a 206 from the spool (size unknown:
    ``/*``); ``bytes=0-`` is the live stream as a 200; ``a-`` and a suffix wait for the end
    (a 206 never ends before the output does); no second run."""
    release = trio.Event()

    async def hold_after_five(index: int) -> None:
        if index >= 5:
            await release.wait()

    fake = FakeTransformer(size=50_000, chunk_size=1_000, before_chunk=hold_after_five)
    server = await start_server(nursery, server_config(clips, tmp_path / "cache"), fake)
    url = f"{CLIP}?width=320"
    expected = fake_output(parse_options({"width": "320"}), 50_000)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
        trio.open_nursery() as clients,
    ):
        full: list[httpx.Response] = []

        async def fetch_full() -> None:
            full.append(await client.get(url))

        clients.start_soon(fetch_full)
        await fake.wait_started()
        head = await client.get(url, headers={"Range": "bytes=0-99"})
        assert head.status_code == 206
        assert head.headers["Content-Range"] == "bytes 0-99/*"
        assert head.content == expected[:100]
        ranged: list[httpx.Response] = []

        async def fetch_range(spec: str) -> None:
            ranged.append(await client.get(url, headers={"Range": spec}))

        clients.start_soon(fetch_range, "bytes=20000-20999")  # not produced yet: waits
        clients.start_soon(fetch_range, "bytes=-100")  # needs the total: waits for the end
        clients.start_soon(fetch_range, "bytes=1000-")  # produced, but open-ended: the end
        live: list[httpx.Response] = []
        live_body = bytearray()

        async def fetch_everything() -> None:
            async with client.stream("GET", url, headers={"Range": "bytes=0-"}) as response:
                live.append(response)
                async for data in response.aiter_bytes():
                    live_body.extend(data)

        clients.start_soon(fetch_everything)  # everything: streams live at once
        with trio.fail_after(10):  # all attached to the Work (coalesced); only 0- answered
            await poll_until(lambda: metric(server, "coalesced") == 5)
            await poll_until(lambda: len(live) == 1)
        assert not ranged
        assert live[0].status_code == 200
        assert "Content-Range" not in live[0].headers
        assert live[0].headers["Accept-Ranges"] == "bytes"
        release.set()
    assert bytes(live_body) == expected  # read to the end once the Work went on
    by_range = {r.headers["Content-Range"]: r.content for r in ranged}
    assert by_range == {
        "bytes 20000-20999/*": expected[20000:21000],
        "bytes 49900-49999/50000": expected[-100:],
        "bytes 1000-49999/50000": expected[1000:],
    }
    assert {r.status_code for r in ranged} == {206}
    assert full[0].content == expected
    assert fake.runs_started == 1


# --- several processes sharing one disk cache --------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def two_server_processes(clips: Path, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two ``resizer serve`` processes on one disk cache, like two hypercorn workers."""
    config = tmp_path / "resizer.toml"
    config.write_text(server_config_text(clips, tmp_path / "cache"))
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(  # noqa: ASYNC220 - started and stopped around the test, not awaited
            [sys.executable, "-m", "resizer", "serve", "--config", str(config), "--port", str(p)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        async with httpx.AsyncClient(timeout=1) as client:
            for url in urls:
                with trio.fail_after(30):
                    while True:
                        try:
                            if (await client.get(f"{url}/healthz")).status_code == 200:
                                break
                        except httpx.TransportError:
                            await trio.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


async def test_two_processes_sharing_a_cache_transcode_once(
    two_server_processes: list[str], tmp_path: Path
) -> None:
    """Identical misses spread over two server processes: one ffmpeg run between them."""
    results: list[tuple[str, bytes]] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def fetch(base: str) -> None:
            response = await client.get(f"{base}{CLIP}?width=352&compression=high")
            assert response.status_code == 200
            results.append((response.headers["X-Cache-Status"], response.content))

        async with trio.open_nursery() as clients:
            for index in range(12):
                clients.start_soon(fetch, two_server_processes[index % 2])
        metrics = [(await client.get(f"{base}/metrics")).text for base in two_server_processes]
    assert sum(scrape(text, "resizer_transforms_total") for text in metrics) == 1
    assert sum(scrape(text, "resizer_lease_follows_total") for text in metrics) == 1
    assert len({body for _, body in results}) == 1
    assert "352x198" in ffmpeg_banner_of(results[0][1], tmp_path)
    assert not [p for p in (tmp_path / "cache" / "tmp").iterdir()]
