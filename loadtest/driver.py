"""The load driver: start a resizer with a scenario's configuration, load it, record, report.

    python -m loadtest.driver SCENARIO [--duration S] [--concurrency N] [--out DIR]

It generates the source media it needs (ffmpeg lavfi, cached under loadtest/.media), starts
``resizer serve`` as a separate process on a free port, warms the keys the scenario expects
to be cached, runs the load from trio tasks over httpx (one connection per client), samples
the server's RSS, descriptors, sockets and ffmpeg children every half second, reads the
server's counters from /metrics before and after, stops everything and writes
``result.json`` plus a Markdown report with plots (loadtest/report.py).

The load generator shares the machine's cores with the server: absolute numbers are lower
than on separate hosts; compare ratios (e.g. resizer/nginx on the same bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from resizer.transform.runner import resolve_ffmpeg

HERE = Path(__file__).resolve().parent
MEDIA_DIR = HERE / ".media"
RESULTS_DIR = HERE / "results"


# --- scenarios ---------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    description: str
    concurrency: int
    duration: float  # seconds of load
    sizes_mb: tuple[int, ...] = (1, 10, 50, 100)
    # Share of the clients that replay pre-warmed (cached) keys; the others ask for keys
    # nobody asked for before the run.
    hit_ratio: float = 0.5
    range_ratio: float = 0.0  # share of hit requests that ask for a byte range
    abort_ratio: float = 0.0  # share of requests that disconnect mid-body
    storm: bool = False  # every client asks for one uncached key at once, once
    nginx: bool = False  # also run the same hit load against nginx
    warmup: float = 5.0
    read_chunk: str = "64KiB"
    hit_query: str = "width=320&duration=2s"  # the warmed (cached) variant of each source
    # The other requests pick among this many keys nobody asked for before the run: each
    # is a miss the first time and a hit afterwards, as with real traffic (0: never repeat).
    cold_keys: int = 200
    # New keys per second, all the cold clients together: each waits a random think time
    # (Poisson arrivals) before its next request, like a user opening another video. None:
    # they ask again as soon as answered, which offers far more transcodes than 2 cores run.
    miss_rate: float | None = None
    # Hit clients read at this multiple of the variant's bitrate, like a player keeping its
    # buffer ahead; their streams stay open for most of the clip. None: as fast as they can.
    playback: float | None = None
    ramp: float = 0.0  # seconds over which the clients start (evenly), like arriving users
    cache_config: str = ""  # extra TOML lines for the server's [cache] section
    # False where clients loop flat out on purpose (saturation, bursts): there TTFB is about
    # clients / throughput (Little's law), so it is reported, not judged.
    latency_goals: bool = True
    workers: int = 1  # resizer worker processes (and nginx's, in versus-nginx)
    params: dict[str, Any] = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    "smoke": Scenario(
        "smoke", "A few clients for a few seconds: proves the harness works (make test).",
        concurrency=8, duration=3.0, sizes_mb=(1,), warmup=0.5,
    ),
    "baseline": Scenario(
        "baseline",
        "100 concurrent clients, sources of 1-100 MB: half replay cached keys flat out, half"
        " open new ones (4 new keys/s together).",
        concurrency=100, duration=60.0, miss_rate=4.0,
    ),
    "stress": Scenario(
        "stress",
        "1000 concurrent connections asking again as soon as answered, 20% byte ranges.",
        concurrency=1000, duration=60.0, sizes_mb=(1, 10), hit_ratio=1.0, range_ratio=0.2,
        params={"max_rss_mb": 96},  # the plan's goal with 1000 open streams
        latency_goals=False,
    ),
    "players": Scenario(
        "players",
        "1000 players streaming cached video at 1.5x its bitrate (each request open for"
        " seconds), 20% byte ranges, arriving over 5 s.",
        concurrency=1000, duration=60.0, sizes_mb=(1, 10), hit_ratio=1.0, range_ratio=0.2,
        hit_query="width=640&duration=10s", playback=1.5, ramp=5.0,
        params={"max_rss_mb": 96},  # the plan's goal with 1000 open streams
    ),
    "endurance": Scenario(
        "endurance", "200 clients for a long time: RSS, descriptors and tasks must stay flat.",
        concurrency=200, duration=180.0, sizes_mb=(1, 10), hit_ratio=0.9, abort_ratio=0.05,
        warmup=30.0, miss_rate=2.0,
    ),
    "storm": Scenario(
        "storm", "N clients ask for the same uncached key at once: 1 fetch, 1 transcode.",
        concurrency=500, duration=0.0, sizes_mb=(10,), storm=True, warmup=0.0, cold_keys=0,
    ),
    "abort": Scenario(
        "abort", "Clients disconnect at random points mid-body; resources return to baseline.",
        concurrency=100, duration=30.0, sizes_mb=(10, 50), hit_ratio=0.5, abort_ratio=1.0,
    ),
    "versus-nginx": Scenario(
        "versus-nginx", "The same cached bytes served by resizer and by nginx under one load.",
        concurrency=500, duration=30.0, sizes_mb=(10,), hit_ratio=1.0, nginx=True,
        hit_query="width=960&duration=8s",  # a cached file of about 1.1 MB
        # One worker per core for both, like nginx's `worker_processes auto`.
        workers=os.cpu_count() or 1, latency_goals=False,
    ),
}  # fmt: skip


# --- media -------------------------------------------------------------------------------


def make_source(size_mb: int) -> Path:
    """An H.264 MP4 of about ``size_mb`` MB (20 s of 1280x720 at the needed bitrate)."""
    MEDIA_DIR.mkdir(exist_ok=True)
    # A keyframe every 2 s, like web video (x264's default of 10 s made every frame miss
    # decode up to 250 frames).
    path = MEDIA_DIR / f"source-{size_mb}mb-gop2s.mp4"
    if path.exists():
        return path
    seconds = 20
    kbps = size_mb * 8000 // seconds
    argv = [resolve_ffmpeg(None), "-hide_banner", "-loglevel", "error", "-y"]
    argv += ["-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=25:duration={seconds}"]
    argv += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-b:v", f"{kbps}k"]
    argv += ["-maxrate", f"{kbps}k", "-bufsize", f"{kbps}k", "-c:a", "aac", "-b:a", "64k"]
    partial = path.with_suffix(".partial.mp4")
    subprocess.run([*argv, str(partial)], check=True)
    partial.rename(path)
    return path


# --- the server under test ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    cache: Path


@contextlib.contextmanager
def running_server(scenario: Scenario, work: Path) -> Iterator[Server]:
    """``resizer serve`` in its own process with the scenario's configuration."""
    cache = work / "cache"
    config = work / "resizer.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
