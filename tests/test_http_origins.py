"""Integration: HTTP origins behind the real server (failover, breakers, TTLs, headers)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.media import make_test_video
from tests.origin import Behaviour, Origin, start_origin
from tests.server import RunningServer, server_config, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 4 s MP4 with its moov atom at the end (ffmpeg's default): not streamable."""
    path = make_test_video(tmp_path_factory.mktemp("origin-media") / "clip.mp4", seconds=4)
    data = path.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat")
    return data


def cdn_origin(*base_urls: str, source_options: str = "", ttl: str = "") -> str:
    """An [[origins]] table named cdn with one http source per base URL, in that order."""
    text = '\n[[origins]]\nname = "cdn"\nmatcher = "^/cdn/(?P<path>.+)$"\n'
    if ttl:
        text += f"ttl = {ttl}\n"
    for priority, base in enumerate(base_urls):
        text += (
            f'[[origins.sources]]\ntype = "http"\nbase_url = "{base}/media/"\n'
            f"priority = {priority}\n{source_options}\n"
        )
    return text


async def start(
    nursery: trio.Nursery, tmp_path: Path, media: Path, extra: str
) -> tuple[RunningServer, httpx.AsyncClient]:
    server = await start_server(nursery, server_config(media, tmp_path / "cache", extra))
    return server, httpx.AsyncClient(base_url=server.url, timeout=30)


async def origin_with(nursery: trio.Nursery, behaviour: Behaviour) -> Origin:
    return await start_origin(nursery, {"/media/clip.mp4": behaviour})


