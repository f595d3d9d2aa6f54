"""The access log (one structlog line per request, JSON under ``[logging] format``),
X-Request-Id (generated, or the request's when trusted) and Server-Timing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio

from resizer.config import load_config
from resizer.transform.fake import FakeTransformer
from tests.media import make_test_video
from tests.server import RunningServer, server_config, server_config_text, start_server
from tests.test_workers import free_port, wait_healthy

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"
FIELDS = {
    "method",
    "path",
    "status",
    "bytes",
    "ttfb",
    "duration",
    "cache_status",
    "request_id",
    "origin",
    "source",
    "queue_class",
    "queue_wait",
    "aborted",
}
GENERATED_ID = re.compile(r"[0-9a-f]{16}")


def fake_media(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"source" * 1000)  # the fake transformer never decodes
    return media


def phases(response: httpx.Response) -> list[str]:
    """The metric names of a response's Server-Timing, in order."""
    return [part.split(";")[0] for part in response.headers["Server-Timing"].split(", ")]


Logged = MutableMapping[str, Any]


def access_lines(logs: list[Logged]) -> list[Logged]:
    return [entry for entry in logs if entry.get("event") == "access"]


async def wait_for_lines(logs: list[Logged], count: int) -> list[Logged]:
    """The captured access lines once there are ``count`` (each is written after the last
    byte went out, so possibly just after the client had it)."""
    with trio.fail_after(10):
        while True:
            if len(found := access_lines(logs)) >= count:
                return found
            await trio.sleep(0.01)


async def test_the_json_access_line_has_every_field(tmp_path: Path) -> None:
    """``resizer serve`` with ``format = "json"``: one JSON line per request (miss, hit of
    the hit layer, health check, error), each with every field, matching the responses."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "clip.mp4", 160, 120, seconds=2)
    config = tmp_path / "resizer.toml"
    extra = '[logging]\nformat = "json"'
    config.write_text(server_config_text(media, tmp_path / "cache", extra))
    port = free_port()
    log_file = tmp_path / "server.log"
    with log_file.open("wb") as output:
        process = subprocess.Popen(  # noqa: ASYNC220 - started and stopped around the test
            [sys.executable, "-m", "resizer", "serve", "--config", str(config), f"--port={port}"],
            stdout=output,
            stderr=output,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            miss = await client.get(f"{CLIP}?width=80")
            hit = await client.get(f"{CLIP}?width=80")
            missing = await client.get("/videos/none.mp4")
        with trio.fail_after(10):
            while True:
                text = log_file.read_text()  # hypercorn's own lines are not structlog's
                lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
                access = [line for line in lines if line.get("event") == "access"]
                if len(access) >= 4:  # wait_healthy's /healthz, and the three above
                    break
                await trio.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)

    for line in access:
        assert set(line) >= FIELDS, FIELDS - set(line)
        assert line["level"] == "info"
    by_id = {line["request_id"]: line for line in access}
    health = access[0]
    assert (health["path"], health["status"], health["cache_status"]) == ("/healthz", 200, None)
    for response, status in ((miss, "MISS"), (hit, "HIT")):
        line = by_id[response.headers["X-Request-Id"]]
        assert (line["method"], line["path"], line["query"]) == ("GET", CLIP, "width=80")
        assert (line["status"], line["cache_status"]) == (200, status)
        assert (line["origin"], line["source"]) == ("videos", "filesystem")
        assert line["bytes"] == len(response.content) > 0
        assert 0 < line["ttfb"] <= line["duration"]
        assert line["aborted"] is False
        assert line["queue_wait"] is None or line["queue_wait"] >= 0
    line = by_id[missing.headers["X-Request-Id"]]
    assert (line["status"], line["bytes"]) == (404, len(missing.content))


async def test_a_client_leaving_mid_body_is_logged_as_aborted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A client that disconnects in the middle of a streamed miss: its line says aborted,
    with the bytes sent before it left."""
    release = trio.Event()

    async def hold_after_three(index: int) -> None:
        if index >= 3:
            await release.wait()

    fake = FakeTransformer(size=100_000, chunk_size=1_000, before_chunk=hold_after_three)
    config = server_config(fake_media(tmp_path), tmp_path / "cache")
    with structlog.testing.capture_logs() as logs:
        server = await start_server(nursery, config, fake)
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
            client.stream("GET", CLIP) as response,
        ):
            first = await response.aiter_bytes().__anext__()
            assert first
        [line] = await wait_for_lines(logs, 1)
        release.set()
    assert line["aborted"] is True
    assert (line["status"], line["cache_status"]) == (200, "MISS")
    assert 0 < line["bytes"] < 100_000


