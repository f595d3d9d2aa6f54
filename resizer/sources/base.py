"""The source stage: find a source object and make it available to ffmpeg as a local file.

ffmpeg needs seekable input (MP4s with the ``moov`` atom at the end cannot stream from a
pipe), so every source hands the transform stage a local path: the file itself for the
filesystem source; later, a shared local copy for remote sources.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Told of each source made available: its kind (a metrics label), seconds, bytes fetched.
FetchObserver = Callable[[str, float, int], None]


@dataclass(frozen=True, slots=True)
class SourceStat:
    size: int
    mtime: float
    ranges: bool = False  # the origin serves byte ranges (Accept-Ranges: bytes)


@dataclass(frozen=True, slots=True)
class LocalSource:
    """A seekable local file holding the source's bytes, valid while its context is open."""

    path: Path
    size: int


class Source(Protocol):
    kind: str  # "filesystem", later "http", "s3": reported in X-Source

    async def stat(self, path: str) -> SourceStat:
        """Raise ``SourceNotFound`` when the object does not exist."""
        ...

    def open(self, path: str) -> AbstractAsyncContextManager[LocalSource]:
        """Make the object available as a local file for the duration of the block."""
        ...
