"""A loopback HTTP server that lets ffmpeg seek in a remote source without downloading it.

A frame at 1:58:00 of a 2 GB remote MP4 needs the ``moov`` atom (often at the end) and a few
hundred kilobytes around one keyframe, not the whole file. ffmpeg can read HTTP with byte
ranges, but pointing it at the origin would bypass everything resizer enforces there
(credentials, SigV4 signing, the address policy, the redirect allow-list, breakers). So ffmpeg
reads ``http://127.0.0.1:<port>/<token>`` instead, and each of its range requests is answered
by the source's own ``open_range``, through resizer's HTTP client.

One request per connection (ffmpeg opens a new one for each seek). Tokens are random and
live only while a transformation uses them. The listener is a long-lived service, but it only
reads a request's head: the connection is then answered in a nursery of the ``expose`` block
that owns the token, so leaving that block (ffmpeg done or killed, the work cancelled) ends
its connections and their origin requests. A connection closed by ffmpeg ends its origin
request at once, even while that request waits for origin bytes.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import h11
import structlog
import trio

from ..concurrency.groups import unwrap_single_exception
from ..errors import ResizerError
from ..units import MILLISECONDS, SECONDS

log = structlog.get_logger(__name__)

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_MAX_REQUEST_HEAD = 16 * 1024
_SEND_BUFFER = 64 * 1024
# ffmpeg sends its request as soon as it connects; anything slower is not ffmpeg.
_REQUEST_HEAD_TIMEOUT = 10 * SECONDS
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY = 100 * MILLISECONDS


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
    handlers: trio.Nursery  # the exposing block's: its connections end with it
    # One per connection: shielded from outer cancellation, so that only the block's own
    # exception leaves its nursery, and cancelled by the block when it ends.
    scopes: set[trio.CancelScope] = field(default_factory=set)


class RangeProxy:
    def __init__(self) -> None:
        self._exposed: dict[str, _Exposed] = {}
        self.port = 0
        self.requests = 0
        self.bytes_sent = 0
        self.active = 0  # connections being answered for an exposure

    def __len__(self) -> int:
        return len(self._exposed)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (a free port) until cancelled."""
        # Not trio.serve_listeners: it closes each connection when its handler returns, and
        # ours hands connections over to the exposures they read.
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener, trio.open_nursery() as routers:
            self.port = listener.socket.getsockname()[1]
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors or memory: retry once some are freed (as trio does).
                    log.warning("range_proxy_accept_failed", error=os.strerror(exc.errno))
                    await trio.sleep(_ACCEPT_RETRY)
                    continue
                routers.start_soon(self._handle, stream)

    @asynccontextmanager
    async def expose(self, source: RangeSource, path: str, size: int) -> AsyncIterator[str]:
        """A URL ffmpeg can read ``path`` of ``source`` from, valid inside the block.

        The connections reading it are answered in this block's nursery: leaving the block
        cancels them, closing their origin responses.
        """
        assert self.port, "the proxy is not serving"
        token = secrets.token_urlsafe(16)
        # Handlers neither raise nor see outer cancellation (see _Exposed.scopes), so only
        # the block's exception leaves the nursery: unwrap it from trio's group.
        with unwrap_single_exception():
            async with trio.open_nursery() as handlers:
                exposed = self._exposed[token] = _Exposed(source, path, size, handlers)
                try:
                    yield f"http://127.0.0.1:{self.port}/{token}"
                finally:
                    # In one step, so the listener never hands a connection over after it.
                    del self._exposed[token]
                    for scope in exposed.scopes:
                        scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Read the request; refuse it here, or hand the connection to its exposure."""
        # ffmpeg seeks by dropping a connection mid-body; whatever sits in the socket buffer
        # then was fetched for nothing. Loopback buffers grow to megabytes: keep them small.
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, _SEND_BUFFER)
        handed_over = False
        try:
            with trio.move_on_after(_REQUEST_HEAD_TIMEOUT):
                handed_over = await self._route(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away before its request was answered
        finally:
            if not handed_over:
                await trio.aclose_forcefully(stream)

    async def _route(self, stream: trio.SocketStream) -> bool:
        """Whether the connection was handed to the exposure its request names."""
        connection = h11.Connection(h11.SERVER)
        request = await _read_request(stream, connection)
        if request is None:
            return False
        self.requests += 1
        exposed = self._exposed.get(request.target.decode("ascii", "replace").lstrip("/"))
        if exposed is None or request.method not in (b"GET", b"HEAD"):
            await _send_simple(stream, connection, 404)
            return False
        # Registered now, not when the task starts, so that leaving the block cancels it.
        scope = trio.CancelScope(shield=True)
        exposed.scopes.add(scope)
        exposed.handlers.start_soon(self._serve, stream, connection, request, exposed, scope)
        return True

    async def _serve(
        self,
        stream: trio.SocketStream,
        connection: h11.Connection,
        request: h11.Request,
        exposed: _Exposed,
        scope: trio.CancelScope,
    ) -> None:
        self.active += 1
        try:
            with scope:
                async with stream, trio.open_nursery() as nursery:
                    # Waiting for origin bytes, the answer would see ffmpeg leave only at its
                    # next send, which a stalled origin postpones forever.
                    nursery.start_soon(_cancel_on_hangup, stream, nursery.cancel_scope)
                    try:
                        await self._answer(stream, connection, request, exposed)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # ffmpeg closed the connection (it seeks by reconnecting)
                    except ResizerError as exc:
                        log.info("range_proxy_origin_failed", error=exc.message)
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            exposed.scopes.discard(scope)
            self.active -= 1

    async def _answer(
        self,
        stream: trio.SocketStream,
        connection: h11.Connection,
        request: h11.Request,
        exposed: _Exposed,
    ) -> None:
        span = _parse_range(
            dict(request.headers).get(b"range", b"").decode("latin-1"), exposed.size
        )
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


async def _cancel_on_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client closes its end (it sends nothing after its request)."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # a reset is a hang-up too
    scope.cancel()


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
