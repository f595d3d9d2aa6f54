"""``debug=view``: an HTML page that shows how resizer sees one media request.

``GET /videos/a.mp4?width=640&debug=view`` (or ``/cdn-cgi/media/width=640,debug=view/...``)
answers, instead of the media, a diagnostics page: the resolved options (canonical), the
cache key and whether it is cached (the entry's metadata), which origin and source the path
resolves to (with its stat), how long the lookup and the resolution took, every circuit
breaker's state, and a preview of the same URL without ``debug``. Nothing is transformed,
and the page is never cached nor answered by the hit layers (they let such requests through:
``asks_debug_view``). Admin only: see ``admin.py`` (404 when off, 401 without the token).

Every value on the page comes from the request, the configuration or an origin, so every
value is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote_plus

import trio
from quart import Response, request

from ..errors import NoOriginMatched, ResizerError
from ..options import TransformOptions, cache_key, key_digest
from ..pipeline import Service
from ..responsive import resolve_options
from ..targets import CDN_PREFIX, Target, parse_target
from .admin import NO_STORE, describe_work, require_admin

DEBUG_PARAM = "debug"
DEBUG_VIEW = "view"

# The page loads nothing but its preview, from this origin; no script runs.
PAGE_HEADERS = {
    "Cache-Control": NO_STORE,
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; media-src 'self'"
    ),
    "Referrer-Policy": "no-referrer",
}


def asks_debug_view(params: Mapping[str, str]) -> bool:
    """Whether a target's parameters ask for the diagnostics page (``debug=view``)."""
    return any(
        name.strip().lower() == DEBUG_PARAM and value.strip().lower() == DEBUG_VIEW
        for name, value in params.items()
    )


def is_debug_request(path: str, query_string: bytes) -> bool:
    """``asks_debug_view`` for a request path and raw query (either URL form)."""
    if b"debug" not in query_string.lower() and "debug" not in path.lower():
        return False  # the common case, without parsing
    try:
        return asks_debug_view(parse_target(path, query_string).params)
    except ResizerError:
        return False  # a malformed target: the media route renders the error


def _is_debug_pair(name: str) -> bool:
    return unquote_plus(name).strip().lower() == DEBUG_PARAM


def preview_url(path: str, query_string: bytes) -> str:
    """The same request without its ``debug`` parameter (a URL relative to this host)."""
    query = query_string.decode("latin-1")
    if path.startswith(CDN_PREFIX):
        # The options are the path's first segment; a query belongs to a remote source URL.
        segment, _, source = path[len(CDN_PREFIX) :].partition("/")
        kept = [item for item in segment.split(",") if not _is_debug_pair(item.partition("=")[0])]
        path = f"{CDN_PREFIX}{','.join(kept)}/{source}"
    else:
        pairs = [pair for pair in query.split("&") if pair]
        query = "&".join(pair for pair in pairs if not _is_debug_pair(pair.partition("=")[0]))
    url = quote(path, safe="/:@!$&'()*+,;=~")
    return f"{url}?{query}" if query else url


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: object) -> None:
        self.rows.append((label, "" if value is None else str(value)))


def _error(exc: ResizerError) -> str:
    return f"{exc.status} {exc.code}: {exc.message}"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def diagnose(
    service: Service, path: str, query_string: bytes, headers: Mapping[str, str]
) -> tuple[list[Section], TransformOptions | None]:
    """What resizer makes of this request, section by section (nothing is transformed)."""
    asked = Section("Request")
    asked.add("path", path)
    asked.add("query", query_string.decode("latin-1"))
    try:
        target = parse_target(path, query_string)
    except ResizerError as exc:
        asked.add("target", _error(exc))
        return [asked], None
    asked.add("URL form", "/cdn-cgi/media" if target.cdn_form else "query")
    asked.add("source", target.source + (" (remote URL)" if target.remote else ""))
    for name, value in target.params.items():
        asked.add(f"param {name}", value)
    sections = [asked]

    timings = Section("Timings")
    options_section = Section("Options")
    sections.append(options_section)
    started = time.perf_counter()
    try:
        choice = resolve_options(target.params, headers, service.policy)
    except ResizerError as exc:
        options_section.add("error", _error(exc))
        choice = None
    timings.add("options", _ms(time.perf_counter() - started))
    options = choice.options if choice is not None else None
    if choice is not None:
        options_section.add("canonical", choice.options.canonical())
        options_section.add("derivative", choice.derivative or "(none)")
        options_section.add("vary", ", ".join(choice.vary) or "(nothing)")
        options_section.add("content type", choice.options.content_type)
        sections.append(await _cache_section(service, target, choice.options, timings))
    sections.append(await _origin_section(service, target, timings))
    sections.append(_breakers_section(service))
    sections.append(timings)
    return sections, options


