"""Integration: real players (headless Chromium, Firefox ESR) play what the real server serves.

``make players`` (part of ``make test``) installs them; see tests/players.py. Each browser
start costs seconds, so these tests are few.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import resizer.web.server
from resizer.pipeline import Service
from resizer.web.app import create_app
from tests.media import make_test_video
from tests.players import (
    Browser,
    PageRun,
    PageServer,
    PlayerError,
    RequestLog,
    describe,
    run_page,
    start_page_server,
)
from tests.server import RunningServer, server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"  # 640x360, 8 s, with audio
LONG = "/videos/long.mp4"  # 640x360, 40 s, with audio
CLIP_SECONDS = 8.0
PLAY = 2.0  # seconds played before the seek


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("player-media")
    make_test_video(folder / "clip.mp4", 640, 360, seconds=CLIP_SECONDS, audio=True)
    make_test_video(folder / "long.mp4", 640, 360, seconds=40, audio=True)
    return folder


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> RequestLog:
    """What the server is asked and answers (the server fixture wraps its app in it)."""
    log = RequestLog(None)

    def create_logged_app(service: Service) -> RequestLog:
        log.app = create_app(service)
        return log

    monkeypatch.setattr(resizer.web.server, "create_app", create_logged_app)
    return log


@pytest.fixture
async def server(
    media: Path, tmp_path: Path, nursery: trio.Nursery, requests: RequestLog
) -> RunningServer:
    return await start_server(nursery, server_config(media, tmp_path / "cache"))


@pytest.fixture
async def pages(nursery: trio.Nursery) -> PageServer:
    return await start_page_server(nursery)


async def play_progressive(
    browser: Browser,
    pages: PageServer,
    src: str,
    workdir: Path,
    requests: RequestLog,
    *,
    seekable: bool = True,
) -> PageRun:
    """Play ``src`` in ``browser`` at once, then seek within what is buffered: the seek lands
    there (``seekable``), or, where the browser treats the response as a live stream, at 0."""
    run = await run_page(
        browser, pages, pages.page("progressive.html", src=src, play=PLAY), workdir
    )
    report = run.report
    context = describe(run, requests)
    assert run.browser.alive() == [], context
    assert report.get("error") is None, context
    assert report["ok"], context
    assert report["playedTo"] >= PLAY, context
    assert report["timeToPlayingMs"] < 5_000, context
    seek = report["seek"]
    assert seek["targetBuffered"], context
    landed = seek["target"] if seekable else 0.0
    assert abs(seek["landedAt"] - landed) < 0.1, context
    assert seek["currentTime"] >= landed + 0.5, context
    return run


async def test_chromium_plays_a_first_view_at_once_and_seeks_once_cached(
    server: RunningServer, pages: PageServer, requests: RequestLog, tmp_path: Path
) -> None:
    """Headless Chromium plays an uncached MP4 from its first request (the live stream, a 200
    of unknown length); the next view is a hit and seeks within what it has loaded.

    Chromium decides from the first response's headers, once, that a resource of unknown
    length is a live stream, and then clamps every seek to 0 (``seekable`` is [0, 0]; see
    docs/api.md, "Playing in browsers"): the seek of the first view pins that behaviour, so
    a Chromium that starts seeking in live streams shows up here. Seeking a first view in
    Chromium is what HLS (hls.js) is for.
    """
    src = f"{server.url}{CLIP}?width=480"
    await play_progressive("chromium", pages, src, tmp_path / "first", requests, seekable=False)
    assert requests.exchanges[0].headers["x-cache-status"] == "MISS", str(requests)
    assert requests.exchanges[0].status == 200, str(requests)
    await play_progressive("chromium", pages, src, tmp_path / "again", requests)
    assert requests.exchanges[-1].headers["x-cache-status"] == "HIT", str(requests)


async def test_firefox_plays_uncached_progressive(
    server: RunningServer, pages: PageServer, requests: RequestLog, tmp_path: Path
) -> None:
    """Headless Firefox plays a resized MP4 from its first request (a miss) and seeks in it."""
    src = f"{server.url}{CLIP}?width=480"
    await play_progressive("firefox", pages, src, tmp_path / "firefox", requests)
    assert requests.exchanges[0].headers["x-cache-status"] == "MISS", str(requests)


async def test_hlsjs_plays_uncached_hls_and_seeks_beyond_what_it_loaded(
    server: RunningServer, pages: PageServer, requests: RequestLog, tmp_path: Path
) -> None:
    """hls.js in Chromium, on another origin, plays an uncached HLS URL and, seeking to 30 s
    of 40 before the transcode got there, plays on from there."""
    src = f"{server.url}{LONG}?width=480&format=hls"
    page = pages.page("hls.html", src=src, play=PLAY, seek=30, buffer=4)
    run = await run_page("chromium", pages, page, tmp_path / "chromium")
    report, context = run.report, describe(run, requests)
    assert run.browser.alive() == [], context
    assert requests.exchanges[0].headers.get("x-cache-status") == "MISS", context
    assert report["ok"], context  # a fatal hls.js error or an early end makes ok false
    assert report["timeToFirstFrameMs"] < 5000, context
    seek = report["seek"]
    assert not seek["targetBuffered"], context  # the seek goes past what was loaded
    assert abs(seek["landedAt"] - 30) < 0.1, context
    assert seek["currentTime"] >= 30.5, context


async def test_browser_without_report_is_killed(pages: PageServer, tmp_path: Path) -> None:
    """A page that never reports fails its run at the deadline, leaving no browser process."""
    # Firefox: its crash helper leaves the browser's session, so this covers the marker too.
    # A listener nobody accepts from: the video's request never gets an answer.
    (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with silent:
        port = silent.socket.getsockname()[1]
        page = pages.page("progressive.html", timeout=60, src=f"http://127.0.0.1:{port}/a.mp4")
        start = trio.current_time()
        with pytest.raises(PlayerError, match="no final report") as failure:
            await run_page("firefox", pages, page, tmp_path / "firefox", deadline=4)
    assert trio.current_time() - start < 10
    assert failure.value.browser is not None
    assert failure.value.browser.alive() == []
