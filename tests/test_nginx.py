"""Integration: resizer behind a real nginx running the shipped deploy/nginx.conf.

nginx is Debian's (``make players``, part of ``make test``, installs it), and runs the file
changed only in its ports and paths, in front of in-process resizer servers with
``accel_redirect`` on: misses stream through it, hits are sent by nginx from the cache
(ranges too), 304s come from resizer, a client leaving stops the transcode, and two
instances split the URLs between them. An access log records, per request, the instance
that answered and the X-Accel-Redirect it sent.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from resizer.config import Config, load_config
from resizer.options import parse_options
from resizer.transform.base import Transformer
from resizer.transform.fake import FakeTransformer, fake_output
from resizer.web.ranges import http_date, parse_http_date
from tests.media import make_test_video
from tests.server import RunningServer, server_config_text, start_server
from tests.test_http_coalescing import ffmpeg_children, poll_until

pytestmark = pytest.mark.integration

DEPLOYED = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
ACCEL = "/_resizer_cache/"  # deploy/nginx.conf's internal location
PLAYER = "https://player.example"

# The main configuration around the shipped file (which belongs in an http block): files
# in the test's folder, and a log line per request naming the instance and the redirect.
MAIN_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$request_uri $status $upstream_addr "$upstream_http_x_accel_redirect"';
    access_log {work}/access.log upstreams;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/resizer.conf;
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        pytest.fail("nginx is missing: run tests/players/install.sh (make players)")
    return found


def deployed_config(instances: list[int], port: int, cache: Path) -> str:
    """deploy/nginx.conf with its marked ports and paths replaced, and nothing else."""
    text = DEPLOYED.read_text()
    for marked, ours in {
        "server 127.0.0.1:8080;": " ".join(f"server 127.0.0.1:{i};" for i in instances),
        "listen 80 ": f"listen 127.0.0.1:{port} ",
        "alias /var/cache/resizer/": f"alias {cache}/",
    }.items():
        assert text.count(marked) == 1, marked
        text = text.replace(marked, ours)
    return text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Logged:
    uri: str
    status: int
    instance: str  # host:port of the resizer that answered
    redirect: str  # the X-Accel-Redirect it sent, or "-"


@dataclass
class Nginx:
    url: str
    work: Path

    def log(self) -> list[Logged]:
        lines = (self.work / "access.log").read_text().splitlines()
        return [
            Logged(uri, int(status), instance, redirect.strip('"'))
            for uri, status, instance, redirect in (line.split(" ") for line in lines)
        ]

    async def logged(self, uri: str, count: int = 1) -> list[Logged]:
        """The log lines of ``uri`` once there are ``count`` (nginx logs after the response)."""
        with trio.fail_after(5):
            await poll_until(lambda: len(self.lines_of(uri)) >= count)
        return self.lines_of(uri)

    def lines_of(self, uri: str) -> list[Logged]:
        return [line for line in self.log() if line.uri == uri]


@asynccontextmanager
async def running_nginx(
    work: Path, instances: list[RunningServer], cache: Path
) -> AsyncIterator[Nginx]:
    """nginx on the shipped configuration in front of ``instances``, stopped on exit."""
    port = free_port()
    (work / "access.log").touch()
    (work / "resizer.conf").write_text(deployed_config([s.port for s in instances], port, cache))
    (work / "nginx.conf").write_text(MAIN_CONF.format(work=work))
    argv = [nginx_binary(), "-p", str(work), "-e", str(work / "error.log")]
    argv += ["-c", str(work / "nginx.conf"), "-g", "daemon off;"]
    process = await trio.lowlevel.open_process(argv)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    if process.poll() is not None:
                        pytest.fail(f"nginx exited: {(work / 'error.log').read_text()}")
                    await trio.sleep(0.02)
        yield Nginx(f"http://127.0.0.1:{port}", work)
    finally:
        process.terminate()
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5) as waiting:
            await process.wait()
        if waiting.cancelled_caught:
            process.kill()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nginx-media")
    make_test_video(folder / "short.mp4", 320, 240, seconds=1, audio=True)
    # At width=1280 and compression=high (veryslow) ffmpeg runs for seconds (3.8 s here,
    # the first bytes after 1.6 s): surely still running mid-body.
    make_test_video(folder / "long.mp4", 640, 360, seconds=6, audio=True)
    return folder


@pytest.fixture
def cache() -> Iterator[Path]:
    """A cache folder nginx's workers can read when they run as another user (the tests run
    as root): inside a folder everyone may pass through, as deploy/nginx.conf asks."""
    folder = Path(tempfile.mkdtemp(prefix="resizer-nginx-"))
    folder.chmod(0o755)
    yield folder / "cache"
    shutil.rmtree(folder)


def accel_config(media: Path, cache: Path) -> Config:
    # trust_request_id: the client's X-Request-Id, passed on by nginx, is kept (and echoed).
    extra = f'[http]\ncors_allow_origins = ["{PLAYER}"]\n[logging]\ntrust_request_id = true'
    text = server_config_text(media, cache, extra)
    return load_config(text=text, env={"RESIZER_SERVER_ACCEL_REDIRECT": ACCEL})


@asynccontextmanager
async def behind_nginx(
    nursery: trio.Nursery,
    tmp_path: Path,
    media: Path,
    cache: Path,
    transformers: list[Transformer | None],
) -> AsyncIterator[tuple[Nginx, list[RunningServer]]]:
    """One resizer instance per transformer (None: ffmpeg), sharing ``cache``, behind nginx."""
    config = accel_config(media, cache)
    instances = [await start_server(nursery, config, t) for t in transformers]
    async with running_nginx(tmp_path, instances, cache) as nginx:
        yield nginx, instances


def hold_after(chunks: int, release: trio.Event) -> Callable[[int], Awaitable[None]]:
    """A FakeTransformer ``before_chunk`` holding the output after ``chunks`` chunks."""

    async def hold(index: int) -> None:
        if index >= chunks:
            await release.wait()

    return hold


async def test_a_miss_streams_through_nginx(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The first bytes of a miss reach the client while the transcode is held mid-way."""
    release = trio.Event()
    fake = FakeTransformer(size=50_000, chunk_size=1_000, before_chunk=hold_after(3, release))
    url = "/videos/short.mp4?width=320"
    async with (
        behind_nginx(nursery, tmp_path, media, cache, [fake]) as (nginx, _),
        httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
    ):
        with trio.fail_after(5):
            async with client.stream("GET", url) as response:
                assert response.headers["X-Cache-Status"] == "MISS"
                received = b""
                chunks = response.aiter_raw()
                while len(received) < 3_000:
                    received += await chunks.__anext__()
                assert fake.running == 1  # still held: nothing waited for the end
                release.set()
                received += b"".join([chunk async for chunk in chunks])
    assert received == fake_output(parse_options({"width": "320"}), 50_000)


