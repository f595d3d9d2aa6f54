"""Measuring where each track of an output starts, with the bundled ffmpeg (there is no ffprobe).

Timestamps are read after decoding with ``-copyts``, so they are the container's own (edit
lists applied, nothing shifted to zero): what a player that uses FFmpeg's demuxer (Chromium's
progressive playback) presents. ``make_event_clip`` makes a source with a flash and a beep at
the same instant, whose times in an output show whether picture and sound are still in step.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

from tests.media import ffmpeg_exe

AUDIO_FRAME = 1024 / 48000  # one AAC frame at 48 kHz: the tolerance of every comparison
EVENT_AT = 1.0  # seconds into the source at which the flash and the beep start

_PTS_RE = re.compile(r"\bn: *0 +pts: *-?\d+ +pts_time:(-?[\d.e+-]+)")
_VIDEO_FRAME_RE = re.compile(r"\bpts_time:(-?[\d.e+-]+) .*?\bmean:\[(\d+)")
_AUDIO_FRAME_RE = re.compile(r"\bpts_time:(-?[\d.e+-]+) .*?\brate:(\d+) ")


def make_event_clip(path: Path, audio_delay: float = 0.0, seconds: float = 2.0) -> Path:
    """A 25 fps video, black until ``EVENT_AT`` and white from then on, and a 48 kHz track,
    silent until ``EVENT_AT`` and a loud tone from then on. ``audio_delay``: the audio track
    starts that much later than the video (its tone still starts at ``EVENT_AT``)."""
    video = f"color=c=black:s=160x120:r=25:d={seconds},drawbox=c=white:t=fill:enable='gte(t,1)'"
    tone = f"if(gte(t+{audio_delay},{EVENT_AT}),0.8*sin(2*PI*880*t),0)"
    audio = f"aevalsrc='{tone}':s=48000:d={seconds - audio_delay}"
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    argv += ["-f", "lavfi", "-i", video, "-itsoffset", str(audio_delay), "-f", "lavfi", "-i", audio]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    argv += ["-c:a", "aac", "-b:a", "96k", str(path)]
    subprocess.run(argv, check=True, capture_output=True)
    return path


def _decode(path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # Not checked: an output without a decodable frame is measured as having none.
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-copyts", "-i", str(path), *args]
    return subprocess.run(argv, capture_output=True, check=False)


def video_frames(path: Path) -> list[tuple[float, int]]:
    """(presentation time, mean luma) of every decoded video frame."""
    stderr = _decode(path, "-map", "0:v:0", "-vf", "showinfo", "-f", "null", "-").stderr
    return [(float(m[1]), int(m[2])) for m in _VIDEO_FRAME_RE.finditer(stderr.decode())]


def audio_start(path: Path) -> float | None:
    """The presentation time of the first decoded audio frame (None: no audio frame)."""
    stderr = _decode(path, "-map", "0:a:0", "-af", "ashowinfo", "-f", "null", "-").stderr
    match = _PTS_RE.search(stderr.decode())
    return float(match[1]) if match else None


def beep_time(path: Path, threshold: float = 0.1) -> float | None:
    """When the first sample louder than ``threshold`` is heard by a player that starts the
    audio at its first frame's timestamp and plays the samples back to back (as browsers do:
    a gap or a misplaced first frame moves everything after it)."""
    filters = "aformat=sample_fmts=flt:channel_layouts=mono,ashowinfo"
    result = _decode(path, "-map", "0:a:0", "-af", filters, "-f", "f32le", "-")
    frames = list(_AUDIO_FRAME_RE.finditer(result.stderr.decode()))
    samples = struct.unpack(f"<{len(result.stdout) // 4}f", result.stdout)
    loud = next((i for i, value in enumerate(samples) if abs(value) > threshold), None)
    if not frames or loud is None:
        return None
    return float(frames[0][1]) + loud / int(frames[0][2])


def flash_time(path: Path) -> float | None:
    """The presentation time of the first white frame."""
    return next((time for time, luma in video_frames(path) if luma > 128), None)


def top_level_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole box) of each top-level MP4 box."""
    boxes = []
    position = 0
    while position + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, position)
        if size == 1:
            size = struct.unpack_from(">Q", data, position + 8)[0]
        elif size == 0:
            size = len(data) - position
        boxes.append((kind, data[position : position + size]))
        position += size
    return boxes


def init_segment(data: bytes) -> bytes:
    """Everything before the first fragment: ftyp + moov."""
    init = b""
    for kind, box in top_level_boxes(data):
        if kind == b"moof":
            break
        init += box
    return init
