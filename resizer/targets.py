"""The two URL forms (pure): query form and the Cloudflare-style ``/cdn-cgi/media`` form.

* ``/<path>?width=640&mode=frame``: the path is resolved through the configured origins.
* ``/cdn-cgi/media/<k=v,k=v,...>/<source>``: ``<source>`` is a path resolved through the
  origins (``videos/a.mp4`` or ``/videos/a.mp4``), or an absolute ``http(s)://`` URL, which is
  fetched only from hosts in ``[security] allowed_remote_hosts``.

Both forms of the same transformation of the same source share one cache entry: the key is
built from the source (its path or URL) and the canonical options, never from the URL form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote, urlsplit

from .errors import Forbidden, InvalidOption
from .options import OutputFormat, TransformOptions

CDN_PREFIX = "/cdn-cgi/media/"
_SCHEME_RE = re.compile(r"^(https?):/+", re.I)


@dataclass(frozen=True, slots=True)
class Target:
    """What a request asks for: a source and raw option parameters."""

    source: str  # a request path ("/videos/a.mp4") or an absolute http(s) URL
    params: Mapping[str, str]
    remote: bool = False
    cdn_form: bool = False

    @property
    def remote_host(self) -> str:
        return (urlsplit(self.source).hostname or "").lower() if self.remote else ""


def parse_cdn_options(segment: str) -> dict[str, str]:
    """``width=640,mode=frame`` -> {"width": "640", "mode": "frame"}."""
    params: dict[str, str] = {}
    for item in segment.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidOption("options", f"{item!r} is not key=value in the /cdn-cgi/media URL")
        params[name.strip()] = value.strip()
    return params


def parse_target(path: str, query: Mapping[str, str]) -> Target:
    """Split a request into its source and its parameters (either URL form)."""
    if not path.startswith(CDN_PREFIX):
        return Target(source=path, params=dict(query))
    rest = path[len(CDN_PREFIX) :]
    segment, sep, source = rest.partition("/")
    if not sep or not source.strip("/"):
        raise InvalidOption(
            "source",
            "use /cdn-cgi/media/<options>/<source>, e.g. /cdn-cgi/media/width=640/videos/a.mp4",
        )
    params = parse_cdn_options(segment)
    scheme = _SCHEME_RE.match(source)
    if scheme:
        # Proxies and ASGI servers may merge the '//' after the scheme: restore it.
        url = f"{scheme[1].lower()}://{source[scheme.end() :]}"
        if query:  # the source URL's own query string belongs to the source
            url += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        return Target(source=url, params=params, remote=True, cdn_form=True)
    return Target(source="/" + source.lstrip("/"), params=params, cdn_form=True)


def check_remote_allowed(target: Target, allowed_hosts: tuple[str, ...]) -> None:
    """403 unless the remote source's host is listed exactly (case-insensitive)."""
    if not target.remote:
        return
    host = target.remote_host
    if not host or host not in {h.lower() for h in allowed_hosts}:
        raise Forbidden(
            f"remote sources from {host or 'this URL'!r} are not allowed; "
            "list the host in [security] allowed_remote_hosts"
        )


def sheet_url(target: Target, options: TransformOptions) -> str:
    """The URL of the spritesheet a VTT track points at (same options, format=jpg).

    Query form for origin paths, /cdn-cgi/media form for remote URLs; absolute paths, so the
    VTT stays valid whatever host served it (players resolve them against the VTT's URL).
    """
    canonical = replace(options, format=OutputFormat.JPG).canonical()
    if target.remote:
        return f"{CDN_PREFIX}{canonical.replace('&', ',')}/{target.source}"
    return f"{quote(target.source)}?{canonical}"