workers = {scenario.workers}
[cache]
path = "{cache}"
read_chunk = "{scenario.read_chunk}"
{scenario.cache_config}
[logging]
level = "warning"
[limits]
max_source_size = "256MiB"
max_concurrent_origins = 200
origin_queue_timeout = "60s"
[[origins]]
name = "media"
matcher = "^/media/(?P<path>.+)$"
[[origins.sources]]
type = "filesystem"
root = "{MEDIA_DIR}"
"""
    )
    port = free_port()
    log = (work / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "resizer", "serve", "--config", str(config), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the server did not start; see {work / 'server.log'}")
            time.sleep(0.1)
        yield Server(process, url, cache)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _children(pid: int) -> list[int]:
    # Per thread: trio starts subprocesses from worker threads.
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def _is_ffmpeg(pid: int) -> bool:
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        return b"ffmpeg" in raw[: raw.rindex(b")")]
    return False


def _cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        fields = raw[raw.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _rss_and_descriptors(pid: int) -> tuple[int, int, int]:
    rss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    fds = sockets = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            with contextlib.suppress(OSError):
                sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return rss, fds, sockets


def sample_process(pid: int) -> dict[str, Any]:
    """RSS, open descriptors, sockets and ffmpeg children of the server ``pid`` (from /proc).

    With several workers ``pid`` is their supervisor: RSS is given per worker (and summed),
    descriptors and sockets are summed over the workers, ffmpeg counts their children.
    """
    workers = [child for child in _children(pid) if not _is_ffmpeg(child)] or [pid]
    measured = [_rss_and_descriptors(worker) for worker in workers]
    ffmpeg = sum(_is_ffmpeg(child) for worker in workers for child in _children(worker))
    return {
        "rss_bytes": sum(rss for rss, _, _ in measured),
        "rss_per_worker": [rss for rss, _, _ in measured],
        "open_fds": sum(fds for _, fds, _ in measured),
        "connections": sum(sockets for _, _, sockets in measured),
        "ffmpeg": ffmpeg,
        "cpu_seconds": sum(_cpu_seconds(worker) for worker in workers),
    }


async def scrape_metrics(
    client: httpx.AsyncClient, url: str, names: dict[str, str] | None = None
) -> dict[str, float]:
    """The server's counters (``names``: metric name -> key; default the work counters)."""
    names = names or {
        "resizer_origin_fetches_total": "origin_fetches",
        "resizer_transforms_total": "transforms",
        "resizer_coalesced_total": "coalesced",
        "resizer_cache_hits_total": "cache_hits",
        "resizer_cache_misses_total": "cache_misses",
        "resizer_stream_aborts_total": "stream_aborts",
    }
    text = (await client.get(f"{url}/metrics")).text
    found = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[names[name]] = float(value)
    return found


