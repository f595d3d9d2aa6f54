"""Integration: every mode and the option API over HTTP against the real server and ffmpeg."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from resizer.transform.probe import parse_probe_output
from tests.media import ffmpeg_banner, make_test_video
from tests.origin import Behaviour, start_origin
from tests.server import RunningServer, server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"  # 320x240, 4 s, 25 fps, with audio
SILENT = "/videos/silent.mp4"  # 240x320, 2 s, no audio


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api-media")
    make_test_video(folder / "clip.mp4", 320, 240, seconds=4, audio=True)
    make_test_video(folder / "silent.mp4", 240, 320, seconds=2, audio=False)
    return folder


@pytest.fixture
async def server(media: Path, tmp_path: Path, nursery: trio.Nursery) -> RunningServer:
    extra = """
    [limits]
    max_source_size = "2MiB"
    max_source_duration = "60s"
    [derivatives.preview]
    width = 160
    duration = "1s"
    """
    return await start_server(nursery, server_config(media, tmp_path / "cache", extra))


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        yield client


def banner_of(data: bytes, tmp_path: Path, name: str) -> str:
    target = tmp_path / name
    target.write_bytes(data)
    return ffmpeg_banner(target)


def image_size(data: bytes, tmp_path: Path, name: str) -> tuple[int, int]:
    found = re.search(r"Video: .*?, (\d+)x(\d+)", banner_of(data, tmp_path, name))
    assert found is not None
    return int(found[1]), int(found[2])


async def get_ok(client: httpx.AsyncClient, url: str, **kwargs: object) -> httpx.Response:
    response = await client.get(url, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response


async def test_video_clip_with_start_duration_fps_and_no_audio(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """time, duration, fps and audio=false shape the MP4: 1.5 s at 10 fps, no audio track."""
    response = await get_ok(
        client,
        CLIP,
        params={"width": "160", "time": "1s", "duration": "1.5s", "fps": "10", "audio": "false"},
    )
    info = parse_probe_output(banner_of(response.content, tmp_path, "clip.mp4"))
    assert (info.width, info.height, info.has_audio, info.fps) == (160, 120, False, 10.0)
    assert info.duration_ms is not None
    assert abs(info.duration_ms - 1500) <= 200


@pytest.mark.parametrize(
    ("fit", "expected"),
    [("contain", (160, 120)), ("cover", (200, 200)), ("scale-down", (320, 240))],
)
async def test_fit_modes(
    client: httpx.AsyncClient, tmp_path: Path, fit: str, expected: tuple[int, int]
) -> None:
    """contain fits inside, cover fills exactly, scale-down never upscales."""
    box = {"contain": ("160", "160"), "cover": ("200", "200"), "scale-down": ("640", "480")}[fit]
    response = await get_ok(client, CLIP, params={"width": box[0], "height": box[1], "fit": fit})
    info = parse_probe_output(banner_of(response.content, tmp_path, f"{fit}.mp4"))
    assert (info.width, info.height) == expected


async def test_frame_as_webp(client: httpx.AsyncClient, tmp_path: Path) -> None:
    """mode=frame&format=webp returns a WebP still of the requested size."""
    response = await get_ok(
        client, CLIP, params={"mode": "frame", "format": "webp", "width": "100"}
    )
    assert response.headers["Content-Type"] == "image/webp"
    assert response.content[:4] == b"RIFF"
    assert response.content[8:12] == b"WEBP"
    assert image_size(response.content, tmp_path, "f.webp") == (100, 75)


async def test_spritesheet_and_its_vtt_track(client: httpx.AsyncClient, tmp_path: Path) -> None:
    """A 9-tile sheet is a 3x3 grid of 80x60 tiles; the VTT points into it with xywh."""
    params = {"mode": "spritesheet", "width": "80", "height": "60", "imageCount": "9"}
    sheet = await get_ok(client, CLIP, params=params)
    assert sheet.headers["Content-Type"] == "image/jpeg"
    assert image_size(sheet.content, tmp_path, "sheet.jpg") == (240, 180)

    track = await get_ok(client, CLIP, params={**params, "format": "vtt"})
    assert track.headers["Content-Type"].startswith("text/vtt")
    text = track.text
    assert text.startswith("WEBVTT")
    cues = re.findall(r"(\S+) --> (\S+)\n(\S+)#xywh=(\d+),(\d+),(\d+),(\d+)", text)
    assert len(cues) == 9
    assert cues[0][0] == "00:00:00.000"
    assert cues[-1][6] == "60"
    sheet_ref = cues[0][2]
    again = await get_ok(client, sheet_ref)  # the cue URL serves the very same sheet
    assert again.headers["X-Cache-Status"] == "HIT"
    assert again.content == sheet.content


async def test_audio_mode_returns_m4a(client: httpx.AsyncClient, tmp_path: Path) -> None:
    """format=m4a alone means mode=audio: AAC in MP4, no video, the requested duration."""
    response = await get_ok(client, CLIP, params={"format": "m4a", "duration": "2s"})
    assert response.headers["Content-Type"] == "audio/mp4"
    banner = banner_of(response.content, tmp_path, "a.m4a")
    assert "Audio: aac" in banner
    assert "Video:" not in banner
    duration = re.search(r"Duration: 00:00:(\d+\.\d+)", banner)
    assert duration is not None
    assert abs(float(duration[1]) - 2.0) <= 0.2


async def test_audio_mode_on_a_silent_source_is_415(client: httpx.AsyncClient) -> None:
    """Asking for the audio of a source without audio is 415 with a JSON error."""
    response = await client.get(SILENT, params={"mode": "audio"})
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media"


async def test_cloudflare_form_shares_the_cache_with_the_query_form(
    client: httpx.AsyncClient,
) -> None:
    """/cdn-cgi/media/width=120/videos/clip.mp4 and ?width=120 are one entry."""
    first = await get_ok(client, "/cdn-cgi/media/width=120,mode=frame/videos/clip.mp4")
    assert first.headers["X-Cache-Status"] == "MISS"
    second = await get_ok(client, CLIP, params={"w": "120", "mode": "frame", "utm": "x"})
    assert second.headers["X-Cache-Status"] == "HIT"
    assert second.content == first.content


async def test_remote_urls_need_an_allowed_host(client: httpx.AsyncClient) -> None:
    """An absolute source URL from an unlisted host is 403, without any fetch."""
    response = await client.get("/cdn-cgi/media/width=120/https://example.com/a.mp4")
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


async def test_derivative_and_imquery_share_an_entry(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A configured derivative applies its options; imwidth mapping to mobile hits mobile."""
    preview = await get_ok(client, CLIP, params={"derivative": "preview"})
    info = parse_probe_output(banner_of(preview.content, tmp_path, "preview.mp4"))
    assert info.width == 160
    assert info.duration_ms is not None
    assert abs(info.duration_ms - 1000) <= 200
    mobile = await get_ok(client, SILENT, params={"derivative": "mobile"})
    assert mobile.headers["X-Cache-Status"] == "MISS"
    via_imwidth = await get_ok(client, SILENT, params={"imwidth": "400"})
    assert via_imwidth.headers["X-Cache-Status"] == "HIT"
    assert via_imwidth.content == mobile.content


