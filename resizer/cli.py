"""Command line: ``resizer serve`` and ``resizer check-config``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import structlog
import trio

from .config import Config, load_config
from .errors import ConfigError
from .log import configure_logging
from .samples import ensure_sample_media
from .transform.runner import resolve_ffmpeg
from .web.server import serve_resizer
from .web.workers import run_supervisor, stop_on_signal

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve HTTP (embedded defaults without --config)")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, help="override server.workers")
    # Internal: a worker started by the supervisor, serving on an inherited socket.
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    return serve(
        args.config, host=args.host, port=args.port, workers=args.workers, worker_fd=args.worker_fd
    )


def check_config(path: Path) -> int:
    try:
        load_config(path)
    except ConfigError as exc:
        for key, message in exc.problems:
            print(f"{path}: {key}: {message}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


def serve(
    path: Path | None,
    *,
    host: str | None,
    port: int | None,
    workers: int | None = None,
    worker_fd: int | None = None,
) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for key, message in exc.problems:
            print(f"{path or '<default>'}: {key}: {message}", file=sys.stderr)
        return 1
    server = dataclasses.replace(
        config.server,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
        workers=workers if workers is not None else config.server.workers,
    )
    config = dataclasses.replace(config, server=server)
    configure_logging(config.logging.level, config.logging.format)
    if worker_fd is not None:  # the supervisor prepared everything shared
        trio.run(partial(_serve_until_signal, config, fd=worker_fd))
        return 0
    if path is None:
        _prepare_default_media(config)
    if config.server.workers > 1:
        return run_supervisor(config, path)
    trio.run(_serve_until_signal, config)
    return 0


def _prepare_default_media(config: Config) -> None:
    """The embedded default serves ./media: give a fresh checkout something to serve."""
    root = config.resolve_path(config.origins[0].sources[0].root)
    made = ensure_sample_media(root, resolve_ffmpeg(config.transform.ffmpeg or None))
    for sample in made:
        log.info("created sample clip", path=str(sample))


async def _serve_until_signal(config: Config, *, fd: int | None = None) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, stop)
        _, binds = await nursery.start(partial(serve_resizer, config, fd=fd, shutdown_trigger=stop))
        for bind in binds:
            log.info("serving", url=bind)
        await stop.wait()
    # serve_resizer returns once hypercorn has shut down gracefully.
