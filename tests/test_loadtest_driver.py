"""Pure parts of the load driver: slices joined into one timeline, clip lengths, the
shipped nginx front made to run here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from loadtest.driver import FRONT_CONFIG, _append_slice, accel_prefix, front_config, variant_seconds


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


def test_the_shipped_front_gets_the_harness_ports_and_cache() -> None:
    """Only deploy/nginx.conf's marked values change: its listen, upstream and alias."""
    shipped = FRONT_CONFIG.read_text()
    made = front_config(shipped, port=4321, upstream=8765, cache=Path("/tmp/run/cache"))
    assert re.search(r"^\s*listen 127\.0\.0\.1:4321[ ;]", made, re.MULTILINE)
    assert re.search(r"^\s*server 127\.0\.0\.1:8765;", made, re.MULTILINE)
    assert re.search(r"^\s*alias /tmp/run/cache/entries/;", made, re.MULTILINE)
    assert "listen 80" not in made
    assert "alias /var/cache/resizer/" not in made
    assert len(made.splitlines()) == len(shipped.splitlines())
    # Parameters after the address stay; commented-out lines are not directives.
    example = "  # server 127.0.0.1:8080;\n  server 127.0.0.1:8080 max_fails=3;\n"
    example += "  listen [::]:80 default_server;\n  alias /var/cache/resizer/entries/;\n"
    assert front_config(example, port=1, upstream=2, cache=Path("/c")).splitlines() == [
        "  # server 127.0.0.1:8080;",
        "  server 127.0.0.1:2 max_fails=3;",
        "  listen 127.0.0.1:1 default_server;",
        "  alias /c/entries/;",
    ]


def test_a_front_without_a_marked_value_is_refused() -> None:
    """A config whose marked values moved fails loudly instead of running half-edited."""
    with pytest.raises(ValueError, match="listen"):
        front_config("server { listen 8080; }", port=1, upstream=2, cache=Path("/c"))


def test_resizer_learns_the_fronts_internal_location() -> None:
    """accel_redirect comes from the shipped config's internal location."""
    assert accel_prefix(FRONT_CONFIG.read_text()) == "/_resizer_cache/"
    assert accel_prefix("location /x/ {\n  # c\n  internal;\n  alias /a/;\n}") == "/x/"
    with pytest.raises(ValueError, match="no internal location"):
        accel_prefix("location / { proxy_pass http://r; }")