async def test_client_hints_pick_a_size_and_vary(client: httpx.AsyncClient, tmp_path: Path) -> None:
    """A phone's User-Agent gets the mobile derivative; the response varies on what was read."""
    phone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148"
    response = await get_ok(client, SILENT, params={"mode": "frame"}, headers={"User-Agent": phone})
    assert "User-Agent" in response.headers["Vary"]
    assert "Sec-CH-Viewport-Width" in response.headers["Accept-CH"]
    # mobile is 854x480 scale-down: a 240x320 source is not upscaled
    assert image_size(response.content, tmp_path, "phone.jpg") == (240, 320)


async def test_filename_sets_content_disposition(client: httpx.AsyncClient) -> None:
    """filename=Trailer_1 -> inline; filename="trailer_1.jpg"."""
    response = await get_ok(client, CLIP, params={"mode": "frame", "filename": "Trailer_1"})
    assert response.headers["Content-Disposition"] == 'inline; filename="trailer_1.jpg"'


@pytest.mark.parametrize(
    ("params", "status", "mentions"),
    [
        ({"time": "9s"}, 400, "4s"),  # past the end: the message gives the source's duration
        ({"mode": "audio", "width": "100"}, 400, "width"),
        ({"mode": "spritesheet", "width": "100"}, 400, "height"),
        ({"fit": "stretch", "width": "100"}, 400, "contain, scale-down, cover"),
        ({"derivative": "poster"}, 400, "derivative"),
        ({"duration": "10m"}, 400, "duration"),
    ],
)
async def test_invalid_requests_say_what_to_fix(
    client: httpx.AsyncClient, params: dict[str, str], status: int, mentions: str
) -> None:
    """Each invalid request gets a JSON 400 that names the parameter and the allowed values."""
    response = await client.get(CLIP, params=params)
    assert response.status_code == status, response.text
    assert mentions in response.json()["message"]


async def test_source_limits(media: Path, client: httpx.AsyncClient) -> None:
    """A source over max_source_size is 413; over max_source_duration it is 422."""
    big = media / "big.mp4"
    if not big.exists():
        big.write_bytes(b"\x00" * (3 * 1024 * 1024))
    long = media / "long.mp4"
    if not long.exists():
        make_test_video(long, 64, 48, seconds=61, audio=False)
    too_big = await client.get("/videos/big.mp4", params={"width": "100"})
    assert too_big.status_code == 413
    too_long = await client.get("/videos/long.mp4", params={"width": "100"})
    assert too_long.status_code == 422
    assert "1m" in too_long.json()["message"] or "60s" in too_long.json()["message"]


async def test_allowed_remote_source_is_fetched_and_transformed(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """/cdn-cgi/media/<opts>/http://127.0.0.1:<port>/clip.mp4 works once the host is allowed."""
    origin = await start_origin(
        nursery, {"/remote/clip.mp4": Behaviour(body=(media / "clip.mp4").read_bytes())}
    )
    host_port = origin.url.removeprefix("http://")  # a non-default port is listed with it
    extra = f'[security]\nallowed_remote_hosts = ["{host_port}"]\n'
    server = await start_server(nursery, server_config(media, tmp_path / "cache", extra))
    url = f"{server.url}/cdn-cgi/media/mode=frame,width=100/{origin.url}/remote/clip.mp4"
    async with httpx.AsyncClient(timeout=30) as client:
        first = await client.get(url)
        assert first.status_code == 200, first.text
        assert first.headers["X-Source"] == "http"
        assert first.content.startswith(b"\xff\xd8\xff")
        second = await client.get(url)
        assert second.headers["X-Cache-Status"] == "HIT"
        missing = await client.get(url.replace("clip.mp4", "nope.mp4"))
        assert missing.status_code == 404
    assert not list((tmp_path / "cache" / "sources").iterdir())  # downloads are cleaned up
