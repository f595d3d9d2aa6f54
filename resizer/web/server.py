"""Run the service under hypercorn's trio worker, in-process."""

from __future__ import annotations

from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from ..config import Config
from ..pipeline import Service, open_service
from ..transform.base import Transformer
from .admin import mark_draining
from .app import create_app
from .listeners import use_draining_listeners
from .zerocopy import use_hit_connections

_read_data = TCPServer._read_data


async def _read_data_then_stop_idle_timer(self: TCPServer) -> None:
    # hypercorn 0.18 (trio) keeps a connection whose client closed it while idle until the
    # keep-alive timer fires: the timer task lives in the connection's task group, which
    # the read loop's end waits for. Every closed keep-alive connection held its descriptor
    # for keep_alive_timeout (found by the load tests; tests/test_http.py reproduces it).
    await _read_data(self)
    await self.idle_task.stop()


TCPServer._read_data = _read_data_then_stop_idle_timer  # type: ignore[method-assign]
use_draining_listeners()
use_hit_connections()  # cache hits answered with sendfile before hypercorn (web/zerocopy.py)


def hypercorn_config(
    config: Config, *, port: int | None = None, fd: int | None = None
) -> HypercornConfig:
    """``fd``: an inherited listening socket (a worker of ``workers.Supervisor``)."""
    hc = HypercornConfig()
    if fd is not None:
        hc.bind = [f"fd://{fd}"]
    else:
        hc.bind = [f"{config.server.host}:{config.server.port if port is None else port}"]
    hc.graceful_timeout = config.server.graceful_timeout
    hc.backlog = config.server.backlog
    hc.keep_alive_timeout = config.server.keep_alive_timeout
    hc.accesslog = None
    hc.errorlog = "-"
    return hc


async def serve_resizer(
    config: Config,
    *,
    port: int | None = None,
    fd: int | None = None,
    task_status: trio.TaskStatus[tuple[Service, list[str]]] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: trio.Event | None = None,
    transformer: Transformer | None = None,
) -> None:
    """Serve until cancelled (or ``shutdown_trigger`` is set); report the bound addresses.

    ``transformer`` replaces ffmpeg (tests inject a fake to script failures).
    """
    async with (
        open_service(config, transformer=transformer) as service,
        trio.open_nursery() as nursery,
    ):
        binds: list[str] = await nursery.start(
            _serve_http, service, hypercorn_config(config, port=port, fd=fd), shutdown_trigger
        )
        service.listening.add_binds(binds)
        task_status.started((service, binds))


async def _serve_http(
    service: Service,
    hc: HypercornConfig,
    shutdown_trigger: trio.Event | None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    draining = None if shutdown_trigger is None else partial(_drain, service, shutdown_trigger)
    await serve(create_app(service), hc, shutdown_trigger=draining, task_status=task_status)


async def _drain(service: Service, trigger: trio.Event) -> None:
    """hypercorn's shutdown trigger: /readyz answers 503 from the moment shutdown begins."""
    await trigger.wait()
    mark_draining(service)
