"""H.264 facts the HLS playlists must state before anything is encoded (pure)."""

from __future__ import annotations

import math

# Table A-1: (level_idc, max macroblocks per second, max frame size in macroblocks).
_LEVELS = (
    (30, 40_500, 1_620),
    (31, 108_000, 3_600),
    (32, 216_000, 5_120),
    (40, 245_760, 8_192),
    (42, 522_240, 8_704),
    (50, 589_824, 22_080),
    (51, 983_040, 36_864),
    (52, 2_073_600, 36_864),
)
# x264's presets per compression level (transform.argv.X264_PRESET) decide the profile it
# writes: ultrafast uses no CABAC, B-frames or 8x8 transforms (Constrained Baseline, 42C0),
# the others need High (6400).
_BASELINE = (0x42, 0xC0)
_HIGH = (0x64, 0x00)


def level_for(width: int, height: int, fps: float) -> int:
    """The lowest level (level_idc, 31 = 3.1) whose frame size and rate fit, from 3.0 on."""
    frame_mbs = math.ceil(width / 16) * math.ceil(height / 16)
    rate = frame_mbs * fps
    for level, max_rate, max_frame in _LEVELS:
        if frame_mbs <= max_frame and rate <= max_rate:
            return level
    return _LEVELS[-1][0]


def level_option(level: int) -> str:
    """x264's spelling: 31 -> "3.1"."""
    return f"{level // 10}.{level % 10}"


def codec_string(width: int, height: int, fps: float, preset: str) -> str:
    """The RFC 6381 ``avc1.PPCCLL`` name of the stream x264 makes with ``preset``."""
    profile, constraints = _BASELINE if preset == "ultrafast" else _HIGH
    return f"avc1.{profile:02x}{constraints:02x}{level_for(width, height, fps):02x}"
