"""The load driver: start a resizer with a scenario's configuration, load it, record, report.

    python -m loadtest.driver SCENARIO [--duration S] [--concurrency N] [--out DIR]

It generates the source media it needs (ffmpeg lavfi, cached under loadtest/.media), starts
``resizer serve`` as a separate process on a free port, warms the keys the scenario expects
to be cached, runs the load from trio tasks over a lean HTTP/1.1 client (one connection
per client), samples the server's RSS, descriptors, sockets and ffmpeg children every half
second, reads the server's counters from /metrics before and after, stops everything and
writes ``result.json`` plus a Markdown report with plots (loadtest/report.py).

Throughput comparisons (the ``wrk`` scenarios) use wrk instead (loadtest/wrk.py): the
Python client would be the bottleneck. The Python client's runs end with a calibration, the
same load against nginx serving the same files: the client's own ceiling.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from resizer.transform.runner import resolve_ffmpeg

from .wrk import THREADS, debian_binary, range_script, run_wrk, wrk_binary

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
    # Also run the hit load through the same Python client against nginx serving the same
    # bodies for a few seconds: the client's own ceiling, reported next to every figure.
    calibrate: bool = True
    # wrk instead of the Python client: resizer and nginx on each of WRK_BODIES at each of
    # ``connections``, in alternating slices (``duration`` per server and cell).
    wrk: bool = False
    connections: tuple[int, ...] = ()
    # wrk against resizer behind nginx as deploy/nginx.conf ships it (X-Accel-Redirect).
    front: bool = False
    server_config: str = ""  # extra TOML lines for the server's [server] section
    extra_config: str = ""  # further TOML tables for the server ([scheduling]...)
    # Clients that keep this many long transcodes (a whole source at 1280 px, high
    # compression, a new key each time) in flight during the load, outside its records:
    # they saturate the ffmpeg slots while the scenario's own clients are measured.
    background: int = 0
    params: dict[str, Any] = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    "smoke": Scenario(
        "smoke", "A few clients for a few seconds: proves the harness works (make test).",
        concurrency=8, duration=3.0, sizes_mb=(1,), warmup=0.5, calibrate=False,
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
        calibrate=False,  # its nginx slices are the client's ceiling
    ),
    "wrk": Scenario(
        "wrk",
        "wrk against resizer and against nginx serving the same cached files (a 50 KB JPEG"
        " frame, a 1 MB PNG frame, a 2.3 MB MP4 whole and in 64 KiB-1 MiB ranges), 50 and"
        " 500 connections, one worker each, alternating 6 s slices.",
        concurrency=500, duration=18.0, sizes_mb=(10,), hit_ratio=1.0, warmup=0.0,
        latency_goals=False, calibrate=False, wrk=True, connections=(50, 500),
    ),
    "priority": Scenario(
        "priority",
        "Frames (high) arriving at 2 new keys/s while 20 long transcodes (medium) keep every"
        " ffmpeg slot busy: the frames' time to first byte with priority scheduling.",
        concurrency=20, duration=60.0, sizes_mb=(10,), hit_ratio=0.0, miss_rate=2.0,
        cold_keys=0, background=20, latency_goals=False, calibrate=False,
    ),
    "priority-off": Scenario(
        "priority-off",
        "priority with [scheduling] enabled = false (first come, first served): the control.",
        concurrency=20, duration=60.0, sizes_mb=(10,), hit_ratio=0.0, miss_rate=2.0,
        cold_keys=0, background=20, latency_goals=False, calibrate=False,
        extra_config="[scheduling]\nenabled = false",
    ),
    "wrk-accel": Scenario(
        "wrk-accel",
        "wrk against resizer behind nginx (deploy/nginx.conf, X-Accel-Redirect) and against"
        " nginx serving the same cached files directly; bodies and slices as in wrk.",
        concurrency=500, duration=18.0, sizes_mb=(10,), hit_ratio=1.0, warmup=0.0,
        latency_goals=False, calibrate=False, wrk=True, connections=(50, 500), front=True,
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


def make_grainy_source() -> Path:
    """4 s of 1280x720 with film grain at 20 Mbit/s (about 10 MB): its frames compress
    like photographs (a 1280-pixel PNG of about 1 MB), where lavfi's flat test pattern
    makes 140 KB ones."""
    MEDIA_DIR.mkdir(exist_ok=True)
    path = MEDIA_DIR / "grain-4s.mp4"
    if path.exists():
        return path
    argv = [resolve_ffmpeg(None), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"]
    argv += ["-i", "testsrc2=size=1280x720:rate=25:duration=4,noise=alls=12:allf=t"]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-b:v", "20000k"]
    argv += ["-maxrate", "20000k", "-bufsize", "20000k"]
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
{scenario.server_config}
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
{scenario.extra_config}
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


HIT = "HIT"  # X-Cache-Status of a hit; nginx's answers count as hits (it serves cached files)


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
    untagged: str = "ERROR",
) -> dict[str, Any]:
    """One GET; ``untagged`` is the cache status recorded when the response has no
    X-Cache-Status (nginx sends none: "HIT")."""
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
            record["cache"] = fields.get("x-cache-status", untagged)
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


def aborts_after(scenario: Scenario, rng: random.Random, size: int) -> float | None:
    """After how many body bytes a request disconnects on purpose (None: it reads all)."""
    if rng.random() >= scenario.abort_ratio:
        return None
    return rng.uniform(0, max(size, 20_000)) if size else 1.0


async def hit_loop(
    scenario: Scenario,
    lean: LeanClient,
    bodies: dict[str, int],
    rng: random.Random,
    origin: float,
    deadline: float,
    records: list[dict[str, Any]],
    untagged: str = "ERROR",
) -> None:
    """One hit client: asks for ``bodies`` (path -> size) until ``deadline``, with the
    scenario's byte ranges, deliberate disconnects and playback pacing."""
    paths = sorted(bodies)
    clip_seconds = variant_seconds(scenario.hit_query)
    while trio.current_time() < deadline:
        path = rng.choice(paths)
        size = bodies[path]
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
            abort_after=aborts_after(scenario, rng, size),
            read_rate=read_rate,
            untagged=untagged,
        )
        records.append(record)


