"""Cross-process leases: one producer per key among services sharing a disk cache.

Two ``Service`` objects on one cache folder stand for two processes: ``flock`` locks held
through different open files conflict within a process exactly as across processes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from resizer.cache.disk import DiskCacheStore
from resizer.cache.leases import Follow, Lead, LeaseBoard
from resizer.concurrency.coalescing import Subscription, Work, WorkState
from resizer.errors import ResizerError
from resizer.options import cache_key, key_digest, parse_options
from resizer.pipeline import Job, Service, open_service
from resizer.sources.fake import FakeSource
from resizer.transform.fake import FakeTransformer
from tests.harness import fake_origin_config, fake_origins

PATH = "/v/clip.mp4"
KEY = "v1:/v/clip.mp4?width=320"


# --- the lease board on its own --------------------------------------------------------


def make_partial(tmp_dir: Path, key: str, data: bytes = b"") -> Path:
    path = tmp_dir / f"{key_digest(key)}.{os.urandom(4).hex()}.data"
    path.write_bytes(data)
    return path


def test_the_first_process_leads_and_the_next_follows(tmp_path: Path) -> None:
    """acquire() gives a Lead when the key is free and a Follow while another leads it."""
    board = LeaseBoard(tmp_path)
    lead = board.acquire(KEY)
    assert isinstance(lead, Lead)
    follow = board.acquire(KEY)
    assert isinstance(follow, Follow)
    assert board.acquire("v1:/other") is not None  # other keys are independent
    follow.release()
    lead.release()
    assert isinstance(board.acquire(KEY), Lead)


def test_a_follower_tails_the_announced_partial_until_the_leader_ends(tmp_path: Path) -> None:
    """The follower sees the partial's size grow, then the leader gone; no lock file is left."""
    board = LeaseBoard(tmp_path)
    lead = board.acquire(KEY)
    assert isinstance(lead, Lead)
    follow = board.acquire(KEY)
    assert isinstance(follow, Follow)
    assert follow.poll().leader_alive
    assert not follow.attached  # nothing announced yet
    partial = make_partial(tmp_path, KEY)
    lead.announce(partial)
    assert follow.poll().size == 0
    assert follow.attached
    partial.write_bytes(b"x" * 1234)
    assert follow.poll().size == 1234
    lead.release()
    tail = follow.poll()
    assert (tail.leader_alive, tail.size) == (False, 1234)
    follow.release()
    assert not board.lock_path(KEY).exists()


def test_a_leader_knows_whether_it_is_followed(tmp_path: Path) -> None:
    """followed() is True while a follower holds the partial; False is final and locks it."""
    board = LeaseBoard(tmp_path)
    lead = board.acquire(KEY)
    assert isinstance(lead, Lead)
    assert not lead.followed()  # nothing announced: nobody can follow
    lead.release()
    lead = board.acquire(KEY)
    assert isinstance(lead, Lead)
    lead.announce(make_partial(tmp_path, KEY))
    follow = board.acquire(KEY)
    assert isinstance(follow, Follow)
    follow.poll()
    assert lead.followed()
    follow.release()
    assert not lead.followed()
    late = board.acquire(KEY)
    assert isinstance(late, Follow)
    late.poll()
    assert not late.attached, "a follower attached to a partial its leader abandons"
    lead.release()
    assert not late.poll().leader_alive
    late.release()


def test_a_dead_leaders_lease_is_taken_over_and_its_partial_removed(tmp_path: Path) -> None:
    """A lock file nobody holds (its process died) yields a Lead that removes the old partial."""
    board = LeaseBoard(tmp_path)
    stale = make_partial(tmp_path, KEY, b"half")
    board.lock_path(KEY).write_text(stale.name)
    lead = board.acquire(KEY)
    assert isinstance(lead, Lead)
    assert not stale.exists()
    assert board.lock_path(KEY).read_text() == ""
    lead.release()