async def test_a_hit_is_sent_by_nginx_with_resizers_headers(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A transcoded entry asked for again: byte-identical, sent by nginx from the file
    resizer's X-Accel-Redirect named, with resizer's headers (ETag, Last-Modified,
    Cache-Control, Vary, X-Cache-Status, CORS...) once each; clients cannot reach the cache's
    location themselves."""
    # No width: the size depends on client hints (Vary); a filename: Content-Disposition.
    url = "/videos/short.mp4?duration=1s&filename=clip"
    headers = {"Origin": PLAYER, "X-Request-Id": "nginx-hit-1"}
    async with (
        behind_nginx(nursery, tmp_path, media, cache, [None]) as (nginx, [instance]),
        httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
    ):
        miss = await client.get(url, headers=headers)
        hit = await client.get(url, headers=headers)
        direct = await client.head(f"{instance.url}{url}", headers=headers)  # resizer's answer
        [_, logged] = await nginx.logged(url, 2)
        outside = await client.get(logged.redirect)
    assert miss.headers["X-Cache-Status"] == "MISS"
    assert (hit.status_code, hit.headers["X-Cache-Status"]) == (200, "HIT")
    assert hit.content == miss.content
    assert logged.redirect.startswith(ACCEL)
    assert (cache / "entries" / logged.redirect.removeprefix(ACCEL)).read_bytes() == hit.content
    assert hit.headers["Content-Length"] == str(len(hit.content))
    carried = ["ETag", "Last-Modified", "Content-Type", "Content-Disposition", "Vary"]
    carried += ["Accept-CH", "X-Origin", "X-Source", "X-Request-Id"]
    carried += ["Access-Control-Allow-Origin", "Access-Control-Expose-Headers"]
    for name in carried:
        assert hit.headers.get_list(name) == direct.headers.get_list(name), name
    assert {"Save-Data", "Origin"} <= set(hit.headers["Vary"].split(", "))
    assert hit.headers["X-Request-Id"] == "nginx-hit-1"
    # max-age counts down: the two answers may lie on either side of a second.
    [cache_control] = hit.headers.get_list("Cache-Control")
    ages = [int(r.headers["Cache-Control"].split("=")[1]) for r in (hit, direct)]
    assert cache_control.startswith("public, max-age=")
    assert 0 <= ages[0] - ages[1] <= 1
    assert hit.headers.get_list("Accept-Ranges") == ["bytes"]
    assert "X-Accel-Redirect" not in hit.headers
    assert outside.status_code == 404


async def test_ranges_and_conditionals_through_nginx(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Ranges of a hit are cut by nginx (206 with resizer's validators, If-Range against
    them, never against nginx's own view of the file); If-None-Match gets resizer's 304;
    If-Match, If-Unmodified-Since and an unsatisfiable range are resizer's own answers."""
    size = 200_000
    url = "/videos/short.mp4?width=240"
    data = fake_output(parse_options({"width": "240"}), size)
    fake = FakeTransformer(size=size)
    async with (
        behind_nginx(nursery, tmp_path, media, cache, [fake]) as (nginx, _),
        httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
    ):
        assert (await client.get(url)).content == data
        validators = (await client.head(url)).headers
        etag, created = validators["ETag"], validators["Last-Modified"]
        # nginx's own validators of the file (its mtime, and mtime-size as its ETag) must
        # never count: set them well apart from resizer's.
        [_, head] = await nginx.logged(url, 2)
        data_file = cache / "entries" / head.redirect.removeprefix(ACCEL)
        mtime = int(parse_http_date(created) or 0) - 100
        os.utime(data_file, (mtime, mtime))
        answers = [
            await client.get(url, headers=headers)
            for headers in [
                {"Range": "bytes=1000-1999"},
                {"Range": "bytes=-500", "If-Range": etag},
                {"Range": "bytes=10-19", "If-Range": created},
                {"Range": "bytes=0-9", "If-Range": '"stale"'},
                {"If-None-Match": '"stale"'},
                {"If-Modified-Since": http_date(mtime)},
                {"If-None-Match": f'"{mtime:x}-{size:x}"'},
                {"If-None-Match": etag},
                {"If-Match": etag, "Range": "bytes=0-9"},
                {"Range": f"bytes={size}-"},
            ]
        ]
        os.utime(data_file, (mtime + 200, mtime + 200))
        unmodified = await client.get(url, headers={"If-Unmodified-Since": created})
        log = await nginx.logged(url, 3 + len(answers))
    part, tail, dated, stale, *modified, not_modified, guarded, beyond = answers
    assert (part.status_code, part.content) == (206, data[1000:2000])
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{size}"
    assert (part.headers["ETag"], part.headers["X-Cache-Status"]) == (etag, "HIT")
    assert (tail.status_code, tail.content) == (206, data[-500:])
    assert (dated.status_code, dated.content) == (206, data[10:20])
    assert (stale.status_code, stale.content) == (200, data)
    assert [(m.status_code, m.content) for m in modified] == [(200, data)] * 3
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert not_modified.headers["ETag"] == etag
    assert (guarded.status_code, guarded.content) == (206, data[:10])
    assert (beyond.status_code, beyond.json()["error"]) == (416, "range_not_satisfiable")
    assert (unmodified.status_code, unmodified.content) == (200, data)
    # nginx sent the file for the HEAD and every 200 and 206 but those with If-Match or
    # If-Unmodified-Since.
    sent_by_nginx = [line.redirect.startswith(ACCEL) for line in log]
    assert sent_by_nginx == [False, True, *[True] * 7, False, False, False, False]


async def test_a_client_leaving_nginx_during_a_miss_stops_ffmpeg_within_a_second(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Closing the connection to nginx mid-body: nginx closes its connection to resizer and
    the ffmpeg run is gone within 1 s."""
    url = "/videos/long.mp4?width=1280&compression=high"
    async with behind_nginx(nursery, tmp_path, media, cache, [None]) as (nginx, _):
        async with (
            httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
            client.stream("GET", url) as response,
        ):
            async for _ in response.aiter_raw():
                break
            assert ffmpeg_children(), "ffmpeg should be running mid-body"
        left_at = trio.current_time()
        with trio.fail_after(1.0):
            await poll_until(lambda: not ffmpeg_children())
        print(f"client left nginx -> ffmpeg exit: {trio.current_time() - left_at:.3f} s")


async def test_a_client_leaving_nginx_while_a_miss_is_silent_stops_it_within_a_second(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The client leaves while the transcode produces nothing (nginx has nothing to send,
    so no failed write tells it): the transcode still stops within 1 s."""
    fake = FakeTransformer(size=50_000, before_chunk=hold_after(1, trio.Event()))
    async with behind_nginx(nursery, tmp_path, media, cache, [fake]) as (nginx, _):
        async with (
            httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
            client.stream("GET", "/videos/short.mp4?width=320") as response,
        ):
            async for _ in response.aiter_raw():
                break
            assert fake.running == 1
        with trio.fail_after(1.0):
            await poll_until(lambda: fake.running == 0)
    assert fake.runs_abandoned == 1


async def test_two_instances_split_the_urls_between_them(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """URLs spread over both instances, and each URL, asked for three times, always reaches
    the same one (hash $request_uri consistent)."""
    # An odd number: round-robin would send each URL to the other instance the next time.
    urls = [f"/videos/short.mp4?width={width}" for width in range(100, 250, 10)]
    fakes: list[Transformer | None] = [FakeTransformer(size=2_000), FakeTransformer(size=2_000)]
    async with (
        behind_nginx(nursery, tmp_path, media, cache, fakes) as (nginx, instances),
        httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
    ):
        for _ in range(3):
            for url in urls:
                assert (await client.get(url)).status_code == 200
        answered = {url: {line.instance for line in await nginx.logged(url, 3)} for url in urls}
    assert all(len(instance) == 1 for instance in answered.values()), answered
    used = set().union(*answered.values())
    assert used == {f"127.0.0.1:{server.port}" for server in instances}


def connections_to(port: int) -> set[int]:
    """Local ports of the loopback TCP connections to ``port`` (any state, TIME_WAIT too)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote = line.split()[1:3]
        if int(remote.split(":")[1], 16) == port:
            found.add(int(local.split(":")[1], 16))
    return found


async def test_nginx_keeps_its_connection_to_resizer_across_requests(
    media: Path, cache: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A miss, then hits (redirects with an empty body), ranges and a 304: the miss's
    connection is closed after it (so the next request meets the hit layer again), the
    eleven others share one kept-alive connection from nginx to resizer."""
    url = "/videos/short.mp4?width=320"
    fake = FakeTransformer(size=20_000)
    async with (
        behind_nginx(nursery, tmp_path, media, cache, [fake]) as (nginx, [instance]),
        httpx.AsyncClient(base_url=nginx.url, timeout=30) as client,
    ):
        etag = (await client.get(url)).headers.get("ETag")
        for _ in range(5):
            hit = await client.get(url)
            etag = hit.headers["ETag"]
            assert (await client.get(url, headers={"Range": "bytes=0-9"})).status_code == 206
        assert (await client.get(url, headers={"If-None-Match": etag})).status_code == 304
        assert len(await nginx.logged(url, 12)) == 12
        assert len(connections_to(instance.port)) == 2  # the miss's (TIME_WAIT), the rest's


def server_level_directives(config: str) -> dict[str, str]:
    """The directives of the config's ``server`` block itself, outside its locations."""
    found: dict[str, str] = {}
    depth, in_server = 0, False
    for line in config.splitlines():
        code = line.split("#", 1)[0].strip()
        if code.startswith("server ") and code.endswith("{"):
            in_server = depth == 0
        if in_server and depth == 1 and code.endswith(";") and not code.endswith("{"):
            name, _, value = code[:-1].partition(" ")
            found[name] = value.strip()
        depth += code.count("{") - code.count("}")
        if depth == 0:
            in_server = False
    return found


def test_the_shipped_config_corks_hits_for_every_location() -> None:
    """sendfile and tcp_nopush are server-wide: nginx settles the cork on the first location
    a request matches (the proxy's) and keeps it through the X-Accel-Redirect."""
    directives = server_level_directives(DEPLOYED.read_text())
    assert directives.get("tcp_nopush") == "on"
    assert directives.get("sendfile") == "on"
