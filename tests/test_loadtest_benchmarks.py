"""BENCHMARKS.md's tables: the Python client's ceiling beside its figures, wrk rows, and
the command that reproduces each run."""

from __future__ import annotations

from typing import Any

from loadtest.benchmarks import command, tables, wrk_table
from loadtest.report import summarize
from tests.test_loadtest_report import synthetic_result, wrk_cell, wrk_result, wrk_run


def recorded(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "summary": summarize(result)}


def wrk_params(connections: list[int], concurrency: int = 500) -> dict[str, Any]:
    return {"concurrency": concurrency, "duration": 18.0, "connections": connections}


def test_wrk_commands_name_concurrency_only_when_it_replaced_the_list() -> None:
    """CONCURRENCY=N stands for a one-count run; the default 50-and-500 run needs none."""
    default = {"scenario": "wrk", "params": wrk_params([50, 500]), "workers": 1}
    assert command(default) == "make loadtest SCENARIO=wrk"
    single = {"scenario": "wrk", "params": wrk_params([500]), "workers": 1}
    assert command(single) == "make loadtest SCENARIO=wrk CONCURRENCY=500"
    front = {"scenario": "wrk-accel", "params": wrk_params([50], 50), "workers": 2}
    assert command(front) == "make loadtest SCENARIO=wrk-accel CONCURRENCY=50 WORKERS=2"


def test_every_python_client_row_carries_its_ceiling() -> None:
    """The run table shows nginx through the same client next to resizer's figures, and
    leaves wrk runs to their own table."""
    result = synthetic_result()
    result["ceiling"] = {
        "requests": [{**r, "cache": "HIT"} for r in result["requests"]],
        "duration_s": 5.0,
        "samples": [],
    }
    result["scenario"] = "baseline"
    result["params"] = {"concurrency": 8, "duration": 60.0}
    wrk = wrk_result([wrk_cell("video, MP4", [wrk_run(800)], [wrk_run(1000)])])
    text = tables({"baseline": recorded(result), "wrk": recorded(wrk)})
    row = next(line for line in text.splitlines() if line.startswith("| baseline "))
    assert "| 1.0 | 2 / 2.0 |" in row  # resizer 1.0 MB/s; ceiling 2 req/s, 2.0 MB/s
    assert "| wrk " not in text


def test_wrk_rows_and_their_command() -> None:
    """One row per wrk cell with both servers' figures and the ratio; the run's command."""
    wrk = wrk_result([wrk_cell("video, MP4", [wrk_run(800)], [wrk_run(1000, timeouts=1)])])
    wrk["params"] = wrk_params([50, 500])
    text = wrk_table({"wrk": recorded(wrk)})
    assert "| wrk | resizer | video, MP4 | 2.00 | 50 | 800 | 1000 | 0.80 | 0.80 |" in text
    assert text.splitlines()[2].endswith("| 0 / 1 |")
    assert "- wrk: `make loadtest SCENARIO=wrk`" in text
