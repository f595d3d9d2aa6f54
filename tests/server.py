"""Start the real server on a free port for integration tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from resizer.config import Config, load_config
from resizer.pipeline import Service
from resizer.transform.base import Transformer
from resizer.web.server import serve_resizer


def server_config(media: Path, cache: Path, extra: str = "") -> Config:
    """A configuration serving ``/videos/<path>`` from ``media`` with a disk cache in ``cache``."""
    return load_config(text=server_config_text(media, cache, extra), env={})


def server_config_text(media: Path, cache: Path, extra: str = "") -> str:
    """``server_config`` as TOML, for a server started as a separate process."""
    return f"""
    [server]
    host = "127.0.0.1"
    port = 0
    [cache]
    backend = "disk"
    path = "{cache}"
    [[origins]]
    name = "videos"
    matcher = "^/videos/(?P<path>.+)$"
    [[origins.sources]]
    type = "filesystem"
    root = "{media}"
    path = "${{path}}"
    {extra}
    """


@dataclass
class RunningServer:
    url: str
    service: Service
    host: str
    port: int


async def start_server(
    nursery: trio.Nursery, config: Config, transformer: Transformer | None = None
) -> RunningServer:
    """Serve ``config`` in ``nursery`` (cancelled with it) and return where it listens."""
    service, binds = await nursery.start(
        partial(serve_resizer, config, port=0, transformer=transformer)
    )
    url = binds[0]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return RunningServer(url=url, service=service, host=host, port=int(port))


def scrape(text: str, name: str) -> float:
    """The sum of a metric's samples (all label sets) in a /metrics text."""
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )
