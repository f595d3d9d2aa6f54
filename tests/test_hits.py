"""The hit fast path: planning a hit (pure) and streaming it until the client leaves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from resizer.cache.base import ChunkSize, EntryMeta
from resizer.cache.disk import DiskCacheStore
from resizer.errors import PreconditionFailed
from resizer.options import cache_key
from resizer.pipeline import Service, open_service
from resizer.responsive import resolve_options
from resizer.targets import parse_target
from resizer.transform.fake import FakeTransformer
from resizer.units import MiB
from resizer.web.hits import HitFastPath, plan_hit
from resizer.web.ranges import http_date
from tests.harness import fake_origin_config

ENTRY = EntryMeta(
    key="k",
    content_type="video/mp4",
    size=1000,
    etag='"0123abcd"',
    created=1_700_000_000.5,
    ttl=3600,
    options="",
)
NOW = ENTRY.created + 10


# --- plan_hit (both hit paths use it) ---------------------------------------------------


def test_if_range_with_last_modified_gets_the_range() -> None:
    """If-Range equal to Last-Modified honours the Range (206); another date sends all."""
    ranged = {"range": "bytes=0-9", "if-range": http_date(ENTRY.created)}
    plan = plan_hit(ENTRY, ranged, NOW)
    assert (plan.status, plan.headers["Content-Range"]) == (206, "bytes 0-9/1000")
    stale = {**ranged, "if-range": http_date(ENTRY.created - 60)}
    plan = plan_hit(ENTRY, stale, NOW)
    assert (plan.status, plan.headers["Content-Length"]) == (200, "1000")
    assert "Content-Range" not in plan.headers


@pytest.mark.parametrize(
    "headers",
    [
        {"if-match": '"other"'},
        {"if-match": f"W/{ENTRY.etag}"},
        {"if-unmodified-since": http_date(ENTRY.created - 60)},
        {"if-match": '"other"', "if-none-match": ENTRY.etag},  # 412 before 304
        {"if-match": '"other"', "range": "bytes=5000-"},  # 412 before 416
    ],
)
def test_failed_preconditions_are_412(headers: dict[str, str]) -> None:
    """A failing If-Match or If-Unmodified-Since is 412, ahead of 304 and 416."""
    with pytest.raises(PreconditionFailed) as info:
        plan_hit(ENTRY, headers, NOW)
    assert info.value.status == 412


def test_holding_preconditions_serve_the_entry() -> None:
    """If-Match on the current tag (or '*') and a later If-Unmodified-Since change nothing."""
    for headers in (
        {"if-match": ENTRY.etag, "range": "bytes=0-9"},
        {"if-match": "*", "range": "bytes=0-9"},
        {"if-unmodified-since": http_date(ENTRY.created), "range": "bytes=0-9"},
    ):
        assert plan_hit(ENTRY, headers, NOW).status == 206


# --- streaming a hit: the client leaving stops the reads --------------------------------

PATH, QUERY = "/v/clip.mp4", b"width=320"
SIZE = 8 * MiB


@asynccontextmanager
async def service_with_entry(tmp_path: Path) -> AsyncIterator[tuple[Service, bytes]]:
    """A service whose disk cache holds a SIZE-byte entry for PATH?QUERY."""
    cache = DiskCacheStore(tmp_path / "cache")
    cache.prepare()
    config = fake_origin_config(tmp_path / "cache")
    async with open_service(config, cache=cache, transformer=FakeTransformer()) as service:
        target = parse_target(PATH, QUERY)
        options = resolve_options(target.params, {}, service.policy).options
        data = bytes(range(256)) * (SIZE // 256)
        async with cache.open_writer(
            cache_key(target.source, options), content_type="video/mp4", ttl=3600, options=""
        ) as writer:
            await writer.write(data)
            await writer.commit()
        yield service, data


class CountingReader:
    """Counts the chunks read from the cache."""

    def __init__(self, reader: AsyncIterator[bytes], reads: list[int]) -> None:
        self._reader = reader
        self._reads = reads

    def __aiter__(self) -> CountingReader:
        return self

    async def __anext__(self) -> bytes:
        data = await self._reader.__anext__()
        self._reads.append(len(data))
        return data


def count_reads(service: Service, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    reads: list[int] = []
    original = service.cache.open_range

    @asynccontextmanager
    async def open_range(
        entry: EntryMeta, start: int, stop: int, chunk_size: ChunkSize
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        async with original(entry, start, stop, chunk_size) as reader:
            yield CountingReader(reader, reads)

    monkeypatch.setattr(service.cache, "open_range", open_range)
    return reads


async def not_for_quart(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the fast path should have answered this hit")


async def get_from_fast_path(
    service: Service,
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Call the fast path as hypercorn would (its fakes are plain dicts, hence Any)."""
    app: Any = HitFastPath(not_for_quart, service)
    scope = {"type": "http", "method": "GET", "path": PATH, "query_string": QUERY, "headers": []}
    await app(scope, receive, send)


def receiver(disconnect: trio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """hypercorn's receive: the request, then http.disconnect once ``disconnect`` is set."""
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        for message in messages:
            await trio.lowlevel.checkpoint()
            return message
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return receive


async def test_a_hit_stops_reading_when_the_client_disconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer resets during the first chunk: at most one more chunk is read, nothing more
    is sent, no final message, and the stream counts as aborted."""
    async with service_with_entry(tmp_path) as (service, _):
        reads = count_reads(service, monkeypatch)
        sent: list[dict[str, Any]] = []
        gone = trio.Event()

        async def send(message: dict[str, Any]) -> None:
            # Like hypercorn: a send to a reset peer "succeeds", and queues http.disconnect.
            sent.append(message)
            if message.get("body"):
                gone.set()
            await trio.lowlevel.checkpoint()

        with trio.fail_after(10):
            await get_from_fast_path(service, receiver(gone), send)
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        assert sent[0]["type"] == "http.response.start"
        assert len(bodies) == 1
        assert bodies[0]["more_body"]  # never a final message: the body is not complete
        assert len(reads) <= 2
        assert sum(reads) < SIZE // 4
        assert service.metrics.stream_aborts._value.get() == 1
        assert service.stream_budget.used == 0


async def test_a_complete_hit_leaves_no_task_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a disconnect the whole entry is sent and the handler returns (the task that
    waits for a disconnect does not outlive the body); nothing counts as aborted."""
    async with service_with_entry(tmp_path) as (service, data):
        reads = count_reads(service, monkeypatch)
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            await trio.lowlevel.checkpoint()

        with trio.fail_after(10):
            await get_from_fast_path(service, receiver(trio.Event()), send)
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        assert b"".join(m["body"] for m in bodies) == data
        assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert sum(reads) == SIZE
        assert service.metrics.stream_aborts._value.get() == 0