# --- load ----------------------------------------------------------------------------------


@dataclass
class Target:
    path: str
    cached: bool  # warmed before the load starts


def plan_targets(scenario: Scenario, rng: random.Random) -> tuple[list[Target], Callable[[], str]]:
    """The warmed keys, and a maker of fresh (uncached) keys."""
    sources = [make_source(size).name for size in scenario.sizes_mb]
    warmed = [Target(f"/media/{name}?{scenario.hit_query}", True) for name in sources]

    def new_key() -> str:
        # A frame at a random instant: a real miss (probe + seek + encode), cheap enough
        # that a 2-core machine can take many at once.
        name = rng.choice(sources)
        return f"/media/{name}?mode=frame&width=320&time={rng.randint(0, 19_000)}ms"

    pool = [new_key() for _ in range(scenario.cold_keys)]

    def fresh() -> str:
        return rng.choice(pool) if pool else new_key()

    return warmed, fresh


def variant_seconds(query: str) -> float | None:
    """The clip length a hit query asks for (``duration=10s``), to pace players by."""
    found = re.search(r"(?:^|&)duration=(\d+(?:\.\d+)?)(ms|s)?(?:&|$)", query)
    if found is None:
        return None
    value = float(found.group(1))
    return value / 1000 if found.group(2) == "ms" else value


class LeanClient:
    """A minimal HTTP/1.1 keep-alive client (h11 over trio sockets), one connection per
    in-flight request, pooled. httpx costs ~1-2 ms of CPU per request, which on a 2-core
    machine shared with the server made the load generator the bottleneck (nginx itself
    measured at 75 requests/s through it)."""

    def __init__(self, base: str) -> None:
        url = httpx.URL(base)
        self.host, self.port = url.host, url.port or 80
        self._idle: list[tuple[trio.SocketStream, Any]] = []

    async def aclose(self) -> None:
        for stream, _ in self._idle:
            await stream.aclose()
        self._idle.clear()

    @contextlib.asynccontextmanager
    async def request(
        self, path: str, headers: dict[str, str]
    ) -> AsyncIterator[tuple[int, dict[str, str], AsyncIterator[bytes]]]:
        import h11

        head = [("Host", f"{self.host}:{self.port}"), *headers.items()]
        request = h11.Request(method="GET", target=path, headers=head)
        try:
            stream, connection, response = await self._send_request(request)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        reusable = False
        try:
            if not isinstance(response, h11.Response):
                raise httpx.RemoteProtocolError("no response")
            fields = {k.decode().lower(): v.decode() for k, v in response.headers}
            finished = False

            async def body() -> AsyncIterator[bytes]:
                nonlocal finished
                while True:
                    event = await self._next_event(stream, connection)
                    if isinstance(event, h11.Data):
                        yield bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        finished = True
                        return
                    else:
                        raise httpx.RemoteProtocolError(f"unexpected {event!r}")

            yield response.status_code, fields, body()
            if finished and connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                connection.start_next_cycle()
                reusable = True
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        finally:
            if reusable:
                self._idle.append((stream, connection))
            else:
                await trio.aclose_forcefully(stream)

    async def _send_request(self, request: Any) -> tuple[trio.SocketStream, Any, Any]:
        """Send ``request``, on an idle connection if one is left, and read the response
        head. Like browsers, it sends again on a new connection when a reused one turns out
        closed before any response byte: the server may close an idle keep-alive connection
        just as it is reused (RFC 9112, 9.3.1), and its timer starts when it has sent the
        last byte, which a slow reader may still be reading seconds later."""
        import h11

        async def exchange(stream: trio.SocketStream, connection: Any) -> Any:
            await stream.send_all(connection.send(request))
            await stream.send_all(connection.send(h11.EndOfMessage()))
            return await self._next_event(stream, connection)

        while self._idle:
            stream, connection = self._idle.pop()
            if stream.socket.is_readable():  # closed by the server (or junk): not reusable
                await trio.aclose_forcefully(stream)
                continue
            try:
                return stream, connection, await exchange(stream, connection)
            except (OSError, trio.BrokenResourceError, h11.ProtocolError, httpx.HTTPError):
                await trio.aclose_forcefully(stream)
        stream = await trio.open_tcp_stream(self.host, self.port)
        connection = h11.Connection(h11.CLIENT)
        try:
            return stream, connection, await exchange(stream, connection)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    @staticmethod
    async def _next_event(stream: trio.SocketStream, connection: Any) -> Any:
        import h11

        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(256 * 1024)
            if not data:
                raise httpx.RemoteProtocolError("server closed the connection")
            connection.receive_data(data)


