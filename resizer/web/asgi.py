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
from ..units import SECONDS

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


class ExchangeGuard:
    def __init__(self, app: ASGIFramework, *, zerocopy: object = None) -> None:
        self.app = app
        # The connection layer in front of hypercorn (web.zerocopy) finds its hit server
        # here, on the app hypercorn was given.
        self.zerocopy = zerocopy

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

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
        finally:
            _exchange_releases.reset(token)
            for release in releases:
                try:
                    release()
                except Exception:
                    log.exception("release at exchange end failed")
