"""HLS playlists from a probe alone (pure): segment timing, media and master playlists.

A rendition's output is cut into segments of ``segment_ms`` (keyframes are forced at every
multiple of it, so segment k starts at k x segment_ms of output time); only the last one is
shorter. Nothing here needs the transcode: a playlist is answered as soon as the source is
probed, and each segment URL is its own cache key, produced when a player asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..options import INIT_SEGMENT, Level

PLAYLIST_VERSION = 7  # fMP4 segments with EXT-X-MAP

# Bits per pixel and frame an H.264 encode at each quality tends to need, for BANDWIDTH
# (peak, as HLS defines it, hence the 1.5 factor on what an average frame takes).
_BITS_PER_PIXEL = {Level.LOW: 0.06, Level.MEDIUM: 0.1, Level.HIGH: 0.16, Level.AUTO: 0.1}
_PEAK_FACTOR = 1.5
AUDIO_CODEC = "mp4a.40.2"  # AAC-LC


@dataclass(frozen=True, slots=True)
class Segments:
    """The segmentation of one rendition: ``span_ms`` of output in ``segment_ms`` pieces."""

    span_ms: int
    segment_ms: int

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.span_ms / self.segment_ms))

    def start_ms(self, index: int) -> int:
        return index * self.segment_ms

    def duration_ms(self, index: int) -> int:
        return min(self.segment_ms, self.span_ms - self.start_ms(index))

    def index_at(self, ms: int) -> int:
        """The segment playing at ``ms`` of output time (clamped to the last one)."""
        return min(self.count - 1, max(0, ms // self.segment_ms))


def media_playlist(segments: Segments, url: Callable[[int], str]) -> str:
    """A VOD media playlist; ``url(index)`` names segment ``index`` (INIT_SEGMENT: the map)."""
    target = math.ceil(segments.segment_ms / 1000)
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{PLAYLIST_VERSION}",
        f"#EXT-X-TARGETDURATION:{target}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
        f'#EXT-X-MAP:URI="{url(INIT_SEGMENT)}"',
    ]
    for index in range(segments.count):
        lines.append(f"#EXTINF:{segments.duration_ms(index) / 1000:.3f},")
        lines.append(url(index))
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Rendition:
    """One entry of a master playlist."""

    url: str
    width: int
    height: int
    fps: float
    bandwidth: int  # bits per second, peak
    codecs: str


def master_playlist(renditions: Sequence[Rendition]) -> str:
    """A master playlist listing ``renditions`` (narrowest first, as players expect)."""
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{PLAYLIST_VERSION}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for rendition in sorted(renditions, key=lambda r: (r.bandwidth, r.width)):
        lines.append(
            f"#EXT-X-STREAM-INF:BANDWIDTH={rendition.bandwidth},"
            f"RESOLUTION={rendition.width}x{rendition.height},"
            f'CODECS="{rendition.codecs}",FRAME-RATE={rendition.fps:.3f}'
        )
        lines.append(rendition.url)
    return "\n".join(lines) + "\n"


def estimate_bandwidth(
    width: int, height: int, fps: float, quality: Level, audio_bits: int | None
) -> int:
    """A peak bit rate for BANDWIDTH: resizer encodes at constant quality, not at a rate."""
    video = width * height * fps * _BITS_PER_PIXEL[quality] * _PEAK_FACTOR
    return round(video + (audio_bits or 0))
