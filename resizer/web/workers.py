"""Several worker processes sharing one listening socket (``[server] workers``).

One worker answers from one Python thread, which caps a worker at one core (BENCHMARKS.md).
The supervisor binds the socket once and runs ``workers`` processes of ``resizer serve
--worker-fd N`` that inherit it; the kernel spreads connections across them. It restarts a
worker that dies (and gives up when workers die right after starting: a configuration or
environment problem restarts cannot fix), and on SIGINT/SIGTERM stops them all gracefully.

Shared between workers: the disk cache, whose leases make one process produce each key;
metrics, through prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a
private folder per supervisor); the ffmpeg slots, through the scheduling coordinator the
supervisor serves on a Unix socket in another private folder (``RESIZER_SCHEDULER_SOCKET``,
see scheduling/coordinator.py). Per worker: the in-flight registry, origin limiter, stream
budget, circuit breakers and negative cache, so those limits apply per worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio
from prometheus_client import multiprocess

from ..config import Config
from ..scheduling.coordinator import SOCKET_ENV, Coordinator
from ..scheduling.rules import rules_from_config
from ..units import SECONDS

log = structlog.get_logger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that exits sooner than this after starting counts as a failed start.
FAILED_START_WITHIN = 5 * SECONDS
MAX_FAILED_STARTS = 5
RESTART_DELAY = 1 * SECONDS
# After the workers' own graceful shutdown, how long before they are killed.
STOP_MARGIN = 5 * SECONDS


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket the workers inherit (TCP_NODELAY is inherited by accepts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def worker_argv(config_path: Path | None, fd: int) -> list[str]:
    argv = [sys.executable, "-m", "resizer", "serve", "--worker-fd", str(fd)]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv


@dataclass
class Supervisor:
    config: Config
    config_path: Path | None
    workers: int
    failed_starts: int = 0
    running: dict[int, trio.Process] = field(default_factory=dict)

    async def serve(
        self, stop: trio.Event, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the workers until ``stop`` is set; reports the URL it listens on."""
        server = self.config.server
        listener = bind_listener(server.host, server.port, server.backlog)
        metrics_dir = tempfile.mkdtemp(prefix="resizer-metrics-")
        scheduler_dir = tempfile.mkdtemp(prefix="resizer-scheduler-")
        scheduler_socket = Path(scheduler_dir) / "slots.sock"
        env = {**os.environ, METRICS_DIR_ENV: metrics_dir, SOCKET_ENV: str(scheduler_socket)}
        argv = worker_argv(self.config_path, listener.fileno())
        try:
            # The coordinator outlives the workers: they give their slots back as they stop.
            async with trio.open_nursery() as services:
                coordinator = Coordinator(rules_from_config(self.config))
                await services.start(coordinator.serve, scheduler_socket)
                async with trio.open_nursery() as nursery:
                    for _ in range(self.workers):
                        await nursery.start(self._run_worker, argv, listener.fileno(), env, stop)
                    host, port = listener.getsockname()[:2]
                    task_status.started(f"http://{host}:{port}")
                    await stop.wait()
                services.cancel_scope.cancel()
        finally:
            listener.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            shutil.rmtree(scheduler_dir, ignore_errors=True)

    async def _run_worker(
        self,
        argv: Sequence[str],
        fd: int,
        env: dict[str, str],
        stop: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One worker slot: start the process, restart it if it dies, stop it on ``stop``."""
        task_status.started()
        while not stop.is_set():
            began = trio.current_time()
            process = await trio.lowlevel.open_process(list(argv), pass_fds=(fd,), env=env)
            self.running[process.pid] = process
            log.info("worker started", pid=process.pid)
            try:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._stop_on, stop, process)
                    await process.wait()
                    watch.cancel_scope.cancel()
            finally:
                if process.returncode is None:  # the supervisor itself is failing
                    with trio.CancelScope(shield=True):
                        await self._terminate(process)
                del self.running[process.pid]
                multiprocess.mark_process_dead(process.pid, env[METRICS_DIR_ENV])  # type: ignore[no-untyped-call]
            if stop.is_set():
                return
            log.warning("worker died; restarting", pid=process.pid, returncode=process.returncode)
            if trio.current_time() - began < FAILED_START_WITHIN:
                self.failed_starts += 1
                if self.failed_starts >= MAX_FAILED_STARTS:
                    log.error("workers keep dying at start-up; giving up")
                    stop.set()
                    return
            else:
                self.failed_starts = 0
            await trio.sleep(RESTART_DELAY)

    async def _stop_on(self, stop: trio.Event, process: trio.Process) -> None:
        await stop.wait()
        # Shielded: the supervisor is being cancelled too, and an orphaned worker would keep
        # serving on the inherited socket.
        with trio.CancelScope(shield=True):
            await self._terminate(process)

    async def _terminate(self, process: trio.Process) -> None:
        """SIGTERM (the worker shuts down gracefully), then SIGKILL if it takes too long."""
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.config.server.graceful_timeout + STOP_MARGIN):
            await process.wait()
            return
        log.warning("worker did not stop; killing it", pid=process.pid)
        process.kill()
        await process.wait()


async def stop_on_signal(stop: trio.Event) -> None:
    """Set ``stop`` at the first SIGINT or SIGTERM (or when ``stop`` is set otherwise)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                async for signum in signals:
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    break
                stop.set()

            nursery.start_soon(receive)
            await stop.wait()
            nursery.cancel_scope.cancel()


def run_supervisor(config: Config, config_path: Path | None) -> int:
    """Serve with ``config.server.workers`` processes until SIGINT/SIGTERM."""

    async def main() -> int:
        supervisor = Supervisor(config, config_path, config.server.workers)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, stop)
            url = await nursery.start(supervisor.serve, stop)
            log.info("serving", url=url, workers=supervisor.workers)
        return 1 if supervisor.failed_starts >= MAX_FAILED_STARTS else 0

    return trio.run(main)
