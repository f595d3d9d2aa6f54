"""Pure option parsing: request parameters -> validated ``TransformOptions`` -> canonical key.

Nothing here does I/O. The steps, in order:

1. ``normalize_params``: lower-case names, resolve aliases (Akamai IVM style ``w``, ``h``,
   ``obj-fit``, ``mute``, ``q``, ``f``, ``start``, ``dur``), drop unknown parameters.
2. A derivative (a named preset from configuration) chosen explicitly, by IMQuery or by
   responsive sizing (``responsive.py``) provides defaults; explicit parameters override it.
3. ``build_options`` validates each value and the cross-field rules into ``TransformOptions``.

Every invalid value raises ``InvalidOption`` naming the parameter and what is allowed.
Unknown parameters are ignored, so tracking parameters never split the cache.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import InvalidOption

MIN_DIMENSION = 10
MAX_DIMENSION = 2000
MAX_TIME_MS = 10 * 60 * 1000
MIN_DURATION_MS = 1000
MAX_DURATION_MS = 5 * 60 * 1000
MAX_FILENAME = 120
DEFAULT_IMAGE_COUNT = 16
MAX_IMAGE_COUNT = 100
MAX_FPS = 60
MAX_SEGMENT = 99_999  # HLS segment index (a 5-minute output has 75 four-second segments)
INIT_SEGMENT = -1  # segment=init: the HLS init segment (ftyp + moov)
MAX_LADDER = 8  # renditions in a master playlist

KEY_VERSION = "v1"

_E = TypeVar("_E", bound=enum.StrEnum)


class Mode(enum.StrEnum):
    VIDEO = "video"
    FRAME = "frame"
    SPRITESHEET = "spritesheet"
    AUDIO = "audio"


class Fit(enum.StrEnum):
    CONTAIN = "contain"  # fit inside the box, keep the aspect ratio
    SCALE_DOWN = "scale-down"  # as contain, but never upscale
    COVER = "cover"  # fill the box exactly, centre crop


class Level(enum.StrEnum):
    """quality and compression levels; README/docs/api.md give the encoder settings."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    AUTO = "auto"


class OutputFormat(enum.StrEnum):
    MP4 = "mp4"
    JPG = "jpg"
    PNG = "png"
    WEBP = "webp"
    VTT = "vtt"
    M4A = "m4a"
    HLS = "hls"  # a playlist; with ``segment``, one of its fMP4 segments


CONTENT_TYPES: dict[OutputFormat, str] = {
    OutputFormat.MP4: "video/mp4",
    OutputFormat.JPG: "image/jpeg",
    OutputFormat.PNG: "image/png",
    OutputFormat.WEBP: "image/webp",
    OutputFormat.VTT: "text/vtt; charset=utf-8",
    OutputFormat.M4A: "audio/mp4",
    OutputFormat.HLS: "application/vnd.apple.mpegurl",
}
SEGMENT_CONTENT_TYPE = "video/mp4"

FORMATS_BY_MODE: dict[Mode, tuple[OutputFormat, ...]] = {
    Mode.VIDEO: (OutputFormat.MP4, OutputFormat.HLS),
    Mode.FRAME: (OutputFormat.JPG, OutputFormat.PNG, OutputFormat.WEBP),
    Mode.SPRITESHEET: (OutputFormat.JPG, OutputFormat.VTT),
    Mode.AUDIO: (OutputFormat.M4A,),
}

# A format given without a mode implies the mode (format=m4a means mode=audio).
MODE_BY_FORMAT: dict[OutputFormat, Mode] = {
    OutputFormat.M4A: Mode.AUDIO,
    OutputFormat.JPG: Mode.FRAME,
    OutputFormat.PNG: Mode.FRAME,
    OutputFormat.WEBP: Mode.FRAME,
    OutputFormat.VTT: Mode.SPRITESHEET,
}

# Canonical parameter names as documented (lookups are case-insensitive).
PARAMS = (
    "mode", "width", "height", "fit", "time", "duration", "audio", "quality",
    "compression", "fps", "format", "imageCount", "filename", "segment", "ladder",
)  # fmt: skip
_CANONICAL_NAME = {name.lower(): name for name in PARAMS}

ALIASES = {
    "w": "width",
    "h": "height",
    "obj-fit": "fit",
    "q": "quality",
    "f": "format",
    "start": "time",
    "dur": "duration",
    "image-count": "imageCount",
    "image_count": "imageCount",
    "mute": "mute",  # special: mute=true means audio=false
}
_FIT_ALIASES = {"crop": Fit.COVER, "fill": Fit.CONTAIN}
_FORMAT_ALIASES = {"jpeg": OutputFormat.JPG}

