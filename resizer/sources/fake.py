"""In-memory source for tests: objects are bytes, spilled to a temp folder when opened."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..errors import SourceNotFound
from .base import LocalSource, SourceStat


class FakeSource:
    kind = "fake"

    def __init__(self, spill_dir: Path, objects: dict[str, bytes] | None = None) -> None:
        self.spill_dir = spill_dir
        self.objects: dict[str, bytes] = dict(objects or {})
        self.opens = 0  # how many times a source was fetched: tests assert "one fetch"

    async def stat(self, path: str) -> SourceStat:
        await trio.lowlevel.checkpoint()
        try:
            return SourceStat(size=len(self.objects[path]), mtime=0.0)
        except KeyError:
            raise SourceNotFound(f"no source at {path!r}") from None

    @asynccontextmanager
    async def open(self, path: str) -> AsyncIterator[LocalSource]:
        await self.stat(path)
        self.opens += 1
        spilled = self.spill_dir / f"fake-{self.opens}-{path.replace('/', '_')}"
        await trio.Path(spilled).write_bytes(self.objects[path])
        try:
            yield LocalSource(path=spilled, size=len(self.objects[path]))
        finally:
            with trio.CancelScope(shield=True):
                await trio.Path(spilled).unlink(missing_ok=True)
