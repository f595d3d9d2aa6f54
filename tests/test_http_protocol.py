"""Integration: HTTP semantics and hardening against the real server (issue 12's defects)."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from resizer.config import load_config
from resizer.transform.fake import FakeTransformer
from resizer.web.server import serve_resizer
from tests.media import make_test_video
from tests.origin import Behaviour, start_origin
from tests.server import RunningServer, scrape, server_config_text

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("protocol-media")
    make_test_video(folder / "clip.mp4", 160, 120, seconds=1, audio=False)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start(
    nursery: trio.Nursery, config_text: str, port: int = 0
) -> tuple[RunningServer, httpx.AsyncClient]:
    config = load_config(text=config_text, env={})
    # A fake transformer: these tests are about HTTP, not about ffmpeg's output.
    service, binds = await nursery.start(
        partial(serve_resizer, config, port=port, transformer=FakeTransformer(size=30_000))
    )
    host, bound = binds[0].removeprefix("http://").rsplit(":", 1)
    server = RunningServer(url=binds[0], service=service, host=host, port=int(bound))
    return server, httpx.AsyncClient(base_url=server.url, timeout=30)


async def test_a_bad_range_is_never_remembered_for_the_key(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A 416 answers that request only: the next plain GET is a 200, even with error TTLs."""
    text = server_config_text(media, tmp_path / "cache").replace(
        "[[origins.sources]]",
        "ttl = { ok = 86400, client_error = 60, server_error = 10 }\n[[origins.sources]]",
        1,
    )
    _, client = await start(nursery, text)
    async with client:
        assert (await client.get(CLIP, params={"width": "100"})).status_code == 200
        hit = await client.get(CLIP, params={"width": "100"})
        assert hit.headers["X-Cache-Status"] == "HIT"
        refused = await client.get(
            CLIP, params={"width": "100"}, headers={"Range": "bytes=999999-"}
        )
        assert refused.status_code == 416
        assert refused.headers["Cache-Control"] == "no-store"
        again = await client.get(CLIP, params={"width": "100"})
        assert again.status_code == 200
        assert again.content == hit.content
        # A miss whose range lies beyond the output is not remembered either.
        beyond = await client.get(CLIP, params={"width": "90"}, headers={"Range": "bytes=-0"})
        assert beyond.status_code == 416
        assert (await client.get(CLIP, params={"width": "90"})).status_code == 200


async def test_methods_outside_http_count_as_other_in_metrics(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Made-up methods add no label values: they count as method="other"."""
    _, client = await start(nursery, server_config_text(media, tmp_path / "cache"))
    async with client:
        for index in range(5):
            response = await client.request(f"BOGUS{index}{'X' * 200}", CLIP)
            assert response.status_code == 405
        metrics = (await client.get("/metrics")).text
    assert "BOGUS" not in metrics
    assert scrape(metrics, 'resizer_requests_total{method="other",status="405"}') == 5


async def test_405_names_the_allowed_methods_and_errors_are_not_sniffed(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A 405 carries Allow (RFC 9110 15.5.6); JSON errors carry nosniff."""
    _, client = await start(nursery, server_config_text(media, tmp_path / "cache"))
    async with client:
        refused = await client.post(CLIP)
        missing = await client.get("/videos/absent.mp4")
    assert refused.status_code == 405
    assert {m.strip() for m in refused.headers["Allow"].split(",")} >= {"GET", "HEAD"}
    assert refused.json()["error"] == "method_not_allowed"
    for response in (refused, missing):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Type"] == "application/json"


async def test_transfer_encoding_with_content_length_is_refused_and_closed(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Both framings at once (a smuggling primitive): 400, then the connection is closed."""
    server, client = await start(nursery, server_config_text(media, tmp_path / "cache"))
    await client.aclose()
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(
            b"GET /videos/clip.mp4?width=100 HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        )
        received = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                received += data  # ends only when the server closes the connection
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 400")
    assert b"connection: close" in head
    assert received.count(b"HTTP/1.1") == 1


async def test_allowed_remote_hosts_allow_web_ports_unless_a_port_is_named(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A bare host allows ports 80/443 only; host:port allows that port; never resizer itself."""
    origin = await start_origin(nursery, {"/clip.mp4": Behaviour(status=404)})
    origin_port = int(origin.url.rsplit(":", 1)[1])
    own_port = free_port()
    allowed = f'["127.0.0.1", "127.0.0.1:{origin_port}", "localhost:{own_port}"]'
    text = server_config_text(media, tmp_path / "cache") + (
        f"\n[security]\nallowed_remote_hosts = {allowed}\n"
    )
    server, client = await start(nursery, text, port=own_port)
    assert server.port == own_port
    prefix = "/cdn-cgi/media/mode=frame,width=100"
    async with client:
        ssh = await client.get(f"{prefix}/http://127.0.0.1:22/clip.mp4")
        named = await client.get(f"{prefix}/http://127.0.0.1:{origin_port}/clip.mp4")
        unnamed = await client.get(f"{prefix}/http://127.0.0.1:{origin_port + 1}/clip.mp4")
        itself = await client.get(f"{prefix}/http://localhost:{own_port}/videos/clip.mp4")
    assert (ssh.status_code, unnamed.status_code) == (403, 403)
    assert "port" in ssh.json()["message"]
    assert named.status_code == 404  # allowed: the origin itself answered
    assert origin.requests
    assert itself.status_code == 403
    assert "itself" in itself.json()["message"]
