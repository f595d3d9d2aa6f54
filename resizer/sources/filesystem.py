"""Filesystem source: serves files under one root folder, never outside it."""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote

import trio

from ..errors import SourceNotFound
from .base import LocalSource, SourceStat


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative`` if it stays inside ``root`` (symlinks resolved), else SourceNotFound.

    ``relative`` may still be percent-encoded (it comes from a URL), so it is decoded until
    stable first: ``%2e%2e`` and ``%252e%252e`` are as much ``..`` as ``..`` itself.
    """
    decoded = relative
    for _ in range(3):
        again = unquote(decoded)
        if again == decoded:
            break
        decoded = again
    parts = decoded.replace("\\", "/").split("/")
    if "\x00" in decoded or any(part == ".." for part in parts):
        raise SourceNotFound(f"{relative!r} is not a valid source path")
    candidate = root.joinpath(*(part for part in parts if part not in ("", ".")))
    # Resolve symlinks: a link inside the root pointing outside it must not be followed out.
    resolved = Path(os.path.realpath(candidate))
    if not resolved.is_relative_to(root):
        raise SourceNotFound(f"{relative!r} is not a valid source path")
    return resolved


class FilesystemSource:
    kind = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))

    async def stat(self, path: str) -> SourceStat:
        target = safe_join(self.root, path)
        try:
            st = await trio.Path(target).stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise SourceNotFound(f"no source at {path!r}") from exc
        except PermissionError as exc:
            raise SourceNotFound(f"source {path!r} is not readable") from exc
        if not stat_module.S_ISREG(st.st_mode):
            raise SourceNotFound(f"no source at {path!r}")
        return SourceStat(size=st.st_size, mtime=st.st_mtime)

    @asynccontextmanager
    async def open(self, path: str) -> AsyncIterator[LocalSource]:
        stat = await self.stat(path)
        yield LocalSource(path=safe_join(self.root, path), size=stat.size)
