"""Collect the latest result of every scenario into BENCHMARKS.md's tables.

    python -m loadtest.benchmarks > /tmp/tables.md

Reads every loadtest/results/<run>/result.json (written by the driver; a run folder is the
scenario's name or, with ``--out``, any name starting with it); prints Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import success_checks

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("baseline", "stress", "players", "endurance", "storm", "abort", "versus-nginx", "wrk")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def command(result: dict[str, Any]) -> str:
    """The make command that reproduces ``result`` (defaults left out)."""
    from .driver import SCENARIOS

    params = result["params"]
    default = SCENARIOS[result["scenario"]]
    environment = [f"{name}={value}" for name, value in (params.get("env") or {}).items()]
    words = [*environment, f"make loadtest SCENARIO={result['scenario']}"]
    if params["duration"] != default.duration:
        words.append(f"DURATION={params['duration']:g}")
    if default.wrk:  # CONCURRENCY=N measures N connections instead of the default list
        if tuple(params.get("connections") or ()) != default.connections:
            words.append(f"CONCURRENCY={params['concurrency']}")
    elif params["concurrency"] != default.concurrency:
        words.append(f"CONCURRENCY={params['concurrency']}")
    if result.get("workers", 1) != default.workers:
        words.append(f"WORKERS={result['workers']}")
    if params.get("miss_rate") != default.miss_rate:
        words.append(f"MISS_RATE={params.get('miss_rate') or 0:g}")
    if params.get("playback") != default.playback:
        words.append(f"PLAYBACK={params.get('playback') or 0:g}")
    return " ".join(words)


def ceiling(summary: dict[str, Any]) -> str:
    """The Python client's ceiling next to a run's figures: nginx through the same client."""
    if summary.get("nginx"):
        return "nginx column"
    found = summary.get("ceiling")
    if not found:
        return "—"
    return f"{found['rps']:.0f} / {found['mb_per_s']:.1f}"


def tables(results: dict[str, dict[str, Any]]) -> str:
    """The Python-client runs: one row each, then their success checks."""
    results = {name: result for name, result in results.items() if not result.get("wrk")}
    lines = [
        "| run | clients | workers | s | req/s | MB/s | client ceiling (nginx) req/s / MB/s "
        "| errors | hit rate after warm-up "
        "| fetches / transforms | peak RSS per worker MB | TTFB P50/P95/P99 ms by status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        s = result["summary"]
        latency = "; ".join(
            f"{status} " + "/".join(_ms(row["ttfb"][p]) for p in ("p50", "p95", "p99"))
            for status, row in sorted(s["latency"].items())
        )
        hit_rate = s["hit_rate_after_warmup"]
        lines.append(
            f"| {name} | {s['concurrency']} | {s['workers']} | {s['duration_s']:.0f} "
            f"| {s['rps']:.0f} "
            f"| {s['mb_per_s']:.1f} | {ceiling(s)} | {s['error_rate'] * 100:.2f} % "
            f"| {'—' if hit_rate is None else f'{hit_rate * 100:.1f} %'} "
            f"| {s['origin_fetches']:.0f} / {s['transforms']:.0f} "
            f"| {s['resources']['peak_rss_per_worker_bytes'] / 1e6:.0f} | {latency} |"
        )
    lines.append("")
    for name, result in results.items():
        lines.append(f"**{name}** (`{command(result)}`):")
        summary = result["summary"]
        for check, passed, detail in success_checks(summary):
            lines.append(f"- {'PASS' if passed else 'FAIL'}: {check} — {detail}")
        hits = summary["latency"].get("HIT", {}).get("ttfb", {})
        if not summary.get("latency_goals", True) and hits.get("p95") is not None:
            lines.append(
                f"- not judged (saturating on purpose): P95 TTFB of hits {_ms(hits.get('p95'))} ms"
            )
        lines.append("")
    return "\n".join(lines)


def nginx_table(results: dict[str, dict[str, Any]]) -> str:
    """resizer vs nginx on the same cached bytes, one row per versus-nginx run."""
    lines = [
        "| run | clients | workers (each) | resizer MB/s | nginx MB/s | ratio "
        "| resizer TTFB P50/P95 ms | nginx TTFB P50/P95 ms | server CPU ms/request resizer / nginx "
        "| resizer peak RSS per worker MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        s = result["summary"]
        if not s.get("nginx"):
            continue
        n = s["nginx"]

        def ttfb(summary: dict[str, Any]) -> str:
            hits = summary["latency"].get("HIT", {}).get("ttfb", {})
            return f"{_ms(hits.get('p50'))} / {_ms(hits.get('p95'))}"

        lines.append(
            f"| {name} | {s['concurrency']} | {s['workers']} | {s['mb_per_s']:.0f} "
            f"| {n['mb_per_s']:.0f} | {s['ratios']['throughput_ratio']:.2f} | {ttfb(s)} "
            f"| {ttfb(n)} | {_number(s.get('cpu_ms_per_request'))} / "
            f"{_number(n.get('cpu_ms_per_request'), 2)} "
            f"| {s['resources']['peak_rss_per_worker_bytes'] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def wrk_table(results: dict[str, dict[str, Any]]) -> str:
    """wrk runs: one row per body and connection count, the command that reproduces it."""
    lines = [
        "| run | server | body | size MB | connections | req/s | nginx req/s | ratio "
        "| slice ratios | MB/s | nginx MB/s | P50 / P99 ms | nginx P50 / P99 ms "
        "| server CPU ms/request | nginx CPU ms/request | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    commands = []
    for name, result in results.items():
        wrk = result["summary"].get("wrk")
        if not wrk:
            continue
        commands.append(f"- {name}: `{command(result)}`")
        for cell in wrk["cells"]:
            ours, nginx = cell["tested"], cell["reference"]
            ratios = ", ".join(_number(r, 2) for r in cell["slice_ratios"])
            lines.append(
                f"| {name} | {wrk['tested']} | {cell['body']} | {cell['size'] / 1e6:.2f} "
                f"| {cell['connections']} | {_number(ours['ok_rps'], 0)} "
                f"| {_number(nginx['ok_rps'], 0)} | {_number(cell['ratio'], 2)} | {ratios} "
                f"| {_number(ours['body_mb_per_s'] or ours['mb_per_s'], 0)} "
                f"| {_number(nginx['body_mb_per_s'] or nginx['mb_per_s'], 0)} "
                f"| {_ms(ours['latency_p50'])} / {_ms(ours['latency_p99'])} "
                f"| {_ms(nginx['latency_p50'])} / {_ms(nginx['latency_p99'])} "
                f"| {_number(ours['cpu_ms_per_request'], 3)} "
                f"| {_number(nginx['cpu_ms_per_request'], 3)} "
                f"| {ours['socket_errors'] + ours['non_2xx']} / "
                f"{nginx['socket_errors'] + nginx['non_2xx']} |"
            )
    return "\n".join([*lines, "", *commands])


def main() -> int:
    results = {}
    for scenario in ORDER:
        for path in sorted(RESULTS.glob(f"{scenario}*/result.json")):
            if path.parent.name not in results:
                results[path.parent.name] = json.loads(path.read_text())
    print(tables(results))
    print(nginx_table(results))
    print()
    print(wrk_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
