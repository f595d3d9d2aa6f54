"""Configuration: TOML file (or the embedded default), environment overrides, strict validation.

Unknown keys are errors. Durations and sizes carry units: ``ttl = "1d"``, ``timeout = "90s"``,
``max_source_size = "256MiB"`` (a bare number means seconds or bytes). Scalar keys can be
overridden from the environment as ``RESIZER_<SECTION>_<KEY>`` (e.g. ``RESIZER_SERVER_PORT``);
``RESIZER_FFMPEG`` selects the ffmpeg binary. Relative paths are resolved against the config
file's folder (against the working directory for the embedded default).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType, get_args, get_origin, get_type_hints

from .errors import ConfigError, InvalidOption
from .options import (
    ALIASES,
    MAX_DIMENSION,
    MIN_DIMENSION,
    PARAMS,
    Limits,
    build_options,
    normalize_params,
)
from .scheduling.queue import RUN_KINDS
from .targets import split_host_port
from .units import DAYS, HOURS, MILLISECONDS, MINUTES, SECONDS, GiB, KiB, MiB

Duration = NewType("Duration", float)  # seconds
ByteSize = NewType("ByteSize", int)  # bytes

ENV_PREFIX = "RESIZER_"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Seconds a graceful shutdown waits for open responses before cutting them.
    graceful_timeout: Duration = Duration(5 * SECONDS)
    # Pending connections the kernel queues for accept(): bursts of hundreds of clients
    # would otherwise wait for SYN retransmits (1 s, 3 s, ...) before being served.
    backlog: int = 2048
    # An idle keep-alive connection (or one whose request has not arrived) is closed after.
    keep_alive_timeout: Duration = Duration(5 * SECONDS)
    # Processes serving the one socket (1: this process serves). Each is one Python thread,
    # so one worker uses at most one core; they share the disk cache and its leases.
    workers: int = 1
    # Behind nginx: the prefix of an `internal` nginx location aliasing the disk cache's
    # entries/ folder (e.g. "/_resizer_cache/"). Hits are then answered with an
    # X-Accel-Redirect there, and nginx sends the file; "": resizer sends hits itself.
    accel_redirect: str = ""


@dataclass(frozen=True)
class HttpConfig:
    # Web pages ("scheme://host[:port]") whose scripts may read responses, as players built
    # on Media Source Extensions do; ["*"]: any page (no credentials); []: no CORS headers.
    cors_allow_origins: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"
    # Take X-Request-Id from the request (a trusted proxy sets it; at most 128 printable
    # ASCII characters, else replaced); false: every request gets a new id.
    trust_request_id: bool = False


@dataclass(frozen=True)
class CacheConfig:
    backend: Literal["disk", "memory"] = "disk"
    path: str = ".cache/resizer"
    ttl: Duration = Duration(1 * DAYS)
    # A lookup that is not a hot entry asks the origin at the same time, so a miss does not
    # pay for both one after the other; off: the origin is asked only after a miss.
    speculative_resolution: bool = True
    # First chunk of a stream; then it adapts. Small, because a slow client's first chunks
    # look fast while the kernel's socket buffers absorb them, and a large one then blocks
    # for seconds (1000 players at playback speed: 94 MB per worker with 64 KiB, 105 with
    # 256 KiB); fast clients double it after every quick send.
    read_chunk: ByteSize = ByteSize(64 * KiB)
    # Streams grow their chunks while the client drains them fast and shrink them while it
    # is slow, within these bounds, drawing from one budget of buffered bytes per process.
    min_read_chunk: ByteSize = ByteSize(16 * KiB)
    max_read_chunk: ByteSize = ByteSize(1 * MiB)
    stream_budget: ByteSize = ByteSize(32 * MiB)
    # While the budget is spent streams wait their turn; after this long one gets the
    # minimum over budget (clients that stopped reading must not stall the others).
    stream_budget_wait: Duration = Duration(1 * SECONDS)
    # While streams run, hand freed heap memory back to the OS at most this often (glibc's
    # malloc_trim; otherwise RSS stays at its peak); 0: never.
    heap_trim_interval: Duration = Duration(1 * SECONDS)
    fsync: bool = False
    # Downloaded remote sources kept for further variants (least recently used evicted
    # first; files being read are never evicted); 0: download for every transformation.
    source_files_size: ByteSize = ByteSize(1 * GiB)
    # Bound of the disk cache's entries (and partial files being written): least recently
    # used entries are evicted beyond it (cache/eviction.py); 0: half of the free space of
    # the cache folder's filesystem plus what the cache holds, measured at start-up.
    max_size: ByteSize = ByteSize(0)
    # How often a worker sweeps the folder (expired entries, then LRU beyond max_size);
    # commits that push the cache over max_size start a sweep at once.
    sweep_interval: Duration = Duration(30 * SECONDS)
    # Expired entries stay this long (the first to go when the cache is over max_size), so a
    # request after expiry revalidates the entry with its origin instead of transcoding.
    expired_retention: Duration = Duration(7 * DAYS)


@dataclass(frozen=True)
class TransformConfig:
    ffmpeg: str = ""  # empty: $RESIZER_FFMPEG, else the bundled imageio-ffmpeg binary
    timeout: Duration = Duration(10 * MINUTES)
    probe_timeout: Duration = Duration(20 * SECONDS)
    # Abandoned output is never used: ffmpeg gets SIGTERM, then SIGKILL if it is still
    # flushing its encoders (x264 lookahead at slow presets takes most of a second).
    kill_grace: Duration = Duration(200 * MILLISECONDS)
    # A frame (or VTT track) of a remote source at least this large, from an origin that
    # serves byte ranges, is read by seeking (only the bytes ffmpeg needs) instead of a
    # whole download; 0: always download.
    seek_remote_over: ByteSize = ByteSize(32 * MiB)


@dataclass(frozen=True)
class LimitsConfig:
    max_width: int = MAX_DIMENSION
    max_height: int = MAX_DIMENSION
    # Outputs (video, audio, spritesheet spans) are never longer than this; it is also the
    # ceiling of the `duration` option.
    max_duration: Duration = Duration(5 * MINUTES)
    # Output length when `duration` is not given; 0 means the rest of the source (capped).
    default_duration: Duration = Duration(0)
    max_source_size: ByteSize = ByteSize(256 * MiB)  # 413 beyond, enforced while reading
    max_source_duration: Duration = Duration(2 * HOURS)  # 422 beyond
    # Decompression-bomb guard: width x height of the source's video (422 beyond).
    max_source_pixels: int = 4096 * 4096
    # Distinct in-flight works (origin fetch + transform); requests that join one in flight
    # never count. A new key beyond it waits up to origin_queue_timeout, then gets a 503.
    max_concurrent_origins: int = 100
    origin_queue_timeout: Duration = Duration(10 * SECONDS)
    max_concurrent_transforms: int = 0  # ffmpeg processes at once; 0: the CPU count

    def options_limits(self) -> Limits:
        return Limits(
            max_width=self.max_width,
            max_height=self.max_height,
            max_duration_ms=round(self.max_duration * 1000),
            default_duration_ms=round(self.default_duration * 1000) or None,
        )


@dataclass(frozen=True)
class CoalescingConfig:
    # Off: every request runs its own fetch and transform (no joining, no leases either).
    enabled: bool = True
    # Let a transformation finish and fill the cache when its last client left (default:
    # stop it at once, nobody needs it).
    finish_without_clients: bool = False
    # Processes sharing a disk cache produce each key once: one leads (a lock on the partial
    # entry), the others tail its partial file, looking every lease_poll_interval.
    cross_process: bool = True
    lease_poll_interval: Duration = Duration(20 * MILLISECONDS)


@dataclass(frozen=True)
class HlsConfig:
    """HLS on the fly (format=hls): segment length, read-ahead, idle runs, the ladder."""

    # Every segment but the last is this long: keyframes are forced at its multiples.
    segment_seconds: Duration = Duration(4 * SECONDS)
    # A run producing segments keeps this many ahead of the newest one asked for.
    prefetch_segments: int = 3
    # A run stops when no client has asked for one of its segments for this long.
    idle_timeout: Duration = Duration(20 * SECONDS)
    # The renditions of a master playlist (format=hls&ladder=) that names none.
    ladder: tuple[str, ...] = ("mobile", "tablet", "desktop")


@dataclass(frozen=True)
class SchedulingConfig:
    """Which ffmpeg run goes first when every slot ([limits] max_concurrent_transforms,
    shared by all the workers of a machine) is busy; see README.md, "Scheduling"."""

    # Off: first come, first served (the slot count still holds; queues stay bounded).
    enabled: bool = True
    # Kinds of run by class (kinds in neither list are medium): probe, frame, spritesheet,
    # video, audio, segment (an HLS segment a player waits for), prefetch (HLS read-ahead,
    # "Sec-Purpose: prefetch" requests), detached (a Work finishing with no client).
    high: tuple[str, ...] = ("probe", "frame", "spritesheet", "segment")
    low: tuple[str, ...] = ("prefetch", "detached")
    # A waiting run moves up one class after waiting this long (0: never), so low never starves.
    aging: Duration = Duration(10 * SECONDS)
    # Waiting runs per class; a new key beyond it gets 503 with Retry-After.
    max_queue: int = 100
    # Slots one source file may hold with medium and low runs; 0: every slot but one.
    max_per_source: int = 0
    # Slots one client address may hold with medium and low runs; 0: no limit (behind a
    # proxy every client has the proxy's address).
    max_per_client: int = 0
    # Slots only high runs may take (runs are never preempted: without it, a frame waits
    # for a long transcode to end); at most all slots but one.
    reserved_high: int = 1


@dataclass(frozen=True)
class SecurityConfig:
    # Hosts whose absolute http(s) URLs the /cdn-cgi/media form may fetch; empty: none (403).
    allowed_remote_hosts: tuple[str, ...] = ()
    # Origins never resolve to loopback, private or link-local addresses unless a configured
    # source (or allowed_remote_hosts) names that IP literally, or it lies in one of these
    # networks (e.g. "10.0.0.0/8" for an internal object store).
    allowed_private_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResponsiveConfig:
    """Choosing a derivative from IMQuery parameters, client hints and the User-Agent."""

    enabled: bool = True
    # derivative -> the largest physical width (CSS px x density) it serves; the widest
    # derivative also takes everything above.
    breakpoints: dict[str, int] = field(
        default_factory=lambda: {"mobile": 854, "tablet": 1280, "desktop": 1920}
    )
    # device class read from the User-Agent -> derivative (no match: source size).
    devices: dict[str, str] = field(
        default_factory=lambda: {"mobile": "mobile", "tablet": "tablet", "desktop": "desktop"}
    )
    save_data_derivative: str = "mobile"  # Save-Data: on
    slow_network_derivative: str = "mobile"  # ECT: slow-2g or 2g
    medium_network_derivative: str = "tablet"  # ECT: 3g caps at this one
    # imwidth + imheight: a derivative matches when both its size and its aspect ratio lie
    # within these relative tolerances; otherwise the values are used directly.
    size_tolerance: float = 0.25
    aspect_tolerance: float = 0.1


@dataclass(frozen=True)
class SourceConfig:
    type: Literal["filesystem", "http", "s3"]
    path: str = "${path}"  # template filled from the origin matcher's captures
    priority: int = 0  # lower first
    name: str = ""  # for metrics and logs; default "<origin>.<index>"
    root: str = ""  # filesystem: the folder
    base_url: str = ""  # http: the path is appended to it
    bucket: str = ""  # s3
    region: str = "us-east-1"  # s3
    endpoint_url: str = ""  # s3-compatible stores; empty: AWS (virtual-hosted URLs)
    access_key_id: str = ""  # s3; empty: $AWS_ACCESS_KEY_ID
    secret_access_key: str = ""  # s3; empty: $AWS_SECRET_ACCESS_KEY
    headers: dict[str, str] = field(default_factory=dict)  # http/s3: sent with every request
    # http: {type = "bearer", env = "VAR"} (token read from $VAR at start-up) or
    # {type = "header", name = "X-Api-Key", value = "..." | env = "VAR"}.
    auth: dict[str, str] = field(default_factory=dict)
    connect_timeout: Duration = Duration(5 * SECONDS)
    first_byte_timeout: Duration = Duration(20 * SECONDS)
    total_timeout: Duration = Duration(5 * MINUTES)
    # http/s3: longest silence while reading a body (a range ffmpeg reads has no total).
    idle_timeout: Duration = Duration(30 * SECONDS)
    # Circuit breaker: open after this many consecutive failures (0: no breaker), probe
    # again after reset_timeout with at most half_open_max requests at once.
    failure_threshold: int = 5
    reset_timeout: Duration = Duration(60 * SECONDS)
    half_open_max: int = 3


@dataclass(frozen=True)
class AdminConfig:
    # The environment variable holding the bearer token of /admin/* and debug=view; they
    # answer 404 unless it names a variable with a non-empty value (README "Seeing inside").
    token_env: str = ""


@dataclass(frozen=True)
class ClusterS3Config:
    """[cluster.s3]: the shared result store (resizer/cluster/s3store.py); bucket "": none."""

    bucket: str = ""
    # Prepended to every object name (manifests/..., data/...), e.g. "resizer/".
    prefix: str = "resizer/"
    region: str = "us-east-1"
    endpoint_url: str = ""  # S3-compatible stores (MinIO, Ceph, R2); empty: AWS
    access_key_id: str = ""  # empty: $AWS_ACCESS_KEY_ID (as for s3 sources)
    secret_access_key: str = ""  # empty: $AWS_SECRET_ACCESS_KEY
    # Parts uploaded at once per output; the producer waits while all are busy.
    upload_concurrency: int = 5
    # Multipart part size: at least 5 MiB (S3's minimum for every part but the last).
    part_size: ByteSize = ByteSize(8 * MiB)
    # Ranged GETs in flight ahead of the reader.
    read_ahead: int = 3
    connect_timeout: Duration = Duration(5 * SECONDS)
    # One request, body included (an 8 MiB part upload or download).
    request_timeout: Duration = Duration(60 * SECONDS)


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: several instances sharing results ([cluster.s3])."""

    s3: ClusterS3Config = field(default_factory=ClusterS3Config)
    # Leases (one transcode per key) and purges between instances (resizer/cluster/leases.py):
    # redis://, rediss:// (TLS), or redis+cluster:// / rediss+cluster:// (a Cluster's seed
    # node); "": none (each instance alone).
    redis_url: str = ""
    # A leader that stops renewing its lease loses it after this long (renewed every third).
    lease_ttl: Duration = Duration(10 * SECONDS)


