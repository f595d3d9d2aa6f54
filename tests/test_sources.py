"""Origin matching, template expansion and the filesystem source's confinement."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from resizer.config import load_config
from resizer.errors import NoOriginMatched, SourceNotFound
from resizer.sources.filesystem import FilesystemSource, safe_join
from resizer.sources.origins import Origins, expand_template


def test_template_expands_named_and_numbered_captures() -> None:
    """$1, ${1}, $name and ${name} all expand; unknown groups expand to nothing."""
    match = re.search(r"^/v/(?P<dir>\w+)/(?P<file>.+)$", "/v/a/b.mp4")
    assert match is not None
    assert expand_template("$1/${2}/$dir/${file}/$nope", match) == "a/b.mp4/a/b.mp4/"


@pytest.mark.parametrize(
    "relative",
    ["../etc/passwd", "a/../../x", "%2e%2e/x", "%252e%252e/x", "..%2fx", "a\\..\\..\\x", "a\x00b"],
)
def test_paths_never_escape_the_root(tmp_path: Path, relative: str) -> None:
    """Plain, percent-encoded and double-encoded '..' are refused."""
    with pytest.raises(SourceNotFound):
        safe_join(tmp_path, relative)


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """A symlink inside the root that points outside it is not followed out."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.mp4")
    with pytest.raises(SourceNotFound):
        safe_join(root.resolve(), "link.mp4")


async def test_filesystem_source_stats_and_opens(tmp_path: Path) -> None:
    """An existing file stats and opens as a local file; a folder or missing file is 404."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.mp4").write_bytes(b"12345")
    source = FilesystemSource(tmp_path)
    assert (await source.stat("sub/a.mp4")).size == 5
    async with source.open("sub/a.mp4") as local:
        assert local.path.read_bytes() == b"12345"
    for missing in ("sub", "nope.mp4", "sub/a.mp4/x"):
        with pytest.raises(SourceNotFound):
            await source.stat(missing)


async def test_resolve_tries_sources_by_priority(tmp_path: Path) -> None:
    """The lowest priority number is asked first; a miss falls over to the next source."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "a.mp4").write_bytes(b"two")
    (first / "b.mp4").write_bytes(b"one")
    (second / "b.mp4").write_bytes(b"two")
    text = f"""
    [[origins]]
    name = "v"
    matcher = "^/v/(?P<path>.+)$"
    [[origins.sources]]
    type = "filesystem"
    root = "{second}"
    priority = 5
    [[origins.sources]]
    type = "filesystem"
    root = "{first}"
    priority = 1
    """
    origins = Origins.from_config(load_config(text=text, env={}))
    resolved_a = await origins.resolve("/v/a.mp4")
    resolved_b = await origins.resolve("/v/b.mp4")
    assert isinstance(resolved_a.source, FilesystemSource)
    assert isinstance(resolved_b.source, FilesystemSource)
    assert resolved_a.source.root == second.resolve()
    assert resolved_b.source.root == first.resolve()
    assert resolved_b.origin == "v"
    with pytest.raises(SourceNotFound):
        await origins.resolve("/v/c.mp4")
    with pytest.raises(NoOriginMatched):
        await origins.resolve("/elsewhere/a.mp4")
