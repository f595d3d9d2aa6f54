"""Reading wrk's reports: the numbers the throughput comparisons are built from."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.wrk import bytes_of, parse_wrk, range_script, seconds_of, wrk_argv

# Captured from wrk 4.1.0 (Debian 12) against nginx 1.22 on loopback.
CLEAN = """\
Running 3s test @ http://127.0.0.1:18999/v.mp4
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    41.73ms   28.65ms 223.60ms   81.18%
    Req/Sec   411.62    211.64     1.13k    72.00%
  Latency Distribution
     50%   34.67ms
     75%   53.09ms
     90%   73.46ms
     99%  149.67ms
  2382 requests in 3.08s, 4.22GB read
Requests/sec:    772.88
Transfer/sec:      1.37GB
"""

# A Lua script asking for a missing file every third request, 200 connections on a 200 MB
# file with a 2 s timeout: socket timeouts and 404s in one report.
ERRORS = """\
Running 3s test @ http://127.0.0.1:18999/
  2 threads and 200 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   323.65ms  403.87ms   1.86s    90.00%
    Req/Sec    26.10     41.75   137.00     90.00%
  Latency Distribution
     50%  234.35ms
     75%  338.85ms
     90%  951.11ms
     99%    1.86s 
  87 requests in 3.16s, 4.72GB read
  Socket errors: connect 0, read 0, write 0, timeout 27
  Non-2xx or 3xx responses: 84
Requests/sec:     27.51
Transfer/sec:      1.49GB
"""  # noqa: W291 (wrk pads the 99 % line)

# Every request timed out but one: wrk prints zeros and "-nan%" for the spread.
NOTHING_ANSWERED = """\
Running 3s test @ http://127.0.0.1:18999/big.bin
  2 threads and 500 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00    100.00%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  1 requests in 3.40s, 4.69GB read
  Socket errors: connect 0, read 0, write 0, timeout 1
Requests/sec:      0.29
Transfer/sec:      1.38GB
"""


def test_a_clean_report() -> None:
    """Requests, rate, bytes (binary units), latency and no errors from a clean run."""
    found = parse_wrk(CLEAN)
    assert found["requests"] == 2382
    assert found["duration_s"] == pytest.approx(3.08)
    assert found["rps"] == pytest.approx(772.88)
    assert found["ok_rps"] == pytest.approx(2382 / 3.08)
    assert found["bytes"] == round(4.22 * 2**30)
    assert found["bytes_per_s"] == round(1.37 * 2**30)
    assert found["latency"] == pytest.approx(
        {
            "avg": 0.04173,
            "stdev": 0.02865,
            "max": 0.2236,
            "p50": 0.03467,
            "p75": 0.05309,
            "p90": 0.07346,
            "p99": 0.14967,
        }
    )
    assert found["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert found["non_2xx"] == 0


def test_socket_errors_and_non_2xx_are_counted() -> None:
    """Timeouts and 404s are read, and ok_rps leaves the non-2xx answers out."""
    found = parse_wrk(ERRORS)
    assert found["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 27}
    assert found["non_2xx"] == 84
    assert found["rps"] == pytest.approx(27.51)
    assert found["ok_rps"] == pytest.approx(3 / 3.16)
    assert found["latency"]["p99"] == pytest.approx(1.86)
    assert found["latency"]["max"] == pytest.approx(1.86)


def test_a_run_with_no_latency_spread() -> None:
    """wrk's '-nan%' spread and zero latencies still parse."""
    found = parse_wrk(NOTHING_ANSWERED)
    assert found["requests"] == 1
    assert found["latency"]["p50"] == 0.0
    assert found["socket_errors"]["timeout"] == 1


def test_an_incomplete_report_is_refused() -> None:
    """A report cut short (or wrk's usage text) raises instead of reading as zero."""
    with pytest.raises(ValueError, match="not a complete wrk report"):
        parse_wrk(CLEAN.split("Requests/sec")[0])
    with pytest.raises(ValueError, match="not a complete wrk report"):
        parse_wrk("unable to connect to 127.0.0.1:18998 Connection refused")


def test_units() -> None:
    """wrk's time units and binary amounts; anything else is refused."""
    assert seconds_of("601.00us") == pytest.approx(601e-6)
    assert seconds_of("2.00m") == pytest.approx(120.0)
    assert bytes_of("46.47MB") == round(46.47 * 2**20)
    assert bytes_of("0.00B") == 0
    with pytest.raises(ValueError, match="duration"):
        seconds_of("12 ms")
    with pytest.raises(ValueError, match="amount"):
        bytes_of("12")


def test_argv_and_range_script(tmp_path: Path) -> None:
    """Same threads, connections, duration and timeout for every server; the ranged script
    asks for ranges inside the body it was written for."""
    argv = wrk_argv("http://127.0.0.1:1/x", 500, 6.0, binary="/usr/bin/wrk")
    assert argv == [
        "/usr/bin/wrk",
        "-t2",
        "-c500",
        "-d6s",
        "--timeout=30s",
        "--latency",
        "http://127.0.0.1:1/x",
    ]
    assert wrk_argv("http://h/x", 1, 2.5)[1:4] == ["-t1", "-c1", "-d2.5s"]
    script = range_script(tmp_path / "ranges.lua", 1_900_000)
    assert "local size = 1900000" in script.read_text()
    assert wrk_argv("http://h/x", 50, 6, script)[-3:] == ["-s", str(script), "http://h/x"]
