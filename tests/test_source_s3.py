"""The S3 source against moto's S3 server (a subprocess) that checks SigV4 signatures.

moto verifies signatures only once "IAM auth" is on: the first INITIAL_NO_AUTH_ACTION_COUNT
actions pass unchecked (infinitely many by default). Starting with 0 would leave no way to
create the first user, so the fixture sets everything up with auth off, then turns it on
with POST /moto-api/reset-auth "0" (the server-mode switch behind moto's
``set_initial_no_auth_action_count``) and checks that a bad signature is now refused.
With auth on, moto recomputes each signature with botocore from the request's raw path
and headers and applies the IAM policies of the key's user or assumed role.

boto3 (a dev dependency through moto) is used only in the sync fixture to set up the store.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from resizer.errors import OriginFailed, SourceNotFound
from resizer.sources.base import Source
from resizer.sources.http import make_http_client
from resizer.sources.s3 import S3Source, credentials_from
from resizer.sources.sigv4 import Credentials
from tests.media import ffmpeg_banner, make_test_video
from tests.moto import enforce_auth, running_moto
from tests.server import server_config, start_server

REGION = "us-east-1"
BUCKET = "media"
KEY = "clips/sample.mp4"
BODY = bytes(range(256)) * 24  # 6 KiB
# Space, non-ASCII, and sub-delimiters that join_url would otherwise leave literal.
ODD_KEY = "clips/été 2024/naïve clip (final)+v2 ✓.mp4"
ODD_BODY = b"odd key body " * 100
SETUP_CREDENTIALS = Credentials("AKIASETUPSETUPSETUP0", "setup-secret")
_S3_READ_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
    ],
}


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    # An IAM user's access key (AKIA...): no session token.
    user: Credentials
    # An assumed role's temporary credentials (ASIA...): signed with x-amz-security-token.
    role: Credentials


VIDEO_KEY = "clips/real.mp4"


def _small_video() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return make_test_video(Path(folder) / "v.mp4", 320, 240, seconds=2).read_bytes()


def _set_up_store(endpoint_url: str) -> MotoS3:
    """A user and a role allowed to read S3, a bucket and its objects (auth still off)."""
    import boto3  # type: ignore[import-untyped]

    def client(service: str, credentials: Credentials) -> Any:
        return boto3.session.Session(
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token or None,
            region_name=REGION,
        ).client(service, endpoint_url=endpoint_url)

    iam = client("iam", SETUP_CREDENTIALS)
    iam.create_user(UserName="resizer")
    iam.put_user_policy(
        UserName="resizer", PolicyName="read", PolicyDocument=json.dumps(_S3_READ_POLICY)
    )
    key = iam.create_access_key(UserName="resizer")["AccessKey"]
    user = Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": iam.get_user(UserName="resizer")["User"]["Arn"]},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    role_arn = iam.create_role(RoleName="reader", AssumeRolePolicyDocument=json.dumps(trust))[
        "Role"
    ]["Arn"]
    iam.put_role_policy(
        RoleName="reader", PolicyName="read", PolicyDocument=json.dumps(_S3_READ_POLICY)
    )
    assumed = client("sts", user).assume_role(RoleArn=role_arn, RoleSessionName="resizer")
    temporary = assumed["Credentials"]
    role = Credentials(
        temporary["AccessKeyId"], temporary["SecretAccessKey"], temporary["SessionToken"]
    )

    s3 = client("s3", SETUP_CREDENTIALS)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=ODD_BODY)
    s3.put_object(Bucket=BUCKET, Key=VIDEO_KEY, Body=_small_video())
    return MotoS3(endpoint_url, user, role)


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with running_moto(tmp_path_factory.mktemp("moto")) as endpoint_url:
        store = _set_up_store(endpoint_url)
        # SETUP_CREDENTIALS made the store; with auth on, moto knows no such key.
        enforce_auth(endpoint_url, f"{endpoint_url}/{BUCKET}/{KEY}", SETUP_CREDENTIALS, REGION)
        yield store


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client(connect_timeout=5) as client:
        yield client


def s3_source(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path, credentials: Credentials | None
) -> S3Source:
    return S3Source(
        client,
        spill_dir=spill,
        bucket=BUCKET,
        region=REGION,
        endpoint_url=moto_s3.endpoint_url,
        credentials=credentials,
        max_size=1024 * 1024,
        connect_timeout=5,
        first_byte_timeout=10,
        total_timeout=30,
    )


async def test_stat_returns_the_size(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """A signed HEAD is accepted and its Content-Length and Last-Modified become the stat."""
    stat = await s3_source(moto_s3, client, spill, moto_s3.user).stat(KEY)
    assert stat.size == len(BODY)
    assert stat.mtime > 0


async def test_open_downloads_the_exact_bytes_and_removes_the_temp_file(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """open() yields a local copy equal to the object, deleted when the block exits."""
    source: Source = s3_source(moto_s3, client, spill, moto_s3.user)
    assert source.kind == "s3"
    async with source.open(KEY) as local:
        assert local.size == len(BODY)
        assert local.path.parent == spill
        assert local.path.suffix == ".mp4"
        assert await trio.Path(local.path).read_bytes() == BODY
    assert not list(await trio.Path(spill).iterdir())


async def test_key_with_spaces_unicode_and_sub_delimiters(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """A key with spaces, non-ASCII, "(", ")" and "+" is addressed and signed correctly."""
    source = s3_source(moto_s3, client, spill, moto_s3.user)
    assert (await source.stat(ODD_KEY)).size == len(ODD_BODY)
    async with source.open(ODD_KEY) as local:
        assert await trio.Path(local.path).read_bytes() == ODD_BODY


async def test_temporary_credentials_sign_the_session_token(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """Assumed-role credentials work, and only with their own session token."""
    source = s3_source(moto_s3, client, spill, moto_s3.role)
    assert (await source.stat(KEY)).size == len(BODY)
    role_key, role_secret = moto_s3.role.access_key_id, moto_s3.role.secret_access_key
    # A wrong token is "InvalidToken", which AWS (and moto) answer with 400.
    forged = Credentials(role_key, role_secret, "forged")
    with pytest.raises(OriginFailed, match="answered 400"):
        await s3_source(moto_s3, client, spill, forged).stat(KEY)
    # Without its token a temporary key is unknown.
    with pytest.raises(OriginFailed, match="answered 403"):
        await s3_source(moto_s3, client, spill, Credentials(role_key, role_secret)).stat(KEY)


async def test_missing_key_is_source_not_found(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """A key that does not exist is a 404 (the user may list the bucket), for stat and open."""
    source = s3_source(moto_s3, client, spill, moto_s3.user)
    with pytest.raises(SourceNotFound):
        await source.stat("clips/missing.mp4")
    with pytest.raises(SourceNotFound):
        async with source.open("clips/missing.mp4"):
            pass
    assert not list(await trio.Path(spill).iterdir())


async def test_wrong_secret_is_origin_failed_and_not_leaked(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """A bad signature is refused by the store (403) and surfaces as a 502 naming the key only."""
    wrong = Credentials(moto_s3.user.access_key_id, "not-the-secret-access-key")
    source = s3_source(moto_s3, client, spill, wrong)
    with pytest.raises(OriginFailed, match="403") as stat_error:
        await source.stat(KEY)
    with pytest.raises(OriginFailed, match="403") as open_error:
        async with source.open(KEY):
            pass
    for error in (stat_error.value, open_error.value):
        assert error.status == 502
        assert KEY in error.message
        for secret in (wrong.secret_access_key, wrong.access_key_id, moto_s3.endpoint_url):
            assert secret not in error.message
    assert not list(await trio.Path(spill).iterdir())


async def test_unknown_access_key_is_origin_failed(
    moto_s3: MotoS3, client: httpx.AsyncClient, spill: Path
) -> None:
    """An access key the store does not know is refused as well."""
    with pytest.raises(OriginFailed, match="403"):
        await s3_source(moto_s3, client, spill, SETUP_CREDENTIALS).stat(KEY)


@pytest.mark.parametrize(
    "key",
    ["../other-bucket/secret.mp4", "clips/../../x.mp4", "%2e%2e/x.mp4", "..", "a/%252e%252e/b"],
)
async def test_dot_dot_keys_are_refused_without_a_request(spill: Path, key: str) -> None:
    """Keys that would climb out of the bucket are SourceNotFound before anything is sent."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
        source = S3Source(
            client,
            spill_dir=spill,
            bucket=BUCKET,
            region=REGION,
            endpoint_url="http://127.0.0.1:9",
            credentials=Credentials("AKIDEXAMPLE", "secret"),
        )
        with pytest.raises(SourceNotFound):
            await source.stat(key)
        with pytest.raises(SourceNotFound):
            async with source.open(key):
                pass
    assert sent == []