TTL_CLASSES = ("ok", "redirects", "client_error", "server_error")


@dataclass(frozen=True)
class OriginConfig:
    name: str
    matcher: str
    sources: tuple[SourceConfig, ...] = ()
    # Cache-Control max-age by response class, seconds; "ok" also sets the cache entry's
    # TTL (default: [cache] ttl). Errors are never stored, so theirs bound clients' caches.
    ttl: dict[str, Duration] = field(default_factory=dict)
    # RFC 5861: an entry expired by less than this is answered at once (X-Cache-Status:
    # STALE) and revalidated in the background; by less than stale_if_error, it is served
    # when revalidating or producing it again fails. 0 turns each off.
    stale_while_revalidate: Duration = Duration(0)
    stale_if_error: Duration = Duration(0)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    responsive: ResponsiveConfig = field(default_factory=ResponsiveConfig)
    coalescing: CoalescingConfig = field(default_factory=CoalescingConfig)
    hls: HlsConfig = field(default_factory=HlsConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    derivatives: dict[str, dict[str, str]] = field(
        default_factory=lambda: dict(DEFAULT_DERIVATIVES)
    )
    origins: tuple[OriginConfig, ...] = ()
    # Folder that relative paths in this configuration are relative to.
    base_dir: Path = field(default_factory=Path.cwd)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


DEFAULT_CONFIG_TOML = """
[server]
host = "127.0.0.1"
port = 8080

[cache]
backend = "disk"
path = ".cache/resizer"

[[origins]]
name = "videos"
matcher = "^/videos/(?P<path>.+)$"

[[origins.sources]]
type = "filesystem"
root = "./media"
path = "${path}"
priority = 0
"""

_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "http": HttpConfig,
    "logging": LoggingConfig,
    "cache": CacheConfig,
    "transform": TransformConfig,
    "limits": LimitsConfig,
    "security": SecurityConfig,
    "responsive": ResponsiveConfig,
    "coalescing": CoalescingConfig,
    "hls": HlsConfig,
    "scheduling": SchedulingConfig,
    "admin": AdminConfig,
    "cluster": ClusterConfig,
}

