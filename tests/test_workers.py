"""``[server] workers``: several processes on one socket, supervised (real processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from resizer.config import load_config
from resizer.errors import ConfigError
from resizer.web.workers import METRICS_DIR_ENV, Supervisor, bind_listener
from tests.media import make_test_video
from tests.server import scrape, server_config_text

pytestmark = pytest.mark.integration


@dataclass
class Supervised:
    url: str
    process: subprocess.Popen[bytes]

    def workers(self) -> list[int]:
        pid = self.process.pid
        return [  # per thread: trio may start subprocesses from a worker thread
            int(child)
            for task in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        ]

    def metrics_dir(self) -> Path:
        environ = Path(f"/proc/{self.workers()[0]}/environ").read_bytes().split(b"\0")
        found = [e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
        return Path(found[0].split(b"=", 1)[1].decode())


def running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient(timeout=1) as client:
        with trio.fail_after(30):
            while True:
                try:
                    if (await client.get(f"{url}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


async def wait_for_workers(server: Supervised, count: int) -> list[int]:
    with trio.fail_after(30):
        while True:
            if len(pids := server.workers()) == count:
                return pids
            await trio.sleep(0.05)


@asynccontextmanager
async def running_supervised(
    config_text: str, folder: Path, workers: int = 2
) -> AsyncIterator[Supervised]:
    """``resizer serve --workers N`` with ``config_text`` on a free port, once every worker
    is up; stopped with SIGTERM afterwards."""
    config = folder / "resizer.toml"
    config.write_text(config_text)
    port = free_port()
    serve = ["serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(  # noqa: ASYNC220 - started and stopped around the test
        [sys.executable, "-m", "resizer", *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Supervised(f"http://127.0.0.1:{port}", process)
    try:
        await wait_healthy(server.url)
        await wait_for_workers(server, workers)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Supervised]:
    """``resizer serve --workers 2`` on a free port, stopped with SIGTERM afterwards."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "clip.mp4", 320, 240, seconds=2)
    async with running_supervised(
        server_config_text(media, tmp_path / "cache"), tmp_path
    ) as server:
        yield server


async def test_two_workers_share_the_socket_the_cache_and_the_metrics(
    supervised: Supervised,
) -> None:
    """Requests on many connections reach both workers; one transform; /metrics sums both."""
    bodies = []
    # A fresh connection per request, so the kernel spreads them over both workers.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        before = (await client.get(f"{supervised.url}/metrics")).text

        async def fetch() -> None:
            response = await client.get(f"{supervised.url}/videos/clip.mp4?width=160")
            assert response.status_code == 200
            bodies.append(response.content)

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(fetch)
        for _ in range(28):
            await fetch()
        metrics = (await client.get(f"{supervised.url}/metrics")).text
    assert len(bodies) == 40
    assert len(set(bodies)) == 1
    assert scrape(metrics, "resizer_transforms_total") == 1
    answered = 'resizer_requests_total{method="GET",status="200"}'
    # The 40 requests, and the first /metrics call (counted once it was answered).
    assert scrape(metrics, answered) - scrape(before, answered) == 41
    files = {path.name for path in supervised.metrics_dir().iterdir()}
    for pid in supervised.workers():  # both workers answered some of them
        assert f"counter_{pid}.db" in files


async def test_a_worker_that_dies_is_replaced(supervised: Supervised) -> None:
    """SIGKILL one worker: the supervisor starts another and the service keeps answering."""
    first, second = supervised.workers()
    os.kill(first, signal.SIGKILL)
    with trio.fail_after(30):
        while True:
            workers = supervised.workers()
            if len(workers) == 2 and first not in workers:
                break
            await trio.sleep(0.05)
    assert second in workers
    await wait_healthy(supervised.url)
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(6):
            response = await client.get(f"{supervised.url}/videos/clip.mp4?width=160")
            assert response.status_code == 200


async def test_sigterm_stops_every_worker_and_removes_the_metrics_folder(
    supervised: Supervised,
) -> None:
    """The supervisor forwards SIGTERM, waits for its workers and cleans up after them."""
    workers = supervised.workers()
    metrics_dir = supervised.metrics_dir()
    supervised.process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        while True:
            if supervised.process.poll() is not None:
                break
            await trio.sleep(0.05)
    assert supervised.process.returncode == 0
    assert not [pid for pid in workers if running(pid)]
    assert not metrics_dir.exists()


def test_the_worker_count_is_validated() -> None:
    """workers = 0, absurdly many, or several without a disk cache: errors naming the key."""
    for workers in (0, 65):
        with pytest.raises(ConfigError) as caught:
            load_config(
                text=server_config_text(Path("m"), Path("c")).replace(
                    "port = 0", f"workers = {workers}"
                ),
                env={},
            )
        assert [key for key, _ in caught.value.problems] == ["server.workers"]
    memory = server_config_text(Path("m"), Path("c")).replace('"disk"', '"memory"')
    with pytest.raises(ConfigError, match=r"need cache\.backend = disk"):
        load_config(text=memory.replace("port = 0", "workers = 2"), env={})


async def test_a_failing_supervisor_leaves_no_worker_behind(tmp_path: Path) -> None:
    """Cancelled for any reason other than stop, a worker slot still terminates its process
    (an orphaned worker would keep serving on the inherited socket)."""
    supervisor = Supervisor(load_config(env={}), None, 1)
    pid_file = tmp_path / "pid"
    argv = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    env = {**os.environ, METRICS_DIR_ENV: str(tmp_path)}
    with bind_listener("127.0.0.1", 0, 8) as listener:
        with trio.move_on_after(10) as waited:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    supervisor._run_worker, argv, listener.fileno(), env, trio.Event()
                )
                while True:
                    if pid_file.exists() and pid_file.read_text():
                        break
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
    assert not waited.cancelled_caught
    assert supervisor.running == {}
    assert not running(int(pid_file.read_text()))
