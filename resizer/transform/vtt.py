"""WebVTT thumbnail tracks for spritesheets (pure).

Players (video.js thumbnails, Plyr's previewThumbnails, JW Player) read cues whose payload is
an image URL with a ``#xywh=x,y,w,h`` media fragment. The cues must agree exactly with the
sheet ffmpeg renders, so both use ``sheet_layout``, ``sprite_times`` and ``output_span_ms``.
"""

from __future__ import annotations

from ..options import TransformOptions
from .argv import output_span_ms, sheet_layout, sprite_times
from .base import MediaInfo


def vtt_timestamp(ms: int) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def build_thumbnail_vtt(
    sheet_url: str, options: TransformOptions, info: MediaInfo, max_output_seconds: float
) -> str:
    """The track for the spritesheet at ``sheet_url`` (tile i covers [t_i, t_i+1))."""
    assert options.width is not None  # validated: spritesheets need a tile size
    assert options.height is not None
    count = options.image_count
    span = output_span_ms(options, info, max_output_seconds)
    starts = sprite_times(options.time_ms, span, count)
    ends = [*starts[1:], options.time_ms + span]
    columns, _ = sheet_layout(count)
    lines = ["WEBVTT", ""]
    for index, (start, end) in enumerate(zip(starts, ends, strict=True)):
        x = (index % columns) * options.width
        y = (index // columns) * options.height
        lines.append(f"{vtt_timestamp(start)} --> {vtt_timestamp(end)}")
        lines.append(f"{sheet_url}#xywh={x},{y},{options.width},{options.height}")
        lines.append("")
    return "\n".join(lines)
