"""The loopback range proxy ffmpeg seeks through, with an in-memory source behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from resizer.errors import TransformFailed
from resizer.sources.http import HttpSource, make_http_client
from resizer.sources.range_proxy import RangeProxy

DATA = bytes(range(256)) * 100


class MemoryRanges:
    """``open_range`` over bytes in memory, recording what was asked."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked: list[tuple[int, int]] = []

    @asynccontextmanager
    async def open_range(
        self, path: str, start: int, stop: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        self.asked.append((start, stop))

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(start, stop, 1000):
                await trio.lowlevel.checkpoint()
                yield self.data[offset : min(stop, offset + 1000)]

        yield chunks()


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> RangeProxy:
    proxy = RangeProxy()
    await nursery.start(proxy.serve)
    return proxy


async def test_ranges_are_answered_from_the_source(proxy: RangeProxy) -> None:
    """bytes=a-b, bytes=a- and no Range give 206 with exactly those bytes from the source."""
    source = MemoryRanges(DATA)
    async with proxy.expose(source, "clip.mp4", len(DATA)) as url, httpx.AsyncClient() as client:
        closed = await client.get(url, headers={"Range": "bytes=100-199"})
        open_ended = await client.get(url, headers={"Range": "bytes=25000-"})
        whole = await client.get(url)
    assert closed.status_code == 206
    assert closed.headers["Content-Range"] == f"bytes 100-199/{len(DATA)}"
    assert closed.content == DATA[100:200]
    assert open_ended.content == DATA[25000:]
    assert whole.content == DATA
    assert source.asked == [(100, 200), (25000, len(DATA)), (0, len(DATA))]


async def test_unknown_tokens_and_bad_ranges_are_refused(proxy: RangeProxy) -> None:
    """A token that is not exposed (or no longer) is 404; a range past the end is 416."""
    source = MemoryRanges(DATA)
    async with proxy.expose(source, "clip.mp4", len(DATA)) as url, httpx.AsyncClient() as client:
        past_end = await client.get(url, headers={"Range": f"bytes={len(DATA)}-"})
    async with httpx.AsyncClient() as client:
        expired = await client.get(url)
        guessed = await client.get(url.rsplit("/", 1)[0] + "/nope")
    assert past_end.status_code == 416
    assert (expired.status_code, guessed.status_code) == (404, 404)
    assert source.asked == []
    assert len(proxy) == 0


async def test_a_reader_that_leaves_early_stops_the_origin_read(proxy: RangeProxy) -> None:
    """ffmpeg seeks by dropping the connection: the proxy stops reading the source."""
    big = MemoryRanges(DATA * 100)
    async with proxy.expose(big, "clip.mp4", len(big.data)) as url:
        async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
            async for _ in response.aiter_raw():
                break
        with trio.fail_after(10):
            while True:  # the handler ends once it notices the closed connection
                if not proxy.active:
                    break
                await trio.sleep(0.01)
    assert proxy.bytes_sent < len(big.data) // 2


STALLED_SIZE = 100_000


@dataclass
class StallingOrigin:
    """Answers a range request with its first 40 KB, then nothing until the client leaves."""

    port: int = 0
    stalled: trio.Event = field(default_factory=trio.Event)  # the 40 KB are sent
    hung_up: trio.Event = field(default_factory=trio.Event)  # the client closed its end

    async def handle(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        last = STALLED_SIZE - 1
        await stream.send_all(
            f"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-{last}/{STALLED_SIZE}\r\n"
            f"Content-Length: {STALLED_SIZE}\r\n\r\n".encode()
            + b"x" * 40_000
        )
        self.stalled.set()
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        self.hung_up.set()


@pytest.fixture
async def stalling(nursery: trio.Nursery) -> StallingOrigin:
    origin = StallingOrigin()
    listeners = await nursery.start(partial(trio.serve_tcp, origin.handle, 0, host="127.0.0.1"))
    origin.port = listeners[0].socket.getsockname()[1]
    return origin


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client(connect_timeout=1.0) as client:
        yield client


def stalling_source(origin: StallingOrigin, client: httpx.AsyncClient, spill: Path) -> HttpSource:
    return HttpSource(client, spill_dir=spill, base_url=f"http://127.0.0.1:{origin.port}/")


async def start_reading(url: str, origin: StallingOrigin) -> trio.SocketStream:
    """Connect like ffmpeg and ask for everything; return once body bytes have arrived."""
    host, port, path = url.removeprefix("http://").replace(":", "/", 1).split("/", 2)
    reader = await trio.open_tcp_stream(host, int(port))
    await reader.send_all(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    received = b""
    with trio.fail_after(5):
        await origin.stalled.wait()
        while not received.partition(b"\r\n\r\n")[2]:  # the head, then some of the body
            received += await reader.receive_some(65536)
    assert received.startswith(b"HTTP/1.1 206")
    return reader


async def test_leaving_the_exposure_ends_its_connections(
    proxy: RangeProxy, stalling: StallingOrigin, client: httpx.AsyncClient, spill: Path
) -> None:
    """ffmpeg failing ends the exposure's connections, though their reader is still connected
    and the origin stalled mid-body: none is left, the origin's connection is closed, and the
    failure leaves the block as itself."""
    source = stalling_source(stalling, client, spill)
    readers: list[trio.SocketStream] = []

    async def transform() -> None:
        async with proxy.expose(source, "clip.mp4", STALLED_SIZE) as url:
            readers.append(await start_reading(url, stalling))
            raise TransformFailed("ffmpeg was killed")

    with pytest.raises(TransformFailed):
        await transform()
    async with readers[0]:
        assert proxy.active == 0
        with trio.fail_after(5):
            await stalling.hung_up.wait()


async def test_a_cancelled_exposure_ends_its_connections_and_stays_plain_cancelled(
    proxy: RangeProxy, stalling: StallingOrigin, client: httpx.AsyncClient, spill: Path
) -> None:
    """Cancelling the work ends the exposure's stalled connections; the caller sees a bare
    trio.Cancelled, not a group holding one per connection."""
    source = stalling_source(stalling, client, spill)
    seen: BaseException | None = None
    with trio.CancelScope() as work:
        try:
            async with proxy.expose(source, "clip.mp4", STALLED_SIZE) as url:
                reader = await start_reading(url, stalling)
                work.cancel()
                await trio.sleep_forever()
        except BaseException as exc:
            seen = exc
            raise
    assert type(seen) is trio.Cancelled
    async with reader:
        assert proxy.active == 0
        with trio.fail_after(5):
            await stalling.hung_up.wait()


async def test_a_reader_hanging_up_ends_a_stalled_origin_read_at_once(
    proxy: RangeProxy, stalling: StallingOrigin, client: httpx.AsyncClient, spill: Path
) -> None:
    """ffmpeg closing its connection ends the answer while it waits for origin bytes (not at
    its next send, which never comes): the origin connection closes inside the exposure."""
    source = stalling_source(stalling, client, spill)
    async with proxy.expose(source, "clip.mp4", STALLED_SIZE) as url:
        reader = await start_reading(url, stalling)
        await reader.aclose()
        with trio.fail_after(5):
            await stalling.hung_up.wait()
        await wait_all_tasks_blocked()  # the handler finishes closing
        assert proxy.active == 0
