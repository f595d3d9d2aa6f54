"""AWS Signature Version 4: AWS's documented example, botocore as a reference, properties.

botocore is a dev dependency only (moto pulls it in), so it is imported inside the tests
that use it; resizer itself never imports it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from unittest import mock
from urllib.parse import quote, unquote_to_bytes

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resizer.sources.sigv4 import (
    EMPTY_PAYLOAD_SHA256,
    UNSIGNED_PAYLOAD,
    Credentials,
    canonical_query,
    canonical_uri,
    make_signer,
    sign_request,
)

# The example of https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
AWS_EXAMPLE_CREDENTIALS = Credentials(
    "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
)
AWS_EXAMPLE_TIME = datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 9, 17, 45, 12, tzinfo=UTC)
AUTHORIZATION_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<day>\d{8})/(?P<region>[a-z0-9-]+)"
    r"/s3/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)
# What the canonical forms may contain: unreserved characters and %XX escapes.
CANONICAL_SEGMENT_RE = re.compile(r"^(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})*$")


def test_aws_documented_get_object_example() -> None:
    """The GET Object example with a Range header from the AWS docs signs to its signature."""
    added = sign_request(
        "GET",
        httpx.URL("https://examplebucket.s3.amazonaws.com/test.txt"),
        {"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9"},
        credentials=AWS_EXAMPLE_CREDENTIALS,
        region="us-east-1",
        now=AWS_EXAMPLE_TIME,
        payload_hash=EMPTY_PAYLOAD_SHA256,
    )
    assert added == {
        "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": EMPTY_PAYLOAD_SHA256,
        "Authorization": (
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
            "aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        ),
    }


def _botocore_authorization(
    method: str,
    url: str,
    headers: dict[str, str],
    credentials: Credentials,
    region: str,
    params: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers botocore's S3 signer adds to the same request at ``NOW``."""
    from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import (  # type: ignore[import-untyped]
        Credentials as BotoCredentials,
    )

    boto_credentials = BotoCredentials(
        credentials.access_key_id, credentials.secret_access_key, credentials.session_token
    )
    request: Any = AWSRequest(method=method, url=url, headers=headers, params=params or {})
    # botocore reads the clock itself; it expects a naive UTC datetime.
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        S3SigV4Auth(boto_credentials, "s3", region).add_auth(request)
    return {name: str(value) for name, value in request.headers.items()}


# Each case: our wire URL, botocore's wire URL (botocore signs its path verbatim, quoted
# the way its serializer quotes keys), the query as params for both, extra headers.
BOTOCORE_CASES = [
    pytest.param(
        "https://media.s3.eu-west-1.amazonaws.com/plain/clip.mp4",
        "https://media.s3.eu-west-1.amazonaws.com/plain/clip.mp4",
        {},
        {},
        id="plain",
    ),
    pytest.param(
        # httpx's quoting: space as %20, "+" and "(" literal, lower-case hex.
        "https://media.s3.eu-west-1.amazonaws.com/a%20b+c(1)/caf%c3%a9.mp4",
        "https://media.s3.eu-west-1.amazonaws.com/" + quote("a b+c(1)/café.mp4", safe="/~"),
        {},
        {"Range": "bytes=0-0"},
        id="space-plus-unicode-range",
    ),
    pytest.param(
        "https://media.s3.eu-west-1.amazonaws.com/~user/%7Etilde%2Fslash.mp4",
        "https://media.s3.eu-west-1.amazonaws.com/~user/~tilde%2Fslash.mp4",
        {},
        {},
        id="tilde-and-encoded-slash",
    ),
    pytest.param(
        "http://127.0.0.1:9000/bucket/dir/%E2%9C%93 check.mp4",
        "http://127.0.0.1:9000/bucket/" + quote("dir/✓ check.mp4", safe="/~"),
        {},
        {},
        id="custom-endpoint-port",
    ),
    pytest.param(
        "https://media.s3.eu-west-1.amazonaws.com/",
        "https://media.s3.eu-west-1.amazonaws.com/",
        {"list-type": "2", "prefix": "a b+c/é", "delimiter": "/", "max-keys": "10"},
        {},
        id="query-string",
    ),
    pytest.param(
        "https://media.s3.eu-west-1.amazonaws.com/clip.mp4",
        "https://media.s3.eu-west-1.amazonaws.com/clip.mp4",
        {"versionId": "3/L4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo"},
        {"x-amz-request-payer": "requester", "Range": "bytes=10-  20"},
        id="query-and-x-amz-header",
    ),
]


