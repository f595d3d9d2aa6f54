"""Cancellation-correctness harness: run a scenario, cancel clients at every checkpoint,
then check that nothing is left behind.

``CancelAtStep`` is a trio Instrument that counts the scheduling steps of watched client
tasks and cancels a client's scope at its k-th step, so a scenario can be replayed with the
cancellation landing at every checkpoint in turn. ``assert_clean`` states the invariants.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

from resizer.cache.disk import DiskCacheStore
from resizer.concurrency.coalescing import Work, WorkState
from resizer.config import Config, load_config
from resizer.errors import ResizerError
from resizer.options import cache_key, parse_options
from resizer.pipeline import Job, Service, open_service
from resizer.sources.fake import FakeSource, Script
from resizer.sources.origins import Origin, Origins
from resizer.transform.fake import FakeTransformer

PATH = "/v/clip.mp4"


class CancelAtStep(trio.abc.Instrument):
    """Cancel a watched task's scope when it is about to run its k-th step."""

    def __init__(self) -> None:
        self._watched: dict[trio.lowlevel.Task, list[object]] = {}
        self.fired = 0  # how many cancellations actually landed

    def watch(self, steps: int | None, scope: trio.CancelScope) -> None:
        self.watch_task(trio.lowlevel.current_task(), steps, scope)

    def watch_task(
        self, task: trio.lowlevel.Task, steps: int | None, scope: trio.CancelScope
    ) -> None:
        """Cancel ``scope`` (which may be another task's) at ``task``'s k-th step."""
        if steps is not None:
            self._watched[task] = [steps, scope]

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        entry = self._watched.get(task)
        if entry is None:
            return
        remaining = int(str(entry[0])) - 1
        entry[0] = remaining
        if remaining == 0:
            self.fired += 1
            scope = entry[1]
            assert isinstance(scope, trio.CancelScope)
            scope.cancel()


@dataclass
class ClientResult:
    body: bytes = b""
    completed: bool = False
    error: ResizerError | None = None
    work: Work | None = None
    joined: bool = False  # attached to a Work another client started


@dataclass
class World:
    service: Service
    source: FakeSource
    transformer: FakeTransformer
    cache_root: Path
    spill_dir: Path
    job: Job
    results: list[ClientResult] = field(default_factory=list)

    @property
    def expected(self) -> bytes:
        return self.transformer.output_for(self.job.options)


def open_fds() -> int:
    """Descriptors this process holds, but the disk cache sweep's: its lock file and the
    folders it scans (under the autojump clock a sweep may run in a thread at any moment)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor among them)
        if target.endswith("/sweep.lock") or os.path.isdir(target):
            continue
        count += 1
    return count


def fake_origin_config(cache_root: Path, coalescing: str = "", extra: str = "") -> Config:
    """A configuration with a disk cache at ``cache_root`` and one origin ``/v/...``
    (``extra``: more sections, TOML)."""
    return load_config(
        text=f"""
        [cache]
        path = "{cache_root}"
        [coalescing]
        {coalescing}
        [[origins]]
        name = "v"
        matcher = "^/v/(?P<path>.+)$"
        [[origins.sources]]
        type = "filesystem"
        root = "{cache_root}"
        {extra}
        """,
        env={},
    )


def fake_origins(source: FakeSource) -> Origins:
    """The origins of ``fake_origin_config`` with ``source`` in place of the folder."""
    return Origins([Origin.simple("v", r"^/v/(?P<path>.+)$", source)])


@asynccontextmanager
async def open_world(
    tmp_path: Path,
    *,
    script: Script | None = None,
    transformer: FakeTransformer | None = None,
    finish_without_clients: bool = False,
    cross_process: bool = True,
    extra_config: str = "",
) -> AsyncIterator[World]:
    cache_root = tmp_path / "cache"
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir(parents=True, exist_ok=True)
    config = fake_origin_config(
        cache_root,
        f"finish_without_clients = {'true' if finish_without_clients else 'false'}\n"
        f"cross_process = {'true' if cross_process else 'false'}",
        extra_config,
    )
    source = FakeSource(spill_dir, {"clip.mp4": b"source" * 1000}, {"clip.mp4": script or Script()})
    origins = fake_origins(source)
    fake = transformer or FakeTransformer(size=20_000, chunk_size=2_000)
    cache = DiskCacheStore(cache_root)
    cache.prepare()
    async with open_service(config, cache=cache, transformer=fake, origins=origins) as service:
        options = parse_options({"width": "320"})
        job = Job(cache_key(PATH, options), await service.origins.resolve(PATH), options)
        yield World(service, source, fake, cache_root, spill_dir, job)


async def client(
    world: World,
    instrument: CancelAtStep,
    steps: int | None,
    result: ClientResult,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One HTTP-like client: subscribe, wait for the first bytes, read to the end.

    Started with ``nursery.start`` it has subscribed when that returns, so clients attach
    in a known order (trio runs tasks started with ``start_soon`` in no fixed order).
    """
    # Against a hanging origin a client gives up eventually (mock time), so the run ends.
    # Only then: the autojump clock also jumps while a task waits for a worker thread.
    hanging = any(script.hang for script in world.source.scripts.values())
    deadline = trio.current_time() + 3600 if hanging else math.inf
    with trio.CancelScope(deadline=deadline) as scope:
        instrument.watch(steps, scope)
        subscription = world.service.subscribe(world.job)
        result.work, result.joined = subscription.work, subscription.joined
        task_status.started()
        try:
            await subscription.wait_first_bytes()
            async for chunk in subscription.iter_bytes(0, 4_096):
                result.body += chunk
            result.completed = True
        except ResizerError as exc:
            result.error = exc
        finally:
            subscription.detach()


async def settle(world: World) -> None:
    """Wait until every Work the clients touched has ended and its task is gone."""
    for result in world.results:
        if result.work is not None:
            await result.work.wait_progress(lambda p: p.state is not WorkState.RUNNING)
    await trio.testing.wait_all_tasks_blocked()


async def assert_clean(world: World, fds_before: int) -> None:
    """The invariants that must hold after any scenario, however it was cancelled."""
    service = world.service
    assert len(service.registry) == 0, "registry not empty"
    assert service.origin_limiter.borrowed_tokens == 0, "origin limiter token leaked"
    assert service.scheduler.snapshot().busy == 0, "an ffmpeg slot or queue place leaked"
    assert world.transformer.running == 0, "a transform is still running"
    assert world.source.open_now == 0, "a source fetch was never closed"
    assert not list(world.spill_dir.iterdir()), "spilled source files left behind"
    leftovers = list((world.cache_root / "tmp").iterdir())
    assert not leftovers, f"partial cache files left behind: {leftovers}"
    assert not service.registry._nursery.child_tasks, "a Work task outlived its work"
    entry = await service.cache.lookup(world.job.key)
    if entry is not None:  # published entries are always complete
        assert entry.size == len(world.expected)
    for result in world.results:
        if result.completed:
            assert result.body == world.expected, "a completed client got a truncated body"
        else:
            assert world.expected.startswith(result.body), "a client got wrong bytes"
    assert open_fds() <= fds_before, "file descriptors leaked"
