"""Integration: cache hits answered by the connection layer with sendfile (web/zerocopy.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from loadtest.wrk import parse_wrk, wrk_binary
from resizer.config import Duration
from resizer.transform.fake import FakeTransformer
from resizer.web.zerocopy import ZeroCopyHits, _parse_head
from tests.media import make_test_video
from tests.server import RunningServer, scrape, server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"
BODY = 3_000_000  # bytes of every fake output: several sendfile slices


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zerocopy-media")
    make_test_video(folder / "clip.mp4", 160, 120, seconds=1, audio=False)
    return folder


@pytest.fixture
def sendfiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each os.sendfile call sent (the connection layer is its only caller here)."""
    sent: list[int] = []
    real: Callable[[int, int, int | None, int], int] = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        result = real(out, fd, offset, count)
        sent.append(result)
        return result

    monkeypatch.setattr(os, "sendfile", counting)
    return sent


@pytest.fixture
async def server(media: Path, tmp_path: Path, nursery: trio.Nursery) -> RunningServer:
    config = server_config(media, tmp_path / "cache")
    config = replace(config, server=replace(config.server, keep_alive_timeout=Duration(1.0)))
    return await start_server(nursery, config, FakeTransformer(size=BODY, chunk_size=65_536))


async def warm(server: RunningServer, *urls: str) -> dict[str, bytes]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        bodies = {}
        for url in urls:
            response = await client.get(url)
            assert response.headers["X-Cache-Status"] == "MISS"
            bodies[url] = response.content
        return bodies


class Raw:
    """One HTTP/1.1 connection spoken to by hand (keep-alive, pipelining, resets)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, *requests: str) -> None:
        await self.stream.send_all("".join(requests).encode())

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 20)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    async def response(self, *, to_head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next whole response (Content-Length or chunked framing; none after HEAD)."""
        with trio.fail_after(30):
            while b"\r\n\r\n" not in self.buffer:
                await self._fill()
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if to_head or status == 304:
                return status, headers, b""
            if "content-length" in headers:
                size = int(headers["content-length"])
                while len(self.buffer) < size:
                    await self._fill()
                body, self.buffer = self.buffer[:size], self.buffer[size:]
                return status, headers, body
            body = b""
            while True:  # chunked
                while b"\r\n" not in self.buffer:
                    await self._fill()
                size_line, self.buffer = self.buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buffer) < size + 2:
                    await self._fill()
                body += self.buffer[:size]
                self.buffer = self.buffer[size + 2 :]
                if size == 0:
                    return status, headers, body


def get(url: str, *fields: str, method: str = "GET") -> str:
    extra = "".join(f"{field}\r\n" for field in fields)
    return f"{method} {url} HTTP/1.1\r\nHost: test\r\n{extra}\r\n"


async def connect(server: RunningServer) -> Raw:
    return Raw(await trio.open_tcp_stream(server.host, server.port))


async def test_a_hit_goes_out_by_sendfile_with_the_asgi_paths_headers(
    server: RunningServer, sendfiles: list[int]
) -> None:
    """The body leaves by sendfile, byte-identical; the fields are those of the ASGI path
    (which answers the same request over HTTP/1.0, a request this layer hands over)."""
    url = f"{CLIP}?width=120"
    body = (await warm(server, url))[url]
    raw = await connect(server)
    await raw.send(get(url, "Origin: https://player.example"))
    status, fast, sent = await raw.response()
    assert (status, sent) == (200, body)
    assert sum(sendfiles) == len(body)
    asgi = await connect(server)
    await asgi.stream.send_all(
        f"GET {url} HTTP/1.0\r\nOrigin: https://player.example\r\n\r\n".encode()
    )
    status, slow, again = await asgi.response()
    assert (status, again) == (200, body)
    assert sum(sendfiles) == len(body)  # the ASGI path copied it
    ignored = {"date", "server", "x-request-id", "connection", "cache-control", "server-timing"}
    assert {k: v for k, v in fast.items() if k not in ignored} == {
        k: v for k, v in slow.items() if k not in ignored
    }
    assert fast["cache-control"].startswith("public, max-age=")
    assert fast["server-timing"].startswith("lookup;dur=")  # times differ, phases do not
    assert slow["server-timing"].startswith("lookup;dur=")


async def test_ranges_heads_and_conditionals_on_one_kept_alive_connection(
    server: RunningServer, sendfiles: list[int]
) -> None:
    """Pipelined: a range, a HEAD, a 304 and a suffix range, answered in order here."""
    url = f"{CLIP}?width=110"
    body = (await warm(server, url))[url]
    raw = await connect(server)
    await raw.send(
        get(url, "Range: bytes=100-199"),
        get(url, method="HEAD"),
        get(url, 'If-None-Match: "nope"', "Range: bytes=-10"),
    )
    status, headers, part = await raw.response()
    assert (status, headers["content-range"], part) == (206, f"bytes 100-199/{BODY}", body[100:200])
    status, headers, empty = await raw.response(to_head=True)
    assert (status, headers["content-length"], empty) == (200, str(BODY), b"")
    status, headers, tail = await raw.response()
    assert (status, tail) == (206, body[-10:])
    await raw.send(get(url, f"If-None-Match: {headers['etag']}"))
    status, _, nothing = await raw.response()
    assert (status, nothing) == (304, b"")
    assert sum(sendfiles) == 100 + 10


