"""Integration: HLS and progressive first views against the real server and real ffmpeg."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from tests.media import ffmpeg_exe, make_test_video
from tests.server import RunningServer, server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"  # 12 s, 25 fps, 640x360 with audio: three 4-second segments
SECONDS = 12
FPS = 25


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hls-media")
    make_test_video(folder / "clip.mp4", 640, 360, seconds=SECONDS, audio=True, fps=FPS)
    return folder


@pytest.fixture
async def server(media: Path, tmp_path: Path, nursery: trio.Nursery) -> RunningServer:
    return await start_server(nursery, server_config(media, tmp_path / "cache"))


def read_with_ffmpeg(url: str, out: Path) -> str:
    """``ffmpeg -i URL`` copies the whole rendition; returns its per-packet listing."""
    quiet = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error"]
    subprocess.run(
        [*quiet, "-y", "-i", url, "-c", "copy", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    listing = subprocess.run(
        [*quiet, "-i", str(out), "-c", "copy", "-f", "framemd5", "-"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return listing.stdout.decode()


def packets(listing: str, stream: int) -> list[tuple[int, int]]:
    """(pts, duration) of each packet of ``stream`` in a framemd5 listing, by pts."""
    rows = []
    for line in listing.splitlines():
        if line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if int(fields[0]) == stream:
            rows.append((int(fields[2]), int(fields[3])))
    return sorted(rows)


def assert_contiguous(rows: list[tuple[int, int]]) -> None:
    """Each packet starts where the one before it ends: no gap, no overlap."""
    for (pts, duration), (following, _) in itertools.pairwise(rows):
        assert following == pts + duration, (pts, duration, following)


async def test_a_playlist_then_every_segment_reads_as_the_whole_video(
    server: RunningServer, tmp_path: Path
) -> None:
    """ffmpeg reads the uncached rendition through its playlist: every frame once, in
    order, the source's duration within one frame, audio and video without gaps."""
    url = f"{server.url}{CLIP}?width=320&format=hls"
    async with httpx.AsyncClient(timeout=60) as client:
        playlist = await client.get(url)
    assert playlist.status_code == 200
    assert playlist.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert playlist.headers["Cache-Control"].startswith("public, max-age=")
    assert playlist.text.count("#EXTINF:4.000,") == SECONDS // 4
    listing = await trio.to_thread.run_sync(read_with_ffmpeg, url, tmp_path / "all.mp4")
    video, audio = packets(listing, 0), packets(listing, 1)
    assert len(video) == SECONDS * FPS
    assert_contiguous(video)
    assert_contiguous(audio)
    assert audio


async def test_segments_from_a_seek_splice_with_the_rest(
    server: RunningServer, tmp_path: Path
) -> None:
    """Segment 2 asked for first (a run starts there), then the whole rendition: the
    segments of both runs join without a gap or overlap and share one init segment."""
    base = f"{server.url}{CLIP}?width=320&format=hls"
    async with httpx.AsyncClient(timeout=60) as client:
        playlist = (await client.get(base)).text
        links = [line for line in playlist.splitlines() if not line.startswith("#")]
        seek = await client.get(server.url + links[2])
        assert seek.status_code == 200
        assert seek.headers["Content-Type"] == "video/mp4"
        init_url = re.search(r'URI="([^"]+)"', playlist)
        assert init_url is not None
        init = (await client.get(server.url + init_url[1])).content
    listing = await trio.to_thread.run_sync(read_with_ffmpeg, base, tmp_path / "spliced.mp4")
    video = packets(listing, 0)
    assert len(video) == SECONDS * FPS
    assert_contiguous(video)
    assert_contiguous(packets(listing, 1))
    assert init[4:8] == b"ftyp"  # one init for both runs: ftyp + moov, no media
    assert b"moof" not in init


async def test_the_master_playlist_announces_what_the_segments_are(
    server: RunningServer,
) -> None:
    """A rendition's CODECS and RESOLUTION in the master playlist match its init segment."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        master = await client.get(f"{CLIP}?format=hls&ladder=mobile")
        assert master.status_code == 200
        stream_inf, rendition = master.text.splitlines()[3:5]
        media = (await client.get(rendition)).text
        init_url = re.search(r'URI="([^"]+)"', media)
        assert init_url is not None
        init = (await client.get(init_url[1])).content
    codecs = re.search(r'CODECS="avc1\.([0-9a-f]{6}),mp4a\.40\.2"', stream_inf)
    assert codecs is not None
    avcc = init.index(b"avcC") + 4
    assert init[avcc + 1 : avcc + 4].hex() == codecs[1]  # profile, constraints, level
    assert "RESOLUTION=640x360" in stream_inf  # mobile is at most 854x480: the source's size


async def test_the_cdn_form_serves_playlists_and_segments_too(server: RunningServer) -> None:
    """/cdn-cgi/media/format=hls/... links its segments in the same form, and they play."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        playlist = await client.get(f"/cdn-cgi/media/width=320,format=hls{CLIP}")
        links = [line for line in playlist.text.splitlines() if not line.startswith("#")]
        assert all(link.startswith("/cdn-cgi/media/") for link in links)
        segment = await client.get(links[0])
    assert segment.status_code == 200
    assert segment.content[4:8] == b"moof"


async def test_probes_during_a_miss_never_break_the_next_request(
    server: RunningServer,
) -> None:
    """HEAD, then a bytes=0-1 probe (WebKit's), then bytes=0- (Chromium's): the last gets
    the whole output as a 200, identical to the cached entry afterwards."""
    url = f"{CLIP}?width=240"
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        head = await client.head(url)
        assert (head.status_code, head.headers["X-Cache-Status"]) == (200, "MISS")
        probe = await client.get(url, headers={"Range": "bytes=0-1"})
        assert probe.status_code == 206
        assert len(probe.content) == 2
        live = await client.get(url, headers={"Range": "bytes=0-"})
        assert live.status_code == 200
        assert live.content[:2] == probe.content
        cached = await client.get(url)
    assert cached.headers["X-Cache-Status"] == "HIT"
    assert cached.content == live.content
