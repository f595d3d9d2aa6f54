"""Leases and the purge channel between instances, against a real redis-server.

Each test starts its own ``redis-server`` on a free loopback port (no persistence), so a test
can stop and restart it. Lease TTLs are short (0.5 s) and time is real.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import pytest
import structlog
import trio
import trio.testing

from resizer.cluster.leases import (
    LOCAL_ONLY,
    Lease,
    LeaseLost,
    Leases,
    Outcome,
    RedisLeases,
    lease_names,
    make_client,
    open_redis_leases,
    parse_redis_url,
)
from resizer.cluster.memleases import MemoryLeaseHub, MemoryLeases
from resizer.config import load_config
from resizer.errors import ConfigError
from resizer.metrics import Metrics

TTL = 0.5
KEY = "v1:/videos/clip.mp4?width=320"


def redis_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if found is None:
        pytest.fail("redis-server is missing: run tests/players/install.sh (make players)")
    return found


def free_port(*, cluster_bus: bool = False) -> int:
    """A free loopback port (with ``cluster_bus``: port + 10000 free too, as Cluster needs)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class RedisServer:
    """A redis-server subprocess on 127.0.0.1 that a test may stop and start again."""

    def __init__(self, port: int, cluster_dir: Path | None = None) -> None:
        self.port = port
        self.cluster_dir = cluster_dir
        scheme = "redis" if cluster_dir is None else "redis+cluster"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        if self.cluster_dir is not None:
            nodes = self.cluster_dir / "nodes.conf"
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(nodes)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=self.cluster_dir)
        deadline = time.monotonic() + 5
        while True:
            try:  # our server answers (not another process that had the port)
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG") and self.process.poll() is None:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisServer]:
    """A one-node Redis Cluster owning every hash slot."""
    server = RedisServer(free_port(cluster_bus=True), cluster_dir=tmp_path)
    server.start()
    try:
        redis_cli = shutil.which("redis-cli")
        assert redis_cli is not None, "redis-cli (redis-tools, with redis-server) is missing"
        cli = [redis_cli, "-p", str(server.port)]
        subprocess.run([*cli, "cluster", "addslotsrange", "0", "16383"], check=True)
        deadline = time.monotonic() + 5
        while b"cluster_state:ok" not in subprocess.check_output([*cli, "cluster", "info"]):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def two_instances(
    url: str, metrics: Metrics | None = None
) -> AsyncIterator[tuple[RedisLeases, RedisLeases]]:
    async with (
        open_redis_leases(url, ttl=TTL, poll_interval=0.02, metrics=metrics) as a,
        open_redis_leases(url, ttl=TTL, poll_interval=0.02) as b,
    ):
        yield a, b


# --- leases -----------------------------------------------------------------------------


async def test_two_instances_race_one_wins_other_follows(redis_server: RedisServer) -> None:
    """Two instances race for a key: one leads, the other follows and sees the release."""
    async with two_instances(redis_server.url) as (a, b):
        outcomes: list[Outcome] = []

        async def race(leases: RedisLeases) -> None:
            outcomes.append(await leases.acquire(KEY))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(race, a)
            nursery.start_soon(race, b)
        leads = [o for o in outcomes if isinstance(o, Lease)]
        assert len(leads) == 1
        assert outcomes.count(None) == 1
        lead = leads[0]
        leader, follower = (a, b) if lead.value.startswith(a.instance_id) else (b, a)

        released_at: list[float] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                await follower.wait_released(KEY)
                released_at.append(trio.current_time())

            nursery.start_soon(follow)
            await trio.sleep(0.2)
            assert not released_at  # still held
            await leader.release(lead)
            release_time = trio.current_time()
        assert released_at[0] - release_time < 0.2  # long before the TTL would end it
        again = await follower.acquire(KEY)
        assert isinstance(again, Lease)
        assert again.token > lead.token


async def test_fencing_tokens_increase(redis_server: RedisServer) -> None:
    """Every new lease on a key carries a larger token, whichever instance takes it."""
    async with two_instances(redis_server.url) as (a, b):
        tokens = []
        for leases in (a, b, a, b):
            lease = await leases.acquire(KEY)
            assert isinstance(lease, Lease)
            tokens.append(lease.token)
            await leases.release(lease)
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == 4
        # A fresh counter starts from the server's clock (ms), so tokens survive its expiry.
        assert tokens[0] > 1_600_000_000_000