async def test_the_first_request_it_does_not_take_hands_the_connection_over(
    server: RunningServer, sendfiles: list[int]
) -> None:
    """A hit (sendfile), then a miss on the same connection, which hypercorn streams and then
    closes; on a new connection the hit layer is first again; a 416 goes to hypercorn,
    which closes after it too (the hit pipelined behind it is never answered)."""
    hit, miss = f"{CLIP}?width=100", f"{CLIP}?width=90"
    body = (await warm(server, hit))[hit]
    raw = await connect(server)
    await raw.send(get(hit))
    assert (await raw.response())[2] == body
    await raw.send(get(miss))
    status, headers, streamed = await raw.response()
    assert (status, headers["x-cache-status"], len(streamed)) == (200, "MISS", BODY)
    assert headers["connection"] == "close"
    with pytest.raises(EOFError):
        await raw._fill()
    assert sum(sendfiles) == len(body)
    again = await connect(server)
    await again.send(get(hit))
    assert (await again.response())[2] == body
    assert sum(sendfiles) == 2 * len(body)  # a new connection: the hit layer again
    await again.send(get(hit, f"Range: bytes={BODY}-"), get(hit))
    status, headers, _ = await again.response()
    assert (status, headers["content-range"]) == (416, f"bytes */{BODY}")
    with pytest.raises(EOFError):
        await again.response()
    assert sum(sendfiles) == 2 * len(body)


async def test_a_reset_mid_body_is_an_abort_and_the_server_goes_on(
    server: RunningServer, sendfiles: list[int]
) -> None:
    """A client leaving after a few bytes: counted as an abort, nothing more is sent."""
    url = f"{CLIP}?width=80"
    await warm(server, url)
    raw = await connect(server)
    await raw.send(get(url))
    with trio.fail_after(10):
        while len(raw.buffer) < 1_000:
            await raw._fill()
    raw.stream.socket.setsockopt(
        trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
    )
    await raw.stream.aclose()  # an RST
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        with trio.fail_after(10):
            while True:
                metrics = (await client.get("/metrics")).text
                if scrape(metrics, "resizer_stream_aborts_total") == 1:
                    break
                await trio.sleep(0.05)
        assert (await client.get(url)).headers["X-Cache-Status"] == "HIT"
    assert sum(sendfiles) < 2 * BODY


async def test_idle_and_closing_connections_end(server: RunningServer) -> None:
    """Connection: close is honoured; an idle kept-alive connection is closed after
    keep_alive_timeout (1 s here)."""
    url = f"{CLIP}?width=70"
    await warm(server, url)
    raw = await connect(server)
    await raw.send(get(url, "Connection: close"))
    status, headers, _ = await raw.response()
    assert (status, headers["connection"]) == (200, "close")
    with pytest.raises(EOFError):
        await raw._fill()
    idle = await connect(server)
    await idle.send(get(url))
    await idle.response()
    started = trio.current_time()
    with pytest.raises(EOFError), trio.fail_after(5):
        await idle._fill()
    assert trio.current_time() - started >= 0.9


@pytest.mark.parametrize(
    "head",
    [
        b"POST /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-Long: a\r\n continued\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_only_plain_requests_are_parsed_here(head: bytes) -> None:
    """Other methods, versions, forms, a missing Host, a body, obs-fold, malformed fields:
    hypercorn's (with h11)."""
    assert _parse_head(head) is None


def test_a_plain_request_is_parsed() -> None:
    """Fields are lower-cased and repeated ones joined; Connection: close is seen."""
    request = _parse_head(
        b"HEAD /v/a.mp4?w=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nConnection: Close\r\n\r\n"
    )
    assert request is not None
    assert (request.method, request.target, request.close) == ("HEAD", b"/v/a.mp4?w=1", True)
    assert request.headers["x-a"] == "1, 2"


async def test_a_bug_in_the_hit_layer_costs_one_connection_not_the_server(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while answering a hit closes that connection; others go on."""
    url = f"{CLIP}?width=60"
    await warm(server, url)

    def broken(*args: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ZeroCopyHits, "_route", broken)
    raw = await connect(server)
    await raw.send(get(url))
    with pytest.raises(EOFError):
        await raw.response()
    monkeypatch.undo()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        assert (await client.get(url)).headers["X-Cache-Status"] == "HIT"


async def test_behind_nginx_the_hit_layer_answers_the_redirects(
    media: Path, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With accel_redirect a hit is answered here too: an empty 200 naming the file."""
    config = server_config(media, tmp_path / "cache")
    config = replace(config, server=replace(config.server, accel_redirect="/_cache/"))
    server = await start_server(nursery, config, FakeTransformer(size=BODY))
    url = f"{CLIP}?width=50"
    await warm(server, url)
    answered: list[int] = []
    hit_for = ZeroCopyHits._hit_for

    async def counting(self: ZeroCopyHits, request: object) -> object:
        hit = await hit_for(self, request)  # type: ignore[arg-type]
        answered.append(hit is not None)
        return hit

    monkeypatch.setattr(ZeroCopyHits, "_hit_for", counting)
    raw = await connect(server)
    await raw.send(get(url))
    status, headers, body = await raw.response()
    assert (status, headers["content-length"], body) == (200, "0", b"")
    assert headers["x-accel-redirect"].startswith("/_cache/")
    assert headers["x-cache-status"] == "HIT"
    assert answered == [True]


async def test_ranges_from_any_offset_go_out_at_once(server: RunningServer) -> None:
    """wrk asking one range from an unaligned offset past 64 KiB, again and again: each
    answer goes out at once (a head sent with MSG_MORE waited for the kernel's 200 ms cork
    timer: 5 answers a second). wrk, because its ACKs show it; a Python client's do not."""
    url = f"{CLIP}?width=40"
    await warm(server, url)
    argv = [wrk_binary(), "-t1", "-c1", "-d1s", "-H", "Range: bytes=100001-165536"]
    result = await trio.run_process([*argv, f"{server.url}{url}"], capture_stdout=True)
    report = parse_wrk(result.stdout.decode())
    assert report["requests"] > 100, report