# Shipped presets; [derivatives.<name>] tables add to or replace them.
DEFAULT_DERIVATIVES: dict[str, dict[str, str]] = {
    "desktop": {"width": "1920", "height": "1080", "fit": "scale-down"},
    "tablet": {"width": "1280", "height": "720", "fit": "scale-down"},
    "mobile": {"width": "854", "height": "480", "fit": "scale-down"},
    "thumbnail": {"mode": "frame", "width": "640", "height": "360", "format": "jpg"},
}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": SECONDS / 1000, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    "B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}  # fmt: skip


class _Problems:
    """Collects every validation problem so check-config can report them all at once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30, '30s', '5m', '1h', '1d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2] or "s"]
    else:
        raise ValueError(f"{value!r} is not a duration; use e.g. 30, '30s', '5m', '1h', '1d'")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size like 65536, '64KiB', '256MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m[1]) * _SIZE_UNITS[m[2] or "B"])
    else:
        raise ValueError(f"{value!r} is not a size; use e.g. 65536, '64KiB', '256MiB'")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _convert(value: object, hint: Any, *, from_env: bool) -> object:
    """Check/convert one scalar against its annotation; raise ValueError with a clear reason."""
    if hint is Duration:
        return parse_duration(value)
    if hint is ByteSize:
        return parse_size(value)
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ValueError(f"{value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value
    if hint is bool:
        if from_env and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not a boolean (true/false)")
        return value
    if hint is int:
        if from_env and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value
    if hint is float:
        if from_env and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if get_origin(hint) is tuple:
        items = value.split(",") if from_env and isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"{value!r} is not a list of strings")
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"{value!r} is not a list of strings")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if get_origin(hint) is dict:
        value_type = get_args(hint)[1]
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a table")
        for item in value.values():
            if value_type is int and (isinstance(item, bool) or not isinstance(item, int)):
                raise ValueError(f"{item!r} is not an integer")
            if value_type is str and not isinstance(item, str):
                raise ValueError(f"{item!r} is not a string")
        return dict(value)
    raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module


def _build(
    cls: type[Any],
    data: Mapping[str, object],
    prefix: str,
    problems: _Problems,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Build dataclass ``cls`` from ``data`` (+ env overrides), recording problems by key."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            allowed = ", ".join(fields)
            problems.add(f"{prefix}{key}", f"unknown key; allowed here: {allowed}")
    kwargs: dict[str, object] = {}
    for name, f in fields.items():
        hint = hints[name]
        value: object = data.get(name, dataclasses.MISSING)
        from_env = False
        env_name = f"{ENV_PREFIX}{prefix.replace('.', '_')}{name}".upper()
        if env is not None and env_name in env:
            value, from_env = env[env_name], True
        if value is dataclasses.MISSING:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                problems.add(f"{prefix}{name}", "required key is missing")
            continue
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # e.g. [cluster.s3]
            if not isinstance(value, dict):
                problems.add(f"{prefix}{name}", "must be a table")
                continue
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", problems, env) or hint()
            continue
        try:
            kwargs[name] = _convert(value, hint, from_env=from_env)
        except ValueError as exc:
            where = f"{prefix}{name}" + (f" (from ${env_name})" if from_env else "")
            problems.add(where, str(exc))
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing required keys were already recorded


def _build_origins(raw: object, problems: _Problems) -> tuple[OriginConfig, ...]:
    if not isinstance(raw, list):
        problems.add("origins", "must be an array of tables ([[origins]])")
        return ()
    origins: list[OriginConfig] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        where = f"origins[{index}]"
        if not isinstance(item, dict):
            problems.add(where, "must be a table")
            continue
        body = {k: v for k, v in item.items() if k not in ("sources", "ttl")}
        head = _build(OriginConfig, body, f"{where}.", problems)
        ttl = _build_ttl(item.get("ttl", {}), f"{where}.ttl", problems)
        sources_raw = item.get("sources", [])
        sources: list[SourceConfig] = []
        if not isinstance(sources_raw, list) or not sources_raw:
            problems.add(f"{where}.sources", "needs at least one [[origins.sources]] table")
        else:
            for s_index, s_item in enumerate(sources_raw):
                s_where = f"{where}.sources[{s_index}]"
                if not isinstance(s_item, dict):
                    problems.add(s_where, "must be a table")
                    continue
                source = _build(SourceConfig, s_item, f"{s_where}.", problems)
                if source is not None:
                    _check_source(source, s_where, problems)
                    sources.append(source)
        if head is None:
            continue
        if head.name in names:
            problems.add(f"{where}.name", f"duplicate origin name {head.name!r}")
        names.add(head.name)
        try:
            re.compile(head.matcher)
        except re.error as exc:
            problems.add(f"{where}.matcher", f"not a valid regular expression: {exc}")
        origins.append(dataclasses.replace(head, sources=tuple(sources), ttl=ttl))
    return tuple(origins)


def _build_ttl(raw: object, where: str, problems: _Problems) -> dict[str, Duration]:
    if not isinstance(raw, dict):
        problems.add(where, "must be a table like { ok = 86400, client_error = 60 }")
        return {}
    ttl: dict[str, Duration] = {}
    for name, value in raw.items():
        if name not in TTL_CLASSES:
            problems.add(f"{where}.{name}", f"unknown class; allowed: {', '.join(TTL_CLASSES)}")
            continue
        try:
            ttl[name] = Duration(parse_duration(value))
        except ValueError as exc:
            problems.add(f"{where}.{name}", str(exc))
    return ttl


_REQUIRED_BY_TYPE = {"filesystem": ("root",), "http": ("base_url",), "s3": ("bucket",)}
_AUTH_KEYS = {"bearer": {"type", "env"}, "header": {"type", "name", "value", "env"}}


def _check_source(source: SourceConfig, where: str, problems: _Problems) -> None:
    """Rules of one [[origins.sources]] table that depend on its type."""
    for key in _REQUIRED_BY_TYPE[source.type]:
        if not getattr(source, key):
            problems.add(f"{where}.{key}", f"required for type = {source.type!r}")
    if (
        source.type == "http"
        and source.base_url
        and not re.match(r"^https?://[^/?#]+", source.base_url)
    ):
        problems.add(f"{where}.base_url", "must be an absolute http(s) URL")
    if source.auth:
        kind = source.auth.get("type", "")
        if source.type != "http":
            problems.add(f"{where}.auth", "only http sources take auth (s3 signs requests)")
        elif kind not in _AUTH_KEYS:
            problems.add(f"{where}.auth.type", "allowed: bearer, header")
        else:
            for key in set(source.auth) - _AUTH_KEYS[kind]:
                problems.add(f"{where}.auth.{key}", f"unknown key for auth type {kind!r}")
            if kind == "bearer" and not source.auth.get("env"):
                problems.add(f"{where}.auth.env", "names the variable holding the token")
            if kind == "header" and not source.auth.get("name"):
                problems.add(f"{where}.auth.name", "the header to send")
            if kind == "header" and not (source.auth.get("value") or source.auth.get("env")):
                problems.add(f"{where}.auth.value", "give value or env")
    if source.idle_timeout <= 0:
        problems.add(f"{where}.idle_timeout", "must be positive")
    if source.failure_threshold < 0:
        problems.add(f"{where}.failure_threshold", "must be 0 (no circuit breaker) or more")
    if source.half_open_max < 1:
        problems.add(f"{where}.half_open_max", "must be at least 1")


def _build_derivatives(raw: object, problems: _Problems) -> dict[str, dict[str, str]]:
    derivatives = dict(DEFAULT_DERIVATIVES)
    if not isinstance(raw, dict):
        problems.add("derivatives", "must be a table of [derivatives.<name>] tables")
        return derivatives
    for name, table in raw.items():
        if not isinstance(table, dict):
            problems.add(f"derivatives.{name}", "must be a table of option keys")
            continue
        values: dict[str, str] = {}
        for key, value in table.items():
            if isinstance(value, dict | list):
                problems.add(f"derivatives.{name}.{key}", "must be a string, number or boolean")
                continue
            values[key] = str(value).lower() if isinstance(value, bool) else str(value)
        derivatives[name] = values
    return derivatives


def _check_derivatives(config: Config, problems: _Problems) -> None:
    """Each derivative must be a valid set of options within the limits."""
    limits = config.limits.options_limits()
    for name, values in config.derivatives.items():
        unknown = set(values) - {p.lower() for p in PARAMS} - {p for p in PARAMS}
        unknown -= set(ALIASES)
        for key in sorted(unknown):
            problems.add(f"derivatives.{name}.{key}", "not an option name")
        try:
            build_options(normalize_params(values), limits)
        except InvalidOption as exc:
            problems.add(f"derivatives.{name}.{exc.param}", exc.message)
    responsive = config.responsive
    referenced = [
        *(f"responsive.breakpoints.{name}" for name in responsive.breakpoints),
        *(f"responsive.devices.{d}" for d in responsive.devices),
        "responsive.save_data_derivative",
        "responsive.slow_network_derivative",
        "responsive.medium_network_derivative",
    ]
    names = [
        *responsive.breakpoints,
        *responsive.devices.values(),
        responsive.save_data_derivative,
        responsive.slow_network_derivative,
        responsive.medium_network_derivative,
    ]
    for where, name in zip(referenced, names, strict=True):
        if name not in config.derivatives:
            problems.add(where, f"no derivative named {name!r}")
    for device in responsive.devices:
        if device not in ("mobile", "tablet", "desktop"):
            problems.add(f"responsive.devices.{device}", "device classes: mobile, tablet, desktop")
    for name in config.hls.ladder:
        if name not in config.derivatives:
            problems.add("hls.ladder", f"no derivative named {name!r}")
    hls = config.hls
    if not 1 <= hls.segment_seconds <= 30:
        problems.add("hls.segment_seconds", "must lie within 1s-30s")
    if not 0 <= hls.prefetch_segments <= 30:
        problems.add("hls.prefetch_segments", "must lie within 0-30")
    if hls.idle_timeout <= 0:
        problems.add("hls.idle_timeout", "must be positive")


def _check(config: Config, problems: _Problems) -> None:
    """Cross-field rules that a single key's type cannot express."""
    _check_derivatives(config, problems)
    if config.limits.max_concurrent_origins < 1:
        problems.add("limits.max_concurrent_origins", "must be at least 1")
    scheduling = config.scheduling
    for kind in (*scheduling.high, *scheduling.low):
        if kind not in RUN_KINDS:
            known = ", ".join(sorted(RUN_KINDS))
            problems.add("scheduling", f"unknown kind of run {kind!r}; known: {known}")
    if both := set(scheduling.high) & set(scheduling.low):
        problems.add("scheduling", f"{', '.join(sorted(both))} cannot be both high and low")
    for name in ("max_queue", "max_per_source", "max_per_client", "reserved_high"):
        if getattr(scheduling, name) < 0:
            problems.add(f"scheduling.{name}", "must be 0 or more")
    if scheduling.aging < 0:
        problems.add("scheduling.aging", "must be 0 (never) or more")
    if config.limits.max_concurrent_transforms < 0:
        problems.add("limits.max_concurrent_transforms", "must be 0 (CPU count) or more")
    if config.limits.max_duration < 1:
        problems.add("limits.max_duration", "must be at least 1s")
    if config.limits.default_duration > config.limits.max_duration:
        problems.add("limits.default_duration", "must not exceed limits.max_duration")
    if not 0 <= config.server.port <= 65535:
        problems.add("server.port", f"{config.server.port} is not a TCP port (0-65535)")
    if not 1 <= config.server.workers <= 64:
        problems.add("server.workers", "must be between 1 and 64")
    elif config.server.workers > 1 and config.cache.backend != "disk":
        # Workers share entries and coalesce through the disk cache's files and leases.
        problems.add("server.workers", "several workers need cache.backend = disk")
    accel = config.server.accel_redirect
    if accel and not _ACCEL_PREFIX_RE.fullmatch(accel):
        problems.add("server.accel_redirect", 'a location prefix like "/_resizer_cache/"')
    elif accel and config.cache.backend != "disk":
        # nginx reads the entries' files: a memory cache has none.
        problems.add("server.accel_redirect", "needs cache.backend = disk")
    for key in ("max_width", "max_height"):
        value = getattr(config.limits, key)
        if not MIN_DIMENSION <= value <= 8192:
            problems.add(f"limits.{key}", f"{value} must lie within {MIN_DIMENSION}-8192")
    if config.cache.read_chunk < 4 * KiB:
        problems.add("cache.read_chunk", "must be at least 4KiB")
    if 0 < config.cache.max_size < 1 * MiB:
        problems.add("cache.max_size", "must be 0 (auto) or at least 1MiB")
    if config.cache.sweep_interval < 100 * MILLISECONDS:
        problems.add("cache.sweep_interval", "must be at least 100ms")
    if config.transform.timeout <= 0:
        problems.add("transform.timeout", "must be positive")
    if not config.origins:
        problems.add("origins", "at least one [[origins]] table is required")
    _check_cors_origins(config.http.cors_allow_origins, problems)
    _check_cluster_s3(config.cluster.s3, problems)
    _check_cluster_redis(config.cluster, problems)
    for entry in config.security.allowed_remote_hosts:
        try:
            split_host_port(entry)
        except ValueError as exc:
            problems.add("security.allowed_remote_hosts", str(exc))


