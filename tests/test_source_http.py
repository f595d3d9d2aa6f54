"""The HTTP source against a real (tiny, scriptable) origin on 127.0.0.1.

The origin is a raw trio TCP server rather than hypercorn: an ASGI server refuses to lie
about Content-Length or to stall before its headers, which are exactly the cases to test.
It runs in pytest-trio's per-test ``nursery``, so it is cancelled when the test ends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from resizer import __version__
from resizer.errors import (
    Forbidden,
    OriginFailed,
    OriginTimeout,
    ServiceUnavailable,
    SourceNotFound,
    SourceTooLarge,
)
from resizer.sources.base import Source
from resizer.sources.http import HttpSource, join_url, make_http_client
from resizer.sources.security import AddressPolicy, parse_ip

BODY = bytes(range(256)) * 400  # 100 KiB: several chunks on the wire
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
LAST_MODIFIED_TS = 1445412480.0


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]


Handler = Callable[[Request, trio.SocketStream], Awaitable[None]]


@dataclass
class Origin:
    """Routes request paths to scripted handlers; records every request it received."""

    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/media/"

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head = buffer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            request = Request(method, target, headers)
            self.requests.append(request)
            handler = self.routes.get(target.split("?", 1)[0], not_found)
            await handler(request, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up, as it should when it aborts a download
        finally:
            await stream.aclose()


def head(status: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def serve(body: bytes, *, length: int | None = None) -> Handler:
    """200 with ``body``; Content-Length is ``length`` when given (a lie), else the truth."""

    async def handler(request: Request, stream: trio.SocketStream) -> None:
        headers = {"Content-Length": str(len(body) if length is None else length)}
        headers["Last-Modified"] = LAST_MODIFIED
        await stream.send_all(head(200, headers))
        if request.method != "HEAD":
            await stream.send_all(body)

    return handler


def answer(status: int, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(head(status, {"Content-Length": "0", **(headers or {})}))

    return handler


not_found = answer(404)


async def endless_chunked(request: Request, stream: trio.SocketStream) -> None:
    """A chunked body that never ends: only the client's own byte count can stop it."""
    await stream.send_all(head(200, {"Transfer-Encoding": "chunked"}))
    chunk = b"x" * 16384
    while True:
        await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))


