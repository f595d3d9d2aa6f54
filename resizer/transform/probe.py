"""Parse the banner ``ffmpeg -hide_banner -i FILE`` writes to stderr into ``MediaInfo``.

The bundled ffmpeg has no ffprobe, so this reads the human-oriented text. Only input #0 is
considered; the first video stream that is not an attached picture (cover art) is the one a
transform maps (``0:V:0``). Anything unparseable is reported as ``UndecodableSource`` rather
than crashing: the banner is text from a file an attacker may have crafted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UndecodableSource, UnsupportedMedia
from .base import MediaInfo

# Demuxers that read still images; errors.py promises 415 for "an image", not a 1-frame video.
IMAGE_DEMUXERS = frozenset({"image2", "image2pipe"})

_INPUT_RE = re.compile(r"^Input #0, (?P<format>[^,]+(?:,[^,\s]+)*?), from ", re.MULTILINE)
_DURATION_RE = re.compile(r"^\s+Duration: (?P<h>\d{1,6}):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?)", re.M)
_STREAM_RE = re.compile(
    r"^\s+Stream #0:\d+\S*: (?P<kind>Video|Audio|Subtitle|Data|Attachment)"
    r": (?P<desc>.*)$",
    re.MULTILINE,
)
# Digit counts are bounded so int()/float() never see absurd input (int's 4300-digit limit).
_DIMENSIONS_RE = re.compile(r"^(?P<w>\d{1,6})x(?P<h>\d{1,6})(?:\s|$)")
_RATE_RE = re.compile(r"^(?P<num>\d{1,7}(?:\.\d{1,6})?)(?P<k>k?) (?P<unit>fps|tbr)$")
# "Display Matrix: rotation of -90.00 degrees" (FFmpeg >= 7) / "displaymatrix: ..." (older).
_MATRIX_RE = re.compile(
    r"display ?matrix: rotation of (?P<deg>-?\d{1,4}(?:\.\d{1,6})?) degrees", re.I
)
_ROTATE_TAG_RE = re.compile(r"^\s+rotate\s+: (?P<deg>-?\d{1,4})\s*$", re.MULTILINE)
_WHITELIST_RE = re.compile(r"Format not on whitelist")

# Lines that mean ffmpeg gave up opening the input. Checked before anything else is parsed.
_OPEN_ERRORS = (
    "Error opening input",
    "Invalid data found when processing input",
    "moov atom not found",
)


@dataclass(frozen=True, slots=True)
class _Stream:
    kind: str
    desc: str
    tail: str  # the indented lines after the stream line (metadata, side data)


def parse_probe_output(stderr: str) -> MediaInfo:
    """Turn an ``ffmpeg -i`` banner into ``MediaInfo``.

    Raises ``UndecodableSource`` when ffmpeg could not open the input (or the banner makes no
    sense) and ``UnsupportedMedia`` when it opened but holds no usable video stream.
    """
    header = _INPUT_RE.search(stderr)
    if header is None or _WHITELIST_RE.search(stderr):
        raise UndecodableSource(_open_error_message(stderr))
    # Errors before the "Input #0" line are fatal; later ones are about other things.
    before = stderr[: header.start()].lower()
    if any(marker.lower() in before for marker in _OPEN_ERRORS):
        raise UndecodableSource(_open_error_message(stderr))

    streams = _streams(stderr[header.start() :])
    if not streams:
        raise UndecodableSource("ffmpeg found no streams in the source")
    video = next((s for s in streams if s.kind == "Video" and "(attached pic)" not in s.desc), None)
    if video is None:
        kinds = sorted({s.kind.lower() for s in streams})
        raise UnsupportedMedia(f"the source has no video stream (found: {', '.join(kinds)})")
    input_format = header["format"].split(",")[0]
    if input_format in IMAGE_DEMUXERS or input_format.endswith("_pipe"):
        raise UnsupportedMedia(f"the source is a still image ({input_format}), not a video")

    fields = _split_top_level(video.desc)
    codec = fields[0].split(" ", 1)[0] if fields and fields[0] else ""
    dimensions = next((m for f in fields if (m := _DIMENSIONS_RE.match(f))), None)
    if not codec or codec == "none" or dimensions is None:
        raise UndecodableSource("ffmpeg could not determine the video stream's codec or size")
    if len(fields) > 1 and fields[1] == "none":
        # "Could not find codec parameters": the pixel format is unknown, decoding would fail.
        raise UndecodableSource("ffmpeg cannot decode the video stream")
    width, height = int(dimensions["w"]), int(dimensions["h"])
    if width <= 0 or height <= 0:
        raise UndecodableSource(f"the video stream has invalid dimensions {width}x{height}")

    return MediaInfo(
        duration_ms=_duration_ms(stderr[header.start() :]),
        width=width,
        height=height,
        has_audio=any(s.kind == "Audio" for s in streams),
        video_codec=codec,
        fps=_fps(fields),
        rotation=_rotation(video.tail),
    )


def _open_error_message(stderr: str) -> str:
    if _WHITELIST_RE.search(stderr):
        return "the source's container format is not accepted"
    for line in reversed(stderr.splitlines()):
        if "Invalid data found" in line or "moov atom not found" in line:
            return "ffmpeg cannot read the source as media (invalid data)"
    return "ffmpeg cannot read the source as media"


def _streams(banner: str) -> list[_Stream]:
    matches = list(_STREAM_RE.finditer(banner))
    streams = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(banner)
        streams.append(_Stream(match["kind"], match["desc"], banner[match.end() : end]))
    return streams


def _split_top_level(desc: str) -> list[str]:
    """Split a stream description on commas outside parentheses/brackets:
    ``h264 (High) (avc1 / 0x31637661), yuv420p(tv, progressive), 1280x720 [SAR 1:1], 25 fps``.
    """
    fields: list[str] = []
    depth = 0
    current: list[str] = []
    for char in desc:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            fields.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    fields.append("".join(current).strip())
    return fields


def _duration_ms(banner: str) -> int | None:
    match = _DURATION_RE.search(banner)
    if match is None:  # "Duration: N/A"
        return None
    seconds = int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])
    return round(seconds * 1000)


def _fps(fields: list[str]) -> float | None:
    rates: dict[str, float] = {}
    for field in fields:
        match = _RATE_RE.match(field)
        if match is not None:
            value = float(match["num"]) * (1000 if match["k"] else 1)
            rates.setdefault(match["unit"], value)
    # "fps" is the average frame rate; "tbr" (a guess from timestamps) is the fallback.
    return rates.get("fps") or rates.get("tbr") or None


def _rotation(tail: str) -> int:
    """Clockwise degrees in 0..359, the convention of the legacy ``rotate`` tag.

    The display matrix states the counter-clockwise angle, so a portrait phone video reads
    "rotation of -90.00 degrees" and becomes 90 here.
    """
    match = _MATRIX_RE.search(tail)
    if match is not None:
        return round(-float(match["deg"])) % 360
    tag = _ROTATE_TAG_RE.search(tail)
    if tag is not None:
        return int(tag["deg"]) % 360
    return 0
