"""A scriptable HTTP origin on 127.0.0.1 for tests (hypercorn + a raw ASGI app)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Behaviour:
    """How the origin answers one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True  # False: chunked, no Content-Length
    stall_before_headers: bool = False
    stall_after_bytes: int | None = None  # send this many body bytes, then hang


@dataclass
class Origin:
    url: str
    paths: dict[str, Behaviour]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)


async def _app(origin: Origin, scope: dict[str, Any], receive: Any, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    origin.requests.append((scope["method"], scope["path"]))
    behaviour = origin.paths.get(scope["path"], Behaviour(status=404, body=b"missing"))
    if behaviour.stall_before_headers:
        await trio.sleep_forever()
    headers = [(k.encode(), v.encode()) for k, v in behaviour.headers.items()]
    if behaviour.send_length:
        headers.append((b"content-length", str(len(behaviour.body)).encode()))
    await send({"type": "http.response.start", "status": behaviour.status, "headers": headers})
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = behaviour.body
    if behaviour.stall_after_bytes is not None:
        await send(
            {
                "type": "http.response.body",
                "body": body[: behaviour.stall_after_bytes],
                "more_body": True,
            }
        )
        await trio.sleep_forever()
    for offset in range(0, len(body), 65536):
        await send(
            {"type": "http.response.body", "body": body[offset : offset + 65536], "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def start_origin(nursery: trio.Nursery, paths: dict[str, Behaviour]) -> Origin:
    """Serve ``paths`` on a free port in ``nursery`` (cancelled with it)."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    origin = Origin(url="", paths=paths)
    binds = await nursery.start(partial(serve, partial(_app, origin), config))
    origin.url = binds[0]
    return origin
