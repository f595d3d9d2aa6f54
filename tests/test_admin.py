"""Seeing inside: /readyz, /admin/inflight, debug=view and the admin token (web/admin.py,
web/debug_view.py), against the real server."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from resizer.config import load_config
from resizer.options import cache_key, parse_options
from resizer.pipeline import Service
from resizer.scheduling.claims import SlotRequest
from resizer.scheduling.queue import Priority
from resizer.transform.fake import FakeTransformer, fake_output
from resizer.web.admin import admin_state, mark_draining
from resizer.web.debug_view import asks_debug_view, is_debug_request, preview_url
from resizer.web.server import serve_resizer
from tests.media import ffmpeg_exe, make_test_video
from tests.server import RunningServer, server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"
TOKEN = "s3cret-token"
TOKEN_ENV = "RESIZER_TEST_ADMIN_TOKEN"
ADMIN = f"""
[admin]
token_env = "{TOKEN_ENV}"
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def media(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"source" * 1000)  # the fake transformer never decodes
    return folder


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def serve(
    nursery: trio.Nursery,
    media: Path,
    tmp_path: Path,
    extra: str = "",
    fake: FakeTransformer | None = None,
) -> RunningServer:
    config = server_config(media, tmp_path / "cache", extra)
    return await start_server(nursery, config, fake or FakeTransformer())


def hold_after(chunks: int, release: trio.Event) -> Callable[[int], Awaitable[None]]:
    """A FakeTransformer ``before_chunk`` holding the output after ``chunks`` chunks."""

    async def hold(index: int) -> None:
        if index >= chunks:
            await release.wait()

    return hold


