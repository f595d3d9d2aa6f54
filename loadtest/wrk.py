"""wrk, the load generator for throughput comparisons: installing it, running it, reading it.

A Python load client on the same two cores as the server caps nginx itself at about
800 MB/s, so it measures the client. wrk (C, epoll, one thread per core) moves several GB/s
on loopback, so the server is what it measures; the Python client stays for the shapes wrk
cannot make (players reading at playback speed, cold clients).

``parse_wrk`` reads wrk 4's text report (with ``--latency``); ``run_wrk`` runs one
measurement and samples the server's CPU and RSS from /proc while it runs.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

THREADS = 2  # one per core of the 2-core machine; both servers get the same
# A request slower than this counts as a socket timeout. wrk's default (2 s) is shorter
# than a saturated server's queue at 500 connections (time ≈ connections ÷ requests/s).
TIMEOUT_S = 30.0
SAMPLE_EVERY_S = 0.5

# Random byte ranges of 64 KiB to 1 MiB within a body of BODY_SIZE bytes. Each thread seeds
# from its own number, so both servers are asked the same sequence of ranges.
RANGE_SCRIPT = """\
local size = {size}
local shortest, longest = 65536, math.min(1048576, size)
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
function init(args)
  math.randomseed(seed)
end
function request()
  local length = math.random(math.min(shortest, longest), longest)
  local first = math.random(0, size - length)
  return wrk.format(nil, nil, {{Range = "bytes=" .. first .. "-" .. (first + length - 1)}})
end
"""


def debian_binary(name: str, package: str) -> str:
    """The path of ``name``, installing the Debian ``package`` on first use (as root)."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found:
        return found
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=quiet)
    return shutil.which(name) or f"/usr/bin/{name}"


def wrk_binary() -> str:
    return debian_binary("wrk", "wrk")


def range_script(path: Path, size: int) -> Path:
    """Write the ranged-request script for a body of ``size`` bytes; returns ``path``."""
    path.write_text(RANGE_SCRIPT.format(size=size))
    return path


def wrk_argv(
    url: str, connections: int, seconds: float, script: Path | None = None, binary: str = "wrk"
) -> list[str]:
    argv = [binary, f"-t{min(THREADS, connections)}", f"-c{connections}", f"-d{seconds:g}s"]
    argv += [f"--timeout={TIMEOUT_S:g}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    return [*argv, url]


# --- reading wrk's report ------------------------------------------------------------------

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_BINARY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_NUMBER = r"(\d+(?:\.\d+)?)"


def seconds_of(text: str) -> float:
    """'15.23ms' -> 0.01523 (wrk's time units: us, ms, s, m, h)."""
    found = re.fullmatch(_NUMBER + r"(us|ms|s|m|h)", text)
    if found is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _TIME_UNITS[found.group(2)]


def bytes_of(text: str) -> int:
    """'36.12GB' -> bytes (wrk prints amounts in binary units: 1 KB = 1024 B)."""
    found = re.fullmatch(_NUMBER + r"([KMGTP]?)B", text)
    if found is None:
        raise ValueError(f"not a wrk amount: {text!r}")
    return round(float(found.group(1)) * _BINARY_UNITS[found.group(2)])


def parse_wrk(text: str) -> dict[str, Any]:
    """The numbers of one wrk report: requests, duration, bytes read, requests/s, bytes/s,
    latency (average, maximum and percentiles, seconds), socket errors and non-2xx/3xx
    responses. ``ok_rps`` counts only the 2xx/3xx answers. Raises ValueError when the text
    is not a complete wrk report (wrk failed, or was stopped)."""
    summary = re.search(rf"(\d+) requests in {_NUMBER}(us|ms|s|m|h), (\S+) read", text)
    rate = re.search(rf"Requests/sec:\s+{_NUMBER}", text)
    transfer = re.search(r"Transfer/sec:\s+(\S+)", text)
    if summary is None or rate is None or transfer is None:
        raise ValueError("not a complete wrk report:\n" + text[-2000:])
    requests = int(summary.group(1))
    duration = seconds_of(summary.group(2) + summary.group(3))
    latency: dict[str, float | None] = {"avg": None, "stdev": None, "max": None}
    stats = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+%", text)
    if stats is not None:
        latency.update(zip(("avg", "stdev", "max"), map(seconds_of, stats.groups()), strict=True))
    for quantile, value in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+(\S+)\s*$", text, re.MULTILINE):
        latency[f"p{float(quantile):g}"] = seconds_of(value)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors is not None:
        errors.update(zip(errors, map(int, socket_errors.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    bad = int(non_2xx.group(1)) if non_2xx else 0
    return {
        "requests": requests,
        "duration_s": duration,
        "bytes": bytes_of(summary.group(4)),
        "rps": float(rate.group(1)),
        "ok_rps": (requests - bad) / duration if duration else None,
        "bytes_per_s": bytes_of(transfer.group(1)),
        "latency": latency,
        "socket_errors": errors,
        "non_2xx": bad,
    }


# --- running it ----------------------------------------------------------------------------


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat), so that a
    slice shows how much of the machine other processes took from the two measured."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(value) for value in fields]
    idle = ticks[3] + ticks[4]  # idle and iowait
    # Guest time is already counted in user and nice.
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    sample: Callable[[], dict[str, Any]],
    script: Path | None = None,
) -> dict[str, Any]:
    """One wrk measurement of ``url``, with the server's CPU and peak RSS per worker over it.

    ``sample`` reads the server's processes (``driver.sample_process``): CPU seconds are
    taken just before wrk starts and just after it exits, RSS every half second. wrk's own
    CPU comes from the children's rusage, to show how much of the machine the generator took.
    """
    argv = wrk_argv(url, connections, seconds, script, wrk_binary())
    before, children = sample(), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = machine_cpu_seconds()
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_rss = max(before["rss_per_worker"], default=0)
    try:
        while process.poll() is None:
            time.sleep(SAMPLE_EVERY_S)
            peak_rss = max(peak_rss, *sample()["rss_per_worker"], 0)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0].decode(errors="replace")
    wall = time.monotonic() - started
    machine = machine_cpu_seconds() - machine
    after, children_after = sample(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}:\n{output}")
    measured = parse_wrk(output)
    server_cpu = float(after["cpu_seconds"]) - float(before["cpu_seconds"])
    wrk_cpu = sum(
        getattr(children_after, f) - getattr(children, f) for f in ("ru_utime", "ru_stime")
    )
    measured.update(
        {
            "command": " ".join(["wrk", *argv[1:]]),
            "output": output,
            "connections": connections,
            "server_cpu_s": server_cpu,
            "server_busy": server_cpu / wall if wall else None,
            "wrk_cpu_s": wrk_cpu,
            "wrk_busy": wrk_cpu / wall if wall else None,
            "machine_busy": machine / wall if wall else None,
            "cpu_ms_per_request": server_cpu * 1000 / measured["requests"]
            if measured["requests"]
            else None,
            "peak_rss_per_worker_bytes": peak_rss,
        }
    )
    return measured
