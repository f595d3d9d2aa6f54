"""A loopback HTTP server that lets ffmpeg seek in a remote source without downloading it.

A frame at 1:58:00 of a 2 GB remote MP4 needs the ``moov`` atom (often at the end) and a few
hundred kilobytes around one keyframe, not the whole file. ffmpeg can read HTTP with byte
ranges, but pointing it at the origin would bypass everything resizer enforces there
(credentials, SigV4 signing, the address policy, the redirect allow-list, breakers). So ffmpeg
reads ``http://127.0.0.1:<port>/<token>`` instead, and each of its range requests is answered
by the source's own ``open_range``, through resizer's HTTP client.

One request per connection (ffmpeg opens a new one for each seek); a connection closed by
ffmpeg mid-body cancels the origin request with it. Tokens are random and live only while a
transformation uses them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import h11
import structlog
import trio

from ..errors import ResizerError

log = structlog.get_logger(__name__)

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_MAX_REQUEST_HEAD = 16 * 1024
_SEND_BUFFER = 64 * 1024


@runtime_checkable
class RangeSource(Protocol):
    def open_range(
        self, path: str, start: int, stop: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


@dataclass(frozen=True, slots=True)
class _Exposed:
    source: RangeSource
    path: str
    size: int


class RangeProxy:
    def __init__(self) -> None:
        self._exposed: dict[str, _Exposed] = {}
        self.port = 0
        self.requests = 0
        self.bytes_sent = 0
        self.active = 0  # connections being answered

    def __len__(self) -> int:
        return len(self._exposed)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (a free port) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)
        finally:
            for listener in listeners:
                listener.socket.close()  # serve_listeners leaves them open when cancelled

    @contextmanager
    def expose(self, source: RangeSource, path: str, size: int) -> Iterator[str]:
        """A URL ffmpeg can read ``path`` of ``source`` from, valid inside the block."""
        assert self.port, "the proxy is not serving"
        token = secrets.token_urlsafe(16)
        self._exposed[token] = _Exposed(source, path, size)
        try:
            yield f"http://127.0.0.1:{self.port}/{token}"
        finally:
            del self._exposed[token]

    async def _handle(self, stream: trio.SocketStream) -> None:
        # ffmpeg seeks by dropping a connection mid-body; whatever sits in the socket buffer
        # then was fetched for nothing. Loopback buffers grow to megabytes: keep them small.
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, _SEND_BUFFER)
        self.active += 1
        try:
            await self._handle_stream(stream)
        finally:
            self.active -= 1

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                pass  # ffmpeg closed the connection (it seeks by reconnecting)
            except ResizerError as exc:
                log.info("range_proxy_origin_failed", error=exc.message)

    async def _answer(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        request = await _read_request(stream, connection)
        if request is None:
            return
        self.requests += 1
        exposed = self._exposed.get(request.target.decode("ascii", "replace").lstrip("/"))
        if exposed is None or request.method not in (b"GET", b"HEAD"):
            await _send_simple(stream, connection, 404)
            return
        span = _parse_range(dict(request.headers).get(b"range", b"").decode(), exposed.size)
        if span is None:
            await _send_simple(
                stream, connection, 416, [(b"content-range", f"bytes */{exposed.size}".encode())]
            )
            return
        start, stop = span
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"accept-ranges", b"bytes"),
            (b"content-length", str(stop - start).encode()),
            (b"content-range", f"bytes {start}-{stop - 1}/{exposed.size}".encode()),
            (b"connection", b"close"),
        ]
        await stream.send_all(connection.send(h11.Response(status_code=206, headers=headers)))
        if request.method == b"HEAD" or stop == start:
            await stream.send_all(connection.send(h11.EndOfMessage()))
            return
        async with exposed.source.open_range(exposed.path, start, stop) as chunks:
            async for chunk in chunks:
                self.bytes_sent += len(chunk)
                await stream.send_all(connection.send(h11.Data(data=chunk)))
        await stream.send_all(connection.send(h11.EndOfMessage()))


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-`` or ``bytes=a-b`` (what ffmpeg sends) as [start, stop); none: all."""
    if not header:
        return (0, size)
    found = _RANGE_RE.match(header.strip())
    if found is None:
        return (0, size)
    start = int(found[1])
    stop = min(size, int(found[2]) + 1) if found[2] else size
    if start >= size or stop <= start:
        return None
    return (start, stop)


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection
) -> h11.Request | None:
    received = 0
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            received += len(data)
            if not data or received > _MAX_REQUEST_HEAD:
                return None
            connection.receive_data(data)
            continue
        return None


async def _send_simple(
    stream: trio.SocketStream,
    connection: h11.Connection,
    status: int,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-length", b"0"), (b"connection", b"close"), *(extra or [])]
    await stream.send_all(connection.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(connection.send(h11.EndOfMessage()))
