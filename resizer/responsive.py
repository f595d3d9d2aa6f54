"""Choosing the transformation for a request: derivatives, IMQuery and client hints (pure).

Order of precedence:

1. ``derivative=<name>`` names a preset explicitly.
2. IMQuery (``imwidth``, ``imheight``, ``im-viewwidth``, ``im-viewheight``, ``im-density``)
   maps to a derivative: a width alone through the breakpoints; width and height to the
   derivative nearest in size and aspect ratio within the tolerances, else the values directly.
3. Without any size or derivative: client hints (``Save-Data``, ``ECT``,
   ``Sec-CH-Viewport-Width`` x ``Sec-CH-DPR``), then the User-Agent's device class.

Explicit parameters always override a derivative's values. Because a derivative resolves to
concrete options, every request that maps to one derivative shares one cache entry. There is
no memoisation: the same inputs always give the same answer, whatever came before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .config import Config
from .errors import InvalidOption
from .options import (
    MIN_DIMENSION,
    MODE_BY_FORMAT,
    Limits,
    Mode,
    OutputFormat,
    TransformOptions,
    build_options,
    normalize_params,
    parse_format,
)

# Hints resizer reads; sent in Accept-CH so browsers include them in later requests.
ACCEPT_CH = ("Sec-CH-Viewport-Width", "Sec-CH-DPR", "ECT", "Save-Data")
# Every request header responsive sizing may read (``_from_hints``): what a memo of its
# choices must be keyed on (web/zerocopy.py).
HINT_HEADERS = (
    "Save-Data", "ECT", "Sec-CH-Viewport-Width", "Viewport-Width", "Sec-CH-DPR", "DPR",
    "User-Agent",
)  # fmt: skip

IMQUERY_PARAMS = ("imwidth", "imheight", "im-viewwidth", "im-viewheight", "im-density", "imref")

_TABLET_RE = re.compile(r"iPad|Tablet|PlayBook|Kindle|Silk|Android(?!.*Mobile)", re.I)
_MOBILE_RE = re.compile(
    r"Mobi|iPhone|iPod|Android.*Mobile|Windows Phone|BlackBerry|Opera Mini", re.I
)
_DESKTOP_RE = re.compile(r"Windows NT|Macintosh|X11|CrOS", re.I)
_BOT_RE = re.compile(r"bot|crawl|spider|slurp|curl|wget|python|httpx|okhttp|java/", re.I)


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything option resolution needs from configuration."""

    limits: Limits = field(default_factory=Limits)
    derivatives: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    responsive: bool = True
    breakpoints: Mapping[str, int] = field(default_factory=dict)  # derivative -> max width
    devices: Mapping[str, str] = field(default_factory=dict)  # device class -> derivative
    save_data_derivative: str | None = None
    slow_network_derivative: str | None = None
    medium_network_derivative: str | None = None
    size_tolerance: float = 0.25
    aspect_tolerance: float = 0.1
    hls_ladder: tuple[str, ...] = ()  # a master playlist's renditions when it names none
    hls_segment_ms: int = 4000  # [hls] segment_seconds


@dataclass(frozen=True, slots=True)
class Resolved:
    options: TransformOptions
    derivative: str | None  # the preset that supplied defaults, if any
    vary: tuple[str, ...]  # request headers the choice depended on


def device_class(user_agent: str) -> str | None:
    """mobile, tablet or desktop from a User-Agent; None for bots, tools and the unknown."""
    if not user_agent or _BOT_RE.search(user_agent):
        return None
    if _TABLET_RE.search(user_agent):
        return "tablet"
    if _MOBILE_RE.search(user_agent):
        return "mobile"
    if _DESKTOP_RE.search(user_agent):
        return "desktop"
    return None


def derivative_for_width(width: float, breakpoints: Mapping[str, int]) -> str | None:
    """The narrowest derivative whose breakpoint covers ``width``; the widest above them all."""
    if not breakpoints:
        return None
    ordered = sorted(breakpoints.items(), key=lambda item: item[1])
    for name, max_width in ordered:
        if width <= max_width:
            return name
    return ordered[-1][0]