def _check_cluster_s3(s3: ClusterS3Config, problems: _Problems) -> None:
    if not 5 * MiB <= s3.part_size <= 5 * GiB:
        problems.add("cluster.s3.part_size", "must lie within 5MiB-5GiB (S3's part sizes)")
    if not 1 <= s3.upload_concurrency <= 64:
        problems.add("cluster.s3.upload_concurrency", "must lie within 1-64")
    if not 1 <= s3.read_ahead <= 64:
        problems.add("cluster.s3.read_ahead", "must lie within 1-64")
    if s3.endpoint_url and not re.match(r"^https?://[^/?#]+/?$", s3.endpoint_url):
        problems.add("cluster.s3.endpoint_url", "must be an http(s) URL without a path")
    if not s3.region or "/" in s3.region:
        problems.add("cluster.s3.region", "must be a region name such as us-east-1")
    if s3.prefix.startswith("/"):
        problems.add("cluster.s3.prefix", 'must not start with "/"')
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        problems.add("cluster.s3", "set both access_key_id and secret_access_key, or neither")
    for key in ("connect_timeout", "request_timeout"):
        if getattr(s3, key) <= 0:
            problems.add(f"cluster.s3.{key}", "must be positive")


_REDIS_URL_RE = re.compile(r"rediss?(\+cluster)?://[^/?#\s]+(/\d*)?(\?\S*)?")