async def one_request(
    client: LeanClient,
    path: str,
    origin: float,
    *,
    byte_range: str | None = None,
    abort_after: float | None = None,
    read_rate: float | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "t": trio.current_time() - origin,
        "status": 0,
        "cache": "ERROR",
        "ttfb": None,
        "total": None,
        "bytes": 0,
        "range": byte_range is not None,
        "error": None,
    }
    started = trio.current_time()
    headers = {"Range": byte_range} if byte_range else {}
    try:
        async with client.request(path, headers) as (status, fields, body):
            record["ttfb"] = trio.current_time() - started
            record["status"] = status
            record["cache"] = fields.get("x-cache-status", "ERROR")
            body_started = trio.current_time()
            async for chunk in body:
                record["bytes"] += len(chunk)
                if abort_after is not None and record["bytes"] >= abort_after:
                    record["cache"] = "ABORTED"
                    break
                if read_rate:  # a player: no faster than it plays (TCP pushes back)
                    await trio.sleep_until(body_started + record["bytes"] / read_rate)
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["total"] = trio.current_time() - started
    return record


async def run_load(
    scenario: Scenario,
    base: str,
    rng: random.Random,
    records: list[dict[str, Any]],
    counters: dict[str, float],
) -> tuple[float, float]:
    """Warm the cache, then run the scenario's clients against ``base``.

    Fills ``counters`` with the server's counters after the warm-up; returns when the load
    phase started (``trio.current_time()``; requests' ``t`` count from there) and its wall
    time.
    """
    warmed, fresh = plan_targets(scenario, rng)
    limits = httpx.Limits(max_connections=scenario.concurrency + 10, max_keepalive_connections=None)
    timeout = httpx.Timeout(300, connect=30, pool=300)
    lean = LeanClient(base)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        for target in warmed:  # fill the cache (sequentially: these are the hits later)
            await one_request(lean, target.path, trio.current_time())
        sizes = {}
        for target in warmed:
            response = await client.head(base + target.path)
            sizes[target.path] = int(response.headers.get("Content-Length", "0"))
        counters.update(await scrape_metrics(client, base))
        origin = trio.current_time()
        if scenario.storm:
            key = fresh()

            async def storm_client() -> None:
                records.append(await one_request(lean, key, origin))

            async with trio.open_nursery() as nursery:
                for _ in range(scenario.concurrency):
                    nursery.start_soon(storm_client)
            elapsed = trio.current_time() - origin
            await lean.aclose()
            return origin, elapsed
        deadline = origin + scenario.duration
        hit_clients = round(scenario.concurrency * scenario.hit_ratio)
        cold_clients = scenario.concurrency - hit_clients
        clip_seconds = variant_seconds(scenario.hit_query)

        def aborts_after(size: int) -> float | None:
            if rng.random() >= scenario.abort_ratio:
                return None
            return rng.uniform(0, max(size, 20_000)) if size else 1.0

        async def hit_client() -> None:
            while trio.current_time() < deadline:
                path = rng.choice(warmed).path
                size = sizes[path]
                byte_range = None
                if size and rng.random() < scenario.range_ratio:
                    start = rng.randrange(size)
                    byte_range = f"bytes={start}-{min(size - 1, start + 65535)}"
                read_rate = None
                if scenario.playback and size and clip_seconds:
                    read_rate = scenario.playback * size / clip_seconds
                record = await one_request(
                    lean,
                    path,
                    origin,
                    byte_range=byte_range,
                    abort_after=aborts_after(size),
                    read_rate=read_rate,
                )
                records.append(record)

        async def cold_client() -> None:
            while True:
                if scenario.miss_rate:  # think, so that arrivals are Poisson at miss_rate
                    think = rng.expovariate(scenario.miss_rate / cold_clients)
                    await trio.sleep_until(min(deadline, trio.current_time() + think))
                if trio.current_time() >= deadline:
                    return
                path = fresh()
                records.append(await one_request(lean, path, origin, abort_after=aborts_after(0)))

        async def arriving(role: Callable[[], Awaitable[None]], index: int) -> None:
            await trio.sleep(scenario.ramp * index / scenario.concurrency)
            await role()

        roles = [hit_client] * hit_clients + [cold_client] * cold_clients
        rng.shuffle(roles)
        async with trio.open_nursery() as nursery:
            for index, role in enumerate(roles):
                nursery.start_soon(arriving, role, index)
        elapsed = trio.current_time() - origin
        await lean.aclose()  # so the last samples show the server's own descriptors
        return origin, elapsed