def _number(param: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise InvalidOption(param, f"{raw!r} is not a number; allowed: {low:g}-{high:g}") from None
    if not low <= value <= high:  # also rejects nan
        raise InvalidOption(param, f"{raw!r} is out of range; allowed: {low:g}-{high:g}")
    return value


def _derivative_size(values: Mapping[str, str]) -> tuple[int, int] | None:
    params = normalize_params(values)
    if "width" in params and "height" in params:
        return int(params["width"]), int(params["height"])
    return None


def _nearest_derivative(width: float, height: float, policy: Policy) -> str | None:
    """The derivative closest in size whose size and aspect lie within the tolerances."""
    best: tuple[float, str] | None = None
    for name in sorted(policy.derivatives):
        size = _derivative_size(policy.derivatives[name])
        if size is None:
            continue
        d_width, d_height = size
        aspect_gap = abs(width / height - d_width / d_height) / (d_width / d_height)
        size_gap = max(abs(width - d_width) / d_width, abs(height - d_height) / d_height)
        within = aspect_gap <= policy.aspect_tolerance and size_gap <= policy.size_tolerance
        if within and (best is None or size_gap < best[0]):
            best = (size_gap, name)
    return None if best is None else best[1]


def _clamp_box(width: float, height: float, limits: Limits) -> tuple[int, int]:
    """Scale a box down (keeping its aspect) until it fits the limits."""
    scale = min(1.0, limits.max_width / width, limits.max_height / height)
    return (
        max(MIN_DIMENSION, min(limits.max_width, round(width * scale))),
        max(MIN_DIMENSION, min(limits.max_height, round(height * scale))),
    )


def _imquery(raw: Mapping[str, str], policy: Policy) -> tuple[str | None, dict[str, str]]:
    """(derivative, direct size params) chosen by IMQuery parameters, if any are present."""
    im = {k.strip().lower(): v for k, v in raw.items() if k.strip().lower() in IMQUERY_PARAMS}
    density = _number("im-density", im["im-density"], 0.5, 4) if "im-density" in im else 1.0
    width = _number("imwidth", im["imwidth"], 1, 10_000) if "imwidth" in im else None
    height = _number("imheight", im["imheight"], 1, 10_000) if "imheight" in im else None
    if width is None and "im-viewwidth" in im:
        width = _number("im-viewwidth", im["im-viewwidth"], 1, 10_000)
    if height is None and width is None and "im-viewheight" in im:
        height = _number("im-viewheight", im["im-viewheight"], 1, 10_000)
    if width is not None and height is not None:
        physical = (width * density, height * density)
        nearest = _nearest_derivative(*physical, policy)
        if nearest is not None:
            return nearest, {}
        clamped = _clamp_box(*physical, policy.limits)
        return None, {"width": str(clamped[0]), "height": str(clamped[1])}
    if width is not None:
        return derivative_for_width(width * density, policy.breakpoints), {}
    if height is not None:
        return None, {"height": str(_clamp_box(1, height * density, policy.limits)[1])}
    return None, {}


def _header(headers: Mapping[str, str], *names: str) -> tuple[str | None, str | None]:
    """The first of ``names`` present (``headers`` has lower-case keys), and its value."""
    for name in names:
        value = headers.get(name.lower())
        if value is not None:
            return name, value.strip()
    return None, None


def _narrower(a: str, b: str | None, policy: Policy) -> str:
    """Of two derivatives, the one with the smaller breakpoint (unknown ones rank widest)."""
    if b is None:
        return a
    rank = policy.breakpoints
    return a if rank.get(a, 1 << 30) <= rank.get(b, 1 << 30) else b


def _from_hints(headers: Mapping[str, str], policy: Policy) -> tuple[str | None, list[str]]:
    """A derivative from client hints, then the User-Agent; and the headers consulted."""
    vary: list[str] = []
    _, save_data = _header(headers, "Save-Data")
    vary.append("Save-Data")
    if save_data is not None and save_data.lower() == "on" and policy.save_data_derivative:
        return policy.save_data_derivative, vary
    vary.append("ECT")
    _, ect = _header(headers, "ECT")
    ect = (ect or "").lower()
    if ect in ("slow-2g", "2g") and policy.slow_network_derivative:
        return policy.slow_network_derivative, vary
    cap = policy.medium_network_derivative if ect == "3g" else None

    chosen: str | None = None
    # From here every hint may choose the variant, sent or not: a cache must not answer a
    # request that sends one with a response chosen without it.
    vary += ["Sec-CH-Viewport-Width", "Viewport-Width", "Sec-CH-DPR", "DPR"]
    _, width_raw = _header(headers, "Sec-CH-Viewport-Width", "Viewport-Width")
    if width_raw is not None:
        try:
            viewport = float(width_raw)
            _, dpr_raw = _header(headers, "Sec-CH-DPR", "DPR")
            dpr = min(4.0, max(1.0, float(dpr_raw))) if dpr_raw else 1.0
        except ValueError:
            viewport = 0.0  # malformed hints are ignored, like a missing one
        if viewport > 0:
            chosen = derivative_for_width(viewport * dpr, policy.breakpoints)
    if chosen is None:
        vary.append("User-Agent")
        device = device_class(headers.get("user-agent", ""))
        chosen = policy.devices.get(device) if device else None
    if chosen is None:
        return None, vary
    return (_narrower(chosen, cap, policy) if cap else chosen), vary


def resolve_options(raw: Mapping[str, str], headers: Mapping[str, str], policy: Policy) -> Resolved:
    """Raw request parameters and headers to validated options (see the module docstring)."""
    params = normalize_params(raw)
    lowered = {k.strip().lower(): v for k, v in raw.items()}
    headers = {name.lower(): value for name, value in headers.items()}
    derivative: str | None = None
    base: dict[str, str] = {}
    vary: list[str] = []
    if "derivative" in lowered:
        derivative = lowered["derivative"].strip().lower()
        if derivative not in policy.derivatives:
            allowed = ", ".join(sorted(policy.derivatives)) or "none configured"
            raise InvalidOption("derivative", f"{derivative!r} is not defined; allowed: {allowed}")
    elif any(k in lowered for k in IMQUERY_PARAMS if k != "imref"):
        derivative, base = _imquery(raw, policy)
    elif (
        policy.responsive
        and "width" not in params
        and "height" not in params
        and "ladder" not in params  # a master playlist lists every size
        and _mode_of(params) in (Mode.VIDEO, Mode.FRAME)
    ):
        derivative, vary = _from_hints(headers, policy)
    if derivative is not None:
        base = normalize_params(policy.derivatives[derivative])
    merged = {**base, **params}
    options = build_options(merged, policy.limits)
    if options.ladder is not None:
        options = replace(options, ladder=_ladder(options.ladder, policy))
    if options.format is OutputFormat.HLS:
        options = replace(options, segment_ms=policy.hls_segment_ms)
    return Resolved(options, derivative, tuple(vary))


def _ladder(names: tuple[str, ...], policy: Policy) -> tuple[str, ...]:
    """The master playlist's derivatives: as asked (each must exist), or the configured ones."""
    for name in names:
        if name not in policy.derivatives:
            allowed = ", ".join(sorted(policy.derivatives)) or "none configured"
            raise InvalidOption("ladder", f"{name!r} is not a derivative; allowed: {allowed}")
    return names or policy.hls_ladder


def _mode_of(params: Mapping[str, str]) -> Mode | None:
    """The mode the parameters ask for (None when invalid: build_options reports that)."""
    if "mode" in params:
        try:
            return Mode(params["mode"].strip().lower())
        except ValueError:
            return None
    if "format" in params:
        try:
            return MODE_BY_FORMAT.get(parse_format(params["format"]), Mode.VIDEO)
        except InvalidOption:
            return None
    return Mode.VIDEO


def policy_from_config(config: Config) -> Policy:
    responsive = config.responsive
    return Policy(
        limits=config.limits.options_limits(),
        derivatives=config.derivatives,
        responsive=responsive.enabled,
        breakpoints=responsive.breakpoints,
        devices=responsive.devices,
        save_data_derivative=responsive.save_data_derivative,
        slow_network_derivative=responsive.slow_network_derivative,
        medium_network_derivative=responsive.medium_network_derivative,
        size_tolerance=responsive.size_tolerance,
        aspect_tolerance=responsive.aspect_tolerance,
        hls_ladder=config.hls.ladder,
        hls_segment_ms=round(config.hls.segment_seconds * 1000),
    )