async def run_load(
    scenario: Scenario,
    base: str,
    rng: random.Random,
    records: list[dict[str, Any]],
    counters: dict[str, float],
    served: list[str],
) -> tuple[float, float]:
    """Warm the cache, then run the scenario's clients against ``base``.

    Fills ``counters`` with the server's counters after the warm-up and ``served`` with the
    paths of the cached bodies the load asked for (the warmed ones, or a storm's key);
    returns when the load phase started (``trio.current_time()``; requests' ``t`` count
    from there) and its wall time.
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
        served.extend(sizes)  # the warmed paths
        if scenario.storm:
            key = fresh()
            served[:] = [key]

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

        async def hit_client() -> None:
            await hit_loop(scenario, lean, sizes, rng, origin, deadline, records)

        async def cold_client() -> None:
            while True:
                if scenario.miss_rate:  # think, so that arrivals are Poisson at miss_rate
                    think = rng.expovariate(scenario.miss_rate / cold_clients)
                    await trio.sleep_until(min(deadline, trio.current_time() + think))
                if trio.current_time() >= deadline:
                    return
                path = fresh()
                abort = aborts_after(scenario, rng, 0)
                records.append(await one_request(lean, path, origin, abort_after=abort))

        async def arriving(role: Callable[[], Awaitable[None]], index: int) -> None:
            await trio.sleep(scenario.ramp * index / scenario.concurrency)
            await role()

        async def background_client() -> None:
            # Long transcodes nobody measures: a new key each time, as long as the load.
            source = warmed[-1].path.split("?")[0]
            while trio.current_time() < deadline:
                path = f"{source}?width=1280&compression=high&time={rng.randint(0, 999)}ms"
                with trio.move_on_at(deadline):
                    await one_request(lean, path, origin)

        roles = [hit_client] * hit_clients + [cold_client] * cold_clients
        rng.shuffle(roles)
        async with trio.open_nursery() as nursery:
            for _ in range(scenario.background):
                nursery.start_soon(background_client)
            if scenario.background:
                await trio.sleep(2.0)  # the slots fill and the queue forms first
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
    served: list[str] = []
    async with httpx.AsyncClient(timeout=30) as control:
        origin = trio.current_time()
        async with sampling(server.process.pid, origin, samples, server.url):
            load_origin, duration = await run_load(
                scenario, server.url, rng, records, before, served
            )
            await trio.sleep(2.0)  # let abandoned work finish so the last samples show it
        after = await scrape_metrics(control, server.url)
    for sample in samples:  # on the requests' clock: the warm-up gets negative times
        sample["t"] -= load_origin - origin
    return {
        "requests": records,
        "samples": samples,
        "duration_s": duration,
        "metrics": {name: after[name] - before.get(name, 0.0) for name in after},
        "served": served,
        "nginx": None,
    }


# --- nginx: the reference server, and the front of wrk-accel ---------------------------------

# The reverse-proxy configuration the project ships; wrk-accel runs resizer behind it.
FRONT_CONFIG = HERE.parent / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    return debian_binary("nginx", "nginx")


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str
    files: dict[str, str]  # a cached entry's ETag -> the file nginx serves it as


@contextlib.contextmanager
def nginx_process(conf: Path, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """nginx in the foreground with ``conf``, once it answers at ``url``."""
    process = subprocess.Popen([nginx_binary(), "-c", str(conf), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{url}/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"nginx did not start with {conf}") from None
                time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def running_nginx(server: Server, workers: int = 1) -> Iterator[Nginx]:
    """nginx (static files, sendfile) serving the very bytes resizer has cached."""
    work = server.cache.parent
    root = work / "nginx-root"
    root.mkdir(exist_ok=True)
    files = {}
    for meta in (server.cache / "entries").glob("*/*.meta.json"):
        fields = json.loads(meta.read_text())
        if not (root / fields["data"]).exists():
            os.link(meta.parent / fields["data"], root / fields["data"])
        files[fields["etag"]] = fields["data"]
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
    url = f"http://127.0.0.1:{port}"
    with nginx_process(conf, url) as process:
        yield Nginx(process, url, files)


def accel_prefix(shipped: str) -> str:
    """The internal location the shipped config aliases the cache under (resizer's
    ``[server] accel_redirect``)."""
    found = re.search(r"location\s+(?:\^~\s+)?(/\S*)\s*\{[^}]*\binternal\s*;", shipped)
    if found is None:
        raise ValueError("no internal location (X-Accel-Redirect target) in the nginx config")
    return found.group(1)


def front_config(shipped: str, *, port: int, upstream: int, cache: Path) -> str:
    """deploy/nginx.conf with only the values it marks "<- yours" replaced: where it
    listens, the resizer it proxies to, the cache folder its internal location aliases."""
    # Directives only (a line's start, so commented-out examples stay as they are); the
    # listen address alone, keeping whatever parameters follow it (default_server...).
    for marked, ours in {
        r"^(\s*listen\s+)[^\s;]+": rf"\g<1>127.0.0.1:{port}",
        r"^(\s*server\s+)127\.0\.0\.1:8080(?=[\s;])": rf"\g<1>127.0.0.1:{upstream}",
        r"^(\s*alias\s+)/var/cache/resizer/": rf"\g<1>{cache}/",
    }.items():
        shipped, found = re.subn(marked, ours, shipped, flags=re.MULTILINE)
        if found != 1:
            raise ValueError(f"{FRONT_CONFIG} should have one line matching {marked!r}")
    return shipped


@contextlib.contextmanager
def running_front(server: Server, workers: int = 1) -> Iterator[Nginx]:
    """resizer behind nginx as deploy/nginx.conf ships it: hits come back to nginx as
    X-Accel-Redirects (resizer must run with ``[server] accel_redirect``, see
    ``front_scenario``), and nginx sends the cache file."""
    work = server.cache.parent
    port = free_port()
    upstream = int(httpx.URL(server.url).port or 80)
    site = work / "front-site.conf"
    shipped = FRONT_CONFIG.read_text()
    site.write_text(front_config(shipped, port=port, upstream=upstream, cache=server.cache))
    conf = work / "front.conf"
    # The shipped file belongs in an http block; around it, the same main settings as the
    # reference nginx's (workers, connections, keep-alive), with its files in ``work``.
    temp = " ".join(f"{kind}_temp_path {work / kind};" for kind in ("client_body", "proxy"))
    conf.write_text(
        f"""
