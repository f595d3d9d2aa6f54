"""Test media generated on the fly with the bundled ffmpeg (no fixtures checked in).

``make_test_video`` is shared with other test modules (integration tests reuse it): keep its
signature stable.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg


def ffmpeg_exe() -> str:
    """The bundled ffmpeg binary (imageio-ffmpeg)."""
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def make_test_video(
    path: Path,
    width: int = 320,
    height: int = 240,
    seconds: float = 2.0,
    audio: bool = True,
    *,
    fps: int = 25,
    rotation: int = 0,
) -> Path:
    """Write an H.264 (+ AAC mono 440 Hz when ``audio``) MP4 test pattern to ``path``.

    ``testsrc2`` at ``width``x``height`` and ``fps`` for ``seconds``; ``rotation`` (0, 90, 180,
    270, clockwise) adds display-matrix side data as a phone would. Runs synchronously and is
    fast (ultrafast preset): about 0.1 s for the defaults. Returns ``path``.
    """
    source = f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    argv += ["-f", "lavfi", "-i", source]
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if audio:
        argv += ["-c:a", "aac", "-b:a", "64k"]
    if rotation:
        # Encode upright, then mark for display rotation without re-encoding.
        plain = path.with_name(f"{path.stem}.unrotated{path.suffix}")
        subprocess.run([*argv, str(plain)], check=True, capture_output=True)
        # -display_rotation is counter-clockwise; ours (like the old rotate tag) is clockwise.
        rotate = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
        rotate += ["-display_rotation", str(-rotation), "-i", str(plain), "-c", "copy"]
        subprocess.run([*rotate, str(path)], check=True, capture_output=True)
        plain.unlink()
        return path
    subprocess.run([*argv, str(path)], check=True, capture_output=True)
    return path


def ffmpeg_banner(path: Path) -> str:
    """The stderr of ``ffmpeg -hide_banner -i path`` (what ``parse_probe_output`` reads)."""
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        check=False,
    )
    return result.stderr.decode("utf-8", errors="replace")
