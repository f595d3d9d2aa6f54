"""CORS: the header decisions (pure), the ASGI middleware around a stub app, the config."""

from __future__ import annotations

from typing import Any

import pytest
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from resizer.config import load_config
from resizer.errors import ConfigError
from resizer.web.cors import (
    Cors,
    CorsPolicy,
    Headers,
    is_preflight,
    preflight_headers,
    request_origin,
    response_headers,
    with_vary_origin,
)

ANY = CorsPolicy.of(["*"])
LISTED = CorsPolicy.of(["https://player.example", "http://localhost:8080"])
OFF = CorsPolicy.of([])
EXPOSED = b"Content-Range, Content-Length, Accept-Ranges, ETag, X-Cache-Status, X-Request-Id"
MEDIA: Headers = [(b"content-type", b"video/mp4"), (b"ETag", b'"abc"')]


def named(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


# --- the policy -------------------------------------------------------------------------


def test_policy_of_star_allows_any_origin_and_empty_list_is_off() -> None:
    """["*"] answers "*" to every request (even without Origin); [] is disabled."""
    assert ANY.enabled
    assert ANY.allow_origin(None) == "*"
    assert ANY.allow_origin("https://anything.example") == "*"
    assert not OFF.enabled
    assert OFF.allow_origin("https://player.example") is None
    assert LISTED.enabled


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://player.example", "https://player.example"),
        ("HTTPS://Player.EXAMPLE", "HTTPS://Player.EXAMPLE"),  # case-insensitive, echoed
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://player.example", None),  # another scheme
        ("https://player.example:8443", None),  # another port
        ("http://localhost", None),
        ("https://player.example.evil", None),  # no prefix matching
        ("https://evil.example/https://player.example", None),
        ("null", None),
        ("", None),
        (None, None),
    ],
)
def test_listed_origins_match_ignoring_case(origin: str | None, allowed: str | None) -> None:
    """A listed origin is echoed as the request spelled it; anything else gets nothing."""
    assert LISTED.allow_origin(origin) == allowed


# --- response headers -------------------------------------------------------------------


def test_any_origin_adds_allow_and_expose_without_vary() -> None:
    """With "*" every response carries ACAO "*" and the exposed headers; Vary is untouched."""
    for origin in ("https://a.example", None):
        headers = response_headers(ANY, origin, MEDIA)
        assert headers[: len(MEDIA)] == MEDIA
        assert named(headers, b"access-control-allow-origin") == [b"*"]
        assert named(headers, b"access-control-expose-headers") == [EXPOSED]
        assert named(headers, b"vary") == []
        assert named(headers, b"access-control-allow-credentials") == []


def test_listed_origin_is_echoed_with_vary_origin() -> None:
    """An allowed origin is echoed, exposed headers listed, and the response varies on Origin."""
    headers = response_headers(LISTED, "https://player.example", MEDIA)
    assert named(headers, b"access-control-allow-origin") == [b"https://player.example"]
    assert named(headers, b"access-control-expose-headers") == [EXPOSED]
    assert named(headers, b"vary") == [b"Origin"]


@pytest.mark.parametrize("origin", ["https://evil.example", None])
def test_unlisted_or_missing_origin_gets_only_vary(origin: str | None) -> None:
    """Refused (or non-CORS) requests get no CORS headers but still Vary: Origin, for caches."""
    headers = response_headers(LISTED, origin, MEDIA)
    assert headers == [*MEDIA, (b"vary", b"Origin")]


def test_disabled_policy_leaves_headers_alone() -> None:
    """An empty list adds nothing at all."""
    assert response_headers(OFF, "https://player.example", MEDIA) == MEDIA


