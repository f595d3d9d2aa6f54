"""Integration: CORS headers on every response path of the real server (fake transformer)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from resizer.transform.fake import FakeTransformer
from tests.server import server_config, start_server

pytestmark = pytest.mark.integration

CLIP = "/videos/clip.mp4"
PLAYER = "https://player.example"
EXPOSED = "Content-Range, Content-Length, Accept-Ranges, ETag, X-Cache-Status, X-Request-Id"
LISTED = '[http]\ncors_allow_origins = ["https://player.example"]'


@pytest.fixture
def media(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"source" * 1000)  # the fake transformer never decodes
    return folder


async def serve(
    nursery: trio.Nursery, media: Path, tmp_path: Path, extra: str = ""
) -> httpx.AsyncClient:
    config = server_config(media, tmp_path / "cache", extra)
    server = await start_server(nursery, config, FakeTransformer())
    return httpx.AsyncClient(base_url=server.url, timeout=30, headers={"Origin": PLAYER})


def assert_cors(response: httpx.Response, allowed: str) -> None:
    assert response.headers.get("Access-Control-Allow-Origin") == allowed, response.headers
    assert response.headers.get("Access-Control-Expose-Headers") == EXPOSED


async def test_every_response_path_allows_any_origin_by_default(
    nursery: trio.Nursery, media: Path, tmp_path: Path
) -> None:
    """Miss, fast-path hit, 206, 304, 416, JSON errors, /healthz, /metrics: all ACAO "*"."""
    async with await serve(nursery, media, tmp_path) as client:
        miss = await client.get(CLIP, params={"width": "100"})
        assert (miss.status_code, miss.headers["X-Cache-Status"]) == (200, "MISS")
        assert_cors(miss, "*")
        hit = await client.get(CLIP, params={"width": "100"})
        assert (hit.status_code, hit.headers["X-Cache-Status"]) == (200, "HIT")
        assert_cors(hit, "*")
        partial = await client.get(CLIP, params={"width": "100"}, headers={"Range": "bytes=0-9"})
        assert partial.status_code == 206
        assert_cors(partial, "*")
        etag = {"If-None-Match": hit.headers["ETag"]}
        unchanged = await client.get(CLIP, params={"width": "100"}, headers=etag)
        assert unchanged.status_code == 304
        assert_cors(unchanged, "*")
        beyond = {"Range": "bytes=99999999-"}
        unsatisfiable = await client.get(CLIP, params={"width": "100"}, headers=beyond)
        assert unsatisfiable.status_code == 416
        assert_cors(unsatisfiable, "*")
        for path, params, status in [
            (CLIP, {"width": "5000"}, 400),
            ("/videos/missing.mp4", {}, 404),
            ("/healthz", {}, 200),
            ("/metrics", {}, 200),
        ]:
            response = await client.get(path, params=params)
            assert response.status_code == status
            assert_cors(response, "*")
        # "*" never depends on the request: no Origin, same header, no Vary: Origin.
        request = client.build_request("GET", CLIP, params={"width": "100"})
        del request.headers["Origin"]
        plain = await client.send(request)
        assert plain.headers["Access-Control-Allow-Origin"] == "*"
        assert "vary" not in plain.headers


async def test_preflight_is_answered_and_plain_options_is_unchanged(
    nursery: trio.Nursery, media: Path, tmp_path: Path
) -> None:
    """A preflight gets 204 with methods, headers and max age; a bare OPTIONS gets Allow."""
    async with await serve(nursery, media, tmp_path) as client:
        asks = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "range"}
        preflight = await client.options(CLIP, headers=asks)
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert preflight.headers["Access-Control-Allow-Methods"] == "GET, HEAD"
        assert "If-None-Match" in preflight.headers["Access-Control-Allow-Headers"]
        assert preflight.headers["Access-Control-Max-Age"] == "7200"
        assert preflight.content == b""
        bare = await client.options(CLIP)
        assert bare.status_code != 204
        assert "GET" in bare.headers["Allow"]


async def test_listed_origin_is_echoed_and_others_refused(
    nursery: trio.Nursery, media: Path, tmp_path: Path
) -> None:
    """A listed origin is echoed on miss, hit and error; an unlisted one gets only Vary."""
    async with await serve(nursery, media, tmp_path, LISTED) as client:
        for expected in ("MISS", "HIT"):
            response = await client.get(CLIP, params={"width": "100"})
            assert response.headers["X-Cache-Status"] == expected
            assert_cors(response, PLAYER)
            assert response.headers.get_list("Vary") == ["Origin"]
        error = await client.get(CLIP, params={"width": "5000"})
        assert error.status_code == 400
        assert_cors(error, PLAYER)
        preflight = await client.options(CLIP, headers={"Access-Control-Request-Method": "GET"})
        assert (preflight.status_code, preflight.headers["Vary"]) == (204, "Origin")
        assert preflight.headers["Access-Control-Allow-Origin"] == PLAYER

        evil = {"Origin": "https://evil.example"}
        refused = await client.get(CLIP, params={"width": "100"}, headers=evil)
        assert refused.headers["X-Cache-Status"] == "HIT"
        assert "access-control-allow-origin" not in refused.headers
        assert "access-control-expose-headers" not in refused.headers
        assert refused.headers.get_list("Vary") == ["Origin"]
        asks = {**evil, "Access-Control-Request-Method": "GET"}
        refused_preflight = await client.options(CLIP, headers=asks)
        assert refused_preflight.status_code != 204  # answered as any OPTIONS
        assert "access-control-allow-origin" not in refused_preflight.headers


async def test_vary_origin_joins_the_client_hint_vary(
    nursery: trio.Nursery, media: Path, tmp_path: Path
) -> None:
    """Responsive responses keep their client-hint Vary fields, Origin added, in one header."""
    async with await serve(nursery, media, tmp_path, LISTED) as client:
        for expected in ("MISS", "HIT"):
            response = await client.get(CLIP)  # no size: chosen from client hints
            assert response.headers["X-Cache-Status"] == expected
            (vary,) = response.headers.get_list("Vary")
            fields = [field.strip() for field in vary.split(",")]
            assert fields[-1] == "Origin"
            assert {"Save-Data", "ECT", "Sec-CH-Viewport-Width", "User-Agent"} <= set(fields)
            assert_cors(response, PLAYER)