def test_a_claim_takes_only_a_free_key_and_is_no_lead(tmp_path: Path) -> None:
    """claim() refuses a held key; while it holds one, others follow it; leads() tells Leads."""
    board, other = LeaseBoard(tmp_path), LeaseBoard(tmp_path)
    digest = key_digest(KEY)
    lead = board.acquire(KEY)
    assert isinstance(lead, Lead)
    assert (board.leads(digest), other.leads(digest)) == (True, False)
    assert other.claim(digest) is None
    lead.release()
    assert not board.leads(digest)
    claim = other.claim(digest)
    assert claim is not None
    assert not other.leads(digest)  # its writers still claim the key to publish it
    assert board.claim(digest) is None
    follow = board.acquire(KEY)
    assert isinstance(follow, Follow)
    follow.poll()
    assert not follow.attached  # a claim announces no partial
    claim.release()
    assert not follow.poll().leader_alive
    follow.release()
    assert not board.lock_path(KEY).exists()


def test_prepare_keeps_partials_that_another_process_is_writing(tmp_path: Path) -> None:
    """A starting process removes dead partials but not those of a live leader."""
    store = DiskCacheStore(tmp_path)
    store.prepare()
    tmp_dir = tmp_path / "tmp"
    lead = store.leases.acquire(KEY)
    assert isinstance(lead, Lead)
    live = make_partial(tmp_dir, KEY, b"live")
    lead.announce(live)
    dead = make_partial(tmp_dir, "v1:/dead", b"dead")
    (tmp_dir / f"{key_digest('v1:/dead')}.lock").write_text(dead.name)
    DiskCacheStore(tmp_path).prepare()
    assert live.exists()
    assert sorted(p.name for p in tmp_dir.iterdir()) == sorted(
        [live.name, f"{live.name[:64]}.lock"]
    )
    lead.release()
    live.unlink()


# --- two services sharing one disk cache -----------------------------------------------


@asynccontextmanager
async def open_services(
    tmp_path: Path, *transformers: FakeTransformer
) -> AsyncIterator[list[tuple[Service, FakeSource]]]:
    """One Service per transformer, all on the same cache folder (like several workers)."""
    config = fake_origin_config(tmp_path / "cache", 'lease_poll_interval = "5ms"')
    async with AsyncExitStack() as stack:
        services = []
        for index, transformer in enumerate(transformers):
            spill = tmp_path / f"spill{index}"
            spill.mkdir()
            source = FakeSource(spill, {"clip.mp4": b"source" * 100})
            origins = fake_origins(source)
            cache = DiskCacheStore(tmp_path / "cache")
            cache.prepare()
            service = await stack.enter_async_context(
                open_service(config, cache=cache, transformer=transformer, origins=origins)
            )
            services.append((service, source))
        yield services


async def make_job(service: Service) -> Job:
    options = parse_options({"width": "320"})
    return Job(cache_key(PATH, options), await service.origins.resolve(PATH), options)


async def read_body(subscription: Subscription, into: list[bytes]) -> None:
    try:
        await subscription.wait_first_bytes()
        into.append(b"".join([chunk async for chunk in subscription.iter_bytes(0, 1_000)]))
    finally:
        subscription.detach()


def tmp_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "tmp").iterdir())


async def wait_until_idle(*services: Service, works: tuple[Work, ...] = ()) -> None:
    """Every Work has ended and its task is gone (then the invariants can be checked)."""
    # No fail_after here: the autojump clock would fire it while a Work waits for a thread.
    for work in works:
        await work.wait_progress(lambda p: p.state is not WorkState.RUNNING)
    await trio.testing.wait_all_tasks_blocked()
    for service in services:
        assert len(service.registry) == 0
        assert not service.registry._nursery.child_tasks


class FirstChunkThenHold:
    """A ``before_chunk`` hook: the first chunk goes out, the rest waits for ``release``."""

    def __init__(self, *, hold_first: bool = False) -> None:
        self.release = trio.Event()
        self._first_held = 0 if hold_first else 1

    async def __call__(self, index: int) -> None:
        if index >= self._first_held:
            await self.release.wait()


@asynccontextmanager
async def lead_and_follow(
    tmp_path: Path, first: FakeTransformer, second: FakeTransformer
) -> AsyncIterator[tuple[Service, Service, Job, Subscription, Subscription]]:
    """Service a leads the job and has output; b follows it and has seen that output."""
    async with open_services(tmp_path, first, second) as [(a, _), (b, _)]:
        job = await make_job(a)
        lead_sub = a.subscribe(job)
        await lead_sub.wait_first_bytes()
        follow_sub = b.subscribe(job)
        await follow_sub.wait_first_bytes()
        yield a, b, job, lead_sub, follow_sub