@pytest.mark.parametrize(("ours", "theirs", "params", "headers"), BOTOCORE_CASES)
@pytest.mark.parametrize("session_token", ["", "FQoGZXIvYXdzE//token+with/slashes="])
def test_signature_matches_botocore(
    ours: str, theirs: str, params: dict[str, str], headers: dict[str, str], session_token: str
) -> None:
    """For awkward keys, queries, ports and temporary credentials we sign as botocore does."""
    credentials = Credentials(
        "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", session_token
    )
    # httpx encodes params as a form does (space as "+"), botocore as %20: both must work.
    url = httpx.URL(ours, params=params) if params else httpx.URL(ours)
    request = httpx.Request("GET", url, headers=headers)
    make_signer(credentials, "eu-west-1", clock=lambda: NOW)(request)

    expected = _botocore_authorization(
        "GET",
        theirs,
        {**headers, "Host": request.headers["host"]},
        credentials,
        "eu-west-1",
        params,
    )
    assert request.headers["Authorization"] == expected["Authorization"]
    assert request.headers["x-amz-date"] == expected["X-Amz-Date"]
    assert request.headers["x-amz-content-sha256"] == expected["X-Amz-Content-SHA256"]
    if session_token:
        assert request.headers["x-amz-security-token"] == session_token
        assert "x-amz-security-token" in request.headers["Authorization"]
    else:
        assert "x-amz-security-token" not in request.headers


def test_host_includes_a_non_default_port_only() -> None:
    """The signed Host has the port when it is not the scheme's default, like on the wire."""
    credentials = Credentials("AKIDEXAMPLE", "secret")
    for url, host in [
        ("http://127.0.0.1:9000/b/k", "127.0.0.1:9000"),
        ("https://s3.example.com:443/b/k", "s3.example.com"),
        ("http://s3.example.com:80/b/k", "s3.example.com"),
    ]:
        request = httpx.Request("GET", url)
        assert request.headers["host"] == host
        make_signer(credentials, "us-east-1", clock=lambda: NOW)(request)
        # Without a Host header the URL gives the same value, so the signature agrees.
        bare = sign_request(
            "GET",
            httpx.URL(url),
            {},
            credentials=credentials,
            region="us-east-1",
            now=NOW,
            payload_hash=EMPTY_PAYLOAD_SHA256,
        )
        assert bare["Authorization"] == request.headers["Authorization"]


def test_canonical_forms() -> None:
    """Paths and queries are decoded once and re-encoded: unreserved literal, rest %XX."""
    assert canonical_uri(b"") == "/"
    assert canonical_uri(b"/") == "/"
    assert canonical_uri(b"/a%20b+c/%7e%c3%a9%2f!?x=1") == "/a%20b%2Bc/~%C3%A9%2F%21"
    # Not UTF-8 and already encoded twice: neither decoded further nor mangled.
    assert canonical_uri(b"/%FF%252F") == "/%FF%252F"
    assert canonical_query(b"b=2&a=&a=1&c&&x+y=%2b") == "a=&a=1&b=2&c=&x%20y=%2B"


def test_signer_hashes_the_body_it_can_see() -> None:
    """Bodiless requests sign the empty hash; a body is hashed; a stream is UNSIGNED."""
    signer = make_signer(Credentials("AKIDEXAMPLE", "secret"), "us-east-1", clock=lambda: NOW)
    bodiless = httpx.Request("HEAD", "https://b.s3.amazonaws.com/k")
    signer(bodiless)
    assert bodiless.headers["x-amz-content-sha256"] == EMPTY_PAYLOAD_SHA256
    with_body = httpx.Request("PUT", "https://b.s3.amazonaws.com/k", content=b"abc")
    signer(with_body)
    assert with_body.headers["x-amz-content-sha256"] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )

    async def chunks() -> Any:
        yield b"abc"

    streamed = httpx.Request("PUT", "https://b.s3.amazonaws.com/k", content=chunks())
    signer(streamed)
    assert streamed.headers["x-amz-content-sha256"] == UNSIGNED_PAYLOAD