BUDGET_GAUGES = {
    "resizer_stream_budget_bytes": "budget_bytes",
    "resizer_streams_waiting_for_budget": "budget_waiting",
    "resizer_stream_budget_overdrafts_total": "budget_overdrafts",
}


async def scrape_budget(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The stream budget's gauges (bytes held, streams waiting, overdrafts so far)."""
    with contextlib.suppress(httpx.HTTPError):
        return await scrape_metrics(client, url, BUDGET_GAUGES)
    return {}


@contextlib.asynccontextmanager
async def sampling(
    pid: int, origin: float, samples: list[dict[str, Any]], url: str | None = None
) -> AsyncIterator[None]:
    async def sample_forever() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                measured = await trio.to_thread.run_sync(sample_process, pid)
                sample: dict[str, Any] = {"t": trio.current_time() - origin, **measured}
                sample["tasks"] = None
                if url is not None:
                    sample.update(await scrape_budget(client, url))
                samples.append(sample)
                await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_forever)
        yield
        nursery.cancel_scope.cancel()


async def drive(scenario: Scenario, server: Server, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    before: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=30) as control:
        origin = trio.current_time()
        async with sampling(server.process.pid, origin, samples, server.url):
            load_origin, duration = await run_load(scenario, server.url, rng, records, before)
            await trio.sleep(2.0)  # let abandoned work finish so the last samples show it
        after = await scrape_metrics(control, server.url)
    for sample in samples:  # on the requests' clock: the warm-up gets negative times
        sample["t"] -= load_origin - origin
    return {
        "requests": records,
        "samples": samples,
        "duration_s": duration,
        "metrics": {name: after[name] - before.get(name, 0.0) for name in after},
        "nginx": None,
    }


# --- nginx, for the versus-nginx scenario ---------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    # The Debian package, from the distribution's registry (allowed on CI machines).
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=True, env=quiet)
    return "/usr/sbin/nginx"


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str
    names: list[str]  # files it serves: the cached entries' data files


@contextlib.contextmanager
def running_nginx(server: Server, workers: int = 1) -> Iterator[Nginx]:
    """nginx (static files, sendfile) serving the very bytes resizer has cached."""
    work = server.cache.parent
    root = work / "nginx-root"
    root.mkdir(exist_ok=True)
    names = []
    for meta in (server.cache / "entries").glob("*/*.meta.json"):
        data_name = json.loads(meta.read_text())["data"]
        if not (root / data_name).exists():
            os.link(meta.parent / data_name, root / data_name)
        names.append(data_name)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
worker_processes {workers};
pid {work / "nginx.pid"};
error_log {work / "nginx-error.log"};
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ default_type video/mp4; }}
  }}
}}
"""
    )
    process = subprocess.Popen([nginx_binary(), "-c", str(conf), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{url}/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield Nginx(process, url, names)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def drive_nginx(scenario: Scenario, nginx: Nginx, seed: int) -> dict[str, Any]:
    """The scenario's hit load against nginx (same concurrency, duration and bytes)."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    origin = trio.current_time()
    deadline = origin + scenario.duration
    lean = LeanClient(nginx.url)
    async with sampling(nginx.process.pid, origin, samples):

        async def loop_client() -> None:
            while trio.current_time() < deadline:
                name = rng.choice(nginx.names)
                record = await one_request(lean, f"/{name}", origin)
                record["cache"] = "HIT" if record["status"] == 200 else "ERROR"
                records.append(record)

        async with trio.open_nursery() as nursery:
            for _ in range(scenario.concurrency):
                nursery.start_soon(loop_client)
    return {"requests": records, "samples": samples, "duration_s": scenario.duration}


VERSUS_ROUNDS = 3