@pytest.mark.parametrize(
    ("vary", "merged"),
    [
        ([], [b"Origin"]),
        ([b"Save-Data, ECT"], [b"Save-Data, ECT, Origin"]),
        ([b"Save-Data", b"User-Agent"], [b"Save-Data, User-Agent, Origin"]),  # several lines
        ([b"ECT,,  DPR "], [b"ECT, DPR, Origin"]),
        ([b"Save-Data, origin"], [b"Save-Data, origin"]),  # already there
        ([b"*"], [b"*"]),  # varies on everything already
    ],
)
def test_vary_origin_merges_with_existing_vary(vary: list[bytes], merged: list[bytes]) -> None:
    """Origin joins the existing Vary fields (one header), never replacing them."""
    headers: Headers = [(b"content-type", b"video/mp4"), *((b"Vary", v) for v in vary)]
    result = with_vary_origin(headers)
    assert named(result, b"vary") == merged
    assert named(result, b"content-type") == [b"video/mp4"]


# --- preflights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("OPTIONS", [(b"origin", b"https://a"), (b"access-control-request-method", b"GET")], True),
        ("OPTIONS", [(b"Origin", b"https://a"), (b"Access-Control-Request-Method", b"GET")], True),
        ("OPTIONS", [(b"origin", b"https://a")], False),
        ("OPTIONS", [(b"access-control-request-method", b"GET")], False),
        ("OPTIONS", [], False),
        ("GET", [(b"origin", b"https://a"), (b"access-control-request-method", b"GET")], False),
    ],
)
def test_preflight_needs_options_origin_and_request_method(
    method: str, headers: Headers, expected: bool
) -> None:
    """Only OPTIONS with Origin and Access-Control-Request-Method is a preflight."""
    assert is_preflight(method, headers) is expected


def test_preflight_answer_lists_methods_headers_and_max_age() -> None:
    """An allowed preflight gets GET/HEAD, the range and conditional headers, a max age."""
    headers = preflight_headers(ANY, "https://a.example")
    assert headers is not None
    assert named(headers, b"access-control-allow-origin") == [b"*"]
    assert named(headers, b"access-control-allow-methods") == [b"GET, HEAD"]
    (allowed,) = named(headers, b"access-control-allow-headers")
    assert {"range", "if-range", "if-none-match", "if-modified-since"} <= {
        h.strip().lower() for h in allowed.decode().split(",")
    }
    assert named(headers, b"access-control-max-age") == [b"7200"]
    assert named(headers, b"vary") == []


def test_preflight_of_listed_origin_varies_and_others_are_refused() -> None:
    """Listed: echoed with Vary: Origin; unlisted or CORS off: None (the app answers)."""
    headers = preflight_headers(LISTED, "https://player.example")
    assert headers is not None
    assert named(headers, b"access-control-allow-origin") == [b"https://player.example"]
    assert named(headers, b"vary") == [b"Origin"]
    assert preflight_headers(LISTED, "https://evil.example") is None
    assert preflight_headers(OFF, "https://player.example") is None


def test_request_origin_is_the_first_origin_header() -> None:
    """The Origin value, matched case-insensitively by name; None without one."""
    assert request_origin([(b"Origin", b"https://a"), (b"origin", b"https://b")]) == "https://a"
    assert request_origin([(b"range", b"bytes=0-")]) is None


# --- the middleware around a stub app ---------------------------------------------------


class Stub:
    """An ASGI app answering 200 with ``headers``; records the requests it saw."""

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        self.seen: list[str] = []

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        assert scope["type"] == "http"
        self.seen.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": b"data", "more_body": False})


