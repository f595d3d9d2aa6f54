"""X-Accel-Redirect answers to hits ([server] accel_redirect): the pure decisions, the
configuration key, and what resizer itself sends on both hit paths (nginx: test_nginx.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from resizer.config import Config, load_config
from resizer.errors import ConfigError
from resizer.options import parse_options
from resizer.transform.fake import FakeTransformer, fake_output
from resizer.web.accel import offloadable, redirect_headers, redirect_target
from resizer.web.hits import HitFastPath
from tests.server import server_config_text, start_server

ACCEL = "/_resizer_cache/"
URL = "/videos/clip.mp4?width=320"
SIZE = 50_000


def test_the_target_is_the_data_file_under_the_prefix_quoted() -> None:
    """The URI names the file relative to entries/, percent-quoted (nginx unquotes it)."""
    entries = Path("/var/cache/resizer/entries")
    data = entries / "ab" / "abc.0123.data"
    assert redirect_target(ACCEL, entries, data) == "/_resizer_cache/ab/abc.0123.data"
    odd = entries / "ab" / "a b?#%.data"
    assert redirect_target(ACCEL, entries, odd) == "/_resizer_cache/ab/a%20b%3F%23%25.data"


@pytest.mark.parametrize(
    ("status", "request_headers", "expected"),
    [
        (200, {}, True),
        (206, {"range": "bytes=0-9"}, True),  # nginx cuts the range itself
        (206, {"range": "bytes=0-9", "if-range": '"e"'}, True),
        (200, {"if-none-match": '"other"'}, True),  # resizer found it modified
        (304, {"if-none-match": '"e"'}, False),  # nothing to send
        (200, {"if-match": '"e"'}, False),  # nginx would 412 against its own validators
        (200, {"if-unmodified-since": "Wed, 01 Jan 2020 00:00:00 GMT"}, False),
    ],
)
def test_what_nginx_may_send(status: int, request_headers: dict[str, str], expected: bool) -> None:
    """200 and 206 go to nginx unless the request carries preconditions nginx re-checks."""
    assert offloadable(status, request_headers) is expected


def test_the_redirect_keeps_resizers_headers_but_not_the_framing() -> None:
    """Validators, caching and status headers stay; length, range and Accept-Ranges are
    nginx's (it writes them for the bytes it sends); the redirect has an empty body."""
    planned = {
        "ETag": '"e"',
        "Last-Modified": "Wed, 01 Jan 2020 00:00:00 GMT",
        "Cache-Control": "public, max-age=60",
        "Accept-Ranges": "bytes",
        "X-Cache-Status": "HIT",
        "Content-Type": "video/mp4",
        "Content-Range": "bytes 0-9/100",
        "Content-Length": "10",
    }
    assert redirect_headers(planned, "/_resizer_cache/ab/x.data") == {
        "ETag": '"e"',
        "Last-Modified": "Wed, 01 Jan 2020 00:00:00 GMT",
        "Cache-Control": "public, max-age=60",
        "X-Cache-Status": "HIT",
        "Content-Type": "video/mp4",
        "Content-Length": "0",
        "X-Accel-Redirect": "/_resizer_cache/ab/x.data",
    }


@pytest.mark.parametrize("prefix", ["_resizer_cache/", "/_resizer_cache", "/", "/../", "/a b/"])
def test_accel_redirect_must_be_a_location_prefix(prefix: str) -> None:
    """accel_redirect is "/segments/": anything else is reported with its key."""
    with pytest.raises(ConfigError) as caught:
        load_config(env={"RESIZER_SERVER_ACCEL_REDIRECT": prefix})
    assert {key for key, _ in caught.value.problems} == {"server.accel_redirect"}


def test_accel_redirect_needs_the_disk_cache() -> None:
    """nginx reads the entries' files: the memory backend has none."""
    text = f'[server]\naccel_redirect = "{ACCEL}"\n[cache]\nbackend = "memory"\n'
    origin = '[[origins]]\nname = "v"\nmatcher = "^/(?P<path>.+)$"\n'
    source = '[[origins.sources]]\ntype = "filesystem"\nroot = "."\npath = "${path}"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(text=text + origin + source, env={})
    assert {key for key, _ in caught.value.problems} == {"server.accel_redirect"}
    assert load_config(env={}).server.accel_redirect == ""  # off by default


def accel_config(media: Path, cache: Path) -> Config:
    return load_config(
        text=server_config_text(media, cache), env={"RESIZER_SERVER_ACCEL_REDIRECT": ACCEL}
    )


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A media folder with a clip the fake transformer never reads."""
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"not read by the fake transformer")
    return folder


async def check_hit_answers(base_url: str, cache: Path) -> None:
    """A cached key, asked for again: the X-Accel-Redirect answers and the ones resizer keeps."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        miss = await client.get(URL)
        assert miss.headers["X-Cache-Status"] == "MISS"
        assert "X-Accel-Redirect" not in miss.headers  # a miss streams from resizer
        etag = (await client.head(URL)).headers["ETag"]

        hit = await client.get(URL, headers={"Range": "bytes=10-19"})
        target = hit.headers["X-Accel-Redirect"]
        assert (hit.status_code, hit.content) == (200, b"")  # nginx cuts the range
        assert hit.headers["Content-Length"] == "0"
        assert "Accept-Ranges" not in hit.headers
        assert (hit.headers["ETag"], hit.headers["X-Cache-Status"]) == (etag, "HIT")
        assert target.startswith(ACCEL)
        data = cache / "entries" / target.removeprefix(ACCEL)
        assert data.read_bytes() == fake_output(parse_options({"width": "320"}), SIZE)

        not_modified = await client.get(URL, headers={"If-None-Match": etag})
        assert not_modified.status_code == 304
        assert "X-Accel-Redirect" not in not_modified.headers
        guarded = await client.get(URL, headers={"If-Match": etag, "Range": "bytes=10-19"})
        assert (guarded.status_code, guarded.content) == (206, data.read_bytes()[10:20])
        assert "X-Accel-Redirect" not in guarded.headers
        beyond = await client.get(URL, headers={"Range": f"bytes={SIZE}-"})
        assert (beyond.status_code, beyond.json()["status"]) == (416, 416)


async def test_the_fast_path_answers_hits_with_x_accel_redirect(
    media: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """With accel_redirect a hit is an empty 200 naming its file (ranges too); 304s, hits
    with If-Match, and 416s are resizer's own answers."""
    cache = tmp_path / "cache"
    fake = FakeTransformer(size=SIZE)
    server = await start_server(nursery, accel_config(media, cache), fake)
    await check_hit_answers(server.url, cache)


async def test_hits_that_reach_quart_are_offloaded_too(
    media: Path, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same answers when the fast path leaves every request to Quart."""

    async def decline(self: HitFastPath, scope: Any, receive: Any, send: Any) -> bool:
        await trio.lowlevel.checkpoint()
        return False

    monkeypatch.setattr(HitFastPath, "_answer_hit", decline)
    cache = tmp_path / "cache"
    fake = FakeTransformer(size=SIZE)
    server = await start_server(nursery, accel_config(media, cache), fake)
    await check_hit_answers(server.url, cache)