def test_time_is_converted_to_utc_and_naive_time_is_refused() -> None:
    """x-amz-date is UTC whatever the clock's zone; a naive datetime is ambiguous."""
    url = httpx.URL("https://b.s3.amazonaws.com/k")
    credentials = Credentials("AKIDEXAMPLE", "secret")
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    signed = sign_request("GET", url, {}, credentials=credentials, region="eu-west-3", now=paris)
    assert signed["x-amz-date"] == "20240309T174512Z"
    with pytest.raises(ValueError, match="timezone"):
        sign_request(
            "GET",
            url,
            {},
            credentials=credentials,
            region="eu-west-3",
            now=NOW.replace(tzinfo=None),
        )


def test_credentials_repr_hides_the_secrets() -> None:
    """Secret key and session token never appear in a repr (logs, tracebacks)."""
    credentials = Credentials("AKIDEXAMPLE", "very-secret-key", "session-token-value")
    assert "very-secret-key" not in repr(credentials)
    assert "session-token-value" not in str(credentials)
    assert "AKIDEXAMPLE" in repr(credentials)


# Keys as S3 allows them: any Unicode except surrogates (not encodable as UTF-8).
# Keys as sources can name them: join_url drops "." segments and refuses "..", so no signed
# path has one (httpx would also normalise them away, unlike botocore).
keys = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40).filter(
    lambda key: not key.startswith("/") and not {".", ".."} & set(key.split("/"))
)


@given(key=keys, secret=st.text(min_size=1, max_size=40), range_end=st.integers(0, 10**9))
def test_authorization_is_well_formed_and_deterministic(
    key: str, secret: str, range_end: int
) -> None:
    """For any key and secret the header parses, names its scope, and signing is repeatable."""
    url = httpx.URL("https://bucket.s3.eu-central-1.amazonaws.com/").copy_with(
        raw_path=b"/" + quote(key, safe="/").encode("ascii")
    )
    credentials = Credentials("AKIDEXAMPLE", secret)

    def sign() -> dict[str, str]:
        return sign_request(
            "GET",
            url,
            {"Range": f"bytes=0-{range_end}"},
            credentials=credentials,
            region="eu-central-1",
            now=NOW,
        )

    first = sign()
    assert first == sign()
    found = AUTHORIZATION_RE.match(first["Authorization"])
    assert found is not None
    assert (found["key"], found["day"], found["region"]) == (
        "AKIDEXAMPLE",
        "20240309",
        "eu-central-1",
    )
    assert found["signed"] == "host;range;x-amz-content-sha256;x-amz-date"
    # The canonical path keeps the key's bytes and is its own canonical form.
    canonical = canonical_uri(url.raw_path)
    assert unquote_to_bytes(canonical) == url.path.encode("utf-8")
    assert canonical_uri(canonical) == canonical
    assert all(CANONICAL_SEGMENT_RE.match(segment) for segment in canonical.split("/"))


@settings(max_examples=100)
@given(key=keys, secret=st.text(min_size=1, max_size=40))
def test_random_keys_sign_as_botocore_does(key: str, secret: str) -> None:
    """For any key, the signature equals botocore's for the same (canonically quoted) path."""
    wire = "https://bucket.s3.eu-central-1.amazonaws.com/" + quote(key, safe="/~")
    credentials = Credentials("AKIDEXAMPLE", secret)
    request = httpx.Request("GET", wire)
    make_signer(credentials, "eu-central-1", clock=lambda: NOW)(request)
    expected = _botocore_authorization(
        "GET", wire, {"Host": request.headers["host"]}, credentials, "eu-central-1"
    )
    assert request.headers["Authorization"] == expected["Authorization"]
