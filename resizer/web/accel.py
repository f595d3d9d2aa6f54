"""Hits sent by nginx: resizer decides them and answers with ``X-Accel-Redirect``.

Behind nginx (``[server] accel_redirect``, ``deploy/nginx.conf``) resizer still decides every
hit (key, freshness, preconditions, headers) but leaves its bytes to nginx: the answer is an
empty 200 naming the entry's data file under an ``internal`` nginx location that aliases the
disk cache's ``entries/`` folder, and nginx sends that file with sendfile.

What nginx 1.22 makes of such an answer (tests/test_nginx.py runs a real one):

- it keeps resizer's Content-Type, Cache-Control and Content-Disposition, and Accept-Ranges,
  which it also writes itself: resizer leaves that one out, or clients would get two. Other
  headers reach the client only as its configuration adds them back from ``$upstream_http_*``
  (ETag and Last-Modified replacing its own, which describe the file's mtime and size).
- it answers Range and If-Range itself, after those headers are in place: so resizer hands
  a planned 206 over as the whole entry and nginx cuts the same range resizer would have.
- it checks If-Match and If-Unmodified-Since too, but before those headers are in place,
  against its own validators (ETag off, the file's mtime): it would refuse (412) what resizer
  accepted. Hits carrying them are rare (resuming uses If-Range) and resizer sends them itself.
- with ``etag off`` and ``if_modified_since off`` it never answers 304 itself: resizer does,
  having nothing to offload. 412 and 416 stay resizer's too (its JSON errors, CORS headers).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..cache.base import EntryMeta
from ..cache.disk import DiskCacheStore

if TYPE_CHECKING:
    from ..pipeline import Service
    from .hits import HitPlan

# Headers nginx writes itself when it sends the file: they frame its bytes, not resizer's.
_FRAMING = frozenset({"content-length", "content-range", "accept-ranges"})
# Preconditions nginx checks again against its own validators of the file (see above).
_RECHECKED = ("if-match", "if-unmodified-since")


def redirect_target(prefix: str, entries: Path, data: Path) -> str:
    """The ``X-Accel-Redirect`` URI of ``data``, a file under the cache's ``entries`` folder,
    for an nginx location ``prefix`` that aliases that folder (nginx unquotes it)."""
    return prefix + quote(data.relative_to(entries).as_posix())


def offloadable(status: int, request_headers: Mapping[str, str]) -> bool:
    """Whether nginx may send a hit planned as ``status`` (200 or 206: it cuts the range
    itself); a 304 has nothing to send. ``request_headers`` has lower-case names."""
    return status in (200, 206) and not any(name in request_headers for name in _RECHECKED)


def redirect_headers(headers: Mapping[str, str], target: str) -> dict[str, str]:
    """The headers of the empty 200 that hands a hit with ``headers`` over to nginx."""
    redirect = {name: value for name, value in headers.items() if name.lower() not in _FRAMING}
    # nginx ignores a redirect's body: send none, framed as such.
    redirect["Content-Length"] = "0"
    redirect["X-Accel-Redirect"] = target
    return redirect


def accel_headers(
    service: Service, entry: EntryMeta, plan: HitPlan, request_headers: Mapping[str, str]
) -> dict[str, str] | None:
    """The headers that hand the hit ``plan`` of ``entry`` over to nginx, or None when
    resizer answers it itself (``accel_redirect`` off, or not ``offloadable``)."""
    prefix = service.config.server.accel_redirect
    store = service.cache
    if not prefix or not isinstance(store, DiskCacheStore):
        return None
    data = store.data_path(entry)
    if data is None or not offloadable(plan.status, request_headers):
        return None
    # entries/ is the folder deploy/nginx.conf aliases (the layout in cache/disk.py).
    return redirect_headers(plan.headers, redirect_target(prefix, store.root / "entries", data))
