"""Integration: hits and conditional requests over HTTP against the real server (fake
transformer): a client leaving mid-hit, If-Range / If-Match / If-Unmodified-Since on hits
and misses, and one cache key per remote URL whichever path computes it."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from resizer.cache.base import ChunkSize, EntryMeta
from resizer.transform.fake import FakeTransformer
from resizer.units import MiB
from tests.origin import Behaviour, start_origin
from tests.server import RunningServer, server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"


@pytest.fixture
def media(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"source" * 1000)  # the fake transformer never decodes
    return folder


async def serve(
    nursery: trio.Nursery, media: Path, tmp_path: Path, fake: FakeTransformer, extra: str = ""
) -> tuple[RunningServer, httpx.AsyncClient]:
    server = await start_server(nursery, server_config(media, tmp_path / "cache", extra), fake)
    return server, httpx.AsyncClient(base_url=server.url, timeout=30)


def counter(server: RunningServer, name: str) -> float:
    value: float = getattr(server.service.metrics, name)._value.get()
    return value


# --- a client leaving in the middle of a hit --------------------------------------------


def count_reads(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every chunk the server reads from its cache from now on."""
    reads: list[int] = []
    original = server.service.cache.open_range

    class Counting:
        def __init__(self, reader: AsyncIterator[bytes]) -> None:
            self.reader = reader

        def __aiter__(self) -> Counting:
            return self

        async def __anext__(self) -> bytes:
            data = await self.reader.__anext__()
            reads.append(len(data))
            return data

    def open_range(entry: EntryMeta, start: int, stop: int, chunk_size: ChunkSize) -> Any:
        manager = original(entry, start, stop, chunk_size)

        class Wrapped:
            async def __aenter__(self) -> Counting:
                return Counting(await manager.__aenter__())

            async def __aexit__(self, *exc: object) -> bool | None:
                return await manager.__aexit__(*exc)  # type: ignore[arg-type]

        return Wrapped()

    monkeypatch.setattr(server.service.cache, "open_range", open_range)
    return reads


