"""Pure parts of the load driver: slices joined into one timeline, clip lengths."""

from __future__ import annotations

from typing import Any

from loadtest.driver import _append_slice, variant_seconds


def run(start: float, requests: int, cpu: float) -> dict[str, Any]:
    return {
        "requests": [{"t": start + i, "total": 0.5} for i in range(requests)],
        "samples": [
            {"t": start - 1.0, "cpu_seconds": cpu},
            {"t": start + requests, "cpu_seconds": cpu + 1},
        ],
        "duration_s": float(requests),
        "metrics": {"transforms": 1.0},
    }


def test_slices_follow_each_other_and_add_up() -> None:
    """A second slice starts after the first one's last record; durations and counters sum."""
    total = run(0.0, 3, cpu=10.0)
    _append_slice(total, run(0.0, 2, cpu=11.0))
    times = [r["t"] for r in total["requests"]]
    assert times == sorted(times)
    assert times[3] > 3.0  # after the first slice's last sample (t=3)
    assert total["duration_s"] == 5.0
    assert total["metrics"] == {"transforms": 2.0}
    assert [s["cpu_seconds"] for s in total["samples"]] == [10.0, 11.0, 11.0, 12.0]


def test_nginx_slices_have_no_metrics_to_add() -> None:
    """nginx slices carry requests and samples only."""
    total = run(0.0, 1, cpu=0.0)
    del total["metrics"]
    part = run(0.0, 1, cpu=1.0)
    del part["metrics"]
    _append_slice(total, part)
    assert len(total["requests"]) == 2
    assert "metrics" not in total


def test_variant_seconds_reads_the_duration_option() -> None:
    """Players pace by the clip length the hit query asks for."""
    assert variant_seconds("width=640&duration=10s") == 10.0
    assert variant_seconds("duration=2500ms&width=320") == 2.5
    assert variant_seconds("duration=8&mode=video") == 8.0
    assert variant_seconds("width=320") is None
