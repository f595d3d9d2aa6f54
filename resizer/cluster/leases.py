"""One transcode per key across instances: leases and the purge channel, through Redis.

A *lease* per cache key makes one instance the key's leader. It is a Redis string
``resizer:{<digest>}:lease`` set with ``SET NX PX`` (expiry ``lease_ttl``) whose value is
``<instance id>:<fencing token>``. The token comes from ``INCR`` on the key's counter
``resizer:{<digest>}:fence`` in the same script, so every new lease on a key has a larger
token than any before it: a store that remembers the largest token it accepted for a key can
refuse a late write from a leader that lost its lease (fencing). Both names carry the same
hash tag, so the scripts also run on Redis Cluster. The counter expires after
``FENCE_RETENTION`` without a lease; a counter created anew starts from the server's clock in
milliseconds, so tokens keep increasing across that too.

The holder renews every ``lease_ttl / 3`` (``hold(key)`` does it in a task it owns) and
releases with a compare-and-delete script, so it never deletes another instance's lease.
A renewal that finds another token means the lease was lost (the holder stalled longer than
the TTL and another instance took over): ``hold`` cancels its block and raises
``LeaseLost``. A renewal that finds no lease at all re-takes it with the same value (the TTL
lapsed but nobody took over). Followers ``wait_released(key)``, which polls until the lease
is gone or held under another token.

The same connection carries the purge channel: ``publish_purge`` sends a JSON object on
``resizer:purge`` and ``serve_purges`` delivers every one received to a callback,
re-subscribing after errors (messages sent while disconnected are lost).

Degraded mode: while Redis cannot be reached (a refused connection, a timeout, an error),
nothing raises. ``acquire`` answers ``LOCAL_ONLY`` (the caller proceeds alone, as the only
instance), ``wait_released`` returns at once, ``publish_purge`` returns False, and a holder
keeps its block running. The first failure of an outage is logged as a warning, the first
success after it at info; each degraded ``acquire`` or ``publish_purge`` counts in
``resizer_cluster_degraded_total``.

URLs: ``redis://`` and ``rediss://`` (TLS) name one server; ``redis+cluster://`` and
``rediss+cluster://`` name a seed node of a Redis Cluster.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol

import anyio
import coredis
import coredis.exceptions
import structlog
import trio

from ..concurrency.groups import unwrap_single_exception
from ..errors import ServiceUnavailable
from ..options import key_digest
from ..units import SECONDS

if TYPE_CHECKING:
    from ..metrics import Metrics

log = structlog.get_logger(__name__)

PURGE_CHANNEL: Final = "resizer:purge"
# A key's fencing counter outlives its last lease by this long (then it restarts from the
# server's clock, still above every token it gave).
FENCE_RETENTION: Final = 7 * 24 * 3600 * SECONDS
DEFAULT_TTL: Final = 10 * SECONDS
DEFAULT_OP_TIMEOUT: Final = 1 * SECONDS
DEFAULT_POLL_INTERVAL: Final = 0.1 * SECONDS
# A release is shielded from cancellation, but not for longer than this.
RELEASE_TIMEOUT: Final = 1 * SECONDS
_RECONNECT_DELAYS: Final = (0.1, 0.2, 0.5, 1.0, 2.0)

REDIS_SCHEMES: Final = ("redis", "rediss")
CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")


# --- outcomes ---------------------------------------------------------------------------


@dataclass(eq=False)
class Lease:
    """A lease this instance holds on ``key``, with its fencing ``token``."""

    key: str
    token: int
    value: str  # what the lease's Redis string holds: "<instance id>:<token>"
    lost: bool = field(default=False)


class LocalOnly:
    """``acquire``'s answer while Redis is unreachable: proceed alone, uncoordinated."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LOCAL_ONLY"


LOCAL_ONLY: Final = LocalOnly()

Outcome = Lease | LocalOnly | None
"""A lease held, ``LOCAL_ONLY`` (Redis unreachable), or None (another instance holds it)."""

PurgeCallback = Callable[[dict[str, Any]], Awaitable[None]]


