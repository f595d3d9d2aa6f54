"""The shared store's S3 adapter: ``ObjectBackend`` over S3's REST API with httpx.

Requests are signed with the project's own SigV4 (``sources.sigv4``); there is no AWS SDK.
Part uploads send their sha256 as ``x-amz-content-sha256`` (the hash the manifest records
anyway), so the store checks each part's body as it arrives. Every httpx error and every
error answer is translated here into a ``SharedStoreError`` leaf.
"""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

import httpx
import trio

from ..config import ClusterS3Config
from ..sources.http import make_http_client
from ..sources.s3 import _bucket_base_url, credentials_from
from ..sources.sigv4 import EMPTY_PAYLOAD_SHA256, Credentials, canonical_uri, sign_request
from .store import (
    ObjectStore,
    SharedEntryGone,
    SharedStoreCorrupt,
    SharedStoreError,
    SharedStoreTimeout,
)

# DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000


def _strip_ns(root: ET.Element) -> None:
    for element in root.iter():
        element.tag = element.tag.rsplit("}", 1)[-1]


def _parse_xml(body: bytes, what: str) -> ET.Element:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise SharedStoreError(f"{what}: the store answered malformed XML") from exc
    _strip_ns(root)
    return root


def _xml_error(body: bytes) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    _strip_ns(root)
    return root.findtext("Code") or ""