async def request_ids(server: RunningServer, sent: str | bytes) -> list[str]:
    """The X-Request-Id answering ``sent`` on a miss, a hit (the hit layer), a health check
    and an error."""
    found = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for path in (CLIP, CLIP, "/healthz", "/videos/none.mp4"):
            raw = sent if isinstance(sent, bytes) else sent.encode()
            response = await client.get(path, headers=[(b"X-Request-Id", raw)])
            found.append(response.headers["X-Request-Id"])
    return found


async def test_request_ids_are_generated_unless_trusted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Untrusted (the default), a request's X-Request-Id is replaced by a new id on every
    path; trusted, it is echoed and logged, unless it is malformed or too long."""
    media = fake_media(tmp_path)
    untrusted = await start_server(
        nursery, server_config(media, tmp_path / "cache-1"), FakeTransformer()
    )
    trusting = await start_server(
        nursery,
        server_config(media, tmp_path / "cache-2", "[logging]\ntrust_request_id = true"),
        FakeTransformer(),
    )
    with structlog.testing.capture_logs() as logs:
        generated = await request_ids(untrusted, "proxy-id-1")
        await wait_for_lines(logs, 4)
    assert all(GENERATED_ID.fullmatch(request_id) for request_id in generated), generated
    assert len(set(generated)) == 4
    assert [line["request_id"] for line in access_lines(logs)] == generated

    with structlog.testing.capture_logs() as logs:
        assert await request_ids(trusting, "proxy-id-1") == ["proxy-id-1"] * 4
        await wait_for_lines(logs, 4)
    assert [line["request_id"] for line in access_lines(logs)] == ["proxy-id-1"] * 4
    for malformed in ("two words", "x" * 129, b"caf\xe9"):
        replaced = await request_ids(trusting, malformed)
        assert all(GENERATED_ID.fullmatch(request_id) for request_id in replaced), replaced
    assert await request_ids(trusting, "y" * 128) == ["y" * 128] * 4


async def test_server_timing_on_a_miss_and_on_hits(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A miss (real ffmpeg) times its lookup, origin fetch and ffmpeg's first byte; a hit,
    from the sendfile layer or through ASGI (memory cache), only its lookup."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "clip.mp4", 160, 120, seconds=2)
    disk = await start_server(nursery, server_config(media, tmp_path / "cache"))
    memory_text = server_config_text(media, tmp_path / "cache-2").replace('"disk"', '"memory"')
    memory = await start_server(
        nursery, load_config(text=memory_text, env={}), FakeTransformer(size=5_000)
    )
    url = f"{CLIP}?mode=frame&time=1s&width=80"
    async with httpx.AsyncClient(timeout=60) as client:
        miss = await client.get(disk.url + url)
        hit = await client.get(disk.url + url)
        health = await client.get(disk.url + "/healthz")
        fake_miss = await client.get(memory.url + CLIP)
        fake_hit = await client.get(memory.url + CLIP)
    assert (miss.headers["X-Cache-Status"], hit.headers["X-Cache-Status"]) == ("MISS", "HIT")
    assert {"lookup", "origin", "transform"} <= set(phases(miss))
    assert set(phases(miss)) <= {"lookup", "origin", "queue", "transform"}
    durations = re.findall(r"dur=([0-9.]+)", miss.headers["Server-Timing"])
    assert all(float(value) >= 0 for value in durations)
    assert phases(hit) == ["lookup"]
    assert "Server-Timing" not in health.headers
    assert fake_hit.headers["X-Cache-Status"] == "HIT"
    assert {"lookup", "origin"} <= set(phases(fake_miss))
    assert phases(fake_hit) == ["lookup"]
