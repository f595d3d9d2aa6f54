"""S3 source: objects in AWS S3 or any S3-compatible store (MinIO, Ceph, R2, moto...).

S3 is HTTP with a signature, so the transport is an HttpSource (HEAD for stat, ranged GET
fallback, size limits, timeouts, temp files) given a SigV4 ``sign`` hook; there is no AWS
SDK at runtime. Without credentials requests go unsigned, for public buckets.

A missing key answers 404 only when the credentials may also list the bucket
(``s3:ListBucket``); otherwise S3 says 403 to hide whether the key exists, and that
surfaces as OriginFailed (502) like every other refusal by the store.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import quote

import httpx

from ..units import MINUTES, SECONDS, MiB
from .base import LocalSource, SourceStat
from .http import HttpSource
from .security import AddressPolicy
from .sigv4 import Credentials, canonical_uri, make_signer

# Bucket names that can be a single DNS label under s3.<region>.amazonaws.com. Names with
# dots are valid too, but would not match the endpoint's wildcard TLS certificate.
_VIRTUAL_HOST_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_AWS_REGION_RE = re.compile(r"^[a-z0-9-]+$")


class _S3Http(HttpSource):
    """An HttpSource that sends object paths in SigV4's canonical encoding.

    ``join_url`` leaves RFC 3986 sub-delimiters such as ``+``, ``(`` or ``=`` literal.
    AWS re-encodes the key it decoded when checking a signature, but moto and some
    S3-compatible stores use the path exactly as it arrived, so a key with ``+`` would fail
    there unless the wire path already is the canonical one. (It also keeps ``+`` from
    ever being read as a space by a store with form-decoding habits.)
    """

    def url(self, path: str) -> httpx.URL:
        url = super().url(path)
        return url.copy_with(raw_path=canonical_uri(url.raw_path).encode("ascii"))


def _bucket_base_url(bucket: str, region: str, endpoint_url: str) -> str:
    if not bucket or "/" in bucket:
        raise ValueError(f"bucket {bucket!r} is not a valid bucket name")
    if endpoint_url:
        # Path style: S3-compatible stores rarely have per-bucket DNS names.
        return f"{endpoint_url.rstrip('/')}/{quote(bucket, safe='')}/"
    if not _AWS_REGION_RE.match(region):
        raise ValueError(f"region {region!r} is not a valid AWS region")
    if _VIRTUAL_HOST_BUCKET_RE.match(bucket):
        return f"https://{bucket}.s3.{region}.amazonaws.com/"
    return f"https://s3.{region}.amazonaws.com/{quote(bucket, safe='')}/"


class S3Source:
    """Objects of one bucket; the source path is the object key."""

    kind = "s3"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        spill_dir: Path,
        bucket: str,
        region: str,
        endpoint_url: str = "",
        credentials: Credentials | None,
        max_size: int = 256 * MiB,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5 * SECONDS,
        first_byte_timeout: float = 20 * SECONDS,
        total_timeout: float = 5 * MINUTES,
        idle_timeout: float = 30 * SECONDS,
        address_policy: AddressPolicy | None = None,
    ) -> None:
        if not region or "/" in region:
            # The region is part of the signature's credential scope, even for stores
            # that ignore it (MinIO accepts any, usually "us-east-1").
            raise ValueError(f"region {region!r} is not a valid region name")
        self.bucket = bucket
        self.region = region
        self._http = _S3Http(
            client,
            spill_dir=spill_dir,
            base_url=_bucket_base_url(bucket, region, endpoint_url),
            max_size=max_size,
            headers=headers,
            connect_timeout=connect_timeout,
            first_byte_timeout=first_byte_timeout,
            total_timeout=total_timeout,
            idle_timeout=idle_timeout,
            sign=make_signer(credentials, region) if credentials is not None else None,
            kind=self.kind,
            address_policy=address_policy,
        )

    def url(self, path: str) -> httpx.URL:
        """The object URL for key ``path``; raises SourceNotFound for ``..`` and the like."""
        return self._http.url(path)

    async def stat(self, path: str) -> SourceStat:
        return await self._http.stat(path)

    def open(self, path: str) -> AbstractAsyncContextManager[LocalSource]:
        return self._http.open(path)

    def open_range(
        self, path: str, start: int, stop: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._http.open_range(path, start, stop)


def credentials_from(
    config_access_key: str, config_secret: str, env: Mapping[str, str]
) -> Credentials | None:
    """The credentials to sign with: the configured pair, else the standard AWS_* variables,
    else None (anonymous requests, for public buckets).

    Half a pair is a mistake rather than a request for anonymity, so it raises ValueError.
    A session token is only taken from the environment together with the environment's
    key pair: it belongs to that key and would invalidate a configured one.
    """
    if config_access_key or config_secret:
        if not (config_access_key and config_secret):
            raise ValueError("both the access key id and the secret access key must be set")
        return Credentials(config_access_key, config_secret)
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    if access_key or secret:
        if not (access_key and secret):
            raise ValueError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set")
        return Credentials(access_key, secret, env.get("AWS_SESSION_TOKEN", ""))
    return None