class LeaseLost(ServiceUnavailable):
    """Another instance took over a key whose lease this instance held (it stalled)."""

    code = "lease_lost"

    def __init__(self, key: str) -> None:
        super().__init__(f"the lease on {key!r} passed to another instance")
        self.key = key


def lease_names(key: str) -> tuple[str, str]:
    """The Redis names of a key's lease and fencing counter (one hash slot)."""
    tag = key_digest(key)
    return f"resizer:{{{tag}}}:lease", f"resizer:{{{tag}}}:fence"


# --- the protocol -----------------------------------------------------------------------


class Leases(Protocol):
    """Coordination between instances: per-key leases and the purge channel."""

    @property
    def ttl(self) -> float: ...

    @property
    def instance_id(self) -> str: ...

    async def acquire(self, key: str) -> Outcome:
        """Take the lease on ``key`` if nobody holds it (no renewal: see ``hold``)."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` by the TTL; False when another instance holds the key now."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give ``lease`` up if it is still ours (compare-and-delete)."""
        ...

    def hold(self, key: str) -> AbstractAsyncContextManager[Outcome]:
        """Acquire, renew while the block runs, release on exit; see ``LeaseHolding``."""
        ...

    async def wait_released(self, key: str) -> None:
        """Return once no lease on ``key`` is held by the holder seen when called."""
        ...

    async def publish_purge(self, message: dict[str, Any]) -> bool:
        """Send ``message`` to every instance's ``serve_purges``; False if not sent."""
        ...

    async def serve_purges(
        self,
        callback: PurgeCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Call ``callback`` with every purge message, for ever (started once listening)."""
        ...


class LeaseHolding:
    """``hold(key)`` on top of ``acquire``/``renew``/``release``, shared by the implementations.

    ``async with leases.hold(key) as outcome:`` runs the block with ``outcome`` being the
    ``Lease`` (renewed every ``ttl / 3`` by a task of its own), ``LOCAL_ONLY`` or None (the
    block should follow the holder). When a renewal finds the key held by another instance
    the block is cancelled and ``LeaseLost`` is raised from the ``async with``. On exit the
    lease is released, shielded from cancellation for at most ``RELEASE_TIMEOUT``.
    """

    ttl: float

    async def acquire(self, key: str) -> Outcome:
        raise NotImplementedError

    async def renew(self, lease: Lease) -> bool:
        raise NotImplementedError

    async def release(self, lease: Lease) -> None:
        raise NotImplementedError

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[Outcome]:
        outcome = await self.acquire(key)
        if not isinstance(outcome, Lease):
            yield outcome
            return
        lease = outcome
        try:
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_renewed, lease, nursery.cancel_scope)
                    yield lease
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                await self.release(lease)
        if lease.lost:
            raise LeaseLost(key)

    async def _keep_renewed(self, lease: Lease, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.ttl / 3)
            if not await self.renew(lease):
                lease.lost = True
                log.warning("lease lost", key=lease.key, token=lease.token)
                scope.cancel()
                return


# --- Redis ------------------------------------------------------------------------------

# KEYS: lease, fence. ARGV: instance id, ttl ms, fence retention ms. Returns the token or 0.
_ACQUIRE = """
if redis.call('set', KEYS[1], 'pending', 'NX', 'PX', ARGV[2]) == false then return 0 end
if redis.call('exists', KEYS[2]) == 0 then
  local now = redis.call('time')
  redis.call('set', KEYS[2], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
end
local token = redis.call('incr', KEYS[2])
redis.call('pexpire', KEYS[2], ARGV[3])
redis.call('set', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: lease. ARGV: value, ttl ms. 1: renewed, 2: re-taken after expiry, 0: someone else's.
_RENEW = """
local current = redis.call('get', KEYS[1])
if current == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if current == false then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""

# KEYS: lease. ARGV: value. Compare-and-delete.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

_UNREACHABLE = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)

RedisClient = coredis.Redis[str] | coredis.RedisCluster[str]


def parse_redis_url(url: str) -> tuple[str, bool]:
    """``url`` as coredis takes it, and whether it names a Cluster; ValueError if invalid."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ValueError(f"{url!r} is not a URL like redis://host:6379/0")
    if scheme in CLUSTER_SCHEMES:
        return f"{scheme.removesuffix('+cluster')}://{rest}", True
    if scheme in REDIS_SCHEMES:
        return url, False
    allowed = ", ".join(f"{s}://" for s in (*REDIS_SCHEMES, *CLUSTER_SCHEMES))
    raise ValueError(f"{scheme}:// is not supported; use {allowed}")


def make_client(url: str, *, op_timeout: float = DEFAULT_OP_TIMEOUT) -> RedisClient:
    """A coredis client (not yet entered) for a redis[s][+cluster]:// URL."""
    target, cluster = parse_redis_url(url)
    options: dict[str, Any] = {
        "decode_responses": True,
        "connect_timeout": op_timeout,
        "stream_timeout": op_timeout,
        # Degraded mode must show at once: no retries inside coredis.
        "retry_policy": coredis.retry.NoRetryPolicy(),
    }
    if cluster:
        return coredis.RedisCluster.from_url(target, **options)
    return coredis.Redis.from_url(target, **options)


class RedisLeases(LeaseHolding):
    """``Leases`` on a Redis server or Cluster, through coredis.

    Build it with ``open_redis_leases``, which keeps the coredis client open in a task of
    its own (re-opening it if it ever fails) for as long as the ``async with`` lasts.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = DEFAULT_TTL,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        metrics: Metrics | None = None,
    ) -> None:
        parse_redis_url(url)  # fail early on a bad URL
        if ttl <= 0:
            raise ValueError("the lease TTL must be positive")
        self.url = url
        self.ttl = ttl
        self.op_timeout = op_timeout
        self.poll_interval = poll_interval
        self.metrics = metrics
        self._instance_id = secrets.token_hex(8)
        self._client: RedisClient | None = None
        self._degraded = False

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def degraded(self) -> bool:
        """Whether the last attempt to reach Redis failed."""
        return self._degraded

    @property
    def _ttl_ms(self) -> int:
        return max(1, math.ceil(self.ttl * 1000))

    # --- the client's lifetime --------------------------------------------------------

    async def run_client(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a coredis client open; started as soon as the first one is (or failed)."""
        delays = iter(_RECONNECT_DELAYS)
        started = False
        while True:
            try:
                client = make_client(self.url, op_timeout=self.op_timeout)
                async with client:
                    self._client = client
                    if not started:
                        started = True
                        task_status.started()
                    delays = iter(_RECONNECT_DELAYS)
                    await trio.sleep_forever()
            except Exception as exc:  # the client's own tasks failed
                self._client = None
                self._outage(exc)
                if not started:
                    started = True
                    task_status.started()
            await trio.sleep(next(delays, _RECONNECT_DELAYS[-1]))

    def _outage(self, exc: BaseException) -> None:
        if not self._degraded:
            self._degraded = True
            log.warning(
                "redis unreachable: coordination is local only",
                url=_redacted(self.url),
                instance=self._instance_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _reachable(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info(
                "redis reachable again: coordination resumes",
                url=_redacted(self.url),
                instance=self._instance_id,
            )

    def _count_degraded(self) -> None:
        if self.metrics is not None:
            self.metrics.cluster_degraded.inc()

    def _require_client(self) -> RedisClient:
        if self._client is None:
            raise coredis.exceptions.ConnectionError("the Redis client is not open")
        return self._client

    async def _eval(self, script: str, keys: list[str], args: list[str | int]) -> int:
        client = self._require_client()
        with trio.fail_after(self.op_timeout):
            result = await client.eval(script, keys=keys, args=args)
        self._reachable()
        return int(result)  # type: ignore[arg-type]

    # --- leases -----------------------------------------------------------------------

    async def acquire(self, key: str) -> Outcome:
        lease_name, fence_name = lease_names(key)
        try:
            token = await self._eval(
                _ACQUIRE,
                [lease_name, fence_name],
                [self._instance_id, self._ttl_ms, math.ceil(FENCE_RETENTION * 1000)],
            )
        except _UNREACHABLE as exc:
            self._outage(exc)
            self._count_degraded()
            return LOCAL_ONLY
        if token == 0:
            return None
        return Lease(key=key, token=token, value=f"{self._instance_id}:{token}")

    async def renew(self, lease: Lease) -> bool:
        try:
            result = await self._eval(
                _RENEW, [lease_names(lease.key)[0]], [lease.value, self._ttl_ms]
            )
        except _UNREACHABLE as exc:
            # Unreachable is not lost: the block goes on alone until Redis answers again.
            self._outage(exc)
            return True
        return result != 0

    async def release(self, lease: Lease) -> None:
        try:
            await self._eval(_RELEASE, [lease_names(lease.key)[0]], [lease.value])
        except _UNREACHABLE as exc:
            self._outage(exc)  # it expires by itself

    async def holder(self, key: str) -> str | None:
        """The value of ``key``'s lease ("<instance>:<token>"), None if free or unreachable."""
        try:
            client = self._require_client()
            with trio.fail_after(self.op_timeout):
                value = await client.get(lease_names(key)[0])
        except _UNREACHABLE as exc:
            self._outage(exc)
            return None
        self._reachable()
        return value

    async def wait_released(self, key: str) -> None:
        first = await self.holder(key)
        if first is None:
            return
        while True:
            await trio.sleep(self.poll_interval)
            if await self.holder(key) != first:
                return

    # --- purges -----------------------------------------------------------------------

    async def publish_purge(self, message: dict[str, Any]) -> bool:
        payload = json.dumps(message, separators=(",", ":"))
        try:
            client = self._require_client()
            with trio.fail_after(self.op_timeout):
                await client.publish(PURGE_CHANNEL, payload)
        except _UNREACHABLE as exc:
            self._outage(exc)
            self._count_degraded()
            return False
        self._reachable()
        return True

    async def serve_purges(
        self,
        callback: PurgeCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        delays = iter(_RECONNECT_DELAYS)
        started = False
        while True:
            try:
                try:
                    client = self._require_client()
                    async with client.pubsub(
                        channels=[PURGE_CHANNEL], ignore_subscribe_messages=True, retry_policy=None
                    ) as pubsub:
                        self._reachable()
                        if not started:
                            started = True
                            task_status.started()
                        delays = iter(_RECONNECT_DELAYS)
                        async for message in pubsub:
                            await _deliver(message.get("data"), callback)
                    raise coredis.exceptions.ConnectionError("the subscription ended")
                except* anyio.ClosedResourceError as closed:
                    # coredis unsubscribes on a connection already closed while it tears the
                    # subscription down (at shutdown, among the cancellations, which go on).
                    self._outage(closed.exceptions[0])
            except _UNREACHABLE as exc:
                self._outage(exc)
            except Exception as exc:  # coredis wraps errors in groups
                self._outage(exc)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(next(delays, _RECONNECT_DELAYS[-1]))


async def _deliver(data: object, callback: PurgeCallback) -> None:
    try:
        message = json.loads(data) if isinstance(data, str | bytes) else None
    except ValueError:
        message = None
    if not isinstance(message, dict):
        log.warning("ignored a purge message that is not a JSON object", data=repr(data)[:200])
        return
    try:
        await callback(message)
    except Exception:
        log.exception("purge callback failed", message=message)


def _redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hostpart}" if user else f"{scheme}{sep}***@{hostpart}"


@asynccontextmanager
async def open_redis_leases(
    url: str,
    *,
    ttl: float = DEFAULT_TTL,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    metrics: Metrics | None = None,
) -> AsyncIterator[RedisLeases]:
    """``RedisLeases`` whose client lives as long as the block (never fails to open)."""
    leases = RedisLeases(
        url, ttl=ttl, op_timeout=op_timeout, poll_interval=poll_interval, metrics=metrics
    )
    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            await nursery.start(leases.run_client)
            yield leases
            nursery.cancel_scope.cancel()