async def poll_until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``predicate``: server state seen over HTTP has no event to wait on."""
    with trio.fail_after(10):
        while True:
            if await predicate():
                return
            await trio.sleep(0.02)


# --- pure parts ---------------------------------------------------------------------------


def test_debug_view_is_asked_by_its_parameter_in_either_url_form() -> None:
    """debug=view (any case) in the query or the /cdn-cgi/media options; nothing else."""
    assert asks_debug_view({"width": "640", "Debug": "VIEW"})
    assert not asks_debug_view({"debug": "1"})
    assert is_debug_request(CLIP, b"width=640&debug=view")
    assert is_debug_request("/cdn-cgi/media/width=640,debug=view/videos/clip.mp4", b"")
    assert not is_debug_request(CLIP, b"width=640")
    # A remote source's own query is the source URL's, not options.
    assert not is_debug_request("/cdn-cgi/media/width=640/https://example.com/a.mp4", b"debug=view")


def test_the_preview_is_the_same_url_without_debug() -> None:
    """The query keeps its other pairs byte for byte; the CDN form loses its debug option."""
    assert preview_url(CLIP, b"width=640&debug=view&q=high") == f"{CLIP}?width=640&q=high"
    assert preview_url(CLIP, b"debug=view") == CLIP
    assert (
        preview_url("/cdn-cgi/media/width=640,debug=view/videos/clip.mp4", b"")
        == "/cdn-cgi/media/width=640/videos/clip.mp4"
    )
    assert preview_url("/videos/a b.mp4", b"debug=view") == "/videos/a%20b.mp4"


def test_admin_token_env_is_a_config_key() -> None:
    """[admin] token_env parses, defaults to "" and takes RESIZER_ADMIN_TOKEN_ENV."""
    base = """
    [[origins]]
    name = "v"
    matcher = "^/"
    [[origins.sources]]
    type = "filesystem"
    root = "."
    """
    assert load_config(text=base, env={}).admin.token_env == ""
    assert load_config(text=base + ADMIN, env={}).admin.token_env == TOKEN_ENV
    overridden = load_config(text=base, env={"RESIZER_ADMIN_TOKEN_ENV": "X"})
    assert overridden.admin.token_env == "X"


# --- off unless a token is configured -----------------------------------------------------


async def test_admin_and_debug_are_off_by_default(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """Without [admin] token_env: /admin/inflight and debug=view are 404 (a cached key's too,
    with any token), while /readyz and /healthz answer."""
    server = await serve(nursery, media, tmp_path)
    url = f"{server.url}{CLIP}?width=320"
    assert (await client.get(url)).status_code == 200  # now cached
    for path in ("/admin/inflight", f"{CLIP}?width=320&debug=view"):
        for headers in ({}, AUTH):
            response = await client.get(f"{server.url}{path}", headers=headers)
            assert response.status_code == 404, path
            assert response.headers["Content-Type"] == "application/json"
    assert (await client.get(f"{server.url}/readyz")).status_code == 200
    assert (await client.get(f"{server.url}/healthz")).status_code == 200


async def test_a_token_env_naming_an_empty_variable_keeps_them_off(
    media: Path,
    tmp_path: Path,
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """token_env naming a blank variable: still 404, whatever token is sent."""
    monkeypatch.setenv(TOKEN_ENV, "  ")
    server = await serve(nursery, media, tmp_path, ADMIN)
    response = await client.get(
        f"{server.url}/admin/inflight", headers={"Authorization": "Bearer x"}
    )
    assert response.status_code == 404


async def test_a_missing_or_wrong_token_gets_401(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient, token: str
) -> None:
    """Admin and debug pages need Authorization: Bearer <token>: otherwise a JSON 401 with
    WWW-Authenticate: Bearer (invalid_token for a wrong one); /readyz needs none."""
    server = await serve(nursery, media, tmp_path, ADMIN)
    for path in ("/admin/inflight", f"{CLIP}?width=320&debug=view"):
        url = f"{server.url}{path}"
        missing = await client.get(url)
        assert missing.status_code == 401, path
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="resizer"'
        assert missing.headers["Cache-Control"] == "no-store"
        assert missing.json()["error"] == "unauthorized"
        for wrong in (f"Bearer {token}x", f"Bearer {token[:-1]}", f"Basic {token}", token):
            refused = await client.get(url, headers={"Authorization": wrong})
            assert refused.status_code == 401, (path, wrong)
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        wrong_token = await client.get(url, headers={"Authorization": f"Bearer {token}x"})
        assert 'error="invalid_token"' in wrong_token.headers["WWW-Authenticate"]
        granted = await client.get(url, headers={"Authorization": f"bearer  {token}"})
        assert granted.status_code == 200, path
    assert (await client.get(f"{server.url}/readyz")).status_code == 200


# --- /admin/inflight ----------------------------------------------------------------------


async def test_inflight_lists_a_running_work_with_its_fields(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient, token: str
) -> None:
    """A transcode held after 5 chunks with two clients: its key, class, age, subscribers,
    bytes produced and the worker's pid; gone once both clients left."""
    release = trio.Event()
    fake = FakeTransformer(size=50_000, chunk_size=1_000, before_chunk=hold_after(5, release))
    server = await serve(nursery, media, tmp_path, ADMIN, fake)
    url = f"{server.url}{CLIP}?width=320"

    async def inflight() -> dict[str, Any]:
        response = await client.get(f"{server.url}/admin/inflight", headers=AUTH)
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = response.json()
        return body

    async with client.stream("GET", url) as first, client.stream("GET", url) as second:
        assert {first.headers["X-Cache-Status"], second.headers["X-Cache-Status"]} == {
            "MISS",
            "COALESCED",
        }

        async def produced_five() -> bool:
            works = (await inflight())["works"]
            return bool(works) and works[0]["bytes_produced"] == 5_000

        await poll_until(produced_five)
        await trio.sleep(0.05)
        body = await inflight()
    assert body["pid"] == os.getpid()
    assert body["draining"] is False
    assert body["hls_runs"] == []
    [work] = body["works"]
    assert work["key"] == cache_key(CLIP, parse_options({"width": "320"}))
    assert work["class"] == "medium"  # a transform with clients attached
    assert 0.05 <= work["age_seconds"] < 10
    assert work["subscribers"] == 2
    assert work["bytes_produced"] == 5_000
    assert work["state"] == "running"
    assert work["ffmpeg_pids"] == []  # the fake runs no process
    assert work["kept_for_followers"] is False

    async def nothing_in_flight() -> bool:
        return not (await inflight())["works"] and fake.runs_abandoned == 1

    await poll_until(nothing_in_flight)  # both clients left: the Work was abandoned


