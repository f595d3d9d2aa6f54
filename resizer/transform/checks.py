"""Checks of a probed source against the limits and the requested options (pure).

They run after the probe, before ffmpeg starts, so a client learns what is wrong (with the
source's actual duration or size in the message) instead of receiving a failed transcode.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOption, SourceLimitExceeded, SourceTooLarge
from ..options import Mode, TransformOptions, format_ms
from .base import MediaInfo


@dataclass(frozen=True, slots=True)
class SourceLimits:
    max_size: int
    max_duration_ms: int
    max_pixels: int


def check_source(info: MediaInfo, size: int, limits: SourceLimits) -> None:
    """413 for too many bytes; 422 for too long or too many pixels (decompression bombs)."""
    if size > limits.max_size:
        raise SourceTooLarge(f"the source has {size} bytes; the limit is {limits.max_size}")
    if info.duration_ms is not None and info.duration_ms > limits.max_duration_ms:
        raise SourceLimitExceeded(
            f"the source lasts {format_ms(info.duration_ms)}; "
            f"the limit is {format_ms(limits.max_duration_ms)}"
        )
    pixels = info.width * info.height
    if pixels > limits.max_pixels:
        raise SourceLimitExceeded(
            f"the source is {info.width}x{info.height} ({pixels} pixels); "
            f"the limit is {limits.max_pixels} pixels"
        )


def check_options(options: TransformOptions, info: MediaInfo) -> None:
    """Options that only the source can refute: a start past its end (frames take the last)."""
    if options.mode is Mode.FRAME or info.duration_ms is None:
        return
    if options.time_ms >= info.duration_ms:
        raise InvalidOption(
            "time",
            f"{format_ms(options.time_ms)} is at or past the end of the source, which lasts "
            f"{format_ms(info.duration_ms)}",
        )