async def stall_before_headers(request: Request, stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


def stall_mid_body(started: trio.Event) -> Handler:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(head(200, {"Content-Length": str(len(BODY))}))
        await stream.send_all(BODY[: len(BODY) // 2])
        started.set()
        await trio.sleep_forever()

    return handler


async def no_head(request: Request, stream: trio.SocketStream) -> None:
    """HEAD -> 405; GET honours ``Range: bytes=0-0`` like a presigned-URL origin."""
    if request.method == "HEAD":
        await stream.send_all(head(405, {"Content-Length": "0", "Allow": "GET"}))
    elif request.headers.get("range") == "bytes=0-0":
        headers = {"Content-Length": "1", "Content-Range": f"bytes 0-0/{len(BODY)}"}
        await stream.send_all(head(206, {**headers, "Last-Modified": LAST_MODIFIED}) + BODY[:1])
    else:
        await serve(BODY)(request, stream)


@pytest.fixture
async def origin(nursery: trio.Nursery) -> Origin:
    server = Origin()
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client(connect_timeout=1.0) as client:
        yield client


def source(origin: Origin, client: httpx.AsyncClient, spill: Path, **options: float) -> HttpSource:
    return HttpSource(
        client,
        spill_dir=spill,
        base_url=origin.base_url,
        max_size=int(options.pop("max_size", 1024 * 1024)),
        headers={"X-Origin-Token": "secret"},
        connect_timeout=options.pop("connect_timeout", 1.0),
        first_byte_timeout=options.pop("first_byte_timeout", 2.0),
        total_timeout=options.pop("total_timeout", 5.0),
        idle_timeout=options.pop("idle_timeout", 5.0),
    )


async def test_download_matches_and_the_temp_file_is_removed(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """open() yields a local copy equal to the served bytes, deleted when the block exits."""
    origin.routes["/media/a/b.mp4"] = serve(BODY)
    http: Source = source(origin, client, spill)
    async with http.open("a/b.mp4") as local:
        assert local.size == len(BODY)
        assert local.path.parent == spill
        assert local.path.suffix == ".mp4"
        assert await trio.Path(local.path).read_bytes() == BODY
    assert not os.listdir(spill)
    sent = origin.requests[0].headers
    assert sent["user-agent"] == f"resizer/{__version__}"
    assert sent["x-origin-token"] == "secret"
    assert sent["accept-encoding"] == "identity"


async def test_stat_reads_size_and_last_modified(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """stat() is a HEAD whose Content-Length and Last-Modified become the SourceStat."""
    origin.routes["/media/a.mp4"] = serve(BODY)
    stat = await source(origin, client, spill).stat("a.mp4")
    assert (stat.size, stat.mtime) == (len(BODY), LAST_MODIFIED_TS)
    assert [r.method for r in origin.requests] == ["HEAD"]


async def test_stat_falls_back_to_a_range_get_when_head_is_refused(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """HEAD -> 405 retries as GET bytes=0-0 and takes the size from Content-Range."""
    origin.routes["/media/a.mp4"] = no_head
    stat = await source(origin, client, spill).stat("a.mp4")
    assert (stat.size, stat.mtime) == (len(BODY), LAST_MODIFIED_TS)
    assert [(r.method, r.headers.get("range")) for r in origin.requests] == [
        ("HEAD", None),
        ("GET", "bytes=0-0"),
    ]


async def test_missing_object_is_source_not_found(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """404 and 410 are SourceNotFound from both stat() and open()."""
    origin.routes["/media/gone.mp4"] = answer(410)
    http = source(origin, client, spill)
    for path in ("nope.mp4", "gone.mp4"):
        with pytest.raises(SourceNotFound):
            await http.stat(path)
        with pytest.raises(SourceNotFound):
            async with http.open(path):
                pytest.fail("opened a missing object")
    assert not os.listdir(spill)


@pytest.mark.parametrize("status", [500, 503, 403])
async def test_origin_errors_are_origin_failed(
    origin: Origin, client: httpx.AsyncClient, spill: Path, status: int
) -> None:
    """5xx and other 4xx are OriginFailed naming the status, from stat() and open()."""
    origin.routes["/media/a.mp4"] = answer(status)
    http = source(origin, client, spill)
    with pytest.raises(OriginFailed, match=str(status)):
        await http.stat("a.mp4")
    with pytest.raises(OriginFailed, match=str(status)):
        async with http.open("a.mp4"):
            pytest.fail("opened a failed object")


async def test_redirects_to_other_hosts_are_not_followed(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """A redirect to a host outside redirect_hosts is OriginFailed; its target is never asked."""
    origin.routes["/media/a.mp4"] = answer(302, {"Location": "http://localhost:1/media/b.mp4"})
    http = source(origin, client, spill)
    with pytest.raises(OriginFailed, match="not allowed"):
        await http.stat("a.mp4")
    with pytest.raises(OriginFailed, match="not allowed"):
        async with http.open("a.mp4"):
            pytest.fail("followed a redirect")
    assert {r.target for r in origin.requests} == {"/media/a.mp4"}


async def test_redirects_to_allowed_hosts_are_followed_three_times_at_most(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """Up to three redirects within redirect_hosts (host:port) are followed; a fourth is
    OriginFailed; the host without its port allows only 80 and 443."""
    for hop in range(4):
        origin.routes[f"/media/r{hop}.mp4"] = answer(302, {"Location": f"/media/r{hop + 1}.mp4"})
    origin.routes["/media/r4.mp4"] = serve(BODY)
    port = int(origin.base_url.rsplit(":", 1)[1].split("/")[0])

    def redirecting_within(*hosts: str) -> HttpSource:
        return HttpSource(
            client, spill_dir=spill, base_url=origin.base_url, redirect_hosts=frozenset(hosts)
        )

    http = redirecting_within(f"127.0.0.1:{port}")
    async with http.open("r1.mp4") as local:  # r1 -> r2 -> r3 -> r4: three redirects
        assert local.path.read_bytes() == BODY
    with pytest.raises(OriginFailed, match="more than 3"):
        await http.stat("r0.mp4")
    with pytest.raises(OriginFailed, match="not allowed"):
        await redirecting_within("127.0.0.1").stat("r3.mp4")


async def test_private_addresses_need_to_be_named(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """Loopback is refused unless the policy names that IP; 'localhost' does not name it."""
    port = int(origin.base_url.rsplit(":", 1)[1].split("/")[0])
    origin.routes["/media/a.mp4"] = serve(BODY)

    def with_policy(base: str, policy: AddressPolicy) -> HttpSource:
        return HttpSource(client, spill_dir=spill, base_url=base, address_policy=policy)

    nothing_named = with_policy(origin.base_url, AddressPolicy())
    with pytest.raises(Forbidden):
        await nothing_named.stat("a.mp4")
    by_name = with_policy(f"http://localhost:{port}/media/", AddressPolicy.of(["localhost"]))
    with pytest.raises(Forbidden):
        await by_name.stat("a.mp4")
    named = with_policy(origin.base_url, AddressPolicy.of(["127.0.0.1"]))
    assert (await named.stat("a.mp4")).size == len(BODY)
    network = with_policy(origin.base_url, AddressPolicy.of([], ["127.0.0.0/8"]))
    assert (await network.stat("a.mp4")).size == len(BODY)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_address_policy_refuses_special_ranges(address: str, allowed: bool) -> None:
    """Only global unicast addresses pass a policy that names nothing."""
    ip = parse_ip(address)
    assert ip is not None
    assert AddressPolicy().allows(ip) is allowed
    assert AddressPolicy.of([address]).allows(ip)


async def test_unreachable_origin_is_origin_failed(client: httpx.AsyncClient, spill: Path) -> None:
    """A refused connection is OriginFailed, not a raw httpx error."""
    with trio.socket.socket() as sock:  # bind then close: a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = HttpSource(client, spill_dir=spill, base_url=f"http://127.0.0.1:{port}/")
    with pytest.raises(OriginFailed):
        await http.stat("a.mp4")


async def test_announced_oversize_is_refused_before_downloading(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """Content-Length over max_size is SourceTooLarge from stat() and from open()."""
    origin.routes["/media/big.mp4"] = serve(BODY)
    http = source(origin, client, spill, max_size=len(BODY) - 1)
    with pytest.raises(SourceTooLarge):
        await http.stat("big.mp4")
    with pytest.raises(SourceTooLarge):
        async with http.open("big.mp4"):
            pytest.fail("opened an oversize object")
    assert not os.listdir(spill)


async def test_oversize_found_while_reading_aborts_and_removes_the_file(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """A chunked body without Content-Length is cut off once it passes max_size."""
    origin.routes["/media/endless.mp4"] = endless_chunked
    http = source(origin, client, spill, max_size=1024 * 1024)
    assert (await http.stat("endless.mp4")).size == 0  # unknown until read
    with pytest.raises(SourceTooLarge):
        async with http.open("endless.mp4"):
            pytest.fail("opened an oversize object")
    assert not os.listdir(spill)


async def test_bytes_beyond_content_length_are_not_kept(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """An origin sending more than it announced yields only the announced bytes."""
    origin.routes["/media/a.mp4"] = serve(BODY, length=100)
    async with source(origin, client, spill, max_size=1000).open("a.mp4") as local:
        assert await trio.Path(local.path).read_bytes() == BODY[:100]


async def test_truncated_body_is_origin_failed_and_removed(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """A body shorter than its Content-Length is OriginFailed; no partial file survives."""
    origin.routes["/media/a.mp4"] = serve(BODY, length=len(BODY) + 10)
    with pytest.raises(OriginFailed):
        async with source(origin, client, spill).open("a.mp4"):
            pytest.fail("opened a truncated object")
    assert not os.listdir(spill)


async def test_stall_before_headers_is_origin_timeout(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """No response headers within first_byte_timeout is OriginTimeout, promptly."""
    origin.routes["/media/slow.mp4"] = stall_before_headers
    http = source(origin, client, spill, first_byte_timeout=0.2)
    start = trio.current_time()
    with pytest.raises(OriginTimeout):
        await http.stat("slow.mp4")
    with pytest.raises(OriginTimeout):
        async with http.open("slow.mp4"):
            pytest.fail("opened a stalled object")
    assert trio.current_time() - start < 1.0
    assert not os.listdir(spill)


async def test_stall_mid_body_hits_the_total_timeout(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """A body that stops flowing is OriginTimeout after total_timeout; no partial file."""
    origin.routes["/media/slow.mp4"] = stall_mid_body(trio.Event())
    http = source(origin, client, spill, total_timeout=0.3)
    with pytest.raises(OriginTimeout):
        async with http.open("slow.mp4"):
            pytest.fail("opened a stalled object")
    assert not os.listdir(spill)


async def test_stall_mid_body_hits_the_idle_timeout(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """A body that stops flowing is OriginTimeout after idle_timeout, well before
    total_timeout; no partial file."""
    origin.routes["/media/slow.mp4"] = stall_mid_body(trio.Event())
    http = source(origin, client, spill, idle_timeout=0.2, total_timeout=5.0)
    start = trio.current_time()
    with pytest.raises(OriginTimeout, match="sent nothing"):
        async with http.open("slow.mp4"):
            pytest.fail("opened a stalled object")
    assert trio.current_time() - start < 2.0
    assert not os.listdir(spill)


class Trickle(httpx.AsyncByteStream):
    """A body that sends 1 KiB every 20 s, three times, then nothing more."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 1024
            await trio.sleep(20)
        await trio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


async def test_a_range_read_ends_after_idle_timeout_without_a_byte(
    autojump_clock: trio.testing.MockClock, spill: Path
) -> None:
    """Bytes every 20 s keep a range read going past idle_timeout = 30 s; 30 s without one
    end it with OriginTimeout and close the response."""
    body = Trickle()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, stream=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        http = HttpSource(client, spill_dir=spill, base_url="http://origin.test/", idle_timeout=30)

        async def read_all() -> None:
            async with http.open_range("clip.mp4", 0, 10_000) as chunks:
                async for _ in chunks:
                    pass

        start = trio.current_time()
        with pytest.raises(OriginTimeout, match="sent nothing"):
            await read_all()
    assert trio.current_time() - start == pytest.approx(40 + 30)  # the last byte came at 40 s
    assert body.closed


async def test_a_full_pool_is_service_unavailable_after_connect_timeout(
    origin: Origin, spill: Path
) -> None:
    """With every pooled connection held by a stalled download, a new request fails with a
    503 after connect_timeout instead of queueing until its first-byte timeout."""
    started = trio.Event()
    origin.routes["/media/slow.mp4"] = stall_mid_body(started)
    origin.routes["/media/a.mp4"] = serve(BODY)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
        http = source(origin, client, spill, connect_timeout=0.2, first_byte_timeout=5.0)

        async def hold_the_connection() -> None:
            async with http.open("slow.mp4"):
                pytest.fail("a stalled download completed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_connection)
            await started.wait()
            start = trio.current_time()
            with pytest.raises(ServiceUnavailable):
                await http.stat("a.mp4")
            assert trio.current_time() - start < 2.0
            nursery.cancel_scope.cancel()


async def test_cancelled_download_leaves_no_file(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """Cancelling open() mid-download removes the partial file it had started writing."""
    started = trio.Event()
    origin.routes["/media/slow.mp4"] = stall_mid_body(started)
    http = source(origin, client, spill)

    async def download() -> None:
        async with http.open("slow.mp4"):
            pytest.fail("a stalled download completed")

    with trio.move_on_after(2.0) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await started.wait()
            # A worker thread creates the file, so there is no event to wait on: poll.
            while not os.listdir(spill):  # noqa: ASYNC110
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert not os.listdir(spill)


async def test_requests_stay_under_the_base_url(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """Hostile paths reach the origin as quoted paths under /media/, never another host."""
    http = source(origin, client, spill)
    for path in ("//evil.com/x", "http://evil.com/x", "a b/é?.mp4"):
        with pytest.raises(SourceNotFound):
            await http.stat(path)
    assert [r.target for r in origin.requests] == [
        "/media/evil.com/x",
        "/media/http:/evil.com/x",
        "/media/a%20b/%C3%A9%3F.mp4",
    ]


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("a/b.mp4", "https://cdn.example.com/media/a/b.mp4"),
        ("/a//./b.mp4", "https://cdn.example.com/media/a/b.mp4"),
        ("//evil.com/x", "https://cdn.example.com/media/evil.com/x"),
        ("http://evil.com/x", "https://cdn.example.com/media/http:/evil.com/x"),
        ("@evil.com/x", "https://cdn.example.com/media/@evil.com/x"),
        ("x?a=1#f", "https://cdn.example.com/media/x%3Fa=1%23f"),
        ("a%2Fb", "https://cdn.example.com/media/a/b"),
    ],
)
def test_join_url_keeps_the_base_host_and_prefix(relative: str, expected: str) -> None:
    """Scheme-, authority-, query- and encoded-looking paths all land under the base prefix."""
    assert str(join_url(httpx.URL("https://cdn.example.com/media/"), relative)) == expected


@pytest.mark.parametrize(
    "relative", ["../../x", "a/../../x", "%2e%2e/x", "%252e%252e/x", "a\\..\\x", "a\x00b", ""]
)
def test_join_url_refuses_escapes(relative: str) -> None:
    """'..' (plain, encoded, double-encoded, backslashed), NUL and empty paths are refused."""
    with pytest.raises(SourceNotFound):
        join_url(httpx.URL("https://cdn.example.com/media/"), relative)


@pytest.mark.parametrize(
    "path", ["a/b.mp4", "file:///etc/passwd", "ftp://cdn.example.com/a.mp4", "http:///a.mp4"]
)
async def test_without_base_url_only_absolute_http_urls_are_fetched(
    client: httpx.AsyncClient, spill: Path, path: str
) -> None:
    """With no base_url, anything but an absolute http(s) URL is Forbidden before any I/O."""
    with pytest.raises(Forbidden):
        await HttpSource(client, spill_dir=spill).stat(path)


async def test_without_base_url_an_absolute_url_is_fetched(
    origin: Origin, client: httpx.AsyncClient, spill: Path
) -> None:
    """With no base_url, the path is the URL itself."""
    origin.routes["/elsewhere/a.mp4"] = serve(BODY)
    http = HttpSource(client, spill_dir=spill)
    stat = await http.stat(f"http://127.0.0.1:{origin.port}/elsewhere/a.mp4")
    assert stat.size == len(BODY)


@pytest.mark.parametrize(
    "base_url", ["cdn.example.com/media", "ftp://cdn.example.com/", "https://cdn/x?a=1"]
)
def test_bad_base_url_is_a_construction_error(base_url: str, tmp_path: Path) -> None:
    """A base_url that is not an absolute http(s) URL without a query fails at start-up."""
    client = httpx.AsyncClient()  # never used, so never needs closing
    with pytest.raises(ValueError, match="base_url"):
        HttpSource(client, spill_dir=tmp_path, base_url=base_url)