async def test_release_is_compare_and_delete(redis_server: RedisServer) -> None:
    """A stale lease's release leaves the lease another instance holds now."""
    async with two_instances(redis_server.url) as (a, b):
        old = await a.acquire(KEY)
        assert isinstance(old, Lease)
        await trio.sleep(TTL + 0.1)  # a never renewed: expired
        new = await b.acquire(KEY)
        assert isinstance(new, Lease)
        await a.release(old)
        assert await b.holder(KEY) == new.value
        assert not await a.renew(old)  # a finds b's token: lost


async def test_stalled_holder_loses_lease_after_ttl(redis_server: RedisServer) -> None:
    """A holder whose renewals stop loses the lease after the TTL; another takes over."""
    async with two_instances(redis_server.url) as (a, b):
        lease = await a.acquire(KEY)  # taken, never renewed: its holder stalled
        assert isinstance(lease, Lease)
        start = trio.current_time()
        assert await b.acquire(KEY) is None
        await b.wait_released(KEY)
        assert TTL - 0.1 < trio.current_time() - start < TTL + 0.5
        taken = await b.acquire(KEY)
        assert isinstance(taken, Lease)
        assert taken.token > lease.token


async def test_hold_renews_past_the_ttl(redis_server: RedisServer) -> None:
    """``hold`` renews the lease, so nobody takes it while the block runs past the TTL."""
    async with two_instances(redis_server.url) as (a, b):
        async with a.hold(KEY) as lease:
            assert isinstance(lease, Lease)
            for _ in range(4):  # twice the TTL
                await trio.sleep(TTL / 2)
                assert await b.acquire(KEY) is None
        assert await b.holder(KEY) is None  # released on exit


