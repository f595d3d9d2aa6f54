"""The load-test report: summary numbers, success checks and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.report import (
    cpu_ms_per_request,
    is_error,
    max_concurrent,
    percentile,
    success_checks,
    summarize,
    write_report,
)

MB = 1_000_000


def request(
    t: float = 20.0,
    status: int = 200,
    cache: str = "HIT",
    ttfb: float | None = 0.01,
    total: float | None = 0.05,
    size: int = 1_000_000,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "t": t,
        "status": status,
        "cache": cache,
        "ttfb": ttfb,
        "total": total,
        "bytes": size,
        "range": status == 206,
        "error": error,
    }


def sample(t: float, rss_mb: float, fds: int = 100, connections: int = 50) -> dict[str, Any]:
    return {
        "t": t,
        "rss_bytes": int(rss_mb * MB),
        "open_fds": fds,
        "connections": connections,
        "ffmpeg": 0,
        "tasks": None,
    }


def synthetic_result(*, nginx: bool = False) -> dict[str, Any]:
    """Ten seconds of load: 1 warm-up miss, 8 fast hits, 1 coalesced; flat resources."""
    requests = [request(t=1.0, cache="MISS", ttfb=0.8, total=1.5)]
    requests += [request(t=10.0 + i) for i in range(8)]
    requests += [request(t=12.0, cache="COALESCED", ttfb=0.9, total=1.2)]
    result: dict[str, Any] = {
        "scenario": "synthetic",
        "description": "A small made-up run.",
        "command": "make loadtest SCENARIO=synthetic",
        "started": "2026-11-27T05:00:00Z",
        "duration_s": 10.0,
        "warmup_s": 5.0,
        "machine": {"cpus": 2, "memory_gib": 24, "python": "3.11.7", "note": "shared cores"},
        "params": {"concurrency": 8},
        "workers": 1,
        "requests": requests,
        "samples": [sample(t, rss_mb=60.0 + t / 10) for t in range(0, 11)],
        "metrics": {"origin_fetches": 1.0, "transforms": 1.0, "coalesced": 1.0},
        "nginx": None,
    }
    if nginx:
        result["nginx"] = {
            "requests": [request(t=float(i), ttfb=0.005, total=0.02) for i in range(10)],
            "duration_s": 5.0,
            "samples": [sample(t, rss_mb=10.0) for t in range(0, 6)],
        }
    return result


def check(checks: list[tuple[str, bool, str]], name: str) -> bool:
    return {line: passed for line, passed, _ in checks}[name]


def test_percentile_interpolates_linearly() -> None:
    """Percentiles interpolate between closest ranks (numpy's default) and ignore order."""
    values = [10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0]
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (request(status=200, cache="ABORTED"), False),
        (request(status=416, cache="ERROR"), False),
        (request(status=206, cache="HIT"), False),
        (request(status=503, cache="ERROR"), True),
        (request(status=500, cache="MISS"), True),
        (request(status=404, cache="ERROR"), True),
        (request(status=0, cache="ERROR", ttfb=None, error="ConnectError: refused"), True),
        (request(status=200, cache="HIT", error="RemoteProtocolError: cut"), True),
    ],
)
def test_error_classification(record: dict[str, Any], expected: bool) -> None:
    """ABORTED and 416 are not errors; 5xx, other 4xx, transport and broken bodies are."""
    assert is_error(record) is expected


def test_summary_counts_errors_and_aborts_separately() -> None:
    """The error rate counts a 503 but neither the driver's aborts nor a 416."""
    result = synthetic_result()
    result["requests"] = [
        request(),
        request(cache="ABORTED"),
        request(status=416, cache="ERROR", size=0),
        request(status=503, cache="ERROR", size=0),
    ]
    summary = summarize(result)
    assert summary["requests"] == 4
    assert summary["errors"] == 1
    assert summary["error_rate"] == pytest.approx(0.25)
    assert summary["aborted"] == 1
    assert summary["not_satisfiable"] == 1
    assert summary["rps"] == pytest.approx(0.4)
    assert summary["mb_per_s"] == pytest.approx(0.2)


