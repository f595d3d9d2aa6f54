"""Cross-origin access (CORS) for players in web pages, on every response.

Players built on Media Source Extensions (hls.js, Shaka, video.js) fetch playlists, segments
and byte ranges with XHR/fetch, so the browser hides every response from them that lacks
``Access-Control-Allow-Origin``. Responses come from several places (the hit fast path,
Quart's handlers and error renderers), so this plain-ASGI middleware adds the headers to
every ``http.response.start`` and answers preflights itself; the decisions are pure
functions of the policy, the request's ``Origin`` and the response's headers.

With ``["*"]`` every response carries ``Access-Control-Allow-Origin: *`` (never credentials),
so a shared cache may serve any stored response to any page. With a list of origins a listed
one is echoed, and every response, refused or not, carries ``Vary: Origin``: the Fetch
standard (§3.2.5, "CORS protocol and HTTP caches") requires it, or a cache (a CDN, the
browser's own, shared by ``<video src>`` and a player's XHR) would serve a response stored
for one origin to another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..units import HOURS

ANY_ORIGIN = "*"
ALLOWED_METHODS = ("GET", "HEAD")
# Request headers resizer reads that a script may set and that are not CORS-safelisted
# (Range is only for one simple range): conditional and range requests, log correlation.
ALLOWED_HEADERS = (
    "Range",
    "If-Range",
    "If-None-Match",
    "If-Modified-Since",
    "If-Match",
    "If-Unmodified-Since",
    "X-Request-Id",
)
# Response headers a player reads beyond the safelisted ones (Content-Type, Cache-Control...).
EXPOSED_HEADERS = (
    "Content-Range",
    "Content-Length",
    "Accept-Ranges",
    "ETag",
    "X-Cache-Status",
    "X-Request-Id",
)
# Chromium caps a cached preflight at 2 h (Firefox at 24 h).
PREFLIGHT_MAX_AGE = 2 * HOURS

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """Which pages may read responses; no origins at all: CORS is off."""

    any_origin: bool
    origins: frozenset[str]  # lower-case "scheme://host[:port]"

    @classmethod
    def of(cls, origins: Iterable[str]) -> CorsPolicy:
        """The policy of ``[http] cors_allow_origins`` (already validated)."""
        listed = frozenset(origin.lower() for origin in origins)
        return cls(any_origin=ANY_ORIGIN in listed, origins=listed - {ANY_ORIGIN})

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or None."""
        if self.any_origin:
            return ANY_ORIGIN
        # Scheme and host are case-insensitive; echo the request's spelling, which is
        # what the browser compares byte for byte.
        if origin is not None and origin.lower() in self.origins:
            return origin
        return None


def is_preflight(method: str, request_headers: Headers) -> bool:
    """A CORS preflight: OPTIONS with ``Origin`` and ``Access-Control-Request-Method``."""
    names = {name.lower() for name, _ in request_headers}
    return method == "OPTIONS" and b"origin" in names and b"access-control-request-method" in names


def request_origin(request_headers: Headers) -> str | None:
    """The request's ``Origin`` (the first, should a broken client send several)."""
    for name, value in request_headers:
        if name.lower() == b"origin":
            return value.decode("latin-1")
    return None


def response_headers(policy: CorsPolicy, origin: str | None, headers: Headers) -> Headers:
    """``headers`` of a response to a request from ``origin``, with the policy's CORS ones."""
    if not policy.enabled:
        return headers
    result = headers if policy.any_origin else with_vary_origin(headers)
    allowed = policy.allow_origin(origin)
    if allowed is None:
        return result
    return [
        *result,
        (b"access-control-allow-origin", allowed.encode("latin-1")),
        (b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode()),
    ]


def preflight_headers(policy: CorsPolicy, origin: str | None) -> Headers | None:
    """Headers of the 204 answering a preflight from ``origin``; None if it is refused.

    The allowed methods and headers are fixed, not echoed: the browser checks the request
    against them, and one answer per origin is what it caches for PREFLIGHT_MAX_AGE.
    """
    allowed = policy.allow_origin(origin)
    if allowed is None:
        return None
    headers: Headers = [
        (b"access-control-allow-origin", allowed.encode("latin-1")),
        (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
        (b"access-control-allow-headers", ", ".join(ALLOWED_HEADERS).encode()),
        (b"access-control-max-age", str(int(PREFLIGHT_MAX_AGE)).encode()),
    ]
    return headers if policy.any_origin else with_vary_origin(headers)


def with_vary_origin(headers: Headers) -> Headers:
    """``headers`` whose ``Vary`` lists ``Origin`` too (its other fields kept)."""
    fields: list[bytes] = []
    others: Headers = []
    for name, value in headers:
        if name.lower() == b"vary":
            fields += [field.strip() for field in value.split(b",") if field.strip()]
        else:
            others.append((name, value))
    if any(field == b"*" or field.lower() == b"origin" for field in fields):
        return headers  # already varies on it (or on everything)
    return [*others, (b"vary", b", ".join([*fields, b"Origin"]))]


class Cors:
    """Adds the policy's CORS headers to every response and answers allowed preflights.

    A preflight the policy refuses (and any other OPTIONS) goes on to the app unchanged.
    """

    def __init__(
        self,
        app: ASGIFramework,
        policy: CorsPolicy,
        count_request: Callable[[str, int], None],
    ) -> None:
        self.app = app
        self.policy = policy
        self.count_request = count_request

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or not self.policy.enabled:
            await self.app(scope, receive, send)
            return
        request_headers = list(scope["headers"])
        origin = request_origin(request_headers)
        if is_preflight(scope["method"], request_headers):
            preflight = preflight_headers(self.policy, origin)
            if preflight is not None:
                await send({"type": "http.response.start", "status": 204, "headers": preflight})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.count_request("OPTIONS", 204)
                return

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                message = {**message, "headers": response_headers(self.policy, origin, headers)}
            await send(message)

        await self.app(scope, receive, send_with_cors)