async def test_requests_are_signed_only_with_credentials(spill: Path) -> None:
    """With credentials every request carries SigV4 headers; anonymous ones carry none."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, headers={"Content-Length": "3"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
        for credentials in (Credentials("AKIDEXAMPLE", "secret", "token"), None):
            source = S3Source(
                client, spill_dir=spill, bucket="media", region="eu-west-1", credentials=credentials
            )
            await source.stat("a b.mp4")
    signed, anonymous = sent
    assert str(signed.url) == "https://media.s3.eu-west-1.amazonaws.com/a%20b.mp4"
    assert signed.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/s3/aws4_request, " in signed.headers["Authorization"]
    assert signed.headers["x-amz-security-token"] == "token"
    assert "authorization" not in anonymous.headers
    assert "x-amz-date" not in anonymous.headers


def test_object_urls(spill: Path) -> None:
    """Virtual-hosted on AWS, path-style on an endpoint or for dotted bucket names."""

    def url(
        key: str, bucket: str = "media", region: str = "eu-west-1", endpoint_url: str = ""
    ) -> str:
        source = S3Source(
            httpx.AsyncClient(),
            spill_dir=spill,
            bucket=bucket,
            region=region,
            endpoint_url=endpoint_url,
            credentials=None,
        )
        return str(source.url(key))

    assert url("a/b.mp4") == "https://media.s3.eu-west-1.amazonaws.com/a/b.mp4"
    assert url("a.mp4", bucket="my.bucket") == "https://s3.eu-west-1.amazonaws.com/my.bucket/a.mp4"
    assert url("a.mp4", endpoint_url="http://minio:9000") == "http://minio:9000/media/a.mp4"
    assert url("a.mp4", endpoint_url="http://minio:9000/s3/") == "http://minio:9000/s3/media/a.mp4"
    # Sent in SigV4's canonical encoding, so stores that sign the raw path agree.
    assert url("x (1)+y é.mp4") == (
        "https://media.s3.eu-west-1.amazonaws.com/x%20%281%29%2By%20%C3%A9.mp4"
    )
    # Something that looks like another host or a query stays a key in this bucket.
    assert url("http://evil.example/x?y=1#z") == (
        "https://media.s3.eu-west-1.amazonaws.com/http%3A/evil.example/x%3Fy%3D1%23z"
    )
    for bucket, region in [("", "eu-west-1"), ("a/b", "eu-west-1"), ("media", ""), ("media", "EU")]:
        with pytest.raises(ValueError, match="not a valid"):
            url("a.mp4", bucket=bucket, region=region)


def test_credentials_from_config_then_environment() -> None:
    """Configured keys win, then AWS_* variables (with a session token), else anonymous."""
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDENV",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-token",
    }
    assert credentials_from("AKIDCONF", "conf-secret", env) == Credentials(
        "AKIDCONF", "conf-secret"
    )
    assert credentials_from("", "", env) == Credentials("AKIDENV", "env-secret", "env-token")
    assert credentials_from("", "", {}) is None
    with pytest.raises(ValueError, match="both"):
        credentials_from("AKIDCONF", "", env)
    with pytest.raises(ValueError, match="both"):
        credentials_from("", "", {"AWS_ACCESS_KEY_ID": "AKIDENV"})


async def test_the_server_transforms_a_video_from_s3(
    moto_s3: MotoS3, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """End to end: an [[origins]] with an s3 source (signed requests) serves a resized video."""
    extra = f"""
[[origins]]
name = "bucket"
matcher = "^/s3/(?P<path>.+)$"
[[origins.sources]]
type = "s3"
bucket = "{BUCKET}"
region = "{REGION}"
endpoint_url = "{moto_s3.endpoint_url}"
access_key_id = "{moto_s3.user.access_key_id}"
secret_access_key = "{moto_s3.user.secret_access_key}"
"""
    server = await start_server(nursery, server_config(tmp_path, tmp_path / "cache", extra))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.get(f"/s3/{VIDEO_KEY}", params={"width": "160"})
        missing = await http.get("/s3/clips/none.mp4", params={"width": "160"})
    assert response.status_code == 200, response.text
    assert (response.headers["X-Origin"], response.headers["X-Source"]) == ("bucket", "s3")
    assert "160x120" in describe(response.content, tmp_path)
    assert missing.status_code == 404


def describe(data: bytes, tmp_path: Path) -> str:
    target = tmp_path / "out.mp4"
    target.write_bytes(data)
    return ffmpeg_banner(target)
