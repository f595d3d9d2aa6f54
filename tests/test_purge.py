"""Purges (POST /admin/purge, resizer/purge.py) and the Cache-Tag / Surrogate-Key headers, on
real servers with a fake transformer, an in-memory shared store and an in-memory lease hub."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from resizer.cluster.leases import Leases
from resizer.cluster.memleases import MemoryLeaseHub, MemoryLeases
from resizer.cluster.memstore import MemoryBackend
from resizer.cluster.store import ObjectStore
from resizer.cluster.tier import SharedTier
from resizer.config import Config
from resizer.options import cache_key, parse_options
from resizer.pipeline import Service, open_service
from resizer.purge import BadPurgeRequest, PurgeLog, PurgeSpec, source_of_key, tag_headers
from resizer.transform.fake import FakeTransformer
from resizer.web.server import _serve_http, hypercorn_config
from tests.server import server_config

CLIP = "/videos/clip.mp4"
URL = f"{CLIP}?width=320"
KEY = cache_key(CLIP, parse_options({"width": "320"}))
TOKEN = "purge-token"
TOKEN_ENV = "RESIZER_TEST_PURGE_TOKEN"
ADMIN = f"""
[admin]
token_env = "{TOKEN_ENV}"
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Instance:
    url: str
    service: Service
    fake: FakeTransformer


@pytest.fixture
def media(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"source" * 1000)  # the fake transformer never decodes
    (folder / "my clip.mp4").write_bytes(b"other" * 1000)
    return folder


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def shared_store() -> ObjectStore:
    return ObjectStore(MemoryBackend(), prefix="p/", part_size=4_096, upload_concurrency=2)


async def start_instance(
    nursery: trio.Nursery,
    config: Config,
    fake: FakeTransformer,
    *,
    store: ObjectStore | None = None,
    cluster: Leases | None = None,
) -> Instance:
    """A real HTTP server on ``config`` with the shared store and leases injected."""

    async def run(task_status: trio.TaskStatus[tuple[Service, list[str]]]) -> None:
        shared = SharedTier(store) if store is not None else None
        async with (
            open_service(config, transformer=fake, shared=shared, cluster=cluster) as service,
            trio.open_nursery() as inner,
        ):
            binds: list[str] = await inner.start(
                _serve_http, service, hypercorn_config(config, port=0), None
            )
            service.listening.add_binds(binds)
            task_status.started((service, binds))

    service, binds = await nursery.start(run)
    return Instance(binds[0], service, fake)


async def until(predicate: object, what: str) -> None:
    """Poll ``predicate`` (an async or sync callable) until true, for at most 5 s."""
    with trio.fail_after(5):
        while True:
            result = predicate()  # type: ignore[operator]
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.005)


async def get(client: httpx.AsyncClient, instance: Instance, url: str = URL) -> httpx.Response:
    response = await client.get(instance.url + url)
    assert response.status_code == 200, response.text
    return response


async def post_purge(client: httpx.AsyncClient, instance: Instance, body: object) -> httpx.Response:
    return await client.post(instance.url + "/admin/purge", json=body, headers=AUTH)


# --- pure parts ---------------------------------------------------------------------------


def test_a_spec_matches_keys_sources_and_prefixes() -> None:
    """Keys match exactly, sources every variant of that path only, prefixes any path."""
    other = cache_key("/videos/clip.mp4.bak", parse_options({"width": "320"}))
    assert PurgeSpec(keys=(KEY,)).matches(KEY)
    assert not PurgeSpec(keys=(KEY + "x",)).matches(KEY)
    assert PurgeSpec(sources=(CLIP,)).matches(KEY)
    assert not PurgeSpec(sources=(CLIP,)).matches(other)
    assert PurgeSpec(prefixes=("/videos/",)).matches(other)
    assert not PurgeSpec(prefixes=("/audio/",)).matches(KEY)
    assert source_of_key(KEY) == CLIP


def test_bad_bodies_are_refused() -> None:
    """Not an object, unknown fields, non-string entries and an empty purge are 400s."""
    bodies: list[object] = [[], {"keys": "x"}, {"keys": [1]}, {"keys": [""]}, {"nope": []}, {}]
    for body in bodies:
        with pytest.raises(BadPurgeRequest):
            PurgeSpec.from_json(body)


def test_the_log_answers_for_purges_after_a_generation_only() -> None:
    """purged_since sees matching purges newer than the Work's generation, not older ones
    nor other keys; once a matcher is forgotten it answers True, to be safe."""
    log = PurgeLog(clock=lambda: 0.0)
    first = log.record(PurgeSpec(sources=(CLIP,)))
    assert log.purged_since(KEY, 0)
    assert not log.purged_since(KEY, first)
    log.record(PurgeSpec(sources=("/videos/other.mp4",)))
    assert not log.purged_since(KEY, first)
    log._recent.popleft()
    log._forgotten_up_to = first
    assert log.purged_since(KEY, 0)


def test_tags_percent_encode_spaces_and_commas() -> None:
    """Tags carry no space nor comma, so both header forms split losslessly."""
    assert tag_headers("videos", "/videos/a b,c.mp4") == {
        "Cache-Tag": "origin:videos, source:/videos/a%20b%2Cc.mp4",
        "Surrogate-Key": "origin:videos source:/videos/a%20b%2Cc.mp4",
    }


