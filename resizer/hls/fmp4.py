"""Cutting a fragmented MP4 stream into an HLS init segment and media segments (pure).

ffmpeg writes ``ftyp`` + ``moov`` (the init segment: codec set-up, no samples), then one
``moof`` + ``mdat`` pair per fragment. With a keyframe forced at every segment boundary and
``frag_keyframe``, each fragment is exactly one HLS segment. ``BoxSplitter`` follows the box
headers as bytes arrive and says where each piece belongs, so a segment can be written to
the cache while it is produced and published the moment its ``mdat`` is complete; nothing
larger than one read is held in memory.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import TransformFailed

_HEADER = struct.Struct(">I4s")
_LARGE_SIZE = struct.Struct(">Q")


class Part(enum.Enum):
    INIT = "init"  # bytes of the init segment (ftyp, moov and anything before the first moof)
    MEDIA = "media"  # bytes of the current media segment (moof, mdat, styp, sidx, ...)


@dataclass(frozen=True, slots=True)
class Piece:
    part: Part
    data: bytes
    segment_complete: bool = False  # the last piece of a media segment (its mdat ended)
    init_complete: bool = False  # the last piece of the init segment (its moov ended)


class BoxSplitter:
    """Feed bytes in order; get ``Piece``s back. Only top-level boxes are parsed."""

    def __init__(self) -> None:
        self._header = b""  # a box header split across reads
        self._remaining = 0  # bytes left in the current box
        self._box = b""  # the current box's type
        self._pending_header = b""  # the header just read, handed out as the box's first piece
        self._media_started = False  # a moof was seen: everything after is media
        self._init_done = False

    @property
    def idle(self) -> bool:
        """Between boxes: a stream may end here without losing anything."""
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes | bytearray) -> Iterator[Piece]:
        view = memoryview(data)
        while view:
            if self._remaining == 0:
                view = self._read_header(view)
                if self._remaining == 0:
                    continue  # header incomplete (view is empty now)
                part = self._part()
                yield Piece(part, self._pending_header)
                self._remaining -= len(self._pending_header)
                if self._remaining == 0:
                    yield from self._box_ended(part)
                continue
            take = min(self._remaining, len(view))
            self._remaining -= take
            part = self._part()
            yield Piece(part, bytes(view[:take]))
            view = view[take:]
            if self._remaining == 0:
                yield from self._box_ended(part)

    def _read_header(self, view: memoryview) -> memoryview:
        need = 8 if len(self._header) < 8 else 16
        take = min(need - len(self._header), len(view))
        self._header += bytes(view[:take])
        view = view[take:]
        if len(self._header) < 8:
            return view
        size, box = _HEADER.unpack(self._header[:8])
        if size == 1:  # a 64-bit size follows
            if len(self._header) < 16:
                return self._read_header(view) if view else view
            size = _LARGE_SIZE.unpack(self._header[8:16])[0]
        if size < len(self._header) or size == 0:
            # size 0 means "to the end of the file": not something a stream can cut.
            raise TransformFailed(f"malformed MP4 box header from ffmpeg ({box!r}, {size})")
        self._box = box
        self._pending_header = self._header
        self._remaining = size
        self._header = b""
        if box == b"moof":
            self._media_started = True
        return view

    def _part(self) -> Part:
        return Part.MEDIA if self._media_started else Part.INIT

    def _box_ended(self, part: Part) -> Iterator[Piece]:
        if part is Part.MEDIA and self._box == b"mdat":
            yield Piece(Part.MEDIA, b"", segment_complete=True)
        elif part is Part.INIT and self._box == b"moov" and not self._init_done:
            self._init_done = True
            yield Piece(Part.INIT, b"", init_complete=True)
