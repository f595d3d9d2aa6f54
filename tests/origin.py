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
    ranges: bool = False  # honour "Range: bytes=a-b" / "bytes=a-" with 206
    get_status: int | None = None  # a different status for GET (HEAD keeps ``status``)


def _requested_range(scope: dict[str, Any], size: int) -> tuple[int, int] | None:
    for name, value in scope["headers"]:
        if name.lower() == b"range" and value.startswith(b"bytes="):
            first, _, last = value[6:].decode().partition("-")
            if first.isdigit():
                return int(first), min(size, int(last) + 1) if last.isdigit() else size
    return None


@dataclass
class Origin:
    url: str
    paths: dict[str, Behaviour]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    ranges_asked: list[str] = field(default_factory=list)  # Range headers, in order
    body_bytes_sent: int = 0


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
    body, status = behaviour.body, behaviour.status
    if scope["method"] == "GET" and behaviour.get_status is not None:
        status = behaviour.get_status
    if behaviour.ranges:
        headers.append((b"accept-ranges", b"bytes"))
        span = _requested_range(scope, len(body))
        if span is not None and scope["method"] == "GET":
            origin.ranges_asked.append(f"{span[0]}-{span[1] - 1}")
            headers.append(
                (b"content-range", f"bytes {span[0]}-{span[1] - 1}/{len(body)}".encode())
            )
            body, status = body[span[0] : span[1]], 206
    if behaviour.send_length:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
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
        chunk = body[offset : offset + 65536]
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        origin.body_bytes_sent += len(chunk)
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