# --- on real servers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{"keys": [KEY]}, {"sources": [CLIP]}, {"prefixes": ["/videos/"]}],
    ids=["key", "source", "prefix"],
)
async def test_a_purge_empties_the_local_cache_and_the_shared_store(
    media: Path,
    tmp_path: Path,
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    body: dict[str, list[str]],
) -> None:
    """Purging by key, source or prefix removes the entry here and from the shared store
    (200 with the counts): the next request is a MISS and transcodes again."""
    store = shared_store()
    config = server_config(media, tmp_path / "cache", ADMIN)
    server = await start_instance(nursery, config, FakeTransformer(size=20_000), store=store)
    first = await get(client, server)
    assert first.headers["X-Cache-Status"] == "MISS"
    await until(lambda: store.lookup(KEY), "the shared upload")
    assert (await get(client, server)).headers["X-Cache-Status"] == "HIT"
    answer = await post_purge(client, server, body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"local": 1, "shared": 1, "broadcast": False}
    assert await store.lookup(KEY, include_stale=True) is None
    again = await get(client, server)
    assert again.headers["X-Cache-Status"] == "MISS"
    assert again.content == first.content
    assert server.fake.runs_started == 2


async def test_a_purge_on_one_instance_reaches_the_other(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """Two instances on one lease hub: a purge on A makes B's next request a MISS; prints
    how long the message took to reach B."""
    hub = MemoryLeaseHub()
    a, b = [
        await start_instance(
            nursery,
            server_config(media, tmp_path / name, ADMIN),
            FakeTransformer(size=5_000),
            cluster=MemoryLeases(hub),
        )
        for name in ("a", "b")
    ]
    await get(client, a)
    await get(client, b)
    assert (await get(client, b)).headers["X-Cache-Status"] == "HIT"
    sent = time.perf_counter()
    answer = await post_purge(client, a, {"sources": [CLIP]})
    assert answer.json() == {"local": 1, "shared": None, "broadcast": True}
    await until(lambda: b.service.purges.generation == 1, "B to receive the purge")
    arrived = time.perf_counter() - sent
    await until(lambda: b.service.cache.recall(KEY) is None, "B to drop the entry")
    print(
        f"purge reached the other instance: {arrived * 1000:.2f} ms after the POST; "
        f"message delivery {b.service.purges.last_delivery or 0.0:.6f} s"
    )
    assert (await get(client, b)).headers["X-Cache-Status"] == "MISS"
    assert b.fake.runs_started == 2
    assert a.service.purges.generation == 1  # its own message is not applied twice


async def test_a_purge_racing_an_in_flight_work_publishes_nothing(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """A purge while a Work transcodes: its client still gets every byte, but neither the
    local cache nor the shared store keeps them; the next request is a MISS."""
    store = shared_store()
    fake = FakeTransformer(size=20_000, gate=trio.Event())
    config = server_config(media, tmp_path / "cache", ADMIN)
    server = await start_instance(nursery, config, fake, store=store)
    bodies: list[bytes] = []

    async def first_client() -> None:
        bodies.append((await get(client, server)).content)

    async with trio.open_nursery() as clients:
        clients.start_soon(first_client)
        with trio.fail_after(5):
            await fake.wait_started()
        answer = await post_purge(client, server, {"keys": [KEY]})
        assert answer.json() == {"local": 0, "shared": 0, "broadcast": False}
        assert fake.gate is not None
        fake.gate.set()
    assert bodies == [fake.output_for(parse_options({"width": "320"}))]
    await trio.sleep(0.05)  # the upload would have completed by now
    assert await server.service.cache.lookup(KEY) is None
    assert await store.lookup(KEY, include_stale=True) is None
    assert (await get(client, server)).headers["X-Cache-Status"] == "MISS"
    assert fake.runs_started == 2


async def test_purge_needs_the_token_and_json(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """Without the token: 401; with it, a body that is not JSON or not a purge: JSON 400."""
    config = server_config(media, tmp_path / "cache", ADMIN)
    server = await start_instance(nursery, config, FakeTransformer())
    url = server.url + "/admin/purge"
    assert (await client.post(url, json={"keys": [KEY]})).status_code == 401
    wrong = await client.post(url, json={"keys": [KEY]}, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401
    not_json = await client.post(url, content=b"{nope", headers=AUTH)
    assert (not_json.status_code, not_json.json()["error"]) == (400, "bad_purge_request")
    not_a_purge = await client.post(url, json={"keys": "x"}, headers=AUTH)
    assert (not_a_purge.status_code, not_a_purge.json()["error"]) == (400, "bad_purge_request")


async def test_media_responses_carry_cache_tags_on_miss_and_hit(
    media: Path, tmp_path: Path, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """Cache-Tag and Surrogate-Key name the origin and the source path (spaces encoded) on a
    miss, a plain hit (the hit layer), a range hit and a HEAD hit alike."""
    config = server_config(media, tmp_path / "cache", ADMIN)
    server = await start_instance(nursery, config, FakeTransformer(size=5_000))
    url = "/videos/my%20clip.mp4?width=320"
    expected = {
        "cache-tag": "origin:videos, source:/videos/my%20clip.mp4",
        "surrogate-key": "origin:videos source:/videos/my%20clip.mp4",
    }
    responses = [await get(client, server, url), await get(client, server, url)]
    responses.append(await client.get(server.url + url, headers={"Range": "bytes=0-9"}))
    responses.append(await client.head(server.url + url))
    statuses = [(r.status_code, r.headers["X-Cache-Status"]) for r in responses]
    assert statuses == [(200, "MISS"), (200, "HIT"), (206, "HIT"), (200, "HIT")]
    for response in responses:
        assert {name: response.headers.get(name) for name in expected} == expected
