"""Integration: the real server on a free port, the real ffmpeg, spoken to over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from resizer.config import load_config
from resizer.transform.fake import FakeTransformer
from resizer.transform.probe import parse_probe_output
from tests.media import ffmpeg_banner, ffmpeg_exe, make_test_video
from tests.server import RunningServer, server_config, server_config_text, start_server

pytestmark = pytest.mark.integration

LANDSCAPE = "/videos/landscape.mp4"  # 320x240, 2 s, with audio
PORTRAIT = "/videos/clips/portrait.mp4"  # 240x320, 2 s, no audio


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    make_test_video(folder / "landscape.mp4", 320, 240, seconds=2, audio=True)
    (folder / "clips").mkdir()
    make_test_video(folder / "clips" / "portrait.mp4", 240, 320, seconds=2, audio=False)
    (folder / "notes.mp4").write_text("this is not a video\n" * 50)
    # An audio-only file: decodable media without a video stream (415).
    subprocess.run(
        [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=1",
            "-c:a",
            "aac",
            str(folder / "song.m4a"),
        ],
        check=True,
    )
    (tmp_path_factory.getbasetemp() / "secret.mp4").write_text("outside the root")
    return folder


@pytest.fixture
async def server(media: Path, tmp_path: Path, nursery: trio.Nursery) -> RunningServer:
    return await start_server(nursery, server_config(media, tmp_path / "cache"))


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        yield client


def describe(data: bytes, tmp_path: Path, name: str = "out.mp4") -> str:
    target = tmp_path / name
    target.write_bytes(data)
    return ffmpeg_banner(target)


async def test_resize_then_hit_is_byte_identical(client: httpx.AsyncClient, tmp_path: Path) -> None:
    """A miss transcodes to a 160-wide H.264/AAC MP4; the repeat is a byte-identical HIT."""
    first = await client.get(LANDSCAPE, params={"width": "160"})
    assert first.status_code == 200, first.text
    assert first.headers["X-Cache-Status"] == "MISS"
    assert first.headers["Content-Type"] == "video/mp4"
    assert first.headers["X-Origin"] == "videos"
    assert first.headers["X-Source"] == "filesystem"
    info = parse_probe_output(describe(first.content, tmp_path))
    assert (info.video_codec, info.width, info.height, info.has_audio) == ("h264", 160, 120, True)
    assert info.duration_ms is not None
    assert abs(info.duration_ms - 2000) < 200

    second = await client.get(LANDSCAPE, params={"width": "160", "utm_source": "newsletter"})
    assert second.status_code == 200
    assert second.headers["X-Cache-Status"] == "HIT"
    assert second.content == first.content
    assert second.headers["Content-Length"] == str(len(first.content))
    assert second.headers["Accept-Ranges"] == "bytes"
    assert second.headers["ETag"].startswith('"')
    assert "Last-Modified" in second.headers
    assert second.headers["Cache-Control"].startswith("public, max-age=")


async def test_source_without_audio_gives_output_without_audio(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """No audio track in, no audio track out; height alone keeps the aspect, evenly."""
    response = await client.get(PORTRAIT, params={"height": "101"})
    assert response.status_code == 200, response.text
    info = parse_probe_output(describe(response.content, tmp_path))
    assert not info.has_audio
    assert info.height % 2 == 0
    assert info.width % 2 == 0
    assert abs(info.height - 101) <= 1
    assert abs(info.width - 76) <= 1


@pytest.mark.parametrize(("fmt", "magic"), [("jpg", b"\xff\xd8\xff"), ("png", b"\x89PNG")])
async def test_frame_mode_returns_an_image(
    client: httpx.AsyncClient, tmp_path: Path, fmt: str, magic: bytes
) -> None:
    """mode=frame returns a still of the requested size and format."""
    response = await client.get(
        LANDSCAPE, params={"mode": "frame", "time": "1s", "width": "100", "format": fmt}
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == {"jpg": "image/jpeg", "png": "image/png"}[fmt]
    assert response.content.startswith(magic)
    banner = describe(response.content, tmp_path, f"frame.{fmt}")
    assert re.search(r"Video: .*, 100x75\b", banner), banner


async def test_frame_past_the_end_is_the_last_frame(client: httpx.AsyncClient) -> None:
    """A frame time beyond the source's end still gives an image, not an error."""
    response = await client.get(LANDSCAPE, params={"mode": "frame", "time": "9s"})
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"\xff\xd8\xff")