def test_hit_rate_after_warmup_ignores_warmup_requests() -> None:
    """Misses that start before warmup_s lower the overall hit rate, not the post-warm-up one."""
    result = synthetic_result()
    result["requests"] = [request(t=float(t), cache="MISS") for t in range(5)]
    result["requests"] += [request(t=5.0 + t) for t in range(3)]
    result["requests"] += [request(t=9.0, cache="COALESCED")]
    summary = summarize(result)
    assert summary["hit_rate_after_warmup"] == pytest.approx(3 / 4)  # COALESCED is no hit
    assert summary["hit_rate"] == pytest.approx(3 / 9)


def test_latency_groups_by_cache_status_over_successes_only() -> None:
    """Per-status latency uses only 200/206 requests; misses pool MISS and COALESCED."""
    summary = summarize(synthetic_result())
    assert set(summary["latency"]) == {"HIT", "MISS", "COALESCED"}
    assert summary["latency"]["HIT"]["count"] == 8
    assert summary["latency"]["HIT"]["ttfb"]["p95"] == pytest.approx(0.01)
    assert summary["misses"]["count"] == 2
    assert summary["misses"]["ttfb"]["p50"] == pytest.approx(0.85)


def test_max_concurrent_from_intervals() -> None:
    """Overlapping intervals add up; one ending exactly when another starts does not."""
    requests = [
        request(t=0.0, total=1.0),
        request(t=0.5, total=1.0),
        request(t=0.7, total=0.1),
        request(t=1.5, total=1.0),
    ]
    assert max_concurrent(requests) == 3
    assert max_concurrent([request(t=0.0, total=1.0), request(t=1.0, total=1.0)]) == 1


def test_resources_peaks_and_growth_after_warmup() -> None:
    """Peaks cover all samples; growth compares the first and last samples after warm-up."""
    result = synthetic_result()
    result["workers"] = 2
    result["samples"] = [
        sample(0.0, rss_mb=300.0, fds=50),  # warm-up: counts for the peak, not the growth
        sample(5.0, rss_mb=100.0, fds=100),
        sample(10.0, rss_mb=110.0, fds=104, connections=90),
    ]
    resources = summarize(result)["resources"]
    assert resources["peak_rss_bytes"] == 300 * MB
    assert resources["peak_rss_per_worker_bytes"] == pytest.approx(150 * MB)
    assert resources["peak_connections"] == 90
    assert resources["rss_growth_bytes"] == 10 * MB
    assert resources["fd_growth"] == 4

    result["samples"][1]["rss_per_worker"] = [40 * MB, 200 * MB]
    resources = summarize(result)["resources"]
    assert resources["peak_rss_per_worker_bytes"] == pytest.approx(200 * MB)


def test_nginx_ratios() -> None:
    """Ratios divide resizer's throughput and HIT TTFB by nginx's."""
    summary = summarize(synthetic_result(nginx=True))
    ratios = summary["ratios"]
    # resizer: 10 MB in 10 s; nginx: 10 MB in 5 s.
    assert ratios["throughput_ratio"] == pytest.approx(0.5)
    assert ratios["rps_ratio"] == pytest.approx(0.5)
    assert ratios["ttfb_p50_ratio"] == pytest.approx(2.0)
    assert ratios["ttfb_p95_ratio"] == pytest.approx(2.0)


def test_success_checks_pass_on_a_good_run() -> None:
    """A healthy synthetic run passes every check that has data, in a stable order."""
    result = synthetic_result(nginx=True)
    result["params"] = {"concurrency": 8, "max_rss_mb": 100}
    checks = success_checks(summarize(result))
    assert [name for name, _, _ in checks] == [
        "P95 TTFB of hits < 500 ms",
        "P95 TTFB of misses < 2 s",
        "RSS < 128 MB per worker under load",
        "error rate < 0.1 %",
        "hit rate > 80 % after warm-up",
        "cached throughput >= 0.5x nginx",
        "RSS <= 100 MB per worker",
    ]
    assert all(passed for _, passed, _ in checks)
    assert all("vs target" in detail for _, _, detail in checks)


