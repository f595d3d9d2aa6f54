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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, urlsplit

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


def parse_query(query_string: str) -> dict[str, str]:
    """Option parameters of the query form: the first value of each name."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        params.setdefault(name, value)
    return params


def parse_target(path: str, query_string: bytes = b"") -> Target:
    """Split a request into its source and its parameters (either URL form).

    ``path`` is the decoded path and ``query_string`` the raw query (ASGI ``path`` and
    ``query_string``): the fast path and Quart pass the same values, so they agree on the key.
    """
    query = query_string.decode("latin-1")  # byte for byte: h11 admits only ASCII anyway
    if not path.startswith(CDN_PREFIX):
        return Target(source=path, params=parse_query(query))
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
        if query:  # the source URL's own: kept as sent (order and repeats are its meaning)
            url += "?" + query
        return Target(source=url, params=params, remote=True, cdn_form=True)
    return Target(source="/" + source.lstrip("/"), params=params, cdn_form=True)


# A listed host without a port may be fetched on the web's ports only: otherwise any service
# on it (ssh, a database, resizer itself) could be probed through error differences.
DEFAULT_REMOTE_PORTS = frozenset({80, 443})


def split_host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (lower-case host, port or None).

    A bare IPv6 literal (several colons, no brackets) is a host. Raises ValueError.
    """
    text = entry.strip().lower()
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r} is not [ipv6] or [ipv6]:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{entry!r} names no host")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{entry!r}: the port must be 1-65535")
    return host, int(port_text)


def host_allowed(entries: Iterable[str], host: str, port: int) -> bool:
    """Whether ``host:port`` is listed: ``host:port`` exactly, or ``host`` on port 80 or 443."""
    host = host.strip("[]").lower()
    for entry in entries:
        try:
            listed, listed_port = split_host_port(entry)
        except ValueError:
            continue  # the configuration check reports it
        if listed == host and (
            port == listed_port if listed_port is not None else port in DEFAULT_REMOTE_PORTS
        ):
            return True
    return False


def url_port(url: str) -> int:
    """The TCP port an http(s) URL connects to."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidOption("source", f"{url!r} has an invalid port") from exc
    return port if port is not None else (443 if parts.scheme == "https" else 80)


def check_remote_allowed(target: Target, allowed_hosts: tuple[str, ...]) -> None:
    """403 unless the remote source's host and port are listed (see ``host_allowed``)."""
    if not target.remote:
        return
    host = target.remote_host
    port = url_port(target.source)
    if not host or not host_allowed(allowed_hosts, host, port):
        raise Forbidden(
            f"remote sources from {host or 'this URL'!r} on port {port} are not allowed; "
            "list the host (ports 80 and 443) or host:port in [security] allowed_remote_hosts"
        )


def variant_url(target: Target, options: TransformOptions) -> str:
    """An absolute-path URL for ``options`` of ``target``'s source, in the request's form.

    Query form for origin paths, /cdn-cgi/media form for remote URLs (and for requests that
    used it); absolute paths, so a document linking to it (a VTT track, a playlist) stays
    valid whatever host served it (players resolve them against the document's URL).
    """
    canonical = options.canonical()
    if target.remote or target.cdn_form:
        source = target.source if target.remote else quote(target.source.lstrip("/"))
        return f"{CDN_PREFIX}{canonical.replace('&', ',')}/{source}"
    return f"{quote(target.source)}?{canonical}"


def sheet_url(target: Target, options: TransformOptions) -> str:
    """The URL of the spritesheet a VTT track points at (same options, format=jpg)."""
    return variant_url(target, replace(options, format=OutputFormat.JPG))