async def test_byte_ranges_on_a_hit(client: httpx.AsyncClient) -> None:
    """Closed, open and suffix ranges give 206 with exact Content-Range; bad ones 416 or 200."""
    url = f"{LANDSCAPE}?width=120"
    full = (await client.get(url)).content
    size = len(full)
    cases = {
        "bytes=0-99": (0, 100),
        "bytes=100-": (100, size),
        "bytes=-500": (size - 500, size),
        f"bytes={size - 10}-{size + 100}": (size - 10, size),
    }
    for header, (start, stop) in cases.items():
        response = await client.get(url, headers={"Range": header})
        assert response.status_code == 206, header
        assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
        assert response.headers["Content-Length"] == str(stop - start)
        assert response.content == full[start:stop]

    unsatisfiable = await client.get(url, headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{size}"
    assert unsatisfiable.json()["status"] == 416

    malformed = await client.get(url, headers={"Range": "bytes=zebra"})
    assert malformed.status_code == 200
    assert malformed.content == full

    stale = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200
    assert stale.content == full


async def test_head_and_conditional_requests(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    """HEAD on a miss costs no transcode; on a hit it has the length; If-None-Match gives 304."""
    url = f"{LANDSCAPE}?width=140"
    head_miss = await client.head(url)
    assert head_miss.status_code == 200
    assert head_miss.headers["X-Cache-Status"] == "MISS"
    assert head_miss.headers["Content-Type"] == "video/mp4"
    assert head_miss.content == b""
    assert "Content-Length" not in head_miss.headers  # unknown until transcoded, not 0
    assert server.service.metrics.transforms._value.get() == 0

    body = (await client.get(url)).content
    head_hit = await client.head(url)
    assert head_hit.headers["X-Cache-Status"] == "HIT"
    assert head_hit.headers["Content-Length"] == str(len(body))
    assert head_hit.content == b""

    etag = head_hit.headers["ETag"]
    not_modified = await client.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["ETag"] == etag
    changed = await client.get(url, headers={"If-None-Match": '"something-else"'})
    assert changed.status_code == 200
    assert changed.content == body


@pytest.mark.parametrize(
    ("target", "status", "code", "mentions"),
    [
        (f"{LANDSCAPE}?width=5000", 400, "invalid_option", "width"),
        (f"{LANDSCAPE}?mode=gif", 400, "invalid_option", "video, frame"),
        (f"{LANDSCAPE}?mode=frame&time=later", 400, "invalid_option", "time"),
        ("/videos/missing.mp4", 404, "source_not_found", "missing.mp4"),
        ("/elsewhere/landscape.mp4", 404, "no_origin", "origin"),
        ("/videos/../secret.mp4", 404, None, ""),
        ("/videos/%2e%2e/secret.mp4", 404, None, ""),
        ("/videos/clips/%252e%252e/%252e%252e/secret.mp4", 404, None, ""),
        ("/videos/notes.mp4", 422, "undecodable_source", ""),
        ("/videos/song.m4a", 415, "unsupported_media", ""),
    ],
)
async def test_errors_are_json_and_leave_the_service_healthy(
    client: httpx.AsyncClient, target: str, status: int, code: str | None, mentions: str
) -> None:
    """Bad input gets a JSON error with the right status, no-store, and no traceback."""
    response = await client.get(target)
    assert response.status_code == status, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["status"] == status
    if code is not None:
        assert body["error"] == code
    assert mentions in body["message"]
    assert "Traceback" not in response.text
    assert (await client.get("/healthz")).status_code == 200


async def test_metrics_count_requests_hits_and_misses(client: httpx.AsyncClient) -> None:
    """/metrics exposes request, cache-hit and cache-miss counters in Prometheus text."""
    await client.get(f"{LANDSCAPE}?width=100")
    await client.get(f"{LANDSCAPE}?width=100")
    text = (await client.get("/metrics")).text
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(samples["resizer_cache_hits_total"]) == 1
    assert float(samples["resizer_cache_misses_total"]) == 1
    assert float(samples['resizer_requests_total{method="GET",status="200"}']) == 2
    assert float(samples["resizer_transforms_total"]) == 1
    # Both bodies streamed and gave their chunks back to the stream budget.
    assert float(samples["resizer_stream_budget_bytes"]) == 0
    assert float(samples["resizer_streams_waiting_for_budget"]) == 0
    assert float(samples["resizer_stream_budget_overdrafts_total"]) == 0


async def test_connection_close_request_gets_a_closed_socket(server: RunningServer) -> None:
    """A request with Connection: close is answered and the socket closed (no client hang)."""
    stream = await trio.open_tcp_stream(server.host, server.port)
    request = f"GET /healthz HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n\r\n"
    await stream.send_all(request.encode())
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    assert received.startswith(b"HTTP/1.1 200")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {"status": "ok"}


def open_sockets() -> int:
    """Sockets this process holds (the in-process server's and the test's own)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


async def test_a_keep_alive_connection_closed_by_the_client_is_released_at_once(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The server closes its end as soon as an idle keep-alive client hangs up, not only
    when the keep-alive timer fires (hypercorn held the descriptor for that long)."""
    # A memory cache: no hit layer, so hypercorn keeps the connection alive after /healthz
    # (with the layer, a connection it hands over is closed after that answer).
    config = load_config(
        text=server_config_text(media, tmp_path / "cache").replace(
            'backend = "disk"', 'backend = "memory"'
        ),
        env={},
    )
    server = await start_server(nursery, config)
    assert server.service.config.server.keep_alive_timeout >= 5
    before = open_sockets()
    stream = await trio.open_tcp_stream(server.host, server.port)
    await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
    received = b""
    with trio.fail_after(10):
        while not received.endswith(b"}"):
            received += await stream.receive_some(65536)
    await trio.sleep(0.2)  # idle: the server's keep-alive timer runs
    assert open_sockets() == before + 2  # both ends, the connection kept alive
    await stream.aclose()
    with trio.fail_after(2):
        while True:
            if open_sockets() == before:
                break
            await trio.sleep(0.02)


async def test_client_leaving_mid_stream_stops_ffmpeg_and_caches_nothing(
    server: RunningServer, media: Path, tmp_path: Path
) -> None:
    """The only client disconnecting mid-body kills ffmpeg and leaves no cache entry."""
    long_clip = media / "long.mp4"
    if not long_clip.exists():
        make_test_video(long_clip, 640, 360, seconds=20, audio=True)
    url = f"{server.url}/videos/long.mp4?width=600"
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("GET", url) as response:
            assert response.headers["X-Cache-Status"] == "MISS"
            async for _ in response.aiter_raw():
                break  # first bytes arrived: walk away
        (work,) = [w for w in [server.service.registry.get(k) for k in _keys(server)] if w]
        with trio.fail_after(10):
            await work.wait_progress(lambda p: p.state.value != "running")
        assert work.state.value == "failed"
        assert len(server.service.registry) == 0
        assert not list((tmp_path / "cache" / "tmp").iterdir())
        second = await client.get(url)
        assert second.headers["X-Cache-Status"] == "MISS"
        assert second.status_code == 200
    assert server.service.metrics.stream_aborts._value.get() == 1


def _keys(server: RunningServer) -> list[str]:
    return [work.key for work in server.service.registry._works.values()]


async def test_failure_after_headers_aborts_the_connection(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A transform failing mid-body truncates visibly (no clean end) and caches nothing."""
    fake = FakeTransformer(size=50_000, chunk_size=1_000, fail_after=20_000)
    server = await start_server(nursery, server_config(media, tmp_path / "cache"), fake)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(LANDSCAPE)
        fake.fail_after = None
        retry = await client.get(LANDSCAPE)
        assert retry.headers["X-Cache-Status"] == "MISS"
        assert len(retry.content) == 50_000
        assert (await client.get(LANDSCAPE)).headers["X-Cache-Status"] == "HIT"
    assert fake.runs_started == 2