def slow_ffmpeg(folder: Path) -> Path:
    """An ffmpeg that reads its input at native speed (-re), so a run lasts its duration."""
    script = folder / "slow-ffmpeg"
    script.write_text(f'#!/bin/sh\nexec "{ffmpeg_exe()}" -re "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def process_argv(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().split(b"\0")


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            return status.read().split(b") ", 1)[1][:1] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def test_inflight_shows_the_pid_of_the_ffmpeg_running_for_a_work(
    tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient, token: str
) -> None:
    """A real ffmpeg run: its pid is listed on the Work while it runs (that process is
    ffmpeg), and leaves with it when the client does (the process is gone too)."""
    folder = tmp_path / "media"
    folder.mkdir()
    make_test_video(folder / "clip.mp4", 320, 240, seconds=4, audio=False)
    extra = f'{ADMIN}\n[transform]\nffmpeg = "{slow_ffmpeg(tmp_path)}"\n'
    server = await start_server(nursery, server_config(folder, tmp_path / "cache", extra))

    async def works() -> list[dict[str, Any]]:
        response = await client.get(f"{server.url}/admin/inflight", headers=AUTH)
        listed: list[dict[str, Any]] = response.json()["works"]
        return listed

    async with client.stream("GET", f"{server.url}{CLIP}?width=160") as response:
        assert response.headers["X-Cache-Status"] == "MISS"

        async def has_pid() -> bool:
            found = await works()
            return bool(found) and bool(found[0]["ffmpeg_pids"])

        await poll_until(has_pid)
        [work] = await works()
        [pid] = work["ffmpeg_pids"]
        assert process_alive(pid)
        argv = process_argv(pid)
        assert b"ffmpeg" in argv[0]
        assert b"-re" in argv
        assert work["class"] == "medium"

    async def gone() -> bool:
        return await works() == [] and not process_alive(pid)

    await poll_until(gone)


# --- /readyz ------------------------------------------------------------------------------


async def hold_claim(
    service: Service, priority: Priority, release: trio.Event, task_status: trio.TaskStatus[None]
) -> None:
    """A run that claims an ffmpeg slot (reported once asked) and holds it until ``release``."""
    claim = service.scheduler.claim(SlotRequest(priority, "frame"))
    task_status.started()
    async with claim:
        await release.wait()


async def test_readyz_answers_503_while_the_high_queue_is_full(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """One slot and max_queue = 1: 200 while a high run waits for nothing, 503 overloaded
    while one high run is queued (the next would be refused), 200 once it ran; /healthz stays
    200 throughout; both no-store."""
    extra = "[limits]\nmax_concurrent_transforms = 1\n[scheduling]\nmax_queue = 1"
    server = await serve(nursery, media, tmp_path, extra)
    release = trio.Event()
    async with trio.open_nursery() as runs:
        await runs.start(hold_claim, server.service, Priority.MEDIUM, release)
        ready = await client.get(f"{server.url}/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert ready.headers["Cache-Control"] == "no-store"
        await runs.start(hold_claim, server.service, Priority.HIGH, release)
        busy = await client.get(f"{server.url}/readyz")
        assert (busy.status_code, busy.json()) == (503, {"status": "overloaded"})
        assert busy.headers["Cache-Control"] == "no-store"
        health = await client.get(f"{server.url}/healthz")
        assert (health.status_code, health.headers["Cache-Control"]) == (200, "no-store")
        release.set()
    assert (await client.get(f"{server.url}/readyz")).status_code == 200


async def test_readyz_answers_503_while_draining(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """A draining service answers 503 draining (liveness still 200)."""
    server = await serve(nursery, media, tmp_path)
    assert (await client.get(f"{server.url}/readyz")).status_code == 200
    mark_draining(server.service)
    draining = await client.get(f"{server.url}/readyz")
    assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
    assert (await client.get(f"{server.url}/healthz")).status_code == 200


async def test_shutdown_marks_the_service_draining(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """The server's shutdown trigger sets draining before hypercorn stops serving."""
    trigger = trio.Event()
    config = server_config(media, tmp_path / "cache")
    service: Service
    service, [url] = await nursery.start(
        partial(
            serve_resizer, config, port=0, shutdown_trigger=trigger, transformer=FakeTransformer()
        )
    )
    assert (await client.get(f"{url}/readyz")).status_code == 200
    assert admin_state(service).draining is False
    trigger.set()

    async def draining() -> bool:
        await trio.lowlevel.checkpoint()
        return admin_state(service).draining is True

    await poll_until(draining)


# --- debug=view ---------------------------------------------------------------------------


def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each os.sendfile call sent (the zero-copy hit layer is its only caller here)."""
    sent: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        result = real(out_fd, in_fd, offset, count)
        sent.append(result)
        return result

    monkeypatch.setattr(os, "sendfile", counting)
    return sent


async def test_debug_view_shows_what_resizer_makes_of_a_request(
    media: Path,
    tmp_path: Path,
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For a cached key, in both URL forms: an uncached HTML page with the canonical options,
    the key and its entry, the origin, source and stat, timings, breakers and a preview of
    the URL without debug; the zero-copy layer (sendfile) never answers it."""
    server = await serve(nursery, media, tmp_path, ADMIN)
    options = parse_options({"width": "320"})
    key = cache_key(CLIP, options)
    warm = await client.get(f"{server.url}{CLIP}?width=320")
    assert warm.content == fake_output(options, 10_000)
    hit = await client.get(f"{server.url}{CLIP}?width=320")
    assert hit.headers["X-Cache-Status"] == "HIT"
    sent = sendfile_calls(monkeypatch)
    for path, preview in (
        (f"{CLIP}?width=320&debug=view", f"{CLIP}?width=320"),
        (
            "/cdn-cgi/media/width=320,debug=view/videos/clip.mp4",
            "/cdn-cgi/media/width=320/videos/clip.mp4",
        ),
    ):
        response = await client.get(f"{server.url}{path}", headers=AUTH)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-store"
        assert "X-Cache-Status" not in response.headers
        page = response.text
        assert page.startswith("<!doctype html>")
        assert options.canonical().replace("&", "&amp;") in page
        assert key.replace("&", "&amp;") in page
        assert "<th>cached</th><td>yes</td>" in page
        assert "<th>size</th><td>10000 bytes</td>" in page
        assert "<th>resolved</th><td>videos: videos.0 (filesystem)</td>" in page
        assert "6000 bytes, modified" in page  # the source's stat
        assert "<th>videos.0</th><td>closed; trips 0</td>" in page  # its breaker
        assert "<th>cache lookup</th>" in page
        assert "<th>origin resolution</th>" in page
        assert f'<video src="{preview.replace("&", "&amp;")}" controls' in page
    assert sent == []  # never the hit layer's sendfile
    # Not cached: the same page is made again (a hit would have been the video).
    again = await client.get(f"{server.url}{CLIP}?width=320&debug=view", headers=AUTH)
    assert again.text.startswith("<!doctype html>")


async def test_debug_view_escapes_every_value(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient, token: str
) -> None:
    """Markup in a path, a parameter and an error message is shown as text, never as HTML."""
    server = await serve(nursery, media, tmp_path, ADMIN)
    evil = "%3Cscript%3Ealert(1)%3C/script%3E"
    response = await client.get(
        f"{server.url}/videos/{evil}.mp4?width=320&debug=view&note={evil}&fit=%3Cb%3E",
        headers=AUTH,
    )
    assert response.status_code == 200
    page = response.text
    assert "<script" not in page
    assert "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;" in page  # the invalid fit, in the options error
    assert "invalid_option" in page


async def test_debug_view_passes_the_asgi_hit_path_too(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient, token: str
) -> None:
    """With the memory cache (no zero-copy layer) the ASGI hit fast path lets debug=view
    through to the page as well."""
    config = load_config(
        text=f"""
        [cache]
        backend = "memory"
        path = "{tmp_path / "cache"}"
        [[origins]]
        name = "videos"
        matcher = "^/videos/(?P<path>.+)$"
        [[origins.sources]]
        type = "filesystem"
        root = "{media}"
        path = "${{path}}"
        {ADMIN}
        """,
        env={},
    )
    server = await start_server(nursery, config, FakeTransformer())
    url = f"{server.url}{CLIP}?width=320"
    await client.get(url)
    assert (await client.get(url)).headers["X-Cache-Status"] == "HIT"
    page = await client.get(f"{url}&debug=view", headers=AUTH)
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<th>cached</th><td>yes</td>" in page.text