class S3Backend:
    """Objects of one bucket; names are object keys. An ``ObjectBackend``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        bucket: str,
        region: str,
        endpoint_url: str = "",
        credentials: Credentials | None,
        request_timeout: float = 60.0,
    ) -> None:
        self._client = client
        self._base = httpx.URL(_bucket_base_url(bucket, region, endpoint_url))
        self._region = region
        self._credentials = credentials
        self.request_timeout = request_timeout

    def _url(self, name: str, params: Mapping[str, str] | None = None) -> httpx.URL:
        path = self._base.raw_path.decode("ascii") + quote(name, safe="/")
        url = self._base.copy_with(raw_path=canonical_uri(path).encode("ascii"))
        return url.copy_merge_params(params) if params else url

    async def _send(
        self,
        method: str,
        name: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        content: bytes = b"",
        headers: Mapping[str, str] | None = None,
        payload_hash: str = "",
        ok: tuple[int, ...] = (200, 204, 206),
    ) -> httpx.Response:
        """One signed request, its body read; a status outside ``ok`` raises (404 and 412
        too, unless listed)."""
        request = self._client.build_request(
            method, self._url(name, params), content=content, headers=dict(headers or {})
        )
        if self._credentials is not None:
            digest = payload_hash or (
                hashlib.sha256(content).hexdigest() if content else EMPTY_PAYLOAD_SHA256
            )
            request.headers.update(
                sign_request(
                    method,
                    request.url,
                    request.headers,
                    credentials=self._credentials,
                    region=self._region,
                    now=datetime.now(UTC),
                    payload_hash=digest,
                )
            )
        try:
            with trio.fail_after(self.request_timeout):
                response = await self._client.send(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except trio.TooSlowError as exc:
            raise SharedStoreTimeout(
                f"{what}: no answer within {self.request_timeout:g} s"
            ) from exc
        except httpx.TimeoutException as exc:
            raise SharedStoreTimeout(f"{what}: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise SharedStoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if response.status_code not in ok:
            code = _xml_error(response.content)
            raise SharedStoreError(
                f"{what}: the store answered {response.status_code} {code}".rstrip()
            )
        return response

    async def create_multipart(self, name: str) -> str:
        response = await self._send(
            "POST", name, params={"uploads": ""}, what=f"starting the upload of {name!r}"
        )
        upload_id = _parse_xml(response.content, "CreateMultipartUpload").findtext("UploadId")
        if not upload_id:
            raise SharedStoreError(f"starting the upload of {name!r}: no UploadId")
        return upload_id

    async def upload_part(
        self, name: str, upload_id: str, number: int, data: bytes, sha256: str
    ) -> str:
        response = await self._send(
            "PUT",
            name,
            params={"partNumber": str(number), "uploadId": upload_id},
            content=data,
            payload_hash=sha256,
            what=f"uploading part {number} of {name!r}",
        )
        etag = str(response.headers.get("ETag", ""))
        if not etag:
            raise SharedStoreError(f"uploading part {number} of {name!r}: no ETag")
        return etag

    async def complete_multipart(self, name: str, upload_id: str, etags: list[str]) -> str:
        root = ET.Element("CompleteMultipartUpload")
        for number, etag in enumerate(etags, 1):
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = etag
        response = await self._send(
            "POST",
            name,
            params={"uploadId": upload_id},
            content=ET.tostring(root, xml_declaration=True, encoding="UTF-8"),
            headers={"Content-Type": "application/xml"},
            what=f"completing the upload of {name!r}",
        )
        # S3 may answer 200 and still fail: the error is then the body.
        result = _parse_xml(response.content, "CompleteMultipartUpload")
        if result.tag == "Error":
            code = result.findtext("Code") or "an error"
            raise SharedStoreError(f"completing the upload of {name!r}: {code}")
        etag = result.findtext("ETag") or ""
        if not etag:
            raise SharedStoreError(f"completing the upload of {name!r}: no ETag")
        return etag if etag.startswith('"') else f'"{etag}"'

    async def abort_multipart(self, name: str, upload_id: str) -> None:
        await self._send(
            "DELETE",
            name,
            params={"uploadId": upload_id},
            ok=(200, 204, 404),  # 404: already aborted or completed
            what=f"aborting the upload of {name!r}",
        )

    async def put_object(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        response = await self._send(
            "PUT",
            name,
            content=data,
            payload_hash=sha256,
            headers={"Content-Type": content_type},
            what=f"writing {name!r}",
        )
        etag = str(response.headers.get("ETag", ""))
        if not etag:
            raise SharedStoreError(f"writing {name!r}: no ETag")
        return etag

    async def get_object(self, name: str) -> bytes | None:
        response = await self._send("GET", name, ok=(200, 404), what=f"reading {name!r}")
        return None if response.status_code == 404 else response.content

    async def get_range(self, name: str, start: int, stop: int, if_match: str) -> bytes:
        if start >= stop:
            return b""
        response = await self._send(
            "GET",
            name,
            headers={"Range": f"bytes={start}-{stop - 1}", "If-Match": if_match},
            ok=(200, 206, 404, 412),
            what=f"reading {name!r}",
        )
        if response.status_code == 404:
            raise SharedEntryGone(f"{name!r} is gone (purged or replaced)")
        if response.status_code == 412:
            raise SharedStoreCorrupt(f"{name!r} is no longer the object its manifest names")
        if response.status_code == 200:
            # The store ignored the range: take the bytes asked for (small objects only).
            return response.content[start:stop]
        return response.content

    async def list_names(self, prefix: str) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            params = {"list-type": "2", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            response = await self._send("GET", "", params=params, what=f"listing {prefix!r}")
            root = _parse_xml(response.content, "ListObjectsV2")
            names += [key for c in root.iter("Contents") if (key := c.findtext("Key"))]
            token = root.findtext("NextContinuationToken") or ""
            if root.findtext("IsTruncated") != "true" or not token:
                return names

    async def delete_objects(self, names: list[str]) -> None:
        for index in range(0, len(names), DELETE_BATCH):
            root = ET.Element("Delete")
            ET.SubElement(root, "Quiet").text = "true"
            for name in names[index : index + DELETE_BATCH]:
                ET.SubElement(ET.SubElement(root, "Object"), "Key").text = name
            body = ET.tostring(root, xml_declaration=True, encoding="UTF-8")
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")
            response = await self._send(
                "POST",
                "",
                params={"delete": ""},
                content=body,
                headers={"Content-Type": "application/xml", "Content-MD5": md5},
                what=f"deleting {len(names)} objects",
            )
            result = _parse_xml(response.content, "DeleteObjects")
            failed = [
                f"{e.findtext('Key')}: {e.findtext('Code')}"
                for e in result.iter("Error")
                if e.findtext("Code") != "NoSuchKey"
            ]
            if failed:
                raise SharedStoreError(f"deleting objects failed: {', '.join(failed[:5])}")


def s3_store(
    config: ClusterS3Config, client: httpx.AsyncClient, env: Mapping[str, str]
) -> ObjectStore:
    """The shared store ``[cluster.s3]`` describes, over ``client``.

    Credentials as for S3 sources: the configured pair, else $AWS_ACCESS_KEY_ID /
    $AWS_SECRET_ACCESS_KEY (/ $AWS_SESSION_TOKEN), else unsigned requests.
    """
    backend = S3Backend(
        client,
        bucket=config.bucket,
        region=config.region,
        endpoint_url=config.endpoint_url,
        credentials=credentials_from(config.access_key_id, config.secret_access_key, env),
        request_timeout=config.request_timeout,
    )
    return ObjectStore(
        backend,
        prefix=config.prefix,
        part_size=config.part_size,
        upload_concurrency=config.upload_concurrency,
        read_ahead=config.read_ahead,
    )


def make_store_client(config: ClusterS3Config) -> httpx.AsyncClient:
    """An httpx client for the store (the sources' settings: pool, connect timeout)."""
    return make_http_client(connect_timeout=config.connect_timeout)
