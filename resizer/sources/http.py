"""HTTP(S) source: downloads a remote object into a local temp file ffmpeg can seek in.

Every timeout except connect (and the wait for a pooled connection) is a trio cancel scope
rather than an httpx timeout: httpx's read timeout would also cut the wait for the headers,
which has its own bound. The first-byte and total timeouts bound an exchange as a whole (a
server trickling one byte a minute cannot stretch them); the idle timeout bounds each read of
a body, so a stalled origin frees its connection even when nothing else bounds the read
(ranges streamed to ffmpeg have no total timeout). Error messages may reach clients, so they
name the requested path, never the (internal) origin URL.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote

import httpx
import trio

from .. import __version__
from ..errors import (
    Forbidden,
    OriginFailed,
    OriginTimeout,
    ServiceUnavailable,
    SourceNotFound,
    SourceTooLarge,
)
from ..targets import host_allowed
from ..units import MINUTES, SECONDS, KiB, MiB
from .base import LocalSource, SourceStat
from .security import AddressPolicy

# Cleanup must finish even when the download was cancelled, but never hang a shutdown.
_CLEANUP_TIMEOUT = 5 * SECONDS
# Bounds the memory each download holds and the number of thread hops for file writes.
_CHUNK_SIZE = 256 * KiB
_RANGE_CHUNK_SIZE = 32 * KiB
# Characters RFC 3986 allows unescaped in a path segment ("/" is excluded: it separates).
_SEGMENT_SAFE = "!$&'()*+,;=:@"
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+|\*)\s*$", re.IGNORECASE)
MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Kept on the temp file so ffmpeg's format probing gets the same hint as for local files.
_SUFFIX_RE = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


def _timeout(connect_timeout: float) -> httpx.Timeout:
    # A full pool (every connection busy) fails as fast as an unreachable origin, rather
    # than queueing each request until its first-byte timeout.
    return httpx.Timeout(None, connect=connect_timeout, pool=connect_timeout)


def make_http_client(connect_timeout: float) -> httpx.AsyncClient:
    """The shared client for all HTTP sources (one connection pool per process)."""
    return httpx.AsyncClient(
        # httpx's HTTP/2 never resets a stream upstream when the reader stops, so an
        # abandoned download would keep flowing into the connection; HTTP/1.1 just closes.
        http1=True,
        http2=False,
        # Redirects could point anywhere (internal hosts); an allow-list comes later.
        follow_redirects=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        # Only connect and pool are httpx timeouts; the rest are cancel scopes in HttpSource.
        timeout=_timeout(connect_timeout),
        headers={"User-Agent": f"resizer/{__version__}"},
    )


def _parse_base(base_url: str) -> httpx.URL:
    try:
        base = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"base_url {base_url!r} is not a valid URL") from exc
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError(f"base_url {base_url!r} must be an absolute http(s) URL")
    if base.query or base.fragment:
        raise ValueError(f"base_url {base_url!r} must not have a query or fragment")
    # Without the trailing slash, "media" + "a.mp4" would make "mediaa.mp4".
    if not base.path.endswith("/"):
        base = base.copy_with(path=base.path + "/")
    return base


def join_url(base: httpx.URL, relative: str) -> httpx.URL:
    """``base`` with ``relative`` appended as path segments, never leaving ``base``'s prefix.

    Like the filesystem's ``safe_join``: ``relative`` is decoded until stable (``%2e%2e`` and
    ``%252e%252e`` are ``..``), ``..`` and NUL are refused with SourceNotFound, and each
    segment is re-quoted, so ``?``, ``#``, ``:`` or ``//`` in it cannot start a query, a
    fragment, a scheme or an authority: "http://evil.com/x" becomes a path under ``base``.
    """
    decoded = relative
    for _ in range(4):
        again = unquote(decoded)
        if again == decoded:
            break
        decoded = again
    else:
        raise SourceNotFound(f"{relative!r} is not a valid source path")
    parts = [part for part in decoded.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or "\x00" in decoded or ".." in parts:
        raise SourceNotFound(f"{relative!r} is not a valid source path")
    quoted = "/".join(quote(part, safe=_SEGMENT_SAFE) for part in parts)
    url = base.copy_with(raw_path=base.raw_path + quoted.encode("ascii"))
    # Belt and braces: whatever the quoting missed, the result must stay under the base.
    if url.netloc != base.netloc or not url.raw_path.startswith(base.raw_path) or url.query:
        raise SourceNotFound(f"{relative!r} is not a valid source path")
    return url


def _absolute_url(path: str) -> httpx.URL:
    try:
        url = httpx.URL(path)
    except httpx.InvalidURL as exc:
        raise Forbidden(f"{path!r} is not a valid http(s) URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise Forbidden(f"{path!r} is not an absolute http(s) URL")
    return url


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _range_total(response: httpx.Response) -> int | None:
    """The complete size from ``Content-Range: bytes 0-0/<total>`` (or ``bytes */<total>``)."""
    found = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
    if found is None or found[1] == "*":
        return None
    return int(found[1])


def _last_modified(response: httpx.Response) -> float:
    value = response.headers.get("Last-Modified")
    if not value:
        return 0.0
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0


class _IdleBoundedStream(httpx.AsyncByteStream):
    """A response body whose reads fail with OriginTimeout after ``timeout`` s without a byte."""

    def __init__(self, inner: httpx.AsyncByteStream, timeout: float, path: str) -> None:
        self._inner = inner
        self._timeout = timeout
        self._path = path

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._inner)
        while True:
            try:
                with trio.fail_after(self._timeout):
                    chunk = await anext(chunks, None)
            except trio.TooSlowError as exc:
                raise OriginTimeout(
                    f"origin sent nothing for {self._path!r} for {self._timeout:g} s"
                ) from exc
            if chunk is None:
                return
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


RequestSigner = Callable[[httpx.Request], None]


class HttpSource:
    """An origin spoken to over HTTP; also the transport of the S3 source (``sign``)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        spill_dir: Path,
        base_url: str = "",
        max_size: int = 256 * MiB,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5 * SECONDS,
        first_byte_timeout: float = 20 * SECONDS,
        total_timeout: float = 5 * MINUTES,
        idle_timeout: float = 30 * SECONDS,
        sign: RequestSigner | None = None,
        kind: str = "http",
        address_policy: AddressPolicy | None = None,
        redirect_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self.kind = kind  # reported in X-Source
        self.client = client
        self.spill_dir = spill_dir
        self.base = _parse_base(base_url) if base_url else None
        self.max_size = max_size
        # Video is already compressed: asking for identity keeps Content-Length equal to the
        # bytes that land on disk and spares decompression. Configured headers may override.
        self.headers = {"Accept-Encoding": "identity", **(headers or {})}
        self.first_byte_timeout = first_byte_timeout
        self.total_timeout = total_timeout
        self.idle_timeout = idle_timeout
        # Per request, so a client built with other settings still honours this source's.
        self._timeout = _timeout(connect_timeout)
        # Adds authentication computed from the final request (e.g. AWS SigV4) just before
        # it is sent; it may set headers, never change the URL.
        self._sign = sign
        # Every connection (first request and each redirect) is checked against it.
        self.address_policy = address_policy
        # Redirects are followed (at most MAX_REDIRECTS) only to these hosts.
        self.redirect_hosts = redirect_hosts

    def url(self, path: str) -> httpx.URL:
        """The URL ``path`` names: under ``base_url``, or ``path`` itself when there is none."""
        return join_url(self.base, path) if self.base is not None else _absolute_url(path)

    async def stat(self, path: str) -> SourceStat:
        url = self.url(path)
        async with self._exchange("HEAD", url, path) as response:
            pass
        if response.status_code in (405, 501):
            # Some origins (presigned GET URLs, minimal servers) refuse HEAD; a one-byte
            # range read answers the same questions. The body is never read.
            async with self._exchange("GET", url, path, {"Range": "bytes=0-0"}) as response:
                pass
            if response.status_code == 416:
                # Only an empty object has no byte 0; Content-Range then says "bytes */0".
                total = _range_total(response)
                if total is not None:
                    return SourceStat(size=total, mtime=_last_modified(response))
        self._check_status(response, path)
        # A 206 is the one-byte range answer: its Content-Length is 1, the total is elsewhere.
        partial = response.status_code == 206
        size = _range_total(response) if partial else _content_length(response)
        if size is not None and size > self.max_size:
            raise SourceTooLarge(f"{path!r} is {size} bytes, over the {self.max_size} limit")
        ranges = partial or response.headers.get("Accept-Ranges", "").lower() == "bytes"
        return SourceStat(size=size or 0, mtime=_last_modified(response), ranges=ranges)

    @asynccontextmanager
    async def open(self, path: str) -> AsyncIterator[LocalSource]:
        url = self.url(path)
        suffix = PurePosixPath(url.path).suffix
        spill = (
            self.spill_dir / f"http-{uuid.uuid4().hex}{suffix if _SUFFIX_RE.match(suffix) else ''}"
        )
        try:
            size = await self._download(url, path, spill)
            yield LocalSource(path=spill, size=size)
        finally:
            # Shielded: a cancelled download must still not leave a partial file behind.
            with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                await trio.Path(spill).unlink(missing_ok=True)

    @asynccontextmanager
    async def open_range(
        self, path: str, start: int, stop: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Bytes ``start`` to ``stop`` (exclusive) of the object, streamed as they arrive.

        For readers that seek (ffmpeg taking a frame near the end of a large file): only the
        requested span crosses the network. The first-byte and idle timeouts apply; the total
        one is the caller's (a reader may stop early, which closes the connection).
        """
        url = self.url(path)
        headers = {"Range": f"bytes={start}-{stop - 1}"}
        async with self._exchange("GET", url, path, headers) as response:
            self._check_status(response, path)
            if response.status_code != 206:
                raise OriginFailed(f"origin ignored a range request for {path!r}")
            # Small reads: a seeking reader drops the rest, so read little ahead of it.
            yield response.aiter_bytes(_RANGE_CHUNK_SIZE)

    async def _download(self, url: httpx.URL, path: str, spill: Path) -> int:
        try:
            with trio.fail_after(self.total_timeout):
                async with self._exchange("GET", url, path) as response:
                    self._check_status(response, path)
                    if response.status_code not in (200, 203):
                        raise OriginFailed(
                            f"origin answered {response.status_code} for {path!r}, expected 200"
                        )
                    announced = _content_length(response)
                    if announced is not None and announced > self.max_size:
                        raise SourceTooLarge(
                            f"{path!r} is {announced} bytes, over the {self.max_size} limit"
                        )
                    size = 0
                    async with await trio.open_file(spill, "xb") as file:
                        async for chunk in response.aiter_bytes(_CHUNK_SIZE):
                            # Counted as it arrives: Content-Length may be absent or a lie.
                            # Leaving early leaves httpx's inner async generators to the GC,
                            # which trio reports as a ResourceWarning (encode/httpx#3686);
                            # harmless, the exchange's aclose() has dropped the connection.
                            size += len(chunk)
                            if size > self.max_size:
                                raise SourceTooLarge(
                                    f"{path!r} is over the {self.max_size} byte limit"
                                )
                            await file.write(chunk)
                    return size
        except trio.TooSlowError as exc:
            raise OriginTimeout(f"downloading {path!r} took over {self.total_timeout:g} s") from exc

    @asynccontextmanager
    async def _exchange(
        self, method: str, url: httpx.URL, path: str, extra: Mapping[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and yield the response once its headers are in; body unread.

        Every read of the body fails with OriginTimeout after ``idle_timeout`` without a byte.
        httpx errors raised while the caller reads the body come back through the ``yield``
        and are translated here too, so callers only ever see ResizerErrors.
        """
        try:
            response = await self._send_following_redirects(method, url, path, extra)
            assert isinstance(response.stream, httpx.AsyncByteStream)  # an AsyncClient's
            # Wrapping the stream itself times each network read, whatever chunking the
            # caller asks of aiter_bytes (a 256 KiB chunk may take many reads to fill).
            response.stream = _IdleBoundedStream(response.stream, self.idle_timeout, path)
            try:
                yield response
            finally:
                # Closing an unfinished HTTP/1.1 body drops the connection: quick, but it
                # must happen even when cancelled, or the pool slot leaks.
                with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                    await response.aclose()
        except httpx.PoolTimeout as exc:
            # Every pooled connection is busy: this process is overloaded, not the origin
            # (so no breaker counts it, and no other source would fare better).
            raise ServiceUnavailable(
                f"no free origin connection for {path!r}; retry later"
            ) from exc
        except httpx.TimeoutException as exc:
            raise OriginTimeout(f"origin timed out for {path!r}") from exc
        except httpx.HTTPError as exc:
            raise OriginFailed(f"origin failed for {path!r}: {type(exc).__name__}") from exc

    async def _send_following_redirects(
        self, method: str, url: httpx.URL, path: str, extra: Mapping[str, str] | None
    ) -> httpx.Response:
        """The response, after at most MAX_REDIRECTS redirects to allowed hosts."""
        for hops in range(MAX_REDIRECTS + 1):
            if self.address_policy is not None:
                await self.address_policy.check(url.host, url.port or _default_port(url))
            request = self.client.build_request(
                method, url, headers={**self.headers, **(extra or {})}, timeout=self._timeout
            )
            if self._sign is not None:
                self._sign(request)
            try:
                with trio.fail_after(self.first_byte_timeout):
                    response = await self.client.send(request, stream=True)
            except trio.TooSlowError as exc:
                raise OriginTimeout(
                    f"origin sent no response for {path!r} within {self.first_byte_timeout:g} s"
                ) from exc
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECT_STATUSES or not location:
                return response
            with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                await response.aclose()
            if hops == MAX_REDIRECTS:
                break
            target = url.join(location)
            if target.scheme not in ("http", "https") or not host_allowed(
                self.redirect_hosts, target.host, target.port or _default_port(target)
            ):
                raise OriginFailed(f"origin redirected {path!r} to a host that is not allowed")
            if response.status_code == 303:
                method = "GET" if method != "HEAD" else method
            url = target
        raise OriginFailed(f"origin redirected {path!r} more than {MAX_REDIRECTS} times")

    @staticmethod
    def _check_status(response: httpx.Response, path: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (404, 410):
            raise SourceNotFound(f"no source at {path!r}")
        if 300 <= status < 400:
            raise OriginFailed(f"origin answered {status} for {path!r} (not a followed redirect)")
        raise OriginFailed(f"origin answered {status} for {path!r}")