async def test_a_hit_stops_reading_soon_after_the_client_resets(
    media: Path, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reads 256 KiB of a 64 MiB hit and resets: the server reads at most two more
    chunks after the reset (it read the whole entry for nobody) and counts an abort."""
    size = 64 * MiB
    fake = FakeTransformer(output=b"\x00" * size, chunk_size=MiB)
    server, client = await serve(nursery, media, tmp_path, fake)
    async with client:
        assert len((await client.get(CLIP)).content) == size  # now cached
    reads = count_reads(server, monkeypatch)
    stream = await trio.open_tcp_stream(server.host, server.port)
    await stream.send_all(f"GET {CLIP} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    with trio.fail_after(10):
        while received < 256 * 1024:
            received += len(await stream.receive_some(65536))
    # SO_LINGER 0: close() sends a RST, as a browser cancelling a video does.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    read_before_reset = sum(reads)
    await stream.aclose()
    with trio.fail_after(5):
        while counter(server, "stream_aborts") < 1:  # noqa: ASYNC110 - a counter has no event
            await trio.sleep(0.01)
    await trio.sleep(0.2)  # anything still reading would go on now
    assert sum(reads) - read_before_reset <= 2 * server.service.config.cache.max_read_chunk
    assert sum(reads) < size // 2
    assert counter(server, "stream_aborts") == 1


async def read_response(stream: trio.SocketStream, pending: bytearray) -> tuple[int, bytes]:
    """One Content-Length response from ``stream`` (``pending``: bytes already received)."""
    while b"\r\n\r\n" not in pending:
        pending += await stream.receive_some(65536)
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    body = bytearray(rest)
    while len(body) < length:
        body += await stream.receive_some(65536)
    pending[:] = body[length:]
    return int(lines[0].split()[1]), bytes(body[:length])


async def test_hits_complete_and_the_connection_stays_usable(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Three hits in a row on one keep-alive connection are whole, and none is an abort
    (the task waiting for a disconnect ends with each body)."""
    fake = FakeTransformer(size=3 * MiB, chunk_size=256 * 1024)
    server, client = await serve(nursery, media, tmp_path, fake)
    async with client:
        expected = (await client.get(CLIP)).content
    stream = await trio.open_tcp_stream(server.host, server.port)
    pending = bytearray()
    with trio.fail_after(10):
        for _ in range(3):
            await stream.send_all(f"GET {CLIP} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert await read_response(stream, pending) == (200, expected)
    await stream.aclose()
    assert counter(server, "cache_hits") == 3
    assert counter(server, "stream_aborts") == 0


# --- conditional requests ---------------------------------------------------------------


async def test_if_range_on_a_miss_sends_the_whole_output(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Range with an If-Range on an uncached variant is a 200 of everything (no validator
    can match output not yet made); without If-Range the Range is still served."""
    fake = FakeTransformer(size=5000)
    _, client = await serve(nursery, media, tmp_path, fake)
    async with client:
        stale = await client.get(
            CLIP, params={"width": "100"}, headers={"Range": "bytes=0-9", "If-Range": '"zzz"'}
        )
        assert stale.status_code == 200, stale.text
        assert stale.headers["X-Cache-Status"] == "MISS"
        assert "Content-Range" not in stale.headers
        assert len(stale.content) == 5000
        ranged = await client.get(CLIP, params={"width": "120"}, headers={"Range": "bytes=0-9"})
        assert (ranged.status_code, ranged.headers["Content-Range"]) == (206, "bytes 0-9/*")


async def test_if_range_with_the_last_modified_date_on_a_hit(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A hit honours a Range whose If-Range is the entry's Last-Modified; an older date
    gets the whole entry."""
    _, client = await serve(nursery, media, tmp_path, FakeTransformer(size=5000))
    async with client:
        body = (await client.get(CLIP)).content
        last_modified = (await client.head(CLIP)).headers["Last-Modified"]
        same = await client.get(CLIP, headers={"Range": "bytes=0-9", "If-Range": last_modified})
        assert (same.status_code, same.headers["Content-Range"]) == (206, "bytes 0-9/5000")
        assert same.content == body[:10]
        older = await client.get(
            CLIP, headers={"Range": "bytes=0-9", "If-Range": "Sun, 06 Nov 1994 08:49:37 GMT"}
        )
        assert (older.status_code, older.content) == (200, body)


@pytest.mark.parametrize(
    "headers",
    [{"If-Match": '"other"'}, {"If-Unmodified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}],
)
async def test_failed_preconditions_on_a_hit_are_412(
    media: Path, tmp_path: Path, nursery: trio.Nursery, headers: dict[str, str]
) -> None:
    """If-Match with another tag, or an entry modified since If-Unmodified-Since: 412 JSON;
    the current tag passes."""
    _, client = await serve(nursery, media, tmp_path, FakeTransformer(size=5000))
    async with client:
        await client.get(CLIP)  # now cached
        etag = (await client.head(CLIP)).headers["ETag"]
        failed = await client.get(CLIP, headers=headers)
        assert failed.status_code == 412, failed.text
        assert failed.json()["error"] == "precondition_failed"
        assert failed.headers["Cache-Control"] == "no-store"
        matching = await client.get(CLIP, headers={"If-Match": etag, "Range": "bytes=0-9"})
        assert matching.status_code == 206


async def test_if_match_on_a_miss(media: Path, tmp_path: Path, nursery: trio.Nursery) -> None:
    """On a miss a listed tag cannot be the current one (412, and no transform starts);
    If-Match: * holds, since the variant exists (it is made on demand), and so
    If-None-Match: * answers 304."""
    fake = FakeTransformer(size=5000)
    _, client = await serve(nursery, media, tmp_path, fake)
    async with client:
        failed = await client.get(CLIP, headers={"If-Match": '"abc"'})
        assert failed.status_code == 412, failed.text
        unchanged = await client.get(CLIP, headers={"If-None-Match": "*"})
        assert (unchanged.status_code, unchanged.content) == (304, b"")
        assert fake.runs_started == 0
        star = await client.get(CLIP, headers={"If-Match": "*"})
        assert (star.status_code, star.headers["X-Cache-Status"]) == (200, "MISS")
        assert len(star.content) == 5000


# --- one key per remote URL on both paths -----------------------------------------------


async def test_remote_query_order_makes_distinct_keys_on_both_paths(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """?b=2&a=1 and ?a=1&b=2 of a remote source are two entries; repeating either is a
    hit the fast path answers (no cache miss counted), never the other URL's entry."""
    origin = await start_origin(nursery, {"/bikes.mp4": Behaviour(body=b"remote" * 1000)})
    host_port = origin.url.removeprefix("http://")
    extra = f'[security]\nallowed_remote_hosts = ["{host_port}"]\n'
    server, client = await serve(nursery, media, tmp_path, FakeTransformer(size=5000), extra)
    base = f"/cdn-cgi/media/mode=frame,width=100/{origin.url}/bikes.mp4"
    async with client:
        for query in ("?b=2&a=1", "?a=1&b=2"):
            first = await client.get(base + query)
            assert first.status_code == 200, first.text
            assert first.headers["X-Cache-Status"] == "MISS", query
            misses = counter(server, "cache_misses")
            again = await client.get(base + query)
            assert again.headers["X-Cache-Status"] == "HIT", query
            assert counter(server, "cache_misses") == misses, "the fast path missed"
    assert counter(server, "transforms") == 2