async def test_two_processes_share_one_transform(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Identical misses in two processes: one transform, identical bodies, then a HIT."""
    stall = FirstChunkThenHold()
    first, second = FakeTransformer(before_chunk=stall), FakeTransformer()
    async with lead_and_follow(tmp_path, first, second) as (a, b, job, lead_sub, follow_sub):
        bodies: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_body, lead_sub, bodies)
            nursery.start_soon(read_body, follow_sub, bodies)
            await trio.testing.wait_all_tasks_blocked()
            stall.release.set()
        assert bodies == [first.output_for(job.options)] * 2
        assert (first.runs_started, second.runs_started, second.probes) == (1, 0, 0)
        assert b.metrics.lease_follows._value.get() == 1
        assert follow_sub.joined is False  # a MISS here, served from the other's output
        assert await b.cache.lookup(job.key) is not None
        await wait_until_idle(a, b)
        assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("leaving", ["leader", "follower"])
async def test_one_process_leaving_does_not_disturb_the_other(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, leaving: str
) -> None:
    """When the leader's (or the follower's) only client leaves, the other still gets it all."""
    stall = FirstChunkThenHold()
    first, second = FakeTransformer(before_chunk=stall), FakeTransformer()
    async with lead_and_follow(tmp_path, first, second) as (a, b, job, lead_sub, follow_sub):
        stayer, leaver = (follow_sub, lead_sub) if leaving == "leader" else (lead_sub, follow_sub)
        leaver.detach()
        await trio.sleep(0.1)  # twenty poll intervals (mock clock): the leader keeps going
        assert first.running == 1
        stall.release.set()
        bodies: list[bytes] = []
        await read_body(stayer, bodies)
        assert bodies == [first.output_for(job.options)]
        assert (first.runs_finished, second.runs_started) == (1, 0)
        assert await a.cache.lookup(job.key) is not None
        await wait_until_idle(a, b)
        assert tmp_files(tmp_path) == []


async def test_the_leader_stops_once_every_process_has_left(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Leader's client leaves, then the follower's: the transform is abandoned, nothing stays."""
    stall = FirstChunkThenHold()
    first, second = FakeTransformer(before_chunk=stall), FakeTransformer()
    async with lead_and_follow(tmp_path, first, second) as (a, b, job, lead_sub, follow_sub):
        lead_sub.detach()
        await trio.sleep(0.1)
        assert first.running == 1
        follow_sub.detach()
        await wait_until_idle(a, b, works=(lead_sub.work, follow_sub.work))
        assert (first.running, first.runs_abandoned, second.runs_started) == (0, 1, 0)
        assert await a.cache.lookup(job.key) is None
        assert tmp_files(tmp_path) == []


async def test_a_follower_takes_over_when_the_leader_fails_before_any_output(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The leader fails before its first byte: the follower produces the output itself."""
    stall = FirstChunkThenHold(hold_first=True)
    failing = FakeTransformer(before_chunk=stall, fail_after=0)
    healthy = FakeTransformer()
    async with open_services(tmp_path, failing, healthy) as [(a, _), (b, _)]:
        job = await make_job(a)
        lead_sub = a.subscribe(job)
        await failing.wait_started()
        bodies: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_body, b.subscribe(job), bodies)
            await trio.testing.wait_all_tasks_blocked()  # b found the lease taken
            stall.release.set()
            with pytest.raises(ResizerError):
                await lead_sub.wait_first_bytes()
            lead_sub.detach()
        assert bodies == [healthy.output_for(job.options)]
        assert (failing.runs_failed, healthy.runs_finished) == (1, 1)
        assert b.metrics.lease_follows._value.get() == 1
        await wait_until_idle(a, b)
        assert tmp_files(tmp_path) == []


async def test_a_failure_after_output_reaches_the_followers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The leader fails mid-stream: the follower's client gets an error, not a short body."""
    stall = FirstChunkThenHold()
    failing = FakeTransformer(size=20_000, before_chunk=stall, fail_after=5_000)
    async with lead_and_follow(tmp_path, failing, FakeTransformer()) as (a, b, job, lead, follow):
        stall.release.set()
        bodies: list[bytes] = []
        with pytest.raises(ResizerError):
            await read_body(follow, bodies)
        lead.detach()
        assert bodies == []
        await wait_until_idle(a, b)
        assert await a.cache.lookup(job.key) is None
        assert tmp_files(tmp_path) == []
