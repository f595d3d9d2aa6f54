"""The in-memory fake of the shared store: ``ObjectStore`` over a dict of objects.

It behaves like S3 where the engine can tell: uploads are invisible until completed, an
aborted upload leaves nothing, ETags change when an object is rewritten, ``If-Match`` is
checked, parts but the last must reach ``min_part_size``. It also counts requests by kind
and can hold part uploads at a gate, for tests of read-ahead and backpressure.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter

import trio

from ..units import MiB
from .store import ObjectStore, SharedEntryGone, SharedStoreCorrupt, SharedStoreError


class MemoryBackend:
    """Objects in a dict; an ``ObjectBackend``."""

    def __init__(self, *, min_part_size: int = 0) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}  # name -> (bytes, quoted ETag)
        # upload id -> (object name, {part number: (bytes, ETag)})
        self.uploads: dict[str, tuple[str, dict[int, tuple[bytes, str]]]] = {}
        self.requests: Counter[str] = Counter()
        self.min_part_size = min_part_size
        # While set, upload_part waits for the event (tests of backpressure).
        self.part_gate: trio.Event | None = None
        self.parts_started = 0

    def put(self, name: str, data: bytes) -> str:
        """Store ``data`` under ``name`` at once (tests use it to overwrite objects)."""
        etag = f'"{hashlib.md5(data + secrets.token_bytes(4)).hexdigest()}"'
        self.objects[name] = (data, etag)
        return etag

    async def create_multipart(self, name: str) -> str:
        await trio.lowlevel.checkpoint()
        self.requests["create_multipart"] += 1
        upload_id = secrets.token_hex(8)
        self.uploads[upload_id] = (name, {})
        return upload_id

    def _upload(self, name: str, upload_id: str) -> dict[int, tuple[bytes, str]]:
        if upload_id not in self.uploads or self.uploads[upload_id][0] != name:
            raise SharedStoreError(f"no upload {upload_id!r} for {name!r}")
        return self.uploads[upload_id][1]

    async def upload_part(
        self, name: str, upload_id: str, number: int, data: bytes, sha256: str
    ) -> str:
        self.requests["upload_part"] += 1
        self.parts_started += 1
        if self.part_gate is not None:
            await self.part_gate.wait()
        await trio.lowlevel.checkpoint()
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise SharedStoreError(f"part {number} of {name!r}: the body does not match")
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        self._upload(name, upload_id)[number] = (data, etag)
        return etag

    async def complete_multipart(self, name: str, upload_id: str, etags: list[str]) -> str:
        await trio.lowlevel.checkpoint()
        self.requests["complete_multipart"] += 1
        parts = self._upload(name, upload_id)
        if sorted(parts) != list(range(1, len(etags) + 1)):
            raise SharedStoreError(f"upload of {name!r}: parts {sorted(parts)} were uploaded")
        for number, etag in enumerate(etags, 1):
            data, stored = parts[number]
            if etag != stored:
                raise SharedStoreError(f"upload of {name!r}: part {number} ETag differs")
            if number < len(etags) and len(data) < self.min_part_size:
                raise SharedStoreError(f"upload of {name!r}: part {number} is too small")
        del self.uploads[upload_id]
        return self.put(name, b"".join(parts[n][0] for n in range(1, len(etags) + 1)))

    async def abort_multipart(self, name: str, upload_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.requests["abort_multipart"] += 1
        self.uploads.pop(upload_id, None)

    async def put_object(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        await trio.lowlevel.checkpoint()
        self.requests["put_object"] += 1
        return self.put(name, bytes(data))

    async def get_object(self, name: str) -> bytes | None:
        await trio.lowlevel.checkpoint()
        self.requests["get_object"] += 1
        found = self.objects.get(name)
        return None if found is None else found[0]

    async def get_range(self, name: str, start: int, stop: int, if_match: str) -> bytes:
        await trio.lowlevel.checkpoint()
        self.requests["get_range"] += 1
        found = self.objects.get(name)
        if found is None:
            raise SharedEntryGone(f"{name!r} is gone")
        data, etag = found
        if etag != if_match:
            raise SharedStoreCorrupt(f"{name!r} was replaced (ETag {etag}, not {if_match})")
        return data[start:stop]

    async def list_names(self, prefix: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        self.requests["list"] += 1
        return sorted(name for name in self.objects if name.startswith(prefix))

    async def delete_objects(self, names: list[str]) -> None:
        await trio.lowlevel.checkpoint()
        self.requests["delete"] += 1
        for name in names:
            self.objects.pop(name, None)


def memory_store(
    *,
    prefix: str = "resizer/",
    part_size: int = 8 * MiB,
    upload_concurrency: int = 5,
    read_ahead: int = 3,
    min_part_size: int = 0,
) -> ObjectStore:
    """A shared store in memory (its backend is ``store.backend``)."""
    return ObjectStore(
        MemoryBackend(min_part_size=min_part_size),
        prefix=prefix,
        part_size=part_size,
        upload_concurrency=upload_concurrency,
        read_ahead=read_ahead,
    )