def _check_cluster_redis(cluster: ClusterConfig, problems: _Problems) -> None:
    if cluster.redis_url and not _REDIS_URL_RE.fullmatch(cluster.redis_url):
        problems.add(
            "cluster.redis_url",
            "must be redis://, rediss://, redis+cluster:// or rediss+cluster://host[:port][/db]",
        )
    if cluster.lease_ttl < 0.1:
        problems.add("cluster.lease_ttl", "must be at least 100ms")
    if cluster.redis_url and not cluster.s3.bucket:
        # A follower serves the leader's output from the shared store: without one it would
        # wait for the leader and then transcode again.
        problems.add("cluster.redis_url", "needs [cluster.s3] (followers read the leader's output)")


# An nginx location prefix: segments of URL-safe characters (not "." or ".."), "/" at both ends.
_ACCEL_PREFIX_RE = re.compile(r"/((?!\.+/)[A-Za-z0-9._~-]+/)+")

# What a browser sends as Origin: scheme://host[:port], no path (IPv6 hosts in brackets).
_ORIGIN_RE = re.compile(
    r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[^/?#@:\s\[\]]+)(:\d{1,5})?", re.IGNORECASE
)


def _check_cors_origins(origins: tuple[str, ...], problems: _Problems) -> None:
    for origin in origins:
        if origin != "*" and not _ORIGIN_RE.fullmatch(origin):
            problems.add("http.cors_allow_origins", f"{origin!r} is not * or scheme://host[:port]")
    if "*" in origins and len(origins) > 1:
        problems.add("http.cors_allow_origins", '"*" already allows every origin; list it alone')


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    text: str | None = None,
) -> Config:
    """Load ``path`` (or ``text``, or the embedded default) and apply environment overrides.

    Raises ``ConfigError`` listing every problem found, each with the offending key.
    """
    env = os.environ if env is None else env
    problems = _Problems()
    if text is None and path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([(str(path), f"cannot read: {exc.strerror}")]) from exc
    base_dir = path.resolve().parent if path is not None else Path.cwd()
    try:
        data = tomllib.loads(DEFAULT_CONFIG_TOML if text is None else text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path or "<config>"), f"invalid TOML: {exc}")]) from exc

    known = {*_SECTIONS, "origins", "derivatives"}
    for key in data:
        if key not in known:
            problems.add(key, f"unknown section; allowed: {', '.join(sorted(known))}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            problems.add(name, "must be a table")
            raw = {}
        sections[name] = _build(cls, raw, f"{name}.", problems, env) or cls()
    # RESIZER_FFMPEG is the documented short form of RESIZER_TRANSFORM_FFMPEG.
    if "RESIZER_FFMPEG" in env and "RESIZER_TRANSFORM_FFMPEG" not in env:
        sections["transform"] = dataclasses.replace(
            sections["transform"], ffmpeg=env["RESIZER_FFMPEG"]
        )
    config = Config(
        origins=_build_origins(data.get("origins", []), problems),
        derivatives=_build_derivatives(data.get("derivatives", {}), problems),
        base_dir=base_dir,
        **sections,
    )
    _check(config, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return config
