"""HLS on the fly: playlists from the probe (``playlist``), segments cut from ffmpeg runs
(``fmp4``, ``runs``). ``render_playlist`` is the text answer to a ``format=hls`` request."""

from __future__ import annotations

from dataclasses import replace

from ..options import TransformOptions, build_options, normalize_params
from ..responsive import Policy
from ..targets import Target, variant_url
from ..transform.argv import AUDIO_BITRATE, X264_PRESET, video_fps, video_plan
from ..transform.base import MediaInfo
from ..transform.h264 import codec_string
from .playlist import (
    AUDIO_CODEC,
    Rendition,
    estimate_bandwidth,
    master_playlist,
    media_playlist,
)
from .runs import segmentation

__all__ = ["render_playlist"]


def render_playlist(
    options: TransformOptions,
    target: Target,
    info: MediaInfo,
    policy: Policy,
    max_output_seconds: float,
) -> str:
    """The media playlist of ``options`` (or, with ``ladder``, the master playlist)."""
    if options.ladder is None:
        segments = segmentation(options, info, max_output_seconds)
        return media_playlist(
            segments, lambda index: variant_url(target, replace(options, segment=index))
        )
    renditions = []
    for name in options.ladder:
        preset = build_options(normalize_params(policy.derivatives[name]), policy.limits)
        rendition = replace(
            options, ladder=None, width=preset.width, height=preset.height, fit=preset.fit
        )
        width, height = video_plan(info, rendition).output
        fps = video_fps(info, rendition)
        audio = info.has_audio and rendition.audio
        audio_bits = int(AUDIO_BITRATE[rendition.quality].removesuffix("k")) * 1000
        codecs = codec_string(width, height, fps, X264_PRESET[rendition.compression])
        renditions.append(
            Rendition(
                url=variant_url(target, rendition),
                width=width,
                height=height,
                fps=fps,
                bandwidth=estimate_bandwidth(
                    width, height, fps, rendition.quality, audio_bits if audio else None
                ),
                codecs=f"{codecs},{AUDIO_CODEC}" if audio else codecs,
            )
        )
    return master_playlist(renditions)