worker_processes {workers};
pid {work / "front.pid"};
error_log {work / "front-error.log"};
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000;
  {temp}
  include {site};
}}
"""
    )
    url = f"http://127.0.0.1:{port}"
    with nginx_process(conf, url) as process:
        yield Nginx(process, url, {})


def front_scenario(scenario: Scenario) -> Scenario:
    """``scenario`` with resizer configured for the shipped front (its accel prefix)."""
    if not FRONT_CONFIG.exists():
        raise SystemExit(f"{scenario.name}: runs resizer behind {FRONT_CONFIG}, which is missing")
    prefix = accel_prefix(FRONT_CONFIG.read_text())
    return dataclasses.replace(
        scenario, server_config=f'{scenario.server_config}\naccel_redirect = "{prefix}"'
    )


def nginx_bodies(server: Server, nginx: Nginx, paths: list[str]) -> dict[str, int]:
    """nginx's path and size for each cached resizer ``path`` (matched by ETag)."""
    bodies = {}
    for path in paths:
        head = httpx.head(server.url + path, timeout=30).headers
        name = nginx.files.get(head.get("etag", ""))
        if name is None:  # a ceiling measured on other bodies would not be this run's
            raise RuntimeError(f"{path} is not among the cache files nginx serves")
        bodies[f"/{name}"] = int(head.get("content-length", "0"))
    return bodies


