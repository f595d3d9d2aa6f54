"""Cache hits at kernel speed: each connection meets a hit layer before hypercorn.

A hit answered through ASGI costs a millisecond or more of Python per request and copies
every byte through Python and hypercorn (0.12x nginx on a 1.9 MB video, 0.03x on a 50 KB
frame, measured with wrk), while a plain trio loop around ``os.sendfile`` matches nginx on
large bodies: the ceiling is the kernel, not Python. So resizer owns each accepted plain
HTTP/1.1 connection first. ``HitFirstConnection`` parses the plainest requests itself (a
strict subset of HTTP/1.1; anything else goes to hypercorn's h11) and answers the ones that
are cache hits: no origin check, the entry recalled from memory, the pure work of a URL
(target, options, key, header fields) memoised, and the body sent by ``os.sendfile`` from
the cache file straight to the socket (nothing in user space, so a client that stops reading
holds no memory, only its socket).

At the first request it does not take, it hands the connection to hypercorn's own
``TCPServer`` together with the bytes of that request (and anything after it), and from then
on hypercorn owns the connection exactly as before. Not taken: misses (ffmpeg's output must
stream from the spool), other routes and methods, requests with a body or with both
``Transfer-Encoding`` and ``Content-Length`` (the guard refuses those), HTTP/1.0,
``Expect``, upgrades, absolute-form targets, anything h11 finds malformed, a cache that is
not on disk, and any response that would not be a plain hit (errors, 412/416, the memory
cache). TLS and HTTP/2 never come here: sendfile cannot encrypt, and hypercorn terminates
them. With ``[server] accel_redirect`` (behind nginx) a hit's answer here is the empty
``X-Accel-Redirect`` response of ``web.accel``, and nginx sends the file.

Each hit answered here gets the same access-log line and request metrics as one answered
through ASGI (``web.requestlog``), its ``X-Request-Id`` and a ``Server-Timing`` naming its
lookup; its body bytes are those sendfile actually sent.

hypercorn builds a ``TCPServer(app, config, context, state, stream)`` for every accepted
connection; ``use_hit_connections`` makes its trio worker build a ``HitFirstConnection``
(same signature) instead, which finds the service's ``ZeroCopyHits`` on the app it was given.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer

from ..cache.base import EntryMeta
from ..cache.disk import DiskCacheStore
from ..errors import ResizerError
from ..options import cache_key
from ..pipeline import Service
from ..responsive import HINT_HEADERS, resolve_options
from ..targets import parse_target
from ..units import KiB, MiB
from .accel import accel_headers
from .cors import CorsPolicy, response_headers
from .debug_view import is_debug_request
from .hits import HitPlan, negotiation_headers, plan_hit
from .ranges import ByteRange
from .requestlog import RequestRecord, finish, open_record, request_id_for

log = structlog.get_logger(__name__)

MAX_HEAD = 16 * KiB  # a request head larger than this goes to hypercorn (it answers 431/400)
_RECEIVE = 64 * KiB
# A body is sent in sendfile calls of at most this, with a checkpoint between them: one
# fast client on loopback must not keep the event loop from everyone else.
SENDFILE_SLICE = 1 * MiB
_NOT_HERE = frozenset({"/healthz", "/metrics", "/readyz", "/admin/inflight"})
# No MSG_MORE on the head: corked before a sendfile from an unaligned offset, the last
# segment waited for the kernel's 200 ms cork timer (wrk: ranges past 64 KiB took 208 ms).
# Only the plainest requests are parsed here (anything else is hypercorn's, with h11):
# GET or HEAD of an origin-form target over HTTP/1.1, token field names, no obs-fold.
_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r\n")
# Fields that send a request to hypercorn: a body, an expectation, a protocol switch.
_NOT_PLAIN = frozenset({"content-length", "transfer-encoding", "expect", "upgrade"})
# Fields plan_hit reads: without any of them a hit is a plain 200 of the whole entry.
_CONDITIONAL = frozenset(
    {"range", "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)
_ROUTES_KEPT = 4096  # memoised request targets (per distinct target and hint headers)
_STATUS = {200: b"200 OK", 206: b"206 Partial Content", 304: b"304 Not Modified"}


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: bytes
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    close: bool  # Connection: close


@dataclass(frozen=True, slots=True)
class _Route:
    """What a request target (with the headers that chose its variant) maps to."""

    key: str
    fields: bytes  # negotiation and CORS fields, encoded, each ending in CRLF
    path: str  # decoded, and the raw query: for the access log
    query: str


class ZeroCopyHits:
    """The hit layer of one service (see the module docstring)."""

    def __init__(self, service: Service, cors: CorsPolicy) -> None:
        self.service = service
        self.cors = cors
        cache = service.cache
        self.disk = cache if isinstance(cache, DiskCacheStore) else None
        self._date = (0, b"")
        # Pure work a hot URL repeats, memoised: target -> key and header fields, and an
        # entry's own fields by key and ETag (a new version has a new ETag).
        self._routes: OrderedDict[tuple[object, ...], _Route | None] = OrderedDict()
        self._entry_fields: OrderedDict[tuple[str, str, bool], bytes] = OrderedDict()
        self._trust_request_id = service.config.logging.trust_request_id

    @property
    def enabled(self) -> bool:
        return self.disk is not None

    async def serve(
        self, stream: trio.SocketStream, context: Any, config: HypercornConfig
    ) -> bytes | None:
        """Answer the connection's hits; return the bytes to hand over with it to hypercorn,
        or None when the connection is finished (closed by either side, idle, shutdown)."""
        with trio.CancelScope() as idle:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_terminated, context, idle)
                try:
                    return await self._serve_requests(stream.socket, config.keep_alive_timeout)
                finally:
                    nursery.cancel_scope.cancel()
        return None  # shutting down while idle: close, like hypercorn does

    async def _serve_requests(
        self, sock: trio.socket.SocketType, keep_alive_timeout: float
    ) -> bytes | None:
        raw = _raw(sock)
        received = bytearray()  # the current request's bytes (and any after it)
        while True:
            end = received.find(b"\r\n\r\n")
            if end < 0:
                if len(received) > MAX_HEAD:
                    return bytes(received)
                data = b""
                # Idle between requests, or a head that never completes: closed alike.
                with trio.move_on_after(keep_alive_timeout):
                    data = await _receive(sock, raw)
                if not data:
                    return None  # timed out, or the client closed the connection
                received += data
                continue
            request = _parse_head(bytes(received[: end + 4]))
            if request is None:
                return bytes(received)
            hit = await self._hit_for(request)
            if hit is None:
                return bytes(received)
            del received[: end + 4]
            sent = False
            self.service.metrics.active_requests.inc()
            try:
                sent = await self._send(sock, raw, hit)
            finally:
                self._finish(hit.record, sent)
            if not sent or request.close:
                return None  # the client went away mid-body, or asked to close
            # One turn of the scheduler per request, as a server that awaited the next one.
            await trio.lowlevel.checkpoint()

    def _route(self, request: _Request) -> _Route | None:
        """The cache key and the header fields of ``request``'s target (memoised)."""
        headers = request.headers
        origin = headers.get("origin")
        memo = (request.target, origin, *(headers.get(name) for name in _HINT_FIELDS))
        if memo in self._routes:
            self._routes.move_to_end(memo)
            return self._routes[memo]
        service = self.service
        raw_path, _, query = request.target.partition(b"?")
        path = unquote(raw_path.decode("ascii"))
        route = None
        if path not in _NOT_HERE and not is_debug_request(path, query):  # debug=view: Quart's
            try:
                target = parse_target(path, query)
                choice = resolve_options(target.params, headers, service.policy)
            except ResizerError:
                pass  # the ASGI path renders the error
            else:
                fields = negotiation_headers(service, choice.options, choice.vary)
                encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]
                if self.cors.enabled:
                    encoded = response_headers(self.cors, origin, encoded)
                key = cache_key(target.source, choice.options)
                route = _Route(key, _fields(encoded), path, query.decode("ascii"))
        self._routes[memo] = route
        if len(self._routes) > _ROUTES_KEPT:
            self._routes.popitem(last=False)
        return route

    async def _hit_for(self, request: _Request) -> _Hit | None:
        """The answer to ``request`` when it is a plain cache hit, else None (nothing done)."""
        started = trio.current_time()
        route = self._route(request)
        if route is None:
            return None
        service = self.service
        key = route.key
        if service.failures.recall(key) is not None:
            return None
        entry = service.cache.recall(key) or await service.cache.lookup(key)
        if entry is None:
            return None
        assert self.disk is not None
        data_file = self.disk.data_file(entry)
        if data_file is None:
            return None
        now = time.time()
        headers = request.headers
        accel = bool(service.config.server.accel_redirect)
        if not any(name in headers for name in _CONDITIONAL):
            # The common case: the whole entry (or, behind nginx, the redirect to it),
            # whose fields are fixed per version but for the max-age.
            status, span = 200, None if accel else ByteRange(0, entry.size)
            whole = self._fields_of(entry, now, accel)
            if whole is None:
                return None
            fields = whole
        else:
            try:
                plan = plan_hit(entry, headers, now)
            except ResizerError:
                return None  # 412 or 416: the ASGI path answers (and counts) it
            offloaded = accel_headers(service, entry, plan, headers) if accel else None
            if offloaded is not None:  # nginx sends the file (and cuts the range)
                plan = HitPlan(200, offloaded, None)
            status, span = plan.status, plan.span
            fields = _fields(
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in plan.headers.items()
            )
        request_id = request_id_for(headers.get("x-request-id"), trust=self._trust_request_id)
        looked_up = trio.current_time() - started
        head = b"".join(
            (
                b"HTTP/1.1 ",
                _STATUS[status],
                b"\r\n",
                fields,
                route.fields,
                b"X-Request-Id: ",
                request_id.encode("latin-1"),
                b"\r\nServer-Timing: lookup;dur=%.3f" % (looked_up * 1000),
                b"\r\nDate: ",
                self._http_date(),
                b"\r\nConnection: close\r\n\r\n" if request.close else b"\r\n\r\n",
            )
        )
        metrics = service.metrics
        metrics.cache_hits.inc()
        metrics.count_request(request.method, status)
        if request.method == "HEAD" or span is None or not span.length:
            span = None
        record = open_record(
            request.method, route.path, route.query, request_id, started, route="media"
        )
        record.status, record.cache_status, record.lookup = status, "HIT", looked_up
        if entry.source:
            record.origin, _, record.source = entry.source.rpartition(":")
        return _Hit(head, data_file, span, record)

    def _fields_of(self, entry: EntryMeta, now: float, accel: bool) -> bytes | None:
        """The fields of a 200 of the whole ``entry`` (``accel``: of the redirect that hands
        it to nginx), fixed per version but for the max-age, so built once."""
        memo = (entry.key, entry.etag, accel)  # by key too: its Cache-Tag names the source
        fixed = self._entry_fields.get(memo)
        if fixed is None:
            plan = plan_hit(entry, {}, now)
            headers = accel_headers(self.service, entry, plan, {}) if accel else None
            if accel and headers is None:
                return None  # not a file nginx can send: the ASGI path answers
            fixed = _fields(
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in (headers or plan.headers).items()
                if k != "Cache-Control"
            )
            self._entry_fields[memo] = fixed
            if len(self._entry_fields) > _ROUTES_KEPT:
                self._entry_fields.popitem(last=False)
        max_age = max(0, int(entry.expires - now))
        return b"%sCache-Control: public, max-age=%d\r\n" % (fixed, max_age)

    def _finish(self, record: RequestRecord, sent: bool) -> None:
        """A hit has ended (``sent``: to its last byte): its metrics and access-log line."""
        metrics = self.service.metrics
        metrics.active_requests.dec()
        record.aborted = not sent
        finish(record, metrics, trio.current_time())

    def _http_date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    async def _send(self, sock: trio.socket.SocketType, raw: socket.socket, hit: _Hit) -> bool:
        """Send the head, then the body with sendfile; False when the client went away."""
        record = hit.record
        if hit.span is None:
            try:
                await _send_bytes(sock, raw, hit.head, 0)
            except OSError:
                return False
            record.ttfb = trio.current_time() - record.started
            return True
        try:
            fd = os.open(hit.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            # Replaced or evicted since the lookup, and nothing was sent: a 503 the client
            # may retry, and the connection goes on.
            record.status, record.cache_status = 503, None
            return await _send_vanished(sock, raw)
        try:
            await _send_bytes(sock, raw, hit.head, 0)
            record.ttfb = trio.current_time() - record.started
            await _sendfile(sock, fd, hit.span.start, hit.span.length, record)
        except OSError:
            self.service.metrics.stream_aborts.inc()
            return False
        finally:
            os.close(fd)
        return True


@dataclass(frozen=True, slots=True)
class _Hit:
    head: bytes  # status line and fields, ready to send
    path: str  # the cache file
    span: ByteRange | None  # None: no body (HEAD, 304)
    record: RequestRecord  # what the access log and the metrics say about it


# Part of the memo key of a target: the request fields responsive sizing may read.
_HINT_FIELDS = tuple(name.lower() for name in HINT_HEADERS)


def _parse_head(head: bytes) -> _Request | None:
    """A plain GET or HEAD request's head (ending in CRLF CRLF), or None: hypercorn's."""
    line = _REQUEST_LINE.match(head)
    if line is None:
        return None
    headers: dict[str, str] = {}
    position = line.end()
    end = len(head) - 2
    while position < end:
        field = _FIELD.match(head, position)
        if field is None:
            return None
        name = field[1].decode("ascii").lower()
        if name in _NOT_PLAIN:
            return None
        value = field[2].decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
        position = field.end()
    if "host" not in headers:
        return None  # HTTP/1.1 requires it: hypercorn answers 400
    connection = headers.get("connection", "").lower()
    return _Request(line[1].decode(), line[2], headers, "close" in connection)


def _fields(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % pair for pair in pairs)


async def _send_vanished(sock: trio.socket.SocketType, raw: socket.socket) -> bool:
    body = b'{"error": "unavailable", "message": "the entry changed; retry", "status": 503}'
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Cache-Control: no-store\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    try:
        await _send_bytes(sock, raw, head + body, 0)
    except OSError:
        return False
    return True


def _raw(sock: trio.socket.SocketType) -> socket.socket:
    """The non-blocking stdlib socket under trio's, to call without trio's wrappers (each
    costs a checkpoint and a retry loop; ours wait only when the kernel says so)."""
    return sock._sock  # type: ignore[attr-defined,no-any-return]


async def _receive(sock: trio.socket.SocketType, raw: socket.socket) -> bytes:
    while True:
        try:
            return raw.recv(_RECEIVE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except (ConnectionResetError, BrokenPipeError):
            return b""


async def _send_bytes(
    sock: trio.socket.SocketType, raw: socket.socket, data: bytes, flags: int
) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = raw.send(view, flags)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def _sendfile(
    sock: trio.socket.SocketType, fd: int, offset: int, count: int, record: RequestRecord
) -> None:
    """``count`` bytes of ``fd`` from ``offset`` to the socket, by the kernel (counted in
    ``record.bytes`` as they go)."""
    out = sock.fileno()
    while count:
        try:
            sent = os.sendfile(out, fd, offset, min(count, SENDFILE_SLICE))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if sent == 0:  # the file is shorter than its entry says: cut the response visibly
            raise BrokenPipeError("cache file ended early")
        offset += sent
        count -= sent
        record.bytes += sent
        if count:
            await trio.lowlevel.checkpoint()


async def _cancel_when_terminated(context: Any, scope: trio.CancelScope) -> None:
    await context.terminated.wait()
    scope.cancel()


class _Prefixed(trio.abc.HalfCloseableStream):
    """A socket stream with bytes already received put back in front of it."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket  # hypercorn reads the peer's address from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class HitFirstConnection:
    """Where hypercorn builds a ``TCPServer`` per connection: hits first, then hypercorn."""

    def __init__(
        self, app: Any, config: HypercornConfig, context: Any, state: Any, stream: Any
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.state = state
        self.stream = stream

    def __await__(self) -> Generator[Any]:
        return self.run().__await__()

    async def run(self) -> None:
        hits = getattr(getattr(self.app, "app", None), "zerocopy", None)
        stream = self.stream
        if (
            isinstance(hits, ZeroCopyHits)
            and hits.enabled
            and isinstance(stream, trio.SocketStream)
        ):
            try:
                leftover = await hits.serve(stream, self.context, self.config)
            except OSError:
                leftover = None
            except Exception:
                # A bug here must cost one connection, not the server (the handler nursery
                # of hypercorn's listeners would take every connection down with it).
                log.exception("hit connection failed")
                leftover = None
            if leftover is None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
                return
            stream = _Prefixed(stream, leftover)
        await TCPServer(self.app, self.config, self.context, self.state, stream)


def use_hit_connections() -> None:
    """Make hypercorn's trio worker hand each connection to ``HitFirstConnection`` (idempotent)."""
    import hypercorn.trio.run as hypercorn_run

    hypercorn_run.TCPServer = HitFirstConnection  # type: ignore[attr-defined,assignment]
