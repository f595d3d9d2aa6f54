"""The loopback range proxy ffmpeg seeks through, with an in-memory source behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

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
    with proxy.expose(source, "clip.mp4", len(DATA)) as url:
        async with httpx.AsyncClient() as client:
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
    with proxy.expose(source, "clip.mp4", len(DATA)) as url:
        async with httpx.AsyncClient() as client:
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
    with proxy.expose(big, "clip.mp4", len(big.data)) as url:
        async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
            async for _ in response.aiter_raw():
                break
        with trio.fail_after(10):
            while True:  # the handler ends once it notices the closed connection
                if not proxy.active:
                    break
                await trio.sleep(0.01)
    assert proxy.bytes_sent < len(big.data) // 2