async def drive_nginx(
    scenario: Scenario, nginx: Nginx, bodies: dict[str, int], seed: int
) -> dict[str, Any]:
    """The scenario's hit load against nginx (same clients, bodies, ranges, pacing and
    duration; a storm's clients ask once each, all at once)."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    origin = trio.current_time()
    deadline = origin + scenario.duration
    lean = LeanClient(nginx.url)
    async with sampling(nginx.process.pid, origin, samples):

        async def client(index: int) -> None:
            await trio.sleep(scenario.ramp * index / scenario.concurrency)
            if scenario.storm:
                path = min(bodies)
                records.append(await one_request(lean, path, origin, untagged=HIT))
            else:
                await hit_loop(scenario, lean, bodies, rng, origin, deadline, records, HIT)

        async with trio.open_nursery() as nursery:
            for index in range(scenario.concurrency):
                nursery.start_soon(client, index)
        elapsed = trio.current_time() - origin
        await lean.aclose()
    return {"requests": records, "samples": samples, "duration_s": elapsed}


CALIBRATION_S = 10.0


def calibrate(scenario: Scenario, server: Server, served: list[str], seed: int) -> dict[str, Any]:
    """The Python client's own ceiling for ``scenario``: its hit load through the same
    client (every client a hit client, same bodies, ranges, pacing and ramp) against nginx
    serving the same files, for up to CALIBRATION_S seconds."""
    part = dataclasses.replace(scenario, duration=min(scenario.duration, CALIBRATION_S))
    with running_nginx(server, scenario.workers) as nginx:
        measured = trio.run(drive_nginx, part, nginx, nginx_bodies(server, nginx, served), seed)
    return {**measured, "bodies": len(served)}


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
        bodies = nginx_bodies(server, nginx, resizer["served"])
        versus = trio.run(drive_nginx, part, nginx, bodies, seed)
        for round_ in range(1, rounds):
            _append_slice(resizer, trio.run(drive, part, server, seed + round_))
            _append_slice(versus, trio.run(drive_nginx, part, nginx, bodies, seed + round_))
    resizer["nginx"] = versus
    return resizer


# --- wrk: throughput comparisons with a load generator that is not the bottleneck -----------


@dataclass(frozen=True)
class Body:
    label: str
    query: str
    source: Callable[[], Path]
    ranges: bool = False  # random 64 KiB-1 MiB byte ranges of it (wrk.RANGE_SCRIPT)


def _video_source() -> Path:
    return make_source(10)


# Sizes measured on the generated sources (they are deterministic).
WRK_BODIES = (
    Body("frame, JPEG", "mode=frame&width=800&time=1s", make_grainy_source),  # 51 KB
    Body("frame, PNG", "mode=frame&width=1024&time=1s&format=png", make_grainy_source),  # 0.96 MB
    Body("video, MP4", "width=1280&duration=8s", _video_source),  # 2.3 MB
    Body("video, MP4, ranges", "width=1280&duration=8s", _video_source, ranges=True),
)


@dataclass
class WrkTarget:
    name: str
    url: str
    paths: dict[str, str]  # body label -> path on this server
    sample: Callable[[], dict[str, Any]]  # its processes' CPU and RSS (sample_process)
    metrics: str | None = None  # resizer's URL, to count the hits it answered


def warm_bodies(url: str, bodies: Sequence[Body]) -> dict[str, dict[str, Any]]:
    """Ask for each body until it is a cache hit; its path, size and ETag by label."""
    warmed = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for body in bodies:
            path = f"/media/{body.source().name}?{body.query}"
            for _ in range(3):  # the miss, then the hit (a third try for a slow publish)
                response = client.get(path)
                response.raise_for_status()
                if response.headers.get("x-cache-status") == HIT:
                    break
            else:
                raise RuntimeError(f"{path} is still not a cache hit")
            etag = response.headers["etag"]
            warmed[body.label] = {"path": path, "size": len(response.content), "etag": etag}
    return warmed


def processes(*pids: int) -> Callable[[], dict[str, Any]]:
    """A sampler of several servers' processes: CPU of all of them, RSS of the first's
    workers (resizer's, when nginx is in front of it)."""

    def sample() -> dict[str, Any]:
        measured = [sample_process(pid) for pid in pids]
        return {
            "cpu_seconds": sum(m["cpu_seconds"] for m in measured),
            "rss_per_worker": measured[0]["rss_per_worker"],
        }

    return sample


def run_target(
    target: WrkTarget, label: str, connections: int, seconds: float, script: Path | None
) -> dict[str, Any]:
    """One wrk slice against ``target``, with the hits resizer counted meanwhile."""
    before = resizer_hits(target.metrics)
    url = target.url + target.paths[label]
    measured = run_wrk(url, connections, seconds, target.sample, script)
    after = resizer_hits(target.metrics)
    measured["resizer_hits"] = None if before is None or after is None else after - before
    return measured


def resizer_hits(url: str | None) -> float | None:
    """resizer's cache hit counter (summed over its workers); None without a URL."""
    if url is None:
        return None
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name == "resizer_cache_hits_total":
            return float(value)
    return None


def drive_wrk(scenario: Scenario, server: Server, rounds: int = VERSUS_ROUNDS) -> dict[str, Any]:
    """wrk against resizer (or resizer behind the shipped nginx front) and against nginx
    serving the same cached files: each body at each connection count, in ``rounds``
    alternating slices per server of ``duration / rounds`` seconds each, same threads."""
    work = server.cache.parent
    seconds = scenario.duration / rounds
    with contextlib.ExitStack() as stack:
        tested = WrkTarget("resizer", server.url, {}, processes(server.process.pid), server.url)
        if scenario.front:
            front = stack.enter_context(running_front(server, scenario.workers))
            both = processes(server.process.pid, front.process.pid)
            tested = WrkTarget("resizer behind nginx", front.url, {}, both, server.url)
        warmed = warm_bodies(tested.url, WRK_BODIES)
        tested.paths = {label: body["path"] for label, body in warmed.items()}
        nginx = stack.enter_context(running_nginx(server, scenario.workers))
        reference = WrkTarget(
            "nginx",
            nginx.url,
            {label: f"/{nginx.files[body['etag']]}" for label, body in warmed.items()},
            processes(nginx.process.pid),
        )
        cells = []
        for index, body in enumerate(WRK_BODIES):
            size = int(warmed[body.label]["size"])
            script = range_script(work / f"ranges-{index}.lua", size) if body.ranges else None
            for connections in scenario.connections:
                runs: dict[str, list[dict[str, Any]]] = {tested.name: [], reference.name: []}
                for _ in range(rounds):
                    for target in (tested, reference):
                        run = run_target(target, body.label, connections, seconds, script)
                        runs[target.name].append(run)
                cells.append(
                    {
                        "body": body.label,
                        "query": body.query,
                        "size": size,
                        "ranges": body.ranges,
                        "connections": connections,
                        "runs": runs,
                    }
                )
    version = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True).stdout
    return {
        "wrk": {
            "tested": tested.name,
            "reference": reference.name,
            "rounds": rounds,
            "slice_s": seconds,
            "threads": THREADS,
            "version": version.split(" Copyright")[0].strip() or None,
            "cells": cells,
        },
        "requests": [],
        "samples": [],
        "duration_s": seconds * rounds * 2 * len(cells),
        "metrics": {},
        "nginx": None,
    }


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
        "note": "the load generator shares the cores with the server",
    }


def run_scenario(scenario: Scenario, out_dir: Path, seed: int = 20261127) -> Path:
    """Run ``scenario`` end to end and write its report; returns the report's path."""
    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    for size in scenario.sizes_mb:
        make_source(size)
    if scenario.wrk:
        make_grainy_source()
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if scenario.front:
        scenario = front_scenario(scenario)
    with running_server(scenario, work) as server:
        if scenario.wrk:
            measured = drive_wrk(scenario, server)
        elif scenario.nginx:
            measured = drive_versus_nginx(scenario, server, seed)
        else:
            measured = trio.run(drive, scenario, server, seed)
            if scenario.calibrate:
                measured["ceiling"] = calibrate(scenario, server, measured["served"], seed)
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
            "calibrate": scenario.calibrate,
            "connections": list(scenario.connections),
            "server_config": scenario.server_config,
            "extra_config": scenario.extra_config,
            "background": scenario.background,
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
        if scenario.wrk:
            scenario.connections = (args.concurrency,)
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
