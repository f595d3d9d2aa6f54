"""Sample clips for a fresh checkout, so the README's examples work at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".webm", ".mkv"}

SAMPLES = {
    # name: (lavfi video, lavfi audio or None)
    "landscape.mp4": ("testsrc2=size=1280x720:rate=25:duration=6", "sine=frequency=440:duration=6"),
    "portrait.mp4": ("testsrc2=size=720x1280:rate=25:duration=4", None),
}


def sample_argv(ffmpeg: str, target: Path, video: str, audio: str | None) -> list[str]:
    argv = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", video]
    if audio is not None:
        argv += ["-f", "lavfi", "-i", audio, "-c:a", "aac", "-b:a", "96k"]
    argv += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    argv += ["-movflags", "+faststart", "-shortest", str(target)]
    return argv


def ensure_sample_media(folder: Path, ffmpeg: str) -> list[Path]:
    """Create the sample clips in ``folder`` when it holds no video; return what was made.

    Runs before the server starts (plain blocking subprocess calls are fine there).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if any(p.suffix.lower() in VIDEO_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        return []
    made = []
    for name, (video, audio) in SAMPLES.items():
        target = folder / name
        partial = folder / f".{name}.part.mp4"
        subprocess.run(sample_argv(ffmpeg, partial, video, audio), check=True)
        partial.replace(target)
        made.append(target)
    return made
