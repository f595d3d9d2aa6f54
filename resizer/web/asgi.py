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
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import structlog
import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

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


class ExchangeGuard:
    def __init__(self, app: ASGIFramework) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def guarded_send(message: Any) -> None:
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
