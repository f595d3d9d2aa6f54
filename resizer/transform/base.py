"""The transform stage: probe a local source, then stream ffmpeg's output.

``Transformer`` is the protocol; ``FfmpegTransformer`` (runner.py) is the real adapter and
``FakeTransformer`` (fake.py) an in-memory one for tests of the stages around it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..options import TransformOptions


class LoopbackUrl(str):
    """An ``http://127.0.0.1`` URL of resizer's range proxy: an input ffmpeg reads over HTTP
    with byte ranges (see sources/range_proxy.py), instead of a local file."""


# What a transformer reads: a local file, or the range proxy's URL for a remote one.
MediaInput = Path | LoopbackUrl


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What a probe learned about a source (read from ``ffmpeg -i`` since there is no ffprobe)."""

    duration_ms: int | None  # None when the container does not say (e.g. live streams)
    width: int
    height: int
    has_audio: bool
    video_codec: str
    fps: float | None = None
    rotation: int = 0  # degrees from display-matrix side data; 90/270 swap width and height

    @property
    def display_width(self) -> int:
        return self.height if self.rotation % 180 else self.width

    @property
    def display_height(self) -> int:
        return self.width if self.rotation % 180 else self.height


class Transformer(Protocol):
    async def probe(self, source: MediaInput) -> MediaInfo:
        """Raise ``UndecodableSource`` (422) when ffmpeg cannot read it as media,
        ``UnsupportedMedia`` (415) when it holds no video stream."""
        ...

    def open_output(
        self, source: MediaInput, info: MediaInfo, options: TransformOptions
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveStream]:
        """Run the transformation; the stream yields output bytes as they are produced.

        End of stream (``b""``) means ffmpeg succeeded; a failure raises ``TransformFailed``
        (or ``TransformTimeout``) from ``receive_some`` instead, so a consumer can never
        mistake a truncated output for a complete one. Leaving the block early kills ffmpeg
        (SIGTERM, then SIGKILL after a short grace) under a shielded scope.
        """
        ...