async def exchange(
    policy: CorsPolicy, method: str, headers: Headers, app: Stub | None = None
) -> tuple[list[dict[str, Any]], Stub, list[tuple[str, int]]]:
    """Run one request through ``Cors``; the messages sent, the app, the counted requests."""
    app = app or Stub([(b"content-type", b"video/mp4"), (b"vary", b"ECT")])
    counted: list[tuple[str, int]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope: Any = {"type": "http", "method": method, "path": "/v/a.mp4", "headers": headers}
    await Cors(app, policy, lambda m, s: counted.append((m, s)))(scope, receive, send)
    return sent, app, counted


PREFLIGHT: Headers = [
    (b"origin", b"https://player.example"),
    (b"access-control-request-method", b"GET"),
    (b"access-control-request-headers", b"range, if-none-match"),
]


async def test_middleware_answers_an_allowed_preflight_itself() -> None:
    """204 with the CORS headers and an empty body; the app is not called; it is counted."""
    sent, app, counted = await exchange(LISTED, "OPTIONS", PREFLIGHT)
    start, body = sent
    assert start["status"] == 204
    assert named(start["headers"], b"access-control-allow-origin") == [b"https://player.example"]
    assert body == {"type": "http.response.body", "body": b"", "more_body": False}
    assert app.seen == []
    assert counted == [("OPTIONS", 204)]


@pytest.mark.parametrize(
    ("policy", "headers"),
    [
        (CorsPolicy.of(["https://other.example"]), PREFLIGHT),  # refused preflight
        (ANY, [(b"origin", b"https://player.example")]),  # OPTIONS that is no preflight
        (OFF, PREFLIGHT),  # CORS off
    ],
)
async def test_other_options_requests_reach_the_app(policy: CorsPolicy, headers: Headers) -> None:
    """A refused preflight, a plain OPTIONS and any OPTIONS with CORS off go to the app."""
    sent, app, counted = await exchange(policy, "OPTIONS", headers)
    assert app.seen == ["OPTIONS"]
    assert sent[0]["status"] == 200
    assert counted == []


async def test_middleware_rewrites_only_the_response_start() -> None:
    """The app's headers gain ACAO, exposed headers and a merged Vary; the body is untouched."""
    sent, app, _ = await exchange(LISTED, "GET", [(b"origin", b"https://player.example")])
    start, body = sent
    assert app.seen == ["GET"]
    assert named(start["headers"], b"access-control-allow-origin") == [b"https://player.example"]
    assert named(start["headers"], b"vary") == [b"ECT, Origin"]
    assert body == {"type": "http.response.body", "body": b"data", "more_body": False}


async def test_middleware_with_cors_off_passes_everything_through() -> None:
    """An empty list: the app's messages are sent as they are."""
    stub = Stub([(b"content-type", b"video/mp4")])
    sent, _, _ = await exchange(OFF, "GET", [(b"origin", b"https://a.example")], stub)
    assert sent[0]["headers"] == [(b"content-type", b"video/mp4")]


# --- configuration ----------------------------------------------------------------------

ORIGINS = """
[[origins]]
name = "v"
matcher = "^/v/(?P<path>.+)$"
[[origins.sources]]
type = "filesystem"
root = "."
"""


def test_cors_allows_any_origin_by_default() -> None:
    """Without an [http] section every page may read responses."""
    assert load_config(text=ORIGINS, env={}).http.cors_allow_origins == ("*",)


def test_cors_origins_load_from_toml_and_environment() -> None:
    """A list of origins loads as given; the environment overrides it, "" turns CORS off."""
    text = '[http]\ncors_allow_origins = ["https://a.example", "http://[::1]:3000"]\n' + ORIGINS
    config = load_config(text=text, env={})
    assert config.http.cors_allow_origins == ("https://a.example", "http://[::1]:3000")
    env = {"RESIZER_HTTP_CORS_ALLOW_ORIGINS": "https://b.example, HTTP://LOCALHOST:8080"}
    config = load_config(text=text, env=env)
    assert config.http.cors_allow_origins == ("https://b.example", "HTTP://LOCALHOST:8080")
    config = load_config(text=text, env={"RESIZER_HTTP_CORS_ALLOW_ORIGINS": ""})
    assert config.http.cors_allow_origins == ()


@pytest.mark.parametrize(
    "origins",
    [
        '["https://a.example/"]',  # a path (the usual slip: a trailing slash)
        '["https://a.example/player"]',
        '["a.example"]',  # no scheme
        '["*.example.com"]',
        '["https://user@a.example"]',
        '["https://a.example:port"]',
        '["https://a .example"]',
        '["*", "https://a.example"]',  # "*" with others
        '"*"',  # not a list
    ],
)
def test_bad_cors_origins_are_reported_with_their_key(origins: str) -> None:
    """Every entry must be "*" alone or scheme://host[:port]."""
    with pytest.raises(ConfigError) as caught:
        load_config(text=f"[http]\ncors_allow_origins = {origins}\n" + ORIGINS, env={})
    assert [key for key, _ in caught.value.problems] == ["http.cors_allow_origins"]
