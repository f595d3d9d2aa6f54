"""Turn one load-test result (the driver's ``result.json``) into a summary, a report and plots.

    python -m loadtest.report RESULT_JSON OUT_DIR

``summarize`` reduces the raw per-request records and resource samples to numbers;
``success_checks`` compares them with the design notes' targets; ``write_report`` writes
``report.md``, ``latency.png``, ``resources.png`` (``ratios.png`` for a wrk run) and
``result.json`` (the result plus its summary) into a folder.

Conventions:

* Percentiles use linear interpolation between the closest ranks (numpy's default): with
  sorted values x[0..n-1], the q-th percentile is read at position (n - 1) * q / 100.
* Latencies are in seconds in the summary and in milliseconds in the report.
* MB means 10^6 bytes, for throughput and for memory alike (so a "128 MB" target is the
  stricter reading of the two).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MB = 1_000_000
PERCENTILES = (50, 95, 99)
SUCCESS_STATUSES = (200, 206)
NOT_SATISFIABLE = 416  # a byte range past the end: the client's mistake, answered correctly
ABORTED = "ABORTED"  # the driver disconnected on purpose mid-body
HIT = "HIT"
MISS_STATUSES = ("MISS", "COALESCED")  # both waited for a transform

# Targets from the design notes.
HIT_TTFB_P95_TARGET_S = 0.5
MISS_TTFB_P95_TARGET_S = 2.0
RSS_PER_WORKER_TARGET_MB = 128.0
ERROR_RATE_TARGET = 0.001
HIT_RATE_TARGET = 0.8
CONCURRENCY_PER_WORKER_TARGET = 500
NGINX_THROUGHPUT_RATIO_TARGET = 0.5
# wrk goals (issue 14), judged on the whole MP4 and the JPEG frame of a wrk run.
WRK_VIDEO_BODY = "video, MP4"
WRK_FRAME_BODY = "frame, JPEG"
WRK_VIDEO_RATIO_TARGET = 0.8  # one resizer worker against one nginx worker
WRK_FRONT_RATIO_TARGET = 0.9  # resizer behind nginx (X-Accel) against nginx alone
WRK_FRAME_RPS_TARGET = 5000.0  # one worker

FIGURE_SIZE_IN = (8.0, 4.0)
FIGURE_DPI = 100


# --- numbers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def is_error(request: dict[str, Any]) -> bool:
    """Whether a request failed: transport errors, 5xx, 4xx but 416, or a broken body."""
    status = int(request.get("status") or 0)
    cache = request.get("cache")
    if status == NOT_SATISFIABLE:
        return False  # resizer answers 416 without a cache status: not a failure
    if cache == ABORTED:
        # The driver hung up on purpose; only a failed status is still the server's fault.
        return status == 0 or status >= 400
    if status == 0 or status >= 400 or cache == "ERROR":
        return True
    # A 2xx whose body broke off (the driver recorded an exception) is a failure too.
    return bool(request.get("error"))


def is_success(request: dict[str, Any]) -> bool:
    """A 200/206 that did not fail (aborted ones included: their latency is still real)."""
    return request.get("status") in SUCCESS_STATUSES and not is_error(request)


def latency_stats(requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Count and P50/P95/P99 of ttfb and of total (seconds) over ``requests``."""
    ttfbs = [float(r["ttfb"]) for r in requests if r.get("ttfb") is not None]
    totals = [float(r["total"]) for r in requests if r.get("total") is not None]
    return {
        "count": len(requests),
        "ttfb": {f"p{q}": percentile(ttfbs, q) for q in PERCENTILES},
        "total": {f"p{q}": percentile(totals, q) for q in PERCENTILES},
    }


def latency_by_cache_status(requests: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Latency stats of successful requests, one entry per cache status (sorted by name)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for request in requests:
        if is_success(request):
            groups.setdefault(str(request.get("cache")), []).append(request)
    return {status: latency_stats(groups[status]) for status in sorted(groups)}


def max_concurrent(requests: Iterable[dict[str, Any]]) -> int:
    """The most requests in flight at once, from their intervals [t, t + total]."""
    events: list[tuple[float, int]] = []
    for request in requests:
        start, total = request.get("t"), request.get("total")
        if start is None or total is None:
            continue
        events.append((float(start), 1))
        events.append((float(start) + float(total), -1))
    # At equal times ends (-1) sort before starts (+1): back-to-back requests don't overlap.
    events.sort()
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    return peak


def throughput_summary(
    requests: Sequence[dict[str, Any]], duration_s: float | None
) -> dict[str, Any]:
    """Counts, error rate, requests/s, MB/s and per-cache-status latency of one load."""
    errors = sum(1 for r in requests if is_error(r))
    total_bytes = sum(int(r.get("bytes") or 0) for r in requests)
    seconds = duration_s if duration_s and duration_s > 0 else None
    return {
        "requests": len(requests),
        "errors": errors,
        "error_rate": ratio(errors, len(requests)),
        "aborted": sum(1 for r in requests if r.get("cache") == ABORTED),
        "not_satisfiable": sum(1 for r in requests if r.get("status") == NOT_SATISFIABLE),
        "bytes": total_bytes,
        "duration_s": duration_s,
        "rps": ratio(len(requests), seconds),
        "mb_per_s": ratio(total_bytes / MB, seconds),
        "latency": latency_by_cache_status(requests),
    }


def cpu_ms_per_request(
    requests: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]]
) -> float | None:
    """Server CPU time (user + system, all workers) per request, over the samples that
    bracket the load: an efficiency figure that moves less with machine noise than
    throughput does on a shared host."""
    timed = [s for s in samples if s.get("cpu_seconds") is not None]
    if not requests or len(timed) < 2:
        return None
    start = min(float(r.get("t") or 0.0) for r in requests)
    before = [s for s in timed if float(s["t"]) <= start]
    first = before[-1] if before else timed[0]
    last = timed[-1]
    window = [
        r
        for r in requests
        if float(first["t"]) <= float(r.get("t") or 0.0)
        and float(r.get("t") or 0.0) + float(r.get("total") or 0.0) <= float(last["t"])
    ]
    seconds = float(last["cpu_seconds"]) - float(first["cpu_seconds"])
    return ratio(seconds * 1000, len(window))


