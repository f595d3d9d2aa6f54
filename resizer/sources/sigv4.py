"""AWS Signature Version 4 for S3 requests: pure functions, no I/O, no AWS SDK.

https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html

The signature covers a *canonical request* built from the request as it goes on the
wire. S3 differs from other AWS services in one way that matters here: it does not
normalise or double-encode the path, so the canonical URI is the wire path with each
segment's percent-encoding made canonical (unreserved characters literal, everything else
``%XX`` in upper case). A store that re-encodes the decoded key (AWS) and one that takes
the wire path verbatim (moto, some S3-compatible stores) agree only when the wire path
already is in that form, which is why the S3 source sends ``canonical_uri(path)``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote_to_bytes

import httpx

ALGORITHM = "AWS4-HMAC-SHA256"
# Tells the store the body is not covered by the signature (allowed for S3 only).
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# SHA-256 of b"": the payload hash of every GET and HEAD.
EMPTY_PAYLOAD_SHA256 = hashlib.sha256(b"").hexdigest()

_DATE_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True, repr=False)
class Credentials:
    access_key_id: str
    secret_access_key: str
    # Only temporary (STS) credentials have one; it is sent as x-amz-security-token.
    session_token: str = ""

    def __repr__(self) -> str:
        # Credentials end up in logs and tracebacks through reprs; the key id is not a
        # secret (it appears in every Authorization header), the other two are.
        token = ", session_token='***'" if self.session_token else ""
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***'{token})"


def _uri_encode(raw: bytes) -> str:
    """RFC 3986 encoding as SigV4 wants it: unreserved bytes literal, the rest ``%XX``.

    ``quote``'s always-safe set is exactly the unreserved set (``A-Za-z0-9-._~``) and it
    writes upper-case hex, so with ``safe=""`` even ``/`` is encoded.
    """
    return quote(raw, safe="")


def canonical_uri(raw_path: bytes | str) -> str:
    """The S3 canonical URI of a wire path: each segment decoded once and re-encoded.

    Splitting happens before decoding, so an encoded slash (``%2F``) stays inside its
    segment; decoding works on bytes, so a key that is not UTF-8 survives unchanged.
    """
    if isinstance(raw_path, str):
        raw_path = raw_path.encode("ascii")
    path = raw_path.split(b"?", 1)[0]
    if not path:
        return "/"
    return "/".join(_uri_encode(unquote_to_bytes(segment)) for segment in path.split(b"/"))


def canonical_query(raw_query: bytes | str) -> str:
    """The canonical query string: pairs encoded, then sorted by name and then by value.

    ``+`` is read as a space, as in HTML forms: that is how httpx's ``params=`` encodes
    spaces and how S3 decodes query parameters; a literal plus arrives as ``%2B``.
    """
    if isinstance(raw_query, str):
        raw_query = raw_query.encode("ascii")
    pairs = []
    for pair in raw_query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        pairs.append(
            (
                _uri_encode(unquote_to_bytes(name.replace(b"+", b" "))),
                _uri_encode(unquote_to_bytes(value.replace(b"+", b" "))),
            )
        )
    # Sorting the encoded strings sorts by code point, which is what SigV4 requires.
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _trim(value: str) -> str:
    """SigV4's Trimall: no leading or trailing spaces, runs of spaces collapsed to one."""
    return " ".join(value.split())


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _signing_key(secret_access_key: str, day: str, region: str, service: str) -> bytes:
    key = _hmac(f"AWS4{secret_access_key}".encode(), day)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def _signs_header(name: str) -> bool:
    # Besides the required host and x-amz-* headers (S3 rejects an unsigned x-amz-*
    # header), only Range: it changes which bytes the answer holds. Headers a proxy may
    # rewrite (User-Agent, Accept-Encoding, Connection) are left out on purpose.
    return name in ("host", "range") or name.startswith("x-amz-")


def sign_request(
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    *,
    credentials: Credentials,
    region: str,
    service: str = "s3",
    now: datetime,
    payload_hash: str = UNSIGNED_PAYLOAD,
) -> dict[str, str]:
    """The headers that authenticate this request: ``x-amz-date``, ``x-amz-content-sha256``,
    ``Authorization`` and, with temporary credentials, ``x-amz-security-token``.

    ``headers`` are the request's headers as they will be sent; ``Host`` must be among
    them when the port is not the scheme's default (httpx always adds it), else it is
    taken from ``url``. ``now`` must be timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    timestamp = now.astimezone(UTC).strftime(_DATE_FORMAT)
    day = timestamp[:8]
    added = {"x-amz-date": timestamp, "x-amz-content-sha256": payload_hash}
    if credentials.session_token:
        added["x-amz-security-token"] = credentials.session_token

    # Our values replace any the caller had under the same (case-insensitive) names.
    final = {name.lower(): value for name, value in headers.items()}
    final.pop("authorization", None)
    final.setdefault("host", url.netloc.decode("ascii"))
    final.update(added)
    signed = {name: _trim(value) for name, value in final.items() if _signs_header(name)}
    signed_names = ";".join(sorted(signed))

    canonical_request = "\n".join(
        [
            method.upper(),
            canonical_uri(url.raw_path),
            canonical_query(url.query),
            # Each canonical header line ends with "\n", hence the empty line after them.
            "".join(f"{name}:{signed[name]}\n" for name in sorted(signed)),
            signed_names,
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            timestamp,
            scope,
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        ]
    )
    key = _signing_key(credentials.secret_access_key, day, region, service)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    added["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )
    return added


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _payload_hash(request: httpx.Request) -> str:
    try:
        body = request.content
    except httpx.RequestNotRead:
        # A streaming body cannot be hashed without reading it; S3 accepts it unsigned.
        return UNSIGNED_PAYLOAD
    # Hashing a bodiless request is free and is accepted by every S3-compatible store,
    # some of which do not know UNSIGNED-PAYLOAD.
    return hashlib.sha256(body).hexdigest()


def make_signer(
    credentials: Credentials,
    region: str,
    service: str = "s3",
    clock: Callable[[], datetime] = _utc_now,
) -> Callable[[httpx.Request], None]:
    """A ``sign`` hook for HttpSource: adds the SigV4 headers to a built request in place.

    It must run on the final request (after every header is set), and the request must be
    sent soon after: S3 refuses signatures more than 15 minutes off its clock.
    """

    def sign(request: httpx.Request) -> None:
        request.headers.update(
            sign_request(
                request.method,
                request.url,
                request.headers,
                credentials=credentials,
                region=region,
                service=service,
                now=clock(),
                payload_hash=_payload_hash(request),
            )
        )

    return sign
