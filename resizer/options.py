"""Pure option parsing: query parameters -> validated ``TransformOptions`` -> canonical key.

Nothing here does I/O. Every invalid value raises ``InvalidOption`` naming the parameter and
what is allowed; unknown parameters are ignored so tracking parameters never split the cache.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from .errors import InvalidOption

MIN_DIMENSION = 10
MAX_DIMENSION = 2000
MAX_TIME_MS = 10 * 60 * 1000

KEY_VERSION = "v1"

_E = TypeVar("_E", bound=enum.StrEnum)


class Mode(enum.StrEnum):
    VIDEO = "video"
    FRAME = "frame"


class OutputFormat(enum.StrEnum):
    MP4 = "mp4"
    JPG = "jpg"
    PNG = "png"


CONTENT_TYPES: dict[OutputFormat, str] = {
    OutputFormat.MP4: "video/mp4",
    OutputFormat.JPG: "image/jpeg",
    OutputFormat.PNG: "image/png",
}

FORMATS_BY_MODE: dict[Mode, tuple[OutputFormat, ...]] = {
    Mode.VIDEO: (OutputFormat.MP4,),
    Mode.FRAME: (OutputFormat.JPG, OutputFormat.PNG),
}

_FORMAT_ALIASES = {"jpeg": OutputFormat.JPG}


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds option parsing enforces (configurable under ``[limits]``)."""

    max_width: int = MAX_DIMENSION
    max_height: int = MAX_DIMENSION


@dataclass(frozen=True, slots=True)
class TransformOptions:
    """A validated, fully resolved transformation: defaults are filled in, never ``None``-ish
    except for sizes, where ``None`` means "keep the source's size (or aspect)"."""

    mode: Mode = Mode.VIDEO
    width: int | None = None
    height: int | None = None
    time_ms: int = 0
    format: OutputFormat = OutputFormat.MP4

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def canonical(self) -> str:
        """Every parameter that changes the output bytes, in a fixed order, nothing else."""
        parts = [f"mode={self.mode.value}"]
        if self.width is not None:
            parts.append(f"width={self.width}")
        if self.height is not None:
            parts.append(f"height={self.height}")
        if self.mode is Mode.FRAME:
            parts.append(f"time={format_ms(self.time_ms)}")
        parts.append(f"format={self.format.value}")
        return "&".join(parts)


def format_ms(ms: int) -> str:
    """1500 -> '1.5s', 2000 -> '2s': one spelling per instant."""
    seconds, millis = divmod(ms, 1000)
    if millis == 0:
        return f"{seconds}s"
    return f"{seconds}.{millis:03d}".rstrip("0") + "s"


def cache_key(path: str, options: TransformOptions) -> str:
    """The canonical cache key: ``v1:<request path>?<canonical options>``.

    The path is the decoded request path (origins map it to a source); the options part holds
    only parameters that change the bytes, with defaults written out, so any two spellings of
    the same transformation share one entry.
    """
    return f"{KEY_VERSION}:{path}?{options.canonical()}"


def key_digest(key: str) -> str:
    """A filesystem- and header-safe fixed-length name for a cache key."""
    return hashlib.sha256(key.encode()).hexdigest()


_TIME_RE = re.compile(r"^(?P<num>\d+(?:\.\d+)?|\.\d+)(?P<unit>s|ms|m)?$")


def parse_time_ms(param: str, raw: str) -> int:
    """'2s', '2.5s', '1m', '1500ms' -> milliseconds; a bare number means seconds."""
    match = _TIME_RE.match(raw.strip().lower())
    if match is None:
        raise InvalidOption(param, f"{raw!r} is not a time; use seconds like '2s' or '2.5s'")
    number = float(match["num"])
    unit = match["unit"] or "s"
    scale = {"ms": 1, "s": 1000, "m": 60_000}[unit]
    ms = round(number * scale)
    if ms > MAX_TIME_MS:
        raise InvalidOption(param, f"{raw!r} is beyond the maximum of {format_ms(MAX_TIME_MS)}")
    return ms


def _parse_dimension(param: str, raw: str, maximum: int) -> int:
    text = raw.strip()
    if not text.isascii() or not text.isdigit():
        raise InvalidOption(
            param, f"{raw!r} is not an integer; allowed: {MIN_DIMENSION}-{maximum} pixels"
        )
    value = int(text)
    if not MIN_DIMENSION <= value <= maximum:
        raise InvalidOption(param, f"{value} is out of range; allowed: {MIN_DIMENSION}-{maximum}")
    return value


def _choice(param: str, raw: str, kind: type[_E]) -> _E:
    try:
        return kind(raw.strip().lower())
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise InvalidOption(param, f"{raw!r} is not allowed; allowed: {allowed}") from None


def parse_options(query: Mapping[str, str], limits: Limits = Limits()) -> TransformOptions:
    """Validate query parameters into ``TransformOptions``; unknown keys are ignored."""
    mode = _choice("mode", query["mode"], Mode) if "mode" in query else Mode.VIDEO
    width = (
        _parse_dimension("width", query["width"], limits.max_width) if "width" in query else None
    )
    height = (
        _parse_dimension("height", query["height"], limits.max_height)
        if "height" in query
        else None
    )
    time_ms = 0
    if "time" in query:
        if mode is not Mode.FRAME:
            raise InvalidOption("time", "applies to mode=frame only")
        time_ms = parse_time_ms("time", query["time"])
    allowed_formats = FORMATS_BY_MODE[mode]
    output_format = allowed_formats[0]
    if "format" in query:
        raw = query["format"].strip().lower()
        candidate = _FORMAT_ALIASES.get(raw) or next(
            (f for f in OutputFormat if f.value == raw), None
        )
        if candidate not in allowed_formats:
            allowed = ", ".join(f.value for f in allowed_formats)
            raise InvalidOption(
                "format", f"{query['format']!r} is not allowed with mode={mode}; allowed: {allowed}"
            )
        output_format = candidate
    return TransformOptions(
        mode=mode, width=width, height=height, time_ms=time_ms, format=output_format
    )