def hit_rate(requests: Iterable[dict[str, Any]], since_s: float = 0.0) -> float | None:
    """Share of HITs among successful requests started at or after ``since_s``.

    COALESCED is not a hit (it waited for a transform); aborted requests are left out
    because the driver overwrote their cache status.
    """
    counted = [
        r
        for r in requests
        if is_success(r) and r.get("cache") != ABORTED and float(r.get("t") or 0.0) >= since_s
    ]
    return ratio(sum(1 for r in counted if r.get("cache") == HIT), len(counted))


def resource_summary(
    samples: Sequence[dict[str, Any]], workers: int, warmup_s: float
) -> dict[str, Any]:
    """Peaks of RSS, descriptors and connections; growth between the first and last sample
    after warm-up (a leak shows as steady growth while the load is flat)."""

    def peak(key: str) -> int | None:
        values = [int(s[key]) for s in samples if s.get(key) is not None]
        return max(values) if values else None

    def per_worker_rss(sample: dict[str, Any]) -> float | None:
        split = sample.get("rss_per_worker")
        if split:
            return float(max(split))
        if sample.get("rss_bytes") is None:
            return None
        return float(sample["rss_bytes"]) / max(workers, 1)

    per_worker = [v for v in map(per_worker_rss, samples) if v is not None]
    after_warmup = [s for s in samples if float(s.get("t") or 0.0) >= warmup_s]
    first = after_warmup[0] if after_warmup else {}
    last = after_warmup[-1] if after_warmup else {}

    def growth(key: str) -> int | None:
        if len(after_warmup) < 2 or first.get(key) is None or last.get(key) is None:
            return None
        return int(last[key]) - int(first[key])

    return {
        "samples": len(samples),
        "peak_rss_bytes": peak("rss_bytes"),
        "peak_rss_per_worker_bytes": max(per_worker) if per_worker else None,
        "peak_open_fds": peak("open_fds"),
        "peak_connections": peak("connections"),
        "peak_ffmpeg": peak("ffmpeg"),
        "first_rss_bytes": first.get("rss_bytes"),
        "last_rss_bytes": last.get("rss_bytes"),
        "first_open_fds": first.get("open_fds"),
        "last_open_fds": last.get("open_fds"),
        "rss_growth_bytes": growth("rss_bytes"),
        "fd_growth": growth("open_fds"),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers a report needs, from one driver result (JSON-able)."""
    requests: list[dict[str, Any]] = result.get("requests") or []
    samples: list[dict[str, Any]] = result.get("samples") or []
    params: dict[str, Any] = result.get("params") or {}
    metrics: dict[str, Any] = result.get("metrics") or {}
    workers = int(result.get("workers") or 1)
    warmup_s = float(result.get("warmup_s") or 0.0)
    peak_in_flight = max_concurrent(requests)

    summary = throughput_summary(requests, result.get("duration_s"))
    summary["cpu_ms_per_request"] = cpu_ms_per_request(requests, samples)
    summary.update(
        {
            "workers": workers,
            "warmup_s": warmup_s,
            # Targets some checks depend on, so that success_checks needs only the summary.
            "concurrency": params.get("concurrency"),
            "max_rss_mb": params.get("max_rss_mb"),
            "latency_goals": params.get("latency_goals", True),
            "storm": params.get("storm", False),
            "hit_ratio": params.get("hit_ratio"),
            # MISS and COALESCED together: every request that waited for a transform.
            "misses": latency_stats(
                [r for r in requests if is_success(r) and r.get("cache") in MISS_STATUSES]
            ),
            "hit_rate": hit_rate(requests),
            "hit_rate_after_warmup": hit_rate(requests, since_s=warmup_s),
            "origin_fetches": metrics.get("origin_fetches"),
            "transforms": metrics.get("transforms"),
            "metrics": metrics,
            "max_concurrent": peak_in_flight,
            "max_concurrent_per_worker": peak_in_flight / workers,
            "resources": resource_summary(samples, workers, warmup_s),
            "nginx": None,
            "ratios": None,
        }
    )
    nginx = result.get("nginx")
    if nginx:
        nginx_requests: list[dict[str, Any]] = nginx.get("requests") or []
        nginx_summary = throughput_summary(nginx_requests, nginx.get("duration_s"))
        nginx_summary["max_concurrent"] = max_concurrent(nginx_requests)
        nginx_summary["cpu_ms_per_request"] = cpu_ms_per_request(
            nginx_requests, nginx.get("samples") or []
        )
        nginx_summary["resources"] = resource_summary(nginx.get("samples") or [], 1, 0.0)
        summary["nginx"] = nginx_summary
        summary["ratios"] = nginx_ratios(summary, nginx_summary)
    ceiling = result.get("ceiling")
    summary["ceiling"] = None
    if ceiling:
        ceiling_requests: list[dict[str, Any]] = ceiling.get("requests") or []
        summary["ceiling"] = throughput_summary(ceiling_requests, ceiling.get("duration_s"))
        summary["ceiling"]["cpu_ms_per_request"] = cpu_ms_per_request(
            ceiling_requests, ceiling.get("samples") or []
        )
        # Every answer, aborted ones included: nginx's are all hits.
        answered = [r for r in ceiling_requests if is_success(r)]
        summary["ceiling"]["ttfb"] = latency_stats(answered)["ttfb"]
    summary["wrk"] = wrk_summary(result["wrk"]) if result.get("wrk") else None
    return summary


def mean_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the slices; None if a slice lacks it."""
    values = [run.get(key) for run in runs]
    if not values or None in values:
        return None
    return sum(float(v) for v in values if v is not None) / len(values)


def wrk_side(runs: Sequence[dict[str, Any]], size: int | None) -> dict[str, Any]:
    """One server's slices of a wrk cell, added up: rates over the summed durations, CPU
    over the summed requests; latency as the median slice's P50 and the worst slice's P99
    (percentiles of different slices cannot be merged)."""
    seconds = sum(float(r["duration_s"]) for r in runs)
    requests = sum(int(r["requests"]) for r in runs)
    ok = requests - sum(int(r["non_2xx"]) for r in runs)
    cpu = [r.get("server_cpu_s") for r in runs]
    p50s = [r["latency"]["p50"] for r in runs if r["latency"].get("p50") is not None]
    p99s = [r["latency"]["p99"] for r in runs if r["latency"].get("p99") is not None]
    return {
        "slices": len(runs),
        "requests": requests,
        "duration_s": seconds,
        "ok_rps": ratio(ok, seconds),
        # wrk's bytes read (headers included), and the bodies alone for whole-body cells.
        "mb_per_s": ratio(sum(int(r["bytes"]) for r in runs) / MB, seconds),
        "body_mb_per_s": None if size is None else ratio(ok * size / MB, seconds),
        "latency_p50": percentile(p50s, 50),
        "latency_p99": max(p99s, default=None),
        "socket_errors": sum(sum(r["socket_errors"].values()) for r in runs),
        "non_2xx": sum(int(r["non_2xx"]) for r in runs),
        "cpu_ms_per_request": None
        if None in cpu
        else ratio(sum(float(c) for c in cpu if c is not None) * 1000, requests),
        "server_busy": mean_of(runs, "server_busy"),
        "wrk_busy": mean_of(runs, "wrk_busy"),
        "machine_busy": mean_of(runs, "machine_busy"),
        "peak_rss_per_worker_bytes": max(
            (r.get("peak_rss_per_worker_bytes") or 0 for r in runs), default=None
        ),
        "resizer_hits": None
        if any(r.get("resizer_hits") is None for r in runs)
        else sum(float(r["resizer_hits"]) for r in runs),
        "command": runs[0]["command"] if runs else None,
    }


def wrk_summary(wrk: dict[str, Any]) -> dict[str, Any]:
    """Per cell (body x connections): both servers' totals, the ratio of their 2xx
    requests/s (same bodies, so the ratio of body throughput too) per slice pair and
    overall."""
    tested, reference = wrk["tested"], wrk["reference"]
    cells = []
    for cell in wrk["cells"]:
        size = None if cell.get("ranges") else int(cell["size"])
        ours, theirs = cell["runs"][tested], cell["runs"][reference]
        mine, nginx = wrk_side(ours, size), wrk_side(theirs, size)
        cells.append(
            {
                **{k: cell[k] for k in ("body", "query", "size", "ranges", "connections")},
                "tested": mine,
                "reference": nginx,
                "ratio": ratio(mine["ok_rps"], nginx["ok_rps"]),
                "slice_ratios": [
                    ratio(a.get("ok_rps"), b.get("ok_rps"))
                    for a, b in zip(ours, theirs, strict=True)
                ],
            }
        )
    return {**{k: v for k, v in wrk.items() if k != "cells"}, "cells": cells}


def nginx_ratios(resizer: dict[str, Any], nginx: dict[str, Any]) -> dict[str, float | None]:
    """resizer ÷ nginx. Latencies compare HITs: nginx serves only the cached bytes."""
    resizer_hits = resizer["latency"].get(HIT, {}).get("ttfb", {})
    nginx_hits = nginx["latency"].get(HIT, {}).get("ttfb", {})
    return {
        "throughput_ratio": ratio(resizer["mb_per_s"], nginx["mb_per_s"]),
        "rps_ratio": ratio(resizer["rps"], nginx["rps"]),
        "ttfb_p50_ratio": ratio(resizer_hits.get("p50"), nginx_hits.get("p50")),
        "ttfb_p95_ratio": ratio(resizer_hits.get("p95"), nginx_hits.get("p95")),
    }


# --- success metrics --------------------------------------------------------------------------


def success_checks(summary: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The design notes' success metrics as (name, passed, detail), in a fixed order.

    A check whose data the run did not produce (no hits, no samples, no nginx...) is left
    out rather than reported as passed or failed.
    """
    checks: list[tuple[str, bool, str]] = []
    # A run that saturates the server on purpose reports latency without judging it.
    judged = summary.get("latency_goals", True)

    hit_p95 = summary.get("latency", {}).get(HIT, {}).get("ttfb", {}).get("p95")
    if hit_p95 is not None and judged:
        checks.append(
            (
                "P95 TTFB of hits < 500 ms",
                hit_p95 < HIT_TTFB_P95_TARGET_S,
                f"measured {hit_p95 * 1000:.1f} ms vs target < 500 ms",
            )
        )

    miss_p95 = (summary.get("misses") or {}).get("ttfb", {}).get("p95")
    if miss_p95 is not None and judged:
        checks.append(
            (
                "P95 TTFB of misses < 2 s",
                miss_p95 < MISS_TTFB_P95_TARGET_S,
                f"measured {miss_p95 * 1000:.1f} ms vs target < 2000 ms (MISS and COALESCED)",
            )
        )

    rss_per_worker = (summary.get("resources") or {}).get("peak_rss_per_worker_bytes")
    if rss_per_worker is not None:
        measured_mb = rss_per_worker / MB
        checks.append(
            (
                "RSS < 128 MB per worker under load",
                measured_mb < RSS_PER_WORKER_TARGET_MB,
                f"measured peak {measured_mb:.1f} MB vs target < 128 MB",
            )
        )

    error_rate = summary.get("error_rate")
    if error_rate is not None:
        checks.append(
            (
                "error rate < 0.1 %",
                error_rate < ERROR_RATE_TARGET,
                f"measured {error_rate * 100:.3f} % ({summary.get('errors')} of "
                f"{summary.get('requests')}) vs target < 0.1 %",
            )
        )

    after_warmup = summary.get("hit_rate_after_warmup")
    # A storm asks for one uncached key on purpose, and clients that ask only for new keys
    # (hit_ratio 0) never hit: their hit rate says nothing.
    if after_warmup is not None and not summary.get("storm") and summary.get("hit_ratio") != 0:
        checks.append(
            (
                "hit rate > 80 % after warm-up",
                after_warmup > HIT_RATE_TARGET,
                f"measured {after_warmup * 100:.1f} % vs target > 80 %",
            )
        )

    concurrency = summary.get("concurrency")
    per_worker = summary.get("max_concurrent_per_worker")
    offered_per_worker = (concurrency or 0) / (summary.get("workers") or 1)
    # Only a scenario that offers 500+ clients per worker can show 500 in flight on each
    # (and only the Python client records requests in flight).
    offered = offered_per_worker >= CONCURRENCY_PER_WORKER_TARGET
    if per_worker is not None and offered and not summary.get("wrk"):
        checks.append(
            (
                "500+ concurrent requests per worker",
                per_worker >= CONCURRENCY_PER_WORKER_TARGET,
                f"measured {per_worker:.0f} in flight per worker vs target >= 500",
            )
        )

    throughput_ratio = (summary.get("ratios") or {}).get("throughput_ratio")
    if throughput_ratio is not None:
        checks.append(
            (
                "cached throughput >= 0.5x nginx",
                throughput_ratio >= NGINX_THROUGHPUT_RATIO_TARGET,
                f"measured {throughput_ratio:.2f}x vs target >= 0.5x",
            )
        )

    max_rss_mb = summary.get("max_rss_mb")
    if max_rss_mb is not None and rss_per_worker is not None:
        measured_mb = rss_per_worker / MB
        checks.append(
            (
                f"RSS <= {max_rss_mb} MB per worker",
                measured_mb <= float(max_rss_mb),
                f"measured peak {measured_mb:.1f} MB vs target <= {max_rss_mb} MB",
            )
        )
    if summary.get("wrk"):
        checks += wrk_checks(summary["wrk"], int(summary.get("workers") or 1))
    return checks


def wrk_checks(wrk: dict[str, Any], workers: int) -> list[tuple[str, bool, str]]:
    """Issue 14's throughput goals, on the cells of a wrk run that have them, and no
    errors anywhere."""
    checks: list[tuple[str, bool, str]] = []
    front = wrk["tested"] != "resizer"
    for cell in wrk["cells"]:
        tested, connections = cell["tested"], cell["connections"]
        if cell["body"] == WRK_VIDEO_BODY and cell["ratio"] is not None:
            target = WRK_FRONT_RATIO_TARGET if front else WRK_VIDEO_RATIO_TARGET
            pairs = ", ".join(number(r, 2) for r in cell["slice_ratios"])
            checks.append(
                (
                    f"{wrk['tested']}, {cell['size'] / MB:.1f} MB MP4, {connections} connections"
                    f" >= {target}x nginx",
                    cell["ratio"] >= target,
                    f"measured {cell['ratio']:.2f}x (slices {pairs}) vs target >= {target}x",
                )
            )
        rps = tested["ok_rps"]
        if cell["body"] == WRK_FRAME_BODY and not front and workers == 1 and rps is not None:
            checks.append(
                (
                    f"{cell['size'] / 1000:.0f} KB frame hits, {connections} connections,"
                    " >= 5,000 req/s on one worker",
                    rps >= WRK_FRAME_RPS_TARGET,
                    f"measured {rps:,.0f} req/s ({number(cell['ratio'], 2)}x nginx) vs target"
                    " >= 5,000 req/s",
                )
            )
    failures = [
        f"{cell['body']} at {cell['connections']}: {side['socket_errors']} socket errors,"
        f" {side['non_2xx']} non-2xx ({name})"
        for cell in wrk["cells"]
        for name, side in ((wrk["tested"], cell["tested"]), (wrk["reference"], cell["reference"]))
        if side["socket_errors"] or side["non_2xx"]
    ]
    checks.append(
        (
            "no wrk errors (socket errors, non-2xx)",
            not failures,
            "; ".join(failures) or "measured 0 in every slice",
        )
    )
    return checks


# --- Markdown ---------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def mb(size_bytes: float | None) -> str:
    return "—" if size_bytes is None else f"{size_bytes / MB:.1f}"


def number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f} %"


def count(value: int | None) -> str:
    return "—" if value is None else str(value)


def signed_mb(size_bytes: float | None) -> str:
    return "—" if size_bytes is None else f"{size_bytes / MB:+.1f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def latency_table(latency: dict[str, dict[str, Any]]) -> list[str]:
    if not latency:
        return ["No successful requests."]
    header = ["cache", "count"] + [f"TTFB P{q}" for q in PERCENTILES]
    header += [f"total P{q}" for q in PERCENTILES]
    rows = []
    for status, stats in latency.items():
        row = [status, str(stats["count"])]
        row += [ms(stats["ttfb"][f"p{q}"]) for q in PERCENTILES]
        row += [ms(stats["total"][f"p{q}"]) for q in PERCENTILES]
        rows.append(row)
    note = "Milliseconds; successful (200/206) requests only."
    if ABORTED in latency:
        note += " ABORTED rows are the driver's deliberate disconnects: their total is cut short."
    return [*table(header, rows), "", note]


def throughput_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("requests", str(summary["requests"])),
        ("errors", f"{summary['errors']} ({percent(summary['error_rate'])})"),
        ("aborted by the driver (not errors)", str(summary["aborted"])),
        ("416 range not satisfiable (not errors)", str(summary["not_satisfiable"])),
        ("load duration", f"{number(summary['duration_s'])} s"),
        ("requests/s", number(summary["rps"])),
        ("MB/s", number(summary["mb_per_s"])),
        ("max concurrent requests", str(summary.get("max_concurrent", "—"))),
        ("server CPU per request (ms)", number(summary.get("cpu_ms_per_request"))),
    ]


def machine_line(machine: dict[str, Any]) -> str:
    parts = []
    if machine.get("cpus") is not None:
        parts.append(f"{machine['cpus']} CPUs")
    if machine.get("memory_gib") is not None:
        parts.append(f"{machine['memory_gib']} GiB RAM")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    described = ", ".join(parts) or "unknown machine"
    note = machine.get("note") or "the load generator shares the cores with the server"
    return f"Machine: {described}. Note: {note}; prefer ratios over absolute numbers."


def heading(result: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Title, description, the command that reproduces the run, machine and parameters."""
    lines = [f"# Load test: {result.get('scenario', 'unnamed')}", ""]
    if result.get("description"):
        lines += [str(result["description"]), ""]
    if result.get("command"):
        lines += ["```", str(result["command"]), "```", ""]
    if result.get("started"):
        lines += [f"Started {result['started']}.", ""]
    lines += [machine_line(result.get("machine") or {}), ""]
    if result.get("params"):
        params = ", ".join(f"{key}={value}" for key, value in result["params"].items())
        lines += [f"Parameters: {params}; workers={summary['workers']}.", ""]
    return lines


def ceiling_sentence(summary: dict[str, Any]) -> str | None:
    """resizer's throughput through the Python client next to that client's own ceiling."""
    ceiling = summary.get("ceiling")
    if summary.get("nginx"):
        return (
            "The nginx column below is also the Python client's ceiling: the same client,"
            " clients and bodies against nginx."
        )
    if not ceiling:
        return None
    if summary.get("storm"):
        shape = "the same clients asking once each, all at once, for the same body"
    else:
        shape = (
            "every client asking for the cached bodies with the same ranges and pacing,"
            f" {number(ceiling['duration_s'])} s"
        )
    return (
        f"resizer {number(summary['mb_per_s'])} MB/s ({number(summary['rps'], 0)} req/s)"
        f" through the Python client, whose ceiling (nginx through the same client, {shape})"
        f" is {number(ceiling['mb_per_s'])} MB/s ({number(ceiling['rps'], 0)} req/s, TTFB"
        f" P50/P95 {ceiling_ttfb(ceiling)} ms)."
    )


def ceiling_ttfb(ceiling: dict[str, Any]) -> str:
    return f"{ms(ceiling['ttfb']['p50'])} / {ms(ceiling['ttfb']['p95'])}"


def render_markdown(result: dict[str, Any], summary: dict[str, Any]) -> str:
    if summary.get("wrk"):
        return render_wrk_markdown(result, summary)
    resources = summary["resources"]
    lines = heading(result, summary)
    lines += ["## Summary", ""]
    sentence = ceiling_sentence(summary)
    if sentence:
        lines += [sentence, ""]
    rows = [
        *throughput_rows(summary),
        ("max concurrent per worker", number(summary["max_concurrent_per_worker"], 0)),
        ("hit rate (all)", percent(summary["hit_rate"])),
        (
            f"hit rate after {number(summary['warmup_s'])} s warm-up",
            percent(summary["hit_rate_after_warmup"]),
        ),
    ]
    ceiling = summary.get("ceiling")
    if ceiling:
        rows += [
            ("client ceiling: nginx MB/s", number(ceiling["mb_per_s"])),
            ("client ceiling: nginx requests/s", number(ceiling["rps"])),
            ("client ceiling: nginx TTFB P50 / P95 (ms)", ceiling_ttfb(ceiling)),
        ]
    lines += [*table(["metric", "value"], rows), ""]

    lines += ["## Latency by cache status", "", *latency_table(summary["latency"]), ""]

    lines += ["## Success metrics", ""]
    checks = success_checks(summary)
    for name, passed, detail in checks:
        lines.append(f"- {'PASS' if passed else 'FAIL'}: {name} — {detail}")
    if not checks:
        lines.append("No success metric has data in this run.")
    if not summary.get("latency_goals", True):
        lines += [
            "",
            "Latency is reported above but not judged here: this scenario's clients ask again"
            " as soon as they are answered (or all at once), so the server runs saturated and"
            " time to first byte is about clients ÷ throughput (Little's law) — a throughput"
            " figure. The latency goals are judged in baseline, stress and endurance.",
        ]
    lines.append("")

    lines += ["## Origin work", ""]
    lines += [f"- origin fetches: {number(summary['origin_fetches'], 0)}"]
    lines += [f"- transforms: {number(summary['transforms'], 0)}", ""]

    lines += ["## Resources", ""]
    resource_rows = [
        ("peak RSS, total (MB)", mb(resources["peak_rss_bytes"])),
        ("peak RSS per worker (MB)", mb(resources["peak_rss_per_worker_bytes"])),
        ("peak open descriptors", count(resources["peak_open_fds"])),
        ("peak open connections", count(resources["peak_connections"])),
        ("peak ffmpeg children", count(resources["peak_ffmpeg"])),
        ("RSS growth after warm-up (MB)", signed_mb(resources["rss_growth_bytes"])),
        (
            "descriptor growth after warm-up",
            "—" if resources["fd_growth"] is None else f"{resources['fd_growth']:+d}",
        ),
    ]
    lines += [*table(["resource", "value"], resource_rows), ""]
    lines += [f"{resources['samples']} samples; MB = 10^6 bytes.", ""]

    nginx = summary.get("nginx")
    if nginx:
        lines += ["## Versus nginx (same bytes, same load)", ""]
        resizer_rows = dict(throughput_rows(summary))
        nginx_rows = dict(throughput_rows(nginx))
        side_by_side = [(name, resizer_rows[name], nginx_rows[name]) for name in resizer_rows]
        side_by_side.append(
            (
                "peak RSS (MB)",
                mb(resources["peak_rss_bytes"]),
                mb(nginx["resources"]["peak_rss_bytes"]),
            )
        )
        lines += [*table(["metric", "resizer", "nginx"], side_by_side), ""]
        lines += ["nginx latency:", "", *latency_table(nginx["latency"]), ""]
        ratios = summary["ratios"]
        lines += ["Ratios (resizer ÷ nginx; TTFB compares HITs):", ""]
        lines += [f"- {name}: {number(value, 2)}" for name, value in ratios.items()]
        lines.append("")

    lines += ["## Plots", "", "![latency](latency.png)", "", "![resources](resources.png)", ""]
    return "\n".join(lines)


def portable(command: str | None) -> str:
    """A wrk command line without the run's own address and folder."""
    command = re.sub(r"http://[^/\s]+", "http://SERVER", command or "")
    return re.sub(r"-s \S*/", "-s ", command)


def busy(side: dict[str, Any]) -> str:
    parts = (side.get(key) for key in ("server_busy", "wrk_busy", "machine_busy"))
    return " / ".join(number(part, 2) for part in parts)


def render_wrk_markdown(result: dict[str, Any], summary: dict[str, Any]) -> str:
    """A wrk comparison: one row per body and connection count, the goals, the commands."""
    wrk = summary["wrk"]
    ours, theirs = wrk["tested"], wrk["reference"]
    lines = heading(result, summary)
    lines += [f"## {ours} vs {theirs}, wrk", ""]
    lines += [
        f"{wrk.get('version') or 'wrk'}: {wrk['threads']} threads, the same connections, files"
        f" and duration for both; {wrk['rounds']} alternating slices of"
        f" {number(wrk['slice_s'])} s per server and row, {summary['workers']} worker(s)"
        " each. Ratio: 2xx requests/s of the first ÷ nginx's (the same bodies, so also the"
        " ratio of body throughput), overall and per slice pair. MB/s: body bytes (for"
        " ranges, wrk's bytes read, headers included). Latency: median slice's P50 / worst"
        " slice's P99. Busy: CPU seconds per second, out of the machine's"
        f" {(result.get('machine') or {}).get('cpus') or '?'} cores: the server (all its"
        " processes), wrk, and the whole machine; what the machine spent beyond the first"
        " two went to other processes, a sign that the figures are the shared machine's.",
        "",
    ]
    header = [
        "body",
        "size",
        "connections",
        f"{ours} req/s",
        "nginx req/s",
        "ratio",
        "slice ratios",
        f"{ours} MB/s",
        "nginx MB/s",
        "latency P50 / P99 ms",
        "nginx latency P50 / P99 ms",
        "server CPU ms/request",
        "busy: server / wrk / machine",
        "errors",
    ]
    rows = []
    for cell in wrk["cells"]:
        mine, nginx = cell["tested"], cell["reference"]
        rows.append(
            [
                cell["body"],
                f"{cell['size'] / MB:.2f} MB",
                str(cell["connections"]),
                number(mine["ok_rps"], 0),
                number(nginx["ok_rps"], 0),
                number(cell["ratio"], 2),
                ", ".join(number(r, 2) for r in cell["slice_ratios"]),
                number(mine["body_mb_per_s"] or mine["mb_per_s"], 0),
                number(nginx["body_mb_per_s"] or nginx["mb_per_s"], 0),
                f"{ms(mine['latency_p50'])} / {ms(mine['latency_p99'])}",
                f"{ms(nginx['latency_p50'])} / {ms(nginx['latency_p99'])}",
                f"{number(mine['cpu_ms_per_request'], 3)} / "
                f"{number(nginx['cpu_ms_per_request'], 3)}",
                f"{busy(mine)}; {busy(nginx)}",
                f"{mine['socket_errors'] + mine['non_2xx']} / "
                f"{nginx['socket_errors'] + nginx['non_2xx']}",
            ]
        )
    lines += [*table(header, rows), ""]
    hits = [c["tested"]["resizer_hits"] for c in wrk["cells"]]
    if None not in hits:
        completed = sum(c["tested"]["requests"] for c in wrk["cells"])
        lines += [
            f"resizer counted {sum(hits):,.0f} cache hits over the {completed:,} requests wrk"
            " completed against it (requests still in flight when a slice ended count as hits,"
            " not as completed).",
            "",
        ]
    lines += [
        f"Pairs are {ours} / nginx. One slice of each row (nginx: the same arguments, for its"
        " link to the same cache file; ranges-N.lua is loadtest/wrk.py's RANGE_SCRIPT for"
        " the body's size):",
        "",
    ]
    for cell in wrk["cells"]:
        lines.append(f"- `{portable(cell['tested']['command'])}`")
    lines += ["", "## Success metrics", ""]
    for name, passed, detail in success_checks(summary):
        lines.append(f"- {'PASS' if passed else 'FAIL'}: {name} — {detail}")
    lines += ["", "## Plot", "", "![ratios](ratios.png)", ""]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------


def new_figure(rows: int = 1) -> Figure:
    """A figure drawn by Agg, without pyplot's global state (safe in any process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    figure.subplots(rows, 1, sharex=True, squeeze=False)
    return figure


def placeholder(path: Path, note: str) -> None:
    figure = new_figure()
    axes = figure.axes[0]
    axes.set_axis_off()
    axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path)


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def plot_latency(result: dict[str, Any], path: Path) -> None:
    """CDF of total time (solid) and TTFB (dashed) per cache status, log time axis."""
    series: dict[str, list[dict[str, Any]]] = {}
    for request in result.get("requests") or []:
        if is_success(request):
            series.setdefault(str(request.get("cache")), []).append(request)
    nginx = result.get("nginx") or {}
    nginx_ok = [r for r in nginx.get("requests") or [] if is_success(r)]
    if nginx_ok:
        series["nginx"] = nginx_ok

    figure = new_figure()
    axes = figure.axes[0]
    drawn = False
    for index, (label, requests) in enumerate(sorted(series.items())):
        colour = f"C{index}"
        # Log axes cannot show zero: a 0 s latency only happens with synthetic data.
        totals = [float(r["total"]) for r in requests if (r.get("total") or 0) > 0]
        ttfbs = [float(r["ttfb"]) for r in requests if (r.get("ttfb") or 0) > 0]
        if totals:
            axes.step(
                *cdf_points(totals),
                where="post",
                color=colour,
                label=f"{label} total (n={len(requests)})",
            )
            drawn = True
        if ttfbs:
            axes.step(
                *cdf_points(ttfbs),
                where="post",
                color=colour,
                linestyle="--",
                label=f"{label} TTFB",
            )
            drawn = True
    if not drawn:
        placeholder(path, "No successful requests: no latency to plot.")
        return
    axes.set_xscale("log")
    axes.set_xlabel("seconds (log)")
    axes.set_ylabel("share of requests")
    axes.set_ylim(0, 1.02)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    axes.set_title(f"Latency CDF — {result.get('scenario', '')}")
    figure.tight_layout()
    figure.savefig(path)


def plot_resources(result: dict[str, Any], path: Path) -> None:
    """RSS (MB) above, open connections and descriptors below, over time."""
    samples: list[dict[str, Any]] = result.get("samples") or []
    if not samples:
        placeholder(path, "No resource samples.")
        return
    figure = new_figure(rows=2)
    memory, sockets = figure.axes

    def series(
        rows: Sequence[dict[str, Any]], key: str, scale: float = 1.0
    ) -> tuple[list[float], list[float]]:
        present = [s for s in rows if s.get(key) is not None]
        return [float(s["t"]) for s in present], [float(s[key]) / scale for s in present]

    memory.plot(*series(samples, "rss_bytes", MB), label="resizer RSS")
    nginx_samples = (result.get("nginx") or {}).get("samples") or []
    if nginx_samples:
        memory.plot(*series(nginx_samples, "rss_bytes", MB), linestyle="--", label="nginx RSS")
    sockets.plot(*series(samples, "connections"), label="open connections")
    sockets.plot(*series(samples, "open_fds"), linestyle=":", label="open descriptors")
    warmup_s = float(result.get("warmup_s") or 0.0)
    for axes in (memory, sockets):
        if warmup_s > 0:
            axes.axvline(warmup_s, color="grey", linewidth=0.8, linestyle="--")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small", loc="upper left")
    memory.set_ylim(bottom=0)  # from zero, so that small drifts don't look like leaks
    memory.set_ylabel("MB")
    sockets.set_ylabel("count")
    sockets.set_xlabel("seconds since load start (dashed: end of warm-up)")
    memory.set_title(f"Server resources — {result.get('scenario', '')}")
    figure.tight_layout()
    figure.savefig(path)


# --- entry points ------------------------------------------------------------------------------


def plot_ratios(summary: dict[str, Any], path: Path) -> None:
    """The first server's requests/s ÷ nginx's per cell: overall bars, slice pairs as dots."""
    wrk = summary["wrk"]
    cells = [c for c in wrk["cells"] if c["ratio"] is not None]
    if not cells:
        placeholder(path, "No ratio to plot.")
        return
    figure = new_figure()
    figure.set_size_inches(FIGURE_SIZE_IN[0], max(FIGURE_SIZE_IN[1], 1.5 + 0.45 * len(cells)))
    axes = figure.axes[0]
    labels = [f"{c['body']}\n{c['connections']} conn." for c in cells]
    axes.barh(range(len(cells)), [c["ratio"] for c in cells], color="C0", alpha=0.7)
    for index, cell in enumerate(cells):
        dots = [r for r in cell["slice_ratios"] if r is not None]
        axes.plot(dots, [index] * len(dots), "k.", markersize=4)
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.set_yticks(range(len(cells)), labels, fontsize="x-small")
    axes.invert_yaxis()
    axes.set_xlabel(f"{wrk['tested']} ÷ nginx, requests/s (dots: slice pairs)")
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_title(f"wrk — {wrk['tested']} vs nginx")
    figure.tight_layout()
    figure.savefig(path)


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md, its plots (latency.png and resources.png; ratios.png for a wrk
    run) and result.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    if summary["wrk"]:
        plot_ratios(summary, out_dir / "ratios.png")
    else:
        plot_latency(result, out_dir / "latency.png")
        plot_resources(result, out_dir / "resources.png")
    # A copy: the caller's dict stays as the driver made it.
    recorded = {**result, "summary": summary}
    (out_dir / "result.json").write_text(json.dumps(recorded, indent=1) + "\n")
    report = out_dir / "report.md"
    report.write_text(render_markdown(result, summary))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.report", description="Write a load test's report and plots."
    )
    parser.add_argument("result", type=Path, help="the driver's result.json")
    parser.add_argument("out_dir", type=Path, help="folder for report.md, plots, result.json")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    result.pop("summary", None)  # recomputed: the code may have changed since
    print(write_report(result, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