def test_success_checks_fail_on_a_bad_summary() -> None:
    """Slow hits and misses, fat workers, errors, few hits and low concurrency all fail."""
    summary: dict[str, Any] = {
        "latency": {"HIT": {"ttfb": {"p95": 0.6}}},
        "misses": {"ttfb": {"p95": 2.5}},
        "resources": {"peak_rss_per_worker_bytes": 130 * MB},
        "error_rate": 0.002,
        "errors": 2,
        "requests": 1000,
        "hit_rate_after_warmup": 0.8,  # the target is strictly above 80 %
        "concurrency": 1000,
        "max_concurrent_per_worker": 499.0,
        "ratios": {"throughput_ratio": 0.4},
        "max_rss_mb": 131,  # a scenario's own, looser target
    }
    checks = success_checks(summary)
    assert len(checks) == 8
    assert [passed for _, passed, _ in checks] == [False] * 7 + [True]
    assert check(checks, "RSS <= 131 MB per worker")
    details = {name: detail for name, _, detail in checks}
    assert details["RSS < 128 MB per worker under load"] == (
        "measured peak 130.0 MB vs target < 128 MB"
    )


def test_success_checks_omit_lines_without_data() -> None:
    """No hits, no samples, no nginx, low concurrency: those checks are left out."""
    result = synthetic_result()
    result["requests"] = [request(cache="MISS")]
    result["samples"] = []
    result["params"] = {"concurrency": 100}
    names = [name for name, _, _ in success_checks(summarize(result))]
    assert names == [
        "P95 TTFB of misses < 2 s",
        "error rate < 0.1 %",
        "hit rate > 80 % after warm-up",
    ]
    assert success_checks(summarize({"requests": [], "samples": []})) == []


def test_concurrency_check_only_for_500_plus_clients_per_worker() -> None:
    """The 500-per-worker check appears once the scenario offers 500+ clients per worker."""
    result = synthetic_result()
    result["params"] = {"concurrency": 1000}
    result["requests"] = [request(t=0.0, total=1.0) for _ in range(1000)]
    result["workers"] = 2
    checks = success_checks(summarize(result))
    assert check(checks, "500+ concurrent requests per worker")
    result["params"] = {"concurrency": 500}  # 250 per worker offered: no verdict
    names = [name for name, _, _ in success_checks(summarize(result))]
    assert "500+ concurrent requests per worker" not in names


def test_saturating_runs_report_latency_without_judging_it(tmp_path: Path) -> None:
    """latency_goals=False drops the TTFB verdicts and says why; a storm has no hit rate."""
    result = synthetic_result()
    result["params"] = {"concurrency": 8, "latency_goals": False, "storm": True}
    names = [name for name, _, _ in success_checks(summarize(result))]
    assert not any("TTFB" in name for name in names)
    assert "hit rate > 80 % after warm-up" not in names
    assert "error rate < 0.1 %" in names
    report = write_report(result, tmp_path).read_text()
    assert "not judged here" in report


def assert_report_files(out_dir: Path) -> str:
    for name in ("latency.png", "resources.png"):
        image = out_dir / name
        assert image.stat().st_size > 0
        assert image.read_bytes().startswith(b"\x89PNG")
    assert "summary" in json.loads((out_dir / "result.json").read_text())
    return (out_dir / "report.md").read_text()


