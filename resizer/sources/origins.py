"""Origins: map a request path to the sources that may hold it.

Matching and template expansion are pure; ``resolve`` asks each candidate source, by
priority, whether the object exists.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Config, OriginConfig
from ..errors import NoOriginMatched, SourceNotFound
from .base import Source, SourceStat
from .filesystem import FilesystemSource

_TEMPLATE_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_template(template: str, match: re.Match[str]) -> str:
    """Fill ``$1``, ``${1}``, ``$name`` and ``${name}`` from a matcher's captures.

    An unknown group name or number expands to the empty string rather than raising, so a
    template cannot turn a request into a 500; config validation catches such typos.
    """

    def replace(found: re.Match[str]) -> str:
        ref = found[1] or found[2]
        try:
            value = match.group(int(ref) if ref.isdigit() else ref)
        except IndexError:  # no such group
            return ""
        return value or ""

    return _TEMPLATE_RE.sub(replace, template)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One source that may hold the requested object, with the path to ask it for."""

    source: Source
    path: str
    priority: int


@dataclass(frozen=True, slots=True)
class Origin:
    name: str
    matcher: re.Pattern[str]
    sources: tuple[tuple[Source, str, int], ...]  # (source, path template, priority)


@dataclass(frozen=True, slots=True)
class Resolved:
    """The source that holds the object: the outcome of ``Origins.resolve``."""

    origin: str
    source: Source
    path: str
    stat: SourceStat


class Origins:
    def __init__(self, origins: Sequence[Origin]) -> None:
        self.origins = tuple(origins)

    @classmethod
    def from_config(cls, config: Config) -> Origins:
        return cls([_build_origin(config, origin) for origin in config.origins])

    def match(self, request_path: str) -> tuple[str, list[Candidate]]:
        """The first origin whose matcher accepts the path, with its candidates by priority."""
        for origin in self.origins:
            found = origin.matcher.search(request_path)
            if found is None:
                continue
            candidates = [
                Candidate(source, expand_template(template, found), priority)
                for source, template, priority in origin.sources
            ]
            candidates.sort(key=lambda c: c.priority)
            return origin.name, candidates
        raise NoOriginMatched(f"no origin is configured for {request_path!r}")

    async def resolve(self, request_path: str) -> Resolved:
        """The first candidate, by priority, that has the object; else SourceNotFound."""
        name, candidates = self.match(request_path)
        for candidate in candidates:
            if not candidate.path:
                continue
            try:
                stat = await candidate.source.stat(candidate.path)
            except SourceNotFound:
                continue
            return Resolved(name, candidate.source, candidate.path, stat)
        raise SourceNotFound(f"{request_path!r} does not exist on origin {name!r}")


def _build_origin(config: Config, origin: OriginConfig) -> Origin:
    sources: list[tuple[Source, str, int]] = []
    for source in origin.sources:
        adapter: Source = FilesystemSource(config.resolve_path(source.root))
        sources.append((adapter, source.path, source.priority))
    return Origin(origin.name, re.compile(origin.matcher), tuple(sources))
