"""Collect the latest result of every scenario into BENCHMARKS.md's tables.

    python -m loadtest.benchmarks > /tmp/tables.md

Reads loadtest/results/<scenario>/result.json (written by the driver); prints Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import success_checks

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("baseline", "stress", "endurance", "storm", "abort", "versus-nginx")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def tables(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | clients | s | req/s | MB/s | errors | hit rate after warm-up "
        "| fetches / transforms | peak RSS MB | TTFB P50/P95/P99 ms by status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        if name not in results:
            continue
        result = results[name]
        s = result["summary"]
        latency = "; ".join(
            f"{status} " + "/".join(_ms(row["ttfb"][p]) for p in ("p50", "p95", "p99"))
            for status, row in sorted(s["latency"].items())
        )
        hit_rate = s["hit_rate_after_warmup"]
        lines.append(
            f"| {name} | {s['concurrency']} | {s['duration_s']:.0f} | {s['rps']:.0f} "
            f"| {s['mb_per_s']:.1f} | {s['error_rate'] * 100:.2f} % "
            f"| {'—' if hit_rate is None else f'{hit_rate * 100:.1f} %'} "
            f"| {s['origin_fetches']:.0f} / {s['transforms']:.0f} "
            f"| {s['resources']['peak_rss_per_worker_bytes'] / 1e6:.0f} | {latency} |"
        )
    lines.append("")
    for name in ORDER:
        if name not in results:
            continue
        lines.append(f"**{name}** ({results[name]['command']}):")
        for check, passed, detail in success_checks(results[name]["summary"]):
            lines.append(f"- {'PASS' if passed else 'FAIL'}: {check} — {detail}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    results = {}
    for name in ORDER:
        path = RESULTS / name / "result.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