def test_write_report_without_nginx(tmp_path: Path) -> None:
    """report.md holds the PASS/FAIL lines, tables and plot links; PNGs and result.json exist."""
    result = synthetic_result()
    result["requests"].append(request(status=503, cache="ERROR", size=0))
    report = write_report(result, tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    text = assert_report_files(tmp_path / "out")
    assert "# Load test: synthetic" in text
    assert "make loadtest SCENARIO=synthetic" in text
    assert "prefer ratios" in text
    assert "- PASS: P95 TTFB of hits < 500 ms" in text
    assert "- FAIL: error rate < 0.1 %" in text
    assert "![latency](latency.png)" in text
    assert "![resources](resources.png)" in text
    assert "## Versus nginx" not in text
    assert "summary" not in result  # the caller's dict is left alone


def test_write_report_with_nginx(tmp_path: Path) -> None:
    """With an nginx run the report compares both and checks the throughput ratio."""
    write_report(synthetic_result(nginx=True), tmp_path)
    text = assert_report_files(tmp_path)
    assert "## Versus nginx" in text
    assert "throughput_ratio: 0.50" in text
    assert "- PASS: cached throughput >= 0.5x nginx" in text


def test_write_report_with_no_requests_or_samples(tmp_path: Path) -> None:
    """An empty run still writes a report and placeholder plots instead of crashing."""
    result: dict[str, Any] = {"scenario": "empty", "duration_s": 0.0, "requests": [], "samples": []}
    write_report(result, tmp_path)
    text = assert_report_files(tmp_path)
    assert "No successful requests." in text
    assert "No success metric has data in this run." in text


def test_cli_writes_the_report(tmp_path: Path) -> None:
    """python -m loadtest.report RESULT_JSON OUT_DIR recomputes the summary from the raw result."""
    from loadtest.report import main

    source = tmp_path / "result.json"
    source.write_text(json.dumps({**synthetic_result(), "summary": {"stale": True}}))
    assert main([str(source), str(tmp_path / "out")]) == 0
    recorded = json.loads((tmp_path / "out" / "result.json").read_text())
    assert "stale" not in recorded["summary"]
    assert_report_files(tmp_path / "out")


def test_server_cpu_per_request_uses_the_samples_around_the_load() -> None:
    """CPU seconds between the sample before the first request and the last sample, per
    request finished in between; warm-up CPU (negative times) is left out."""
    requests = [request(t=0.5 + i, total=0.2) for i in range(10)]
    requests.append(request(t=11.5, total=1.0))  # ends after the last sample: not counted
    samples = [
        {**sample(-3.0, 50), "cpu_seconds": 1.0},  # warm-up
        {**sample(0.0, 50), "cpu_seconds": 4.0},
        {**sample(6.0, 50), "cpu_seconds": 4.5},
        {**sample(12.0, 50), "cpu_seconds": 5.0},
    ]
    assert cpu_ms_per_request(requests, samples) == pytest.approx(100.0)
    assert cpu_ms_per_request(requests, [sample(0.0, 50)]) is None  # older results
    assert cpu_ms_per_request([], samples) is None


def wrk_run(
    rps: float,
    *,
    seconds: float = 6.0,
    size: int = 2_000_000,
    non_2xx: int = 0,
    timeouts: int = 0,
    cpu: float | None = 3.0,
    p50: float = 0.02,
    p99: float = 0.1,
    hits: float | None = None,
) -> dict[str, Any]:
    requests = round(rps * seconds)
    return {
        "requests": requests,
        "duration_s": seconds,
        "bytes": requests * size,
        "rps": rps,
        "ok_rps": (requests - non_2xx) / seconds,
        "bytes_per_s": rps * size,
        "latency": {"p50": p50, "p99": p99},
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": timeouts},
        "non_2xx": non_2xx,
        "server_cpu_s": cpu,
        "server_busy": None if cpu is None else cpu / seconds,
        "wrk_busy": 0.5,
        "machine_busy": 1.5,
        "peak_rss_per_worker_bytes": 60 * MB,
        "resizer_hits": hits,
        "command": f"wrk -t2 -c50 -d{seconds:g}s --timeout=30s --latency http://127.0.0.1:4321/x",
    }


def wrk_cell(
    body: str, ours: list[dict[str, Any]], nginx: list[dict[str, Any]], *, size: int = 2_000_000
) -> dict[str, Any]:
    return {
        "body": body,
        "query": "width=1280&duration=8s",
        "size": size,
        "ranges": "ranges" in body,
        "connections": 50,
        "runs": {"resizer": ours, "nginx": nginx},
    }


def wrk_result(cells: list[dict[str, Any]], tested: str = "resizer") -> dict[str, Any]:
    for cell in cells:
        cell["runs"] = {tested: cell["runs"]["resizer"], "nginx": cell["runs"]["nginx"]}
    return {
        "scenario": "wrk",
        "command": "make loadtest SCENARIO=wrk",
        "params": {"concurrency": 500},
        "workers": 1,
        "duration_s": 36.0,
        "requests": [],
        "samples": [],
        "wrk": {
            "tested": tested,
            "reference": "nginx",
            "rounds": 3,
            "slice_s": 6.0,
            "threads": 2,
            "version": "wrk 4.1.0",
            "cells": cells,
        },
    }


def test_wrk_cells_add_their_slices_up() -> None:
    """Per cell: 2xx req/s over the summed slices, ratio overall and per slice pair, body
    MB/s, CPU per request, median P50 and worst P99, errors of both kinds."""
    ours = [wrk_run(400, hits=2400), wrk_run(500, non_2xx=60, hits=3000), wrk_run(600, hits=3600)]
    nginx = [wrk_run(1000, cpu=1.0), wrk_run(1000, cpu=1.0, timeouts=2), wrk_run(1000, cpu=1.0)]
    summary = summarize(wrk_result([wrk_cell("video, MP4", ours, nginx)]))
    cell = summary["wrk"]["cells"][0]
    mine = cell["tested"]
    assert mine["requests"] == 9000
    assert mine["ok_rps"] == pytest.approx((9000 - 60) / 18)
    assert mine["body_mb_per_s"] == pytest.approx((9000 - 60) * 2 / 18)
    assert mine["cpu_ms_per_request"] == pytest.approx(9000 / 9000)
    assert mine["latency_p50"] == pytest.approx(0.02)
    assert mine["non_2xx"] == 60
    assert mine["resizer_hits"] == 9000
    assert cell["reference"]["socket_errors"] == 2
    assert cell["reference"]["cpu_ms_per_request"] == pytest.approx(3000 / 18000)
    assert cell["ratio"] == pytest.approx((9000 - 60) / 18000)
    assert cell["slice_ratios"] == pytest.approx([0.4, (3000 - 60) / 6000, 0.6])
    assert (mine["server_busy"], mine["wrk_busy"], mine["machine_busy"]) == (0.5, 0.5, 1.5)
    del ours[0]["machine_busy"]  # a result from before the machine was sampled
    assert (
        summarize(wrk_result([wrk_cell("video, MP4", ours, nginx)]))["wrk"]["cells"][0]["tested"][
            "machine_busy"
        ]
        is None
    )


def test_wrk_latency_takes_the_median_p50_and_the_worst_p99() -> None:
    """Slices' percentiles are not merged: P50 is the median slice's, P99 the worst one's."""
    ours = [wrk_run(10, p50=0.01, p99=0.5), wrk_run(10, p50=0.03, p99=0.2), wrk_run(10, p50=0.02)]
    cell = summarize(wrk_result([wrk_cell("frame, PNG", ours, ours)]))["wrk"]["cells"][0]
    assert cell["tested"]["latency_p50"] == pytest.approx(0.02)
    assert cell["tested"]["latency_p99"] == pytest.approx(0.5)


def test_wrk_ranges_have_no_body_throughput() -> None:
    """Ranged bodies vary in length: MB/s is wrk's bytes read, not requests x size."""
    runs = [wrk_run(100, size=500_000)]
    cell = summarize(wrk_result([wrk_cell("video, MP4, ranges", runs, runs)]))["wrk"]["cells"][0]
    assert cell["tested"]["body_mb_per_s"] is None
    assert cell["tested"]["mb_per_s"] == pytest.approx(100 * 0.5)


def test_wrk_goals() -> None:
    """MP4 >= 0.8x nginx, JPEG frames >= 5,000 req/s on one worker, no errors; behind
    nginx the MP4 target is 0.9x; no Python-client checks on a wrk run."""
    cells = [
        wrk_cell("video, MP4", [wrk_run(850)], [wrk_run(1000)]),
        wrk_cell("frame, JPEG", [wrk_run(4900)], [wrk_run(20000)], size=50_000),
        wrk_cell("frame, PNG", [wrk_run(10)], [wrk_run(1000, non_2xx=3)], size=1_000_000),
    ]
    checks = success_checks(summarize(wrk_result(cells)))
    assert [(name, passed) for name, passed, _ in checks] == [
        ("resizer, 2.0 MB MP4, 50 connections >= 0.8x nginx", True),
        ("50 KB frame hits, 50 connections, >= 5,000 req/s on one worker", False),
        ("no wrk errors (socket errors, non-2xx)", False),
    ]
    assert "frame, PNG at 50: 0 socket errors, 3 non-2xx (nginx)" in checks[2][2]
    front = success_checks(summarize(wrk_result(cells[:1], tested="resizer behind nginx")))
    assert front[0][:2] == ("resizer behind nginx, 2.0 MB MP4, 50 connections >= 0.9x nginx", False)
    assert [passed for _, passed, _ in front] == [False, True]


def test_write_wrk_report(tmp_path: Path) -> None:
    """A wrk run's report: the table, the hits resizer counted, portable commands, the
    goals and a ratio plot (no latency or resources plot: wrk records no requests)."""
    ours, nginx = [wrk_run(800, hits=4810)], [wrk_run(1000)]
    report = write_report(wrk_result([wrk_cell("video, MP4", ours, nginx)]), tmp_path)
    text = report.read_text()
    assert "| video, MP4 | 2.00 MB | 50 | 800 | 1000 | 0.80 | 0.80 |" in text
    assert "resizer counted 4,810 cache hits over the 4,800 requests" in text
    assert "`wrk -t2 -c50 -d6s --timeout=30s --latency http://SERVER/x`" in text
    assert "- PASS: resizer, 2.0 MB MP4, 50 connections >= 0.8x nginx" in text
    assert (tmp_path / "ratios.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "latency.png").exists()
    assert json.loads((tmp_path / "result.json").read_text())["summary"]["wrk"]["cells"]


def test_the_python_clients_ceiling_is_reported_next_to_its_figures(tmp_path: Path) -> None:
    """A calibration run against nginx through the same client is summarised and stated
    next to resizer's throughput."""
    result = synthetic_result()
    result["ceiling"] = {
        "requests": [request(t=float(i), ttfb=0.005) for i in range(19)]
        + [request(t=19.0, cache="ABORTED", ttfb=0.1)],  # deliberate aborts count too
        "duration_s": 10.0,
        "samples": [],
    }
    summary = summarize(result)
    assert summary["ceiling"]["mb_per_s"] == pytest.approx(2.0)
    assert summary["ceiling"]["rps"] == pytest.approx(2.0)
    assert summary["ceiling"]["ttfb"]["p95"] == pytest.approx(0.005 + 0.095 * 0.05)
    text = write_report(result, tmp_path).read_text()
    assert "resizer 1.0 MB/s (1 req/s) through the Python client, whose ceiling" in text
    assert "is 2.0 MB/s (2 req/s, TTFB P50/P95 5.0 / 9.8 ms)" in text
    assert "| client ceiling: nginx MB/s | 2.0 |" in text


def test_versus_nginx_names_its_nginx_column_the_ceiling(tmp_path: Path) -> None:
    """In versus-nginx the nginx slices are the client's ceiling, and the report says so."""
    text = write_report(synthetic_result(nginx=True), tmp_path).read_text()
    assert "The nginx column below is also the Python client's ceiling" in text