async def _cache_section(
    service: Service, target: Target, options: TransformOptions, timings: Section
) -> Section:
    key = cache_key(target.source, options)
    cache = Section("Cache")
    cache.add("key", key)
    cache.add("digest", key_digest(key))
    started = time.perf_counter()
    # The store itself, not Service.lookup: a diagnostic must not count as a hit or miss.
    entry = service.cache.recall(key) or await service.cache.lookup(key)
    timings.add("cache lookup", _ms(time.perf_counter() - started))
    if entry is None:
        cache.add("cached", "no")
    else:
        now = time.time()
        cache.add("cached", "yes" if entry.is_fresh(now) else "yes, stale")
        cache.add("content type", entry.content_type)
        cache.add("size", f"{entry.size} bytes")
        cache.add("ETag", entry.etag)
        cache.add("created", _when(entry.created))
        cache.add("expires", f"{_when(entry.expires)} (in {entry.expires - now:.0f} s)")
        cache.add("entry options", entry.options)
        cache.add("made from", entry.source)
        if service.disk is not None:
            cache.add("data file", service.disk.data_file(entry))
    remembered = service.failures.recall(key)
    if remembered is not None:
        cache.add(
            "remembered failure", f"{_error(remembered)} (for {remembered.max_age:.0f} s more)"
        )
    work = service.registry.get(key)
    if work is None:
        cache.add("in flight", "no")
    else:
        cache.add("in flight", json.dumps(describe_work(work, trio.current_time())))
    return cache


async def _origin_section(service: Service, target: Target, timings: Section) -> Section:
    origin = Section("Origin")
    if target.remote:
        origin.add("origin", "remote URL ([security] allowed_remote_hosts)")
    else:
        try:
            matched, candidates = service.origins.match(target.source)
        except NoOriginMatched as exc:
            origin.add("match", _error(exc))
            return origin
        origin.add("origin", f"{matched.name} (matcher {matched.matcher.pattern})")
        for candidate in candidates:
            slot = candidate.slot
            origin.add(
                f"candidate {slot.breaker.name}",
                f"{slot.source.kind} {candidate.path or '(template names nothing)'}; "
                f"priority {slot.priority}; breaker {slot.breaker.state.name.lower()}",
            )
    started = time.perf_counter()
    try:
        resolved = await service.resolve(target)
    except ResizerError as exc:
        origin.add("resolution", _error(exc))
    else:
        source_name = resolved.breaker.name if resolved.breaker is not None else "remote"
        origin.add("resolved", f"{resolved.origin}: {source_name} ({resolved.source.kind})")
        origin.add("object", resolved.path)
        stat = resolved.stat
        origin.add(
            "stat",
            f"{stat.size} bytes, modified {_when(stat.mtime)}, "
            f"byte ranges {'yes' if stat.ranges else 'no'}",
        )
    timings.add("origin resolution", _ms(time.perf_counter() - started))
    return origin


def _breakers_section(service: Service) -> Section:
    breakers = Section("Circuit breakers")
    for breaker in service.origins.breakers:
        state = breaker.state.name.lower()
        retry = breaker.retry_after()
        detail = f"{state}; trips {breaker.trips}" + (f"; retry in {retry:.1f} s" if retry else "")
        breakers.add(breaker.name, detail)
    if not breakers.rows:
        breakers.add("(none)", "")
    return breakers


def _preview(url: str, options: TransformOptions | None) -> str:
    src = html.escape(url, quote=True)
    kind = options.content_type.split("/")[0] if options is not None else ""
    if kind == "video":
        return f'<video src="{src}" controls muted playsinline preload="metadata"></video>'
    if kind == "audio":
        return f'<audio src="{src}" controls preload="metadata"></audio>'
    if kind == "image":
        return f'<img src="{src}" alt="preview">'
    return f'<a href="{src}">{src}</a>'


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222 }
table { border-collapse: collapse; margin-bottom: 1.2em; min-width: 40em }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top }
th { background: #f3f3f3; width: 14em; font-weight: 600 }
td { font-family: ui-monospace, monospace; word-break: break-all }
video, img { max-width: 100%; max-height: 60vh; border: 1px solid #ccc }
"""


def render_page(sections: list[Section], preview: str, options: TransformOptions | None) -> str:
    """The page (every value escaped here)."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>resizer debug view</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>resizer debug view</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><table>")
        for label, value in section.rows:
            parts.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Preview</h2>")
    parts.append(f"<p>{_preview(preview, options)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


async def debug_view(service: Service) -> Response:
    """The diagnostics page for the current request (admin only)."""
    require_admin(service, request.headers.get("Authorization"))
    headers = {name: value for name, value in request.headers.items()}
    sections, options = await diagnose(service, request.path, request.query_string, headers)
    page = render_page(sections, preview_url(request.path, request.query_string), options)
    return Response(
        page, status=200, content_type="text/html; charset=utf-8", headers=dict(PAGE_HEADERS)
    )