# Which parameters each mode takes; any other known parameter is a 400, not silently ignored.
PARAMS_BY_MODE: dict[Mode, frozenset[str]] = {
    Mode.VIDEO: frozenset(
        {"width", "height", "fit", "time", "duration", "audio", "quality", "compression", "fps"}
        | {"segment", "ladder"}  # format=hls only
    ),
    Mode.FRAME: frozenset({"width", "height", "fit", "time", "quality"}),
    Mode.SPRITESHEET: frozenset(
        {"width", "height", "fit", "time", "duration", "imageCount", "quality"}
    ),
    Mode.AUDIO: frozenset({"time", "duration", "quality"}),
}
_ALWAYS = frozenset({"mode", "format", "filename"})

_FILENAME_RE = re.compile(rf"^[a-z0-9_-]{{1,{MAX_FILENAME}}}$")
_DERIVATIVE_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
# ladder=mobile+tablet (canonical: valid in a query, where + is a space, and in the
# /cdn-cgi/media form, whose options are comma-separated); commas work in a query too.
_LADDER_SEPARATORS = re.compile(r"[\s,+|]+")
_TIME_RE = re.compile(r"^(?P<num>\d{1,9}(?:\.\d{1,6})?|\.\d{1,6})(?P<unit>ms|s|m)?$")


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds option parsing enforces (configurable under ``[limits]``)."""

    max_width: int = MAX_DIMENSION
    max_height: int = MAX_DIMENSION
    max_duration_ms: int = MAX_DURATION_MS
    # Output length when ``duration`` is not given: None means the rest of the source, still
    # capped at max_duration_ms.
    default_duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TransformOptions:
    """A validated, fully resolved transformation.

    ``width``/``height`` None means "follow the source" (its size, or its aspect ratio when
    the other side is given); ``duration_ms`` None means "to the end of the source" (capped
    by the configured maximum). ``filename`` only names the download: it is not part of the
    output bytes and so not part of the cache key.
    """

    mode: Mode = Mode.VIDEO
    width: int | None = None
    height: int | None = None
    fit: Fit = Fit.CONTAIN
    time_ms: int = 0
    duration_ms: int | None = None
    audio: bool = True
    quality: Level = Level.AUTO
    compression: Level = Level.AUTO
    fps: int | None = None
    format: OutputFormat = OutputFormat.MP4
    image_count: int = DEFAULT_IMAGE_COUNT
    # format=hls: None is the media playlist, INIT_SEGMENT or an index one of its segments.
    segment: int | None = None
    # format=hls: derivatives of a master playlist (() until the configured default fills it).
    ladder: tuple[str, ...] | None = None
    # format=hls: the segment length, from configuration ([hls] segment_seconds), not the
    # request; in the key so that entries of another segmentation are never mixed in.
    segment_ms: int | None = None
    filename: str | None = field(default=None, compare=False)

    @property
    def content_type(self) -> str:
        return SEGMENT_CONTENT_TYPE if self.segment is not None else CONTENT_TYPES[self.format]

    @property
    def extension(self) -> str:
        if self.format is OutputFormat.HLS:
            return "m3u8" if self.segment is None else "mp4"
        return self.format.value

    def canonical(self) -> str:
        """Every parameter that changes the output bytes, in a fixed order, nothing else.

        It is also valid query syntax that parses back to the same options.
        """
        parts = [f"mode={self.mode.value}"]
        if self.width is not None:
            parts.append(f"width={self.width}")
        if self.height is not None:
            parts.append(f"height={self.height}")
        if self.mode is not Mode.AUDIO and (self.width is not None or self.height is not None):
            parts.append(f"fit={self.fit.value}")
        parts.append(f"time={format_ms(self.time_ms)}")
        if self.mode is not Mode.FRAME and self.duration_ms is not None:
            parts.append(f"duration={format_ms(self.duration_ms)}")
        if self.mode is Mode.VIDEO:
            parts.append(f"audio={'true' if self.audio else 'false'}")
        parts.append(f"quality={self.quality.value}")
        if self.mode is Mode.VIDEO:
            parts.append(f"compression={self.compression.value}")
            if self.fps is not None:
                parts.append(f"fps={self.fps}")
        if self.mode is Mode.SPRITESHEET:
            parts.append(f"imageCount={self.image_count}")
        parts.append(f"format={self.format.value}")
        if self.segment is not None:
            parts.append(f"segment={format_segment(self.segment)}")
        if self.ladder is not None:
            parts.append(f"ladder={'+'.join(self.ladder)}")
        if self.segment_ms is not None:
            parts.append(f"segmentLength={format_ms(self.segment_ms)}")
        return "&".join(parts)


def format_segment(segment: int) -> str:
    return "init" if segment == INIT_SEGMENT else str(segment)


def format_ms(ms: int) -> str:
    """1500 -> '1.5s', 2000 -> '2s': one spelling per instant."""
    seconds, millis = divmod(ms, 1000)
    if millis == 0:
        return f"{seconds}s"
    return f"{seconds}.{millis:03d}".rstrip("0") + "s"


def cache_key(source: str, options: TransformOptions) -> str:
    """The canonical cache key: ``v1:<source>?<canonical options>``.

    ``source`` is the decoded request path (``/videos/a.mp4``) for sources resolved through
    the origins, whichever URL form asked for it, or the absolute URL of a remote source.
    """
    return f"{KEY_VERSION}:{source}?{options.canonical()}"


def key_digest(key: str) -> str:
    """A filesystem- and header-safe fixed-length name for a cache key."""
    return hashlib.sha256(key.encode()).hexdigest()


def normalize_params(raw: Mapping[str, str]) -> dict[str, str]:
    """Canonical names for known parameters (aliases resolved); unknown ones dropped.

    ``mute`` becomes ``audio``. A parameter given under two spellings with different values
    (``w=100&width=200``) is ambiguous and refused.
    """
    result: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        lowered = key.strip().lower()
        name = ALIASES.get(lowered) or _CANONICAL_NAME.get(lowered)
        if name is None:
            continue
        if name == "mute":
            flag = parse_bool("mute", value)
            name, value = "audio", "false" if flag else "true"
        if name in result and result[name] != value.strip():
            raise InvalidOption(
                name, f"given twice with different values ({spelled[name]} and {key})"
            )
        result[name] = value.strip()
        spelled[name] = key
    return result


def parse_bool(param: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise InvalidOption(param, f"{raw!r} is not a boolean; allowed: true, false")


def parse_time_ms(param: str, raw: str, maximum_ms: int = MAX_TIME_MS) -> int:
    """'2s', '2.5s', '1m', '1500ms' -> milliseconds; a bare number means seconds."""
    match = _TIME_RE.match(raw.strip().lower())
    if match is None:
        raise InvalidOption(
            param, f"{raw!r} is not a time; use seconds or minutes like '2s', '2.5s', '1m'"
        )
    scale = {"ms": 1, "s": 1000, "m": 60_000}[match["unit"] or "s"]
    ms = round(float(match["num"]) * scale)
    if ms > maximum_ms:
        raise InvalidOption(param, f"{raw!r} is beyond the maximum of {format_ms(maximum_ms)}")
    return ms


def parse_int(param: str, raw: str, low: int, high: int, unit: str = "") -> int:
    text = raw.strip()
    allowed = f"allowed: {low}-{high}{unit}"
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise InvalidOption(param, f"{raw!r} is not an integer; {allowed}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidOption(param, f"{value} is out of range; {allowed}")
    return value


def _choice(param: str, raw: str, kind: type[_E], aliases: Mapping[str, _E] | None = None) -> _E:
    lowered = raw.strip().lower()
    if aliases and lowered in aliases:
        return aliases[lowered]
    try:
        return kind(lowered)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise InvalidOption(param, f"{raw!r} is not allowed; allowed: {allowed}") from None


def parse_format(raw: str) -> OutputFormat:
    lowered = raw.strip().lower()
    found = _FORMAT_ALIASES.get(lowered) or next(
        (f for f in OutputFormat if f.value == lowered), None
    )
    if found is None:
        allowed = ", ".join(f.value for f in OutputFormat)
        raise InvalidOption("format", f"{raw!r} is not allowed; allowed: {allowed}")
    return found


def parse_filename(raw: str) -> str:
    name = raw.strip().lower()
    if not _FILENAME_RE.match(name):
        raise InvalidOption(
            "filename",
            f"{raw!r} is not allowed; use 1-{MAX_FILENAME} characters from a-z, 0-9, _ and -",
        )
    return name


def build_options(params: Mapping[str, str], limits: Limits = Limits()) -> TransformOptions:
    """Validate normalized parameters (see ``normalize_params``) into ``TransformOptions``."""
    output_format = parse_format(params["format"]) if "format" in params else None
    if "mode" in params:
        mode = _choice("mode", params["mode"], Mode)
    elif output_format is not None:
        mode = MODE_BY_FORMAT.get(output_format, Mode.VIDEO)
    else:
        mode = Mode.VIDEO
    allowed_formats = FORMATS_BY_MODE[mode]
    if output_format is None:
        output_format = allowed_formats[0]
    elif output_format not in allowed_formats:
        allowed = ", ".join(f.value for f in allowed_formats)
        raise InvalidOption(
            "format",
            f"{output_format.value!r} is not allowed with mode={mode.value}; allowed: {allowed}",
        )

    if mode is Mode.AUDIO and "audio" in params and not parse_bool("audio", params["audio"]):
        raise InvalidOption("audio", "audio=false (or mute=true) contradicts mode=audio")
    for name in params:
        if name not in _ALWAYS and name not in PARAMS_BY_MODE[mode]:
            takes = sorted(m.value for m, names in PARAMS_BY_MODE.items() if name in names)
            raise InvalidOption(
                name, f"does not apply to mode={mode.value} (it applies to: {', '.join(takes)})"
            )

    width = (
        parse_int("width", params["width"], MIN_DIMENSION, limits.max_width, " pixels")
        if "width" in params
        else None
    )
    height = (
        parse_int("height", params["height"], MIN_DIMENSION, limits.max_height, " pixels")
        if "height" in params
        else None
    )
    if mode is Mode.SPRITESHEET and (width is None or height is None):
        missing = "width" if width is None else "height"
        raise InvalidOption(missing, "mode=spritesheet needs both width and height (tile size)")

    duration_ms = limits.default_duration_ms if mode is not Mode.FRAME else None
    if "duration" in params:
        duration_ms = parse_time_ms("duration", params["duration"], limits.max_duration_ms)
        if duration_ms < MIN_DURATION_MS:
            raise InvalidOption(
                "duration",
                f"{params['duration']!r} is too short; allowed: "
                f"{format_ms(MIN_DURATION_MS)}-{format_ms(limits.max_duration_ms)}",
            )

    fit = _choice("fit", params["fit"], Fit, _FIT_ALIASES) if "fit" in params else Fit.CONTAIN
    segment, ladder = _hls_params(params, output_format, width, height)
    return TransformOptions(
        mode=mode,
        width=width,
        height=height,
        # Without a size, fit changes nothing: normalise it so equal outputs compare equal.
        fit=fit if width is not None or height is not None else Fit.CONTAIN,
        time_ms=parse_time_ms("time", params["time"]) if "time" in params else 0,
        duration_ms=duration_ms,
        audio=parse_bool("audio", params["audio"]) if "audio" in params else True,
        quality=_choice("quality", params["quality"], Level) if "quality" in params else Level.AUTO,
        compression=(
            _choice("compression", params["compression"], Level)
            if "compression" in params
            else Level.AUTO
        ),
        fps=parse_int("fps", params["fps"], 1, MAX_FPS) if "fps" in params else None,
        format=output_format,
        image_count=(
            parse_int("imageCount", params["imageCount"], 1, MAX_IMAGE_COUNT)
            if "imageCount" in params
            else DEFAULT_IMAGE_COUNT
        ),
        segment=segment,
        ladder=ladder,
        filename=parse_filename(params["filename"]) if "filename" in params else None,
    )


def _hls_params(
    params: Mapping[str, str], output_format: OutputFormat, width: int | None, height: int | None
) -> tuple[int | None, tuple[str, ...] | None]:
    """``segment`` and ``ladder``, which only format=hls takes (and not both at once)."""
    for name in ("segment", "ladder"):
        if name in params and output_format is not OutputFormat.HLS:
            raise InvalidOption(name, "applies to format=hls only")
    segment: int | None = None
    if "segment" in params:
        raw = params["segment"].strip().lower()
        segment = INIT_SEGMENT if raw == "init" else parse_int("segment", raw, 0, MAX_SEGMENT)
    if "ladder" not in params:
        return segment, None
    if segment is not None:
        raise InvalidOption("ladder", "a master playlist has no segments; drop segment")
    if width is not None or height is not None:
        raise InvalidOption(
            "ladder", "the ladder's derivatives choose the sizes; drop width/height"
        )
    names = [name.lower() for name in _LADDER_SEPARATORS.split(params["ladder"]) if name]
    for name in names:
        if not _DERIVATIVE_RE.match(name):
            raise InvalidOption("ladder", f"{name!r} is not a derivative name")
    if len(names) > MAX_LADDER or len(set(names)) != len(names):
        raise InvalidOption("ladder", f"list at most {MAX_LADDER} distinct derivatives")
    return segment, tuple(names)


def parse_options(query: Mapping[str, str], limits: Limits = Limits()) -> TransformOptions:
    """Raw query parameters straight to options (no derivatives, no responsive sizing)."""
    return build_options(normalize_params(query), limits)
