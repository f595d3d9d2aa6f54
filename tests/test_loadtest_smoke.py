"""The load-test harness works end to end (no timing assertions: machines are shared)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from loadtest.driver import SCENARIOS, run_scenario

pytestmark = pytest.mark.integration


def test_the_smoke_scenario_produces_a_report(tmp_path: Path) -> None:
    """A short run starts a server, loads it, stops it and writes report, JSON and plots."""
    scenario = dataclasses.replace(SCENARIOS["smoke"], duration=2.0, concurrency=4)
    report = run_scenario(scenario, tmp_path)
    text = report.read_text()
    assert text.startswith("# ")
    assert "Success metrics" in text
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["requests"], "no request was recorded"
    assert result["samples"], "the server was never sampled"
    assert {"HIT", "MISS"} & {r["cache"] for r in result["requests"]}
    for plot in ("latency.png", "resources.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert not (tmp_path / "work").exists()  # the server's folder is cleaned up
