"""A scriptable in-memory source for tests: objects are bytes, spilled to a folder when opened.

Per path, a ``Script`` makes the origin misbehave the ways real ones do: stall before
answering, drip slowly, fail after N bytes, hang forever, or answer 5xx. Counters let tests
assert "one fetch" and "every opened source was closed".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..errors import OriginFailed, SourceNotFound
from .base import LocalSource, SourceStat


@dataclass(frozen=True)
class Script:
    stall: float = 0.0  # seconds before the first byte
    drip_chunk: int = 0  # when set, spill this many bytes at a time ...
    drip_delay: float = 0.0  # ... sleeping this long between chunks
    fail_after: int | None = None  # OriginFailed once this many bytes were spilled
    hang: bool = False  # never answer
    server_error: bool = False  # answer 5xx (OriginFailed) at once


class FakeSource:
    kind = "fake"

    def __init__(
        self,
        spill_dir: Path,
        objects: dict[str, bytes] | None = None,
        scripts: dict[str, Script] | None = None,
    ) -> None:
        self.spill_dir = spill_dir
        self.objects: dict[str, bytes] = dict(objects or {})
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.opens = 0  # fetches started: tests assert "one fetch"
        self.stats = 0  # existence checks asked for
        self.open_now = 0  # fetches not yet closed: must return to 0

    async def stat(self, path: str) -> SourceStat:
        self.stats += 1
        await trio.lowlevel.checkpoint()
        if path not in self.objects:
            raise SourceNotFound(f"no source at {path!r}")
        return SourceStat(size=len(self.objects[path]), mtime=0.0)

    @asynccontextmanager
    async def open(self, path: str) -> AsyncIterator[LocalSource]:
        await self.stat(path)
        script = self.scripts.get(path, Script())
        self.opens += 1
        self.open_now += 1
        spilled = self.spill_dir / f"fake-{self.opens}-{path.replace('/', '_')}"
        try:
            await self._spill(self.objects[path], script, spilled)
            yield LocalSource(path=spilled, size=len(self.objects[path]))
        finally:
            self.open_now -= 1
            with trio.CancelScope(shield=True):
                await trio.Path(spilled).unlink(missing_ok=True)

    async def _spill(self, data: bytes, script: Script, target: Path) -> None:
        if script.hang:
            await trio.sleep_forever()
        if script.stall:
            await trio.sleep(script.stall)
        if script.server_error:
            raise OriginFailed("the fake origin answered 503")
        step = script.drip_chunk or len(data) or 1
        async with await trio.open_file(target, "wb") as file:
            for offset in range(0, len(data), step):
                if script.fail_after is not None and offset >= script.fail_after:
                    raise OriginFailed(f"the fake origin failed after {offset} bytes")
                await file.write(data[offset : offset + step])
                if script.drip_delay:
                    await trio.sleep(script.drip_delay)