def drive_versus_nginx(
    scenario: Scenario, server: Server, seed: int, rounds: int = VERSUS_ROUNDS
) -> dict[str, Any]:
    """resizer and nginx in alternating slices of the same load (``rounds`` each, the
    duration split between them), so that the shared machine's drift, which moved one
    server's CPU per request by 30 % between runs minutes apart, falls on both alike."""
    part = dataclasses.replace(scenario, duration=scenario.duration / rounds)
    # The first slice also warms the cache: nginx then serves the files resizer wrote.
    resizer = trio.run(drive, part, server, seed)
    with running_nginx(server, scenario.workers) as nginx:
        versus = trio.run(drive_nginx, part, nginx, seed)
        for round_ in range(1, rounds):
            _append_slice(resizer, trio.run(drive, part, server, seed + round_))
            _append_slice(versus, trio.run(drive_nginx, part, nginx, seed + round_))
    resizer["nginx"] = versus
    return resizer


def _append_slice(total: dict[str, Any], part: dict[str, Any]) -> None:
    """One timeline from consecutive slices: each starts a second after the last sample
    (or request) of the ones before; durations and counters add up."""
    ends = [float(s["t"]) for s in total["samples"]]
    ends += [float(r["t"]) + float(r.get("total") or 0.0) for r in total["requests"]]
    starts = [float(s["t"]) for s in part["samples"]] + [float(r["t"]) for r in part["requests"]]
    shift = max(ends, default=0.0) + 1.0 - min(starts, default=0.0)
    for record in (*part["requests"], *part["samples"]):
        record["t"] = float(record["t"]) + shift
    total["requests"] += part["requests"]
    total["samples"] += part["samples"]
    total["duration_s"] += part["duration_s"]
    if "metrics" in total:
        for name, value in part["metrics"].items():
            total["metrics"][name] = total["metrics"].get(name, 0.0) + value


# --- entry point -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": "the load generator shares the cores with the server: prefer ratios",
    }


def run_scenario(scenario: Scenario, out_dir: Path, seed: int = 20261127) -> Path:
    """Run ``scenario`` end to end and write its report; returns the report's path."""
    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    for size in scenario.sizes_mb:
        make_source(size)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with running_server(scenario, work) as server:
        if scenario.nginx:
            measured = drive_versus_nginx(scenario, server, seed)
        else:
            measured = trio.run(drive, scenario, server, seed)
    result = {
        "scenario": scenario.name,
        "description": scenario.description,
        "command": f"make loadtest SCENARIO={scenario.name}",
        "started": started,
        "warmup_s": scenario.warmup,
        "machine": machine(),
        "params": {
            "concurrency": scenario.concurrency,
            "duration": scenario.duration,
            "sizes_mb": list(scenario.sizes_mb),
            "hit_ratio": scenario.hit_ratio,
            "range_ratio": scenario.range_ratio,
            "abort_ratio": scenario.abort_ratio,
            "read_chunk": scenario.read_chunk,
            "hit_query": scenario.hit_query,
            "cold_keys": scenario.cold_keys,
            "ramp": scenario.ramp,
            "cache_config": scenario.cache_config,
            "miss_rate": scenario.miss_rate,
            "playback": scenario.playback,
            "latency_goals": scenario.latency_goals,
            "storm": scenario.storm,
            # Server settings overridden from the environment for this run (RESIZER_*).
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RESIZER_")},
            **scenario.params,
        },
        "workers": scenario.workers,
        **measured,
    }
    shutil.rmtree(work, ignore_errors=True)
    return write_report(result, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--duration", type=float, help="seconds of load")
    parser.add_argument("--concurrency", type=int, help="concurrent clients")
    parser.add_argument("--workers", type=int, help="resizer worker processes")
    parser.add_argument(
        "--miss-rate", type=float, help="new keys per second (0: cold clients loop flat out)"
    )
    parser.add_argument(
        "--playback", type=float, help="players read at this x bitrate (0: flat out)"
    )
    parser.add_argument("--out", type=Path, help="report folder (default loadtest/results/NAME)")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    if args.duration is not None:
        scenario.duration = args.duration
    if args.concurrency is not None:
        scenario.concurrency = args.concurrency
    if args.workers is not None:
        scenario.workers = args.workers
    if args.miss_rate is not None:
        scenario.miss_rate = args.miss_rate or None
    if args.playback is not None:
        scenario.playback = args.playback or None
    # Absolute: nginx resolves a relative -c path against its own prefix.
    report = run_scenario(scenario, (args.out or RESULTS_DIR / scenario.name).resolve())
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