async def test_a_failing_source_falls_over_to_the_next(
    clip_bytes: bytes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """First source answers 500: the second serves a frame near the end of a moov-last MP4."""
    broken = await origin_with(nursery, Behaviour(status=500, body=b"oops"))
    healthy = await origin_with(nursery, Behaviour(body=clip_bytes))
    extra = cdn_origin(broken.url, healthy.url, ttl="{ ok = 3600 }")
    _, client = await start(nursery, tmp_path, tmp_path, extra)
    async with client:
        response = await client.get("/cdn/clip.mp4", params={"mode": "frame", "time": "3.9s"})
        assert response.status_code == 200, response.text
        assert response.content.startswith(b"\xff\xd8\xff")
        assert response.headers["X-Origin"] == "cdn"
        assert response.headers["X-Source"] == "http"
        assert response.headers["Cache-Control"] == "public, max-age=3600"
        hit = await client.get("/cdn/clip.mp4", params={"mode": "frame", "time": "3.9s"})
        assert hit.headers["X-Cache-Status"] == "HIT"
        assert (hit.headers["X-Origin"], hit.headers["X-Source"]) == ("cdn", "http")
        assert 3590 <= int(hit.headers["Cache-Control"].split("=")[1]) <= 3600
    assert ("HEAD", "/media/clip.mp4") in broken.requests
    assert ("GET", "/media/clip.mp4") in healthy.requests


async def test_a_download_failing_after_the_check_falls_over_too(
    clip_bytes: bytes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The first source answers HEAD but fails the GET: the second source's copy is used."""
    flaky = await origin_with(nursery, Behaviour(body=clip_bytes, get_status=500))
    healthy = await origin_with(nursery, Behaviour(body=clip_bytes))
    _, client = await start(nursery, tmp_path, tmp_path, cdn_origin(flaky.url, healthy.url))
    async with client:
        response = await client.get("/cdn/clip.mp4", params={"mode": "frame"})
    assert response.status_code == 200, response.text
    assert ("GET", "/media/clip.mp4") in flaky.requests
    assert ("GET", "/media/clip.mp4") in healthy.requests


@pytest.mark.parametrize(
    ("behaviours", "status", "code"),
    [
        ([Behaviour(status=404), Behaviour(status=410)], 404, "source_not_found"),
        ([Behaviour(status=502), Behaviour(status=404)], 502, "origin_failed"),
        ([Behaviour(status=500), Behaviour(stall_before_headers=True)], 504, "origin_timeout"),
    ],
)
async def test_when_every_source_fails_the_status_says_why(
    tmp_path: Path, nursery: trio.Nursery, behaviours: list[Behaviour], status: int, code: str
) -> None:
    """All not-found: 404; last failure a timeout: 504; otherwise 502 — as JSON errors."""
    origins = [await origin_with(nursery, b) for b in behaviours]
    extra = cdn_origin(*(o.url for o in origins), source_options='first_byte_timeout = "300ms"')
    _, client = await start(nursery, tmp_path, tmp_path, extra)
    async with client:
        response = await client.get("/cdn/clip.mp4", params={"width": "100"})
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.headers["Cache-Control"] == "no-store"


async def test_error_ttls_cache_errors_for_their_class_only(
    clip_bytes: bytes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A 404 is answered again from memory for client_error seconds, without the origin."""
    origin = await origin_with(nursery, Behaviour(status=404))
    extra = cdn_origin(origin.url, ttl="{ ok = 600, client_error = 30, server_error = 5 }")
    _, client = await start(nursery, tmp_path, tmp_path, extra)
    async with client:
        first = await client.get("/cdn/clip.mp4", params={"width": "100"})
        asked = len(origin.requests)
        second = await client.get("/cdn/clip.mp4", params={"width": "100"})
    assert (first.status_code, second.status_code) == (404, 404)
    assert first.headers["Cache-Control"] == "public, max-age=30"
    assert 1 <= int(second.headers["Cache-Control"].split("=")[1]) <= 30
    assert len(origin.requests) == asked  # the second never reached the origin
    assert second.json() == first.json()


async def test_a_breaker_opens_and_answers_503_while_open(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Two failures open the only source's breaker: 503 + Retry-After, trip counted."""
    origin = await origin_with(nursery, Behaviour(status=503))
    options = 'failure_threshold = 2\nreset_timeout = "30s"'
    extra = cdn_origin(origin.url, source_options=options)
    _, client = await start(nursery, tmp_path, tmp_path, extra)
    async with client:
        codes = [(await client.get(f"/cdn/clip.mp4?width={w}")).status_code for w in (100, 110)]
        asked = len(origin.requests)
        refused = await client.get("/cdn/clip.mp4?width=120")
        metrics = (await client.get("/metrics")).text
    assert codes == [502, 502]
    assert refused.status_code == 503
    assert 29 <= int(refused.headers["Retry-After"]) <= 30
    assert len(origin.requests) == asked
    assert 'resizer_circuit_breaker_trips_total{source="cdn.0"} 1.0' in metrics
    assert 'resizer_circuit_breaker_state{source="cdn.0"} 2.0' in metrics


async def test_configured_loopback_origins_work_but_other_private_hosts_do_not(
    clip_bytes: bytes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A source naming 127.0.0.1 is allowed; one naming localhost (same address) is refused."""
    origin = await origin_with(nursery, Behaviour(body=clip_bytes))
    by_name = origin.url.replace("127.0.0.1", "localhost")
    extra = cdn_origin(by_name)
    _, client = await start(nursery, tmp_path, tmp_path, extra)
    async with client:
        refused = await client.get("/cdn/clip.mp4", params={"width": "100"})
    assert refused.status_code == 403
    assert origin.requests == []


async def test_variants_of_one_remote_source_download_it_once(
    clip_bytes: bytes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A size, a frame and a spritesheet of one remote video: one GET of the source."""
    origin = await origin_with(nursery, Behaviour(body=clip_bytes))
    _, client = await start(nursery, tmp_path, tmp_path, cdn_origin(origin.url))
    async with client:
        for params in (
            {"width": "100"},
            {"mode": "frame"},
            {"mode": "spritesheet", "width": "80", "height": "60"},
        ):
            response = await client.get("/cdn/clip.mp4", params=params)
            assert response.status_code == 200, response.text
    assert [r for r in origin.requests if r[0] == "GET"] == [("GET", "/media/clip.mp4")]


@pytest.fixture(scope="module")
def long_clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 120 s moov-last MP4 (~11 MB): large enough that seeking beats downloading."""
    path = tmp_path_factory.mktemp("long-media") / "long.mp4"
    return make_test_video(path, 320, 240, seconds=120, audio=False).read_bytes()


async def test_a_frame_of_a_large_remote_file_reads_only_what_it_needs(
    long_clip_bytes: bytes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A frame near the end of a ranged remote MP4: ffmpeg seeks, the origin sends a fraction."""
    origin = await origin_with(nursery, Behaviour(body=long_clip_bytes, ranges=True))
    extra = cdn_origin(origin.url) + '\n[transform]\nseek_remote_over = "64KiB"\n'
    server, client = await start(nursery, tmp_path, tmp_path, extra)
    async with client:
        frame = await client.get("/cdn/clip.mp4", params={"mode": "frame", "time": "118s"})
        frame_bytes = server.service.range_proxy.bytes_sent
        vtt = await client.get(
            "/cdn/clip.mp4", params={"format": "vtt", "width": "80", "height": "60"}
        )
    assert frame.status_code == 200, frame.text
    assert frame.content.startswith(b"\xff\xd8\xff")
    assert vtt.status_code == 200, vtt.text
    assert ("GET", "/media/clip.mp4") in origin.requests
    assert origin.ranges_asked, "ffmpeg did not read through ranges"
    proxy = server.service.range_proxy
    # Probe + frame read the index, the start and one GOP (10 s here), not 120 s of video.
    assert frame_bytes < len(long_clip_bytes) // 4, (frame_bytes, origin.ranges_asked)
    assert proxy.bytes_sent < len(long_clip_bytes) // 3
    assert proxy.requests >= 4
