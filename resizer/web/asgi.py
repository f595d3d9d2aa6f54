"""ASGI wrapper around the Quart app: exchange-scoped cleanup and a shielded final send.

Three things Quart/hypercorn do not guarantee by themselves:

* A response body that Quart never starts iterating (the client vanished while the headers
  were being sent) is never closed, so resources it would release in ``finally`` would leak.
  Handlers register synchronous release callbacks with ``release_on_exchange_end``; this
  wrapper runs them when the HTTP exchange ends, however it ends. They must be idempotent.
* A failure after the headers were sent must abort the connection (never a body that looks
  complete); hypercorn does that when the app returns mid-body, without a traceback.
* quart-trio on hypercorn 0.18 cancels the final (empty) body message of a request that sent
  ``Connection: close`` together with the request, so the socket is never closed and the
  client hangs. Shielding that one send, with a short deadline of its own, fixes it.

It also refuses a request framed by both ``Transfer-Encoding`` and ``Content-Length`` (h11
accepts it): behind a front proxy that reads the other header, that is request smuggling, so
RFC 9112 section 6.1 wants the connection closed; resizer takes no request bodies anyway.

And it keeps each request's ``RequestRecord`` (web.requestlog): current while the app runs,
filled from what the response sends (status, X-Cache-Status, X-Origin, X-Source, body bytes,
first and last byte), finished with the request's metrics and access-log line. It gives
every response the record's ``X-Request-Id`` and media responses their ``Server-Timing``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import structlog
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from ..errors import ResizerError
from ..metrics import Metrics
from ..units import SECONDS
from .requestlog import RequestRecord, finish, open_record, recording, request_id_for, server_timing

log = structlog.get_logger(__name__)

FINAL_SEND_GRACE = 5 * SECONDS

_exchange_releases: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "exchange_releases", default=None
)


def release_on_exchange_end(release: Callable[[], None]) -> None:
    """Run ``release`` when the current HTTP exchange ends (normally or not)."""
    releases = _exchange_releases.get()
    if releases is None:  # outside the wrapper (unit tests calling handlers directly)
        return
    releases.append(release)


def error_body(status: int, code: str, message: str) -> bytes:
    """The JSON body of every error resizer answers."""
    return json.dumps({"error": code, "message": message, "status": status}).encode()


# On every JSON error: a browser must never sniff an error body into something else.
ERROR_HEADERS = {"X-Content-Type-Options": "nosniff"}


def _ambiguous_framing(scope: HTTPScope) -> bool:
    names = {name.lower() for name, _ in scope["headers"]}
    return b"transfer-encoding" in names and b"content-length" in names


async def _refuse_and_close(send: ASGISendCallable, message: str) -> None:
    body = error_body(400, "bad_request", message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in ERROR_HEADERS.items()),
    ]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: HTTPScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _tracked(send: ASGISendCallable, record: RequestRecord) -> ASGISendCallable:
    """``send``, filling ``record`` from the response and adding its X-Request-Id and (on
    media) Server-Timing; ``record.aborted`` stays True until the last body byte is sent."""

    async def tracked_send(message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            record.status = message["status"]
            headers = []
            for name, value in message.get("headers", ()):
                lower = name.lower()
                if lower == b"x-request-id":
                    continue  # the record's, below (the same unless a layer guessed)
                if lower == b"x-cache-status":
                    record.cache_status = value.decode("latin-1")
                elif lower == b"x-origin":
                    record.origin = value.decode("latin-1")
                elif lower == b"x-source":
                    record.source = value.decode("latin-1")
                headers.append((name, value))
            headers.append((b"x-request-id", record.request_id.encode("latin-1")))
            if record.route == "media" and (timing := server_timing(record)) is not None:
                headers.append((b"server-timing", timing.encode()))
            message = {**message, "headers": headers}
        elif kind == "http.response.body":
            if record.ttfb is None:  # the headers leave with the first body message
                record.ttfb = trio.current_time() - record.started
            await send(message)
            record.bytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                record.aborted = False
                record.duration = trio.current_time() - record.started
            return
        await send(message)

    return tracked_send


class ExchangeGuard:
    def __init__(
        self,
        app: ASGIFramework,
        *,
        zerocopy: object = None,
        metrics: Metrics | None = None,
        trust_request_id: bool = False,
    ) -> None:
        self.app = app
        # The connection layer in front of hypercorn (web.zerocopy) finds its hit server
        # here, on the app hypercorn was given.
        self.zerocopy = zerocopy
        self.metrics = metrics
        # [logging] trust_request_id: take X-Request-Id from the request (a trusted proxy's).
        self.trust_request_id = trust_request_id

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = trio.current_time()
        request_id = request_id_for(_header(scope, b"x-request-id"), trust=self.trust_request_id)
        query = scope["query_string"].decode("latin-1")
        record = open_record(scope["method"], scope["path"], query, request_id, started)
        record.aborted = True  # until the last body byte is sent
        metrics = self.metrics
        if metrics is not None:
            metrics.active_requests.inc()
        try:
            with recording(record):
                await self._exchange(scope, receive, _tracked(send, record), record)
        finally:
            if metrics is not None:
                metrics.active_requests.dec()
            ended = record.duration
            finish(record, metrics, trio.current_time() if ended is None else started + ended)

    async def _exchange(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        record: RequestRecord,
    ) -> None:
        if _ambiguous_framing(scope):
            log.info("request refused", status=400, reason="Transfer-Encoding and Content-Length")
            message = "a request must not carry both Transfer-Encoding and Content-Length"
            with trio.move_on_after(FINAL_SEND_GRACE, shield=True):
                await _refuse_and_close(send, message)
            return

        # A plain HTTP/1.1 connection reaches this app only once the hit layer has handed it
        # to hypercorn (a miss, an error...), and it would stay hypercorn's for good: behind
        # nginx, whose upstream connections live long, hits would soon all go the slow way.
        # Closing after this answer gives the next request a new connection, which the hit
        # layer sees first (one TCP handshake per request the hit layer does not take).
        hand_back = (
            getattr(self.zerocopy, "enabled", False)
            and scope.get("scheme") == "http"
            and scope.get("http_version") == "1.1"
        )

        async def guarded_send(message: Any) -> None:
            if hand_back and message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(FINAL_SEND_GRACE, shield=True):
                    await send(message)
            else:
                await send(message)

        releases: list[Callable[[], None]] = []
        token = _exchange_releases.set(releases)
        try:
            await self.app(scope, receive, guarded_send)
        except* ResizerError as group:
            # Only a failure after the headers gets here (before, Quart renders it as JSON).
            # Returning without finishing the body makes hypercorn close the connection, so
            # the client sees the truncation; the traceback would add nothing.
            for error in group.exceptions:
                log.warning("response aborted after headers", reason=str(error))
            record.aborted = False  # cut by the server, not left by the client
        finally:
            _exchange_releases.reset(token)
            for release in releases:
                try:
                    release()
                except Exception:
                    log.exception("release at exchange end failed")