async def test_holder_block_cancelled_when_lease_stolen(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that stalls past the TTL while another takes over has its block cancelled."""
    async with two_instances(redis_server.url) as (a, b):
        real_renew = a.renew

        async def stalled_renew(lease: Lease) -> bool:
            await trio.sleep(TTL * 1.6)  # a pause: the lease expires meanwhile
            return await real_renew(lease)

        monkeypatch.setattr(a, "renew", stalled_renew)
        finished = False
        stolen: Outcome = None
        with trio.fail_after(4 * TTL):
            async with trio.open_nursery() as nursery:

                async def steal() -> None:
                    nonlocal stolen
                    await b.wait_released(KEY)
                    async with b.hold(KEY) as outcome:
                        stolen = outcome
                        await trio.sleep_forever()

                async def transcode() -> None:
                    nonlocal finished
                    async with a.hold(KEY) as lease:
                        assert isinstance(lease, Lease)
                        nursery.start_soon(steal)
                        await trio.sleep(10 * TTL)
                        finished = True

                with pytest.raises(LeaseLost):
                    await transcode()
                assert not finished
                assert isinstance(stolen, Lease)
                assert await b.holder(KEY) == stolen.value  # a's release left b's alone
                nursery.cancel_scope.cancel()


async def test_hold_follows_when_held(redis_server: RedisServer) -> None:
    """``hold`` on a key another instance holds yields None and touches nothing."""
    async with two_instances(redis_server.url) as (a, b):
        lease = await a.acquire(KEY)
        assert isinstance(lease, Lease)
        async with b.hold(KEY) as outcome:
            assert outcome is None
        assert await a.holder(KEY) == lease.value


# --- purges -----------------------------------------------------------------------------


async def test_purge_messages_reach_subscribers(redis_server: RedisServer) -> None:
    """A purge published by one instance reaches every subscriber; junk is skipped."""
    async with two_instances(redis_server.url) as (a, b):
        got_b: list[dict[str, Any]] = []
        got_a: list[dict[str, Any]] = []
        arrived = trio.Event()

        async def on_b(message: dict[str, Any]) -> None:
            got_b.append(message)
            if len(got_b) == 2:
                arrived.set()

        async def on_a(message: dict[str, Any]) -> None:
            got_a.append(message)

        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_purges, on_b)
            await nursery.start(a.serve_purges, on_a)
            client = make_client(redis_server.url)
            async with client:
                await client.publish("resizer:purge", "not json")
            assert await a.publish_purge({"keys": [KEY]})
            assert await a.publish_purge({"sources": ["/videos/a.mp4"]})
            with trio.fail_after(2):
                await arrived.wait()
            nursery.cancel_scope.cancel()
        assert got_b == [{"keys": [KEY]}, {"sources": ["/videos/a.mp4"]}]
        assert got_a == got_b  # the publisher's own subscriber hears it too


# --- degraded mode ----------------------------------------------------------------------


def degraded_count(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("resizer_cluster_degraded_total")
    assert value is not None
    return value


async def test_redis_down_degrades_then_recovers(redis_server: RedisServer) -> None:
    """Redis stopped: local only, logged once, counted; restarted: leases and purges work."""
    metrics = Metrics()
    async with two_instances(redis_server.url, metrics) as (a, b):
        got: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:

            async def on_purge(message: dict[str, Any]) -> None:
                got.append(message)

            await nursery.start(b.serve_purges, on_purge)
            held = await b.acquire(KEY)
            assert isinstance(held, Lease)

            redis_server.stop()
            with structlog.testing.capture_logs() as logs:
                with trio.fail_after(3):
                    assert await a.acquire(KEY) is LOCAL_ONLY
                    assert await a.acquire("other") is LOCAL_ONLY
                    assert not await a.publish_purge({"keys": [KEY]})
                    await a.wait_released(KEY)  # returns at once: nothing to wait for
                    async with a.hold(KEY) as outcome:
                        assert outcome is LOCAL_ONLY
                    assert await b.renew(held)  # unreachable is not lost: b goes on
            assert a.degraded
            assert degraded_count(metrics) == 4  # three acquires (one by hold), one publish
            warnings = [e for e in logs if e["log_level"] == "warning"]
            assert sorted(e["instance"] for e in warnings) == sorted([a.instance_id, b.instance_id])
            assert all("local only" in e["event"] for e in warnings)  # once per instance

            redis_server.start()  # empty: no persistence
            with structlog.testing.capture_logs() as logs:
                lease = await a.acquire(KEY)
            assert isinstance(lease, Lease)
            assert not a.degraded
            assert any("reachable again" in e["event"] for e in logs)
            assert not await b.renew(held)  # a holds it now

            with trio.fail_after(4):  # the subscriber re-subscribes by itself
                while not got:
                    await a.publish_purge({"keys": ["after"]})
                    await trio.sleep(0.1)
            assert got[0] == {"keys": ["after"]}
            nursery.cancel_scope.cancel()
        assert degraded_count(metrics) == 4


async def test_redis_unreachable_from_the_start() -> None:
    """With no server at all, opening works and every call answers local only."""
    metrics = Metrics()
    with trio.fail_after(3):
        async with open_redis_leases(f"redis://127.0.0.1:{free_port()}", metrics=metrics) as a:
            assert await a.acquire(KEY) is LOCAL_ONLY
            async with trio.open_nursery() as nursery:

                async def never(message: dict[str, Any]) -> None:
                    raise AssertionError(message)

                await nursery.start(a.serve_purges, never)  # starts though unsubscribed
                nursery.cancel_scope.cancel()
    assert degraded_count(metrics) == 1


async def test_redis_cluster_leases_and_purges(redis_cluster: RedisServer) -> None:
    """On a Redis Cluster (redis+cluster://) leases, renewals and purges work alike."""
    async with two_instances(redis_cluster.url) as (a, b):
        got: list[dict[str, Any]] = []
        arrived = trio.Event()

        async def on_purge(message: dict[str, Any]) -> None:
            got.append(message)
            arrived.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_purges, on_purge)
            async with a.hold(KEY) as lease:
                assert isinstance(lease, Lease)
                await trio.sleep(TTL * 1.5)  # renewed
                assert await b.acquire(KEY) is None
            again = await b.acquire(KEY)
            assert isinstance(again, Lease)
            assert again.token > lease.token
            assert await a.publish_purge({"keys": [KEY]})
            with trio.fail_after(2):
                await arrived.wait()
            nursery.cancel_scope.cancel()
        assert got == [{"keys": [KEY]}]
        assert not a.degraded
        assert not b.degraded


# --- URLs and configuration -------------------------------------------------------------


def test_redis_urls() -> None:
    """redis[s]:// name a server, redis[s]+cluster:// a Cluster; other schemes are refused."""
    assert parse_redis_url("redis://h:6379/0") == ("redis://h:6379/0", False)
    assert parse_redis_url("rediss://u:p@h:6380") == ("rediss://u:p@h:6380", False)
    assert parse_redis_url("redis+cluster://h:7000") == ("redis://h:7000", True)
    assert parse_redis_url("rediss+cluster://h:7000") == ("rediss://h:7000", True)
    assert isinstance(make_client("redis+cluster://127.0.0.1:7000"), coredis.RedisCluster)
    assert isinstance(make_client("redis://127.0.0.1:6379"), coredis.Redis)
    for bad in ("http://h:6379", "h:6379", "redis://"):
        with pytest.raises(ValueError, match="redis"):
            parse_redis_url(bad)
    lease_key, fence_key = lease_names(KEY)
    tag = lease_key.split("{")[1].split("}")[0]
    assert fence_key.split("{")[1].split("}")[0] == tag  # one Cluster hash slot


def test_cluster_config() -> None:
    """[cluster] redis_url and lease_ttl load with units and are checked."""
    base = '[[origins]]\nname = "v"\nmatcher = "^/v/(.+)$"\n'
    base += '[[origins.sources]]\ntype = "filesystem"\nroot = "."\npath = "$1"\n'
    config = load_config(text=base, env={})
    assert config.cluster.redis_url == ""
    assert config.cluster.lease_ttl == 10.0
    text = '[cluster]\nredis_url = "redis+cluster://10.0.0.5:7000"\nlease_ttl = "3s"\n' + base
    with pytest.raises(ConfigError) as alone:  # followers need the shared store
        load_config(text=text, env={})
    assert [key for key, _ in alone.value.problems] == ["cluster.redis_url"]
    text = text.replace('lease_ttl = "3s"\n', 'lease_ttl = "3s"\n[cluster.s3]\nbucket = "b"\n')
    config = load_config(text=text, env={})
    assert config.cluster.redis_url == "redis+cluster://10.0.0.5:7000"
    assert config.cluster.lease_ttl == 3.0
    text = '[cluster]\nredis_url = "http://x"\nlease_ttl = "10ms"\n' + base
    with pytest.raises(ConfigError) as info:
        load_config(text=text, env={})
    assert "cluster.redis_url" in str(info.value)
    assert "cluster.lease_ttl" in str(info.value)


# --- the in-memory fake -----------------------------------------------------------------


async def test_memory_leases_behave_alike(autojump_clock: trio.testing.MockClock) -> None:
    """The fake: one winner, rising tokens, expiry on trio's clock, stolen → LeaseLost."""
    hub = MemoryLeaseHub()
    a, b = MemoryLeases(hub, ttl=TTL), MemoryLeases(hub, ttl=TTL)
    first = await a.acquire(KEY)
    assert isinstance(first, Lease)
    assert await b.acquire(KEY) is None
    await b.wait_released(KEY)  # expires: a never renewed
    second = await b.acquire(KEY)
    assert isinstance(second, Lease)
    assert second.token > first.token
    assert not await a.renew(first)
    await b.release(second)

    real_renew = a.renew

    async def stalled_renew(lease: Lease) -> bool:
        await trio.sleep(TTL * 2)
        return await real_renew(lease)

    a.renew = stalled_renew  # type: ignore[method-assign]
    finished = False
    async with trio.open_nursery() as nursery:

        async def steal() -> None:
            await b.wait_released(KEY)
            async with b.hold(KEY) as outcome:
                assert isinstance(outcome, Lease)
                await trio.sleep_forever()

        async def transcode() -> None:
            nonlocal finished
            async with a.hold(KEY):
                nursery.start_soon(steal)
                await trio.sleep(100)
                finished = True

        with pytest.raises(LeaseLost):
            await transcode()
        nursery.cancel_scope.cancel()
    assert not finished
    hub.down = True
    assert await a.acquire("k") is LOCAL_ONLY
    assert not await a.publish_purge({"keys": []})
    assert a.degraded_count == 2


async def test_memory_purges(autojump_clock: trio.testing.MockClock) -> None:
    """The fake delivers purge messages to every subscriber."""
    hub = MemoryLeaseHub()
    a, b = MemoryLeases(hub), MemoryLeases(hub)
    got: list[dict[str, Any]] = []

    async def on_purge(message: dict[str, Any]) -> None:
        got.append(message)

    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve_purges, on_purge)
        assert await a.publish_purge({"prefixes": ["/videos/2024/"]})
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert got == [{"prefixes": ["/videos/2024/"]}]


def _both_are_leases(redis: RedisLeases, memory: MemoryLeases) -> list[Leases]:
    """Type-checked only: both implementations satisfy the ``Leases`` protocol."""
    return [redis, memory]
