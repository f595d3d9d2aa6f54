"""Metrics (README "Metrics"): every documented name on /metrics, summed over workers, and
what the request, ffmpeg, origin and process metrics count."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from resizer.config import load_config
from resizer.metrics import Metrics, cache_status_label
from resizer.transform.fake import FakeTransformer
from resizer.web.requestlog import route_of
from tests.media import make_test_video
from tests.server import scrape, server_config, server_config_text, start_server
from tests.test_workers import Supervised, running_supervised

README = Path(__file__).resolve().parent.parent / "README.md"
CLIP = "/videos/clip.mp4"


def documented_metrics() -> list[str]:
    """The metric names README.md's "Metrics" section lists (first column of its table)."""
    text = README.read_text()
    section = text.split("\n### Metrics\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    names = re.findall(r"^\| `(resizer_[a-z_]+)`", section, flags=re.MULTILINE)
    assert len(names) >= 20, names
    return names


def sample_names(text: str) -> set[str]:
    """Every metric name with a sample in a /metrics text (histograms by family name)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[ {]", line, maxsplit=1)[0]
            names.add(re.sub(r"_(bucket|count|sum)$", "", name))
            names.add(name)
    return names


def labelled(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(line.split()[-1])
    return total


def pids_of(text: str, name: str) -> set[int]:
    return {int(pid) for pid in re.findall(rf'^{name}{{pid="(\d+)"}}', text, flags=re.MULTILINE)}


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[Supervised]:
    """``resizer serve --workers 2`` (real ffmpeg) on a free port, stopped afterwards."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "clip.mp4", 320, 240, seconds=2)
    config = server_config_text(media, tmp_path / "cache")
    async with running_supervised(config, tmp_path) as server:
        yield server


@pytest.mark.integration
async def test_every_documented_metric_appears_summed_over_two_workers(
    two_workers: Supervised,
) -> None:
    """Each metric README documents is on /metrics of a 2-worker server, request histograms
    sum both workers' requests, and the process gauges have one series per worker."""
    limits = httpx.Limits(max_keepalive_connections=0)  # new connections: both workers answer
    hits = 30
    async with httpx.AsyncClient(base_url=two_workers.url, timeout=60, limits=limits) as client:
        before = (await client.get("/metrics")).text  # after the start-up's health checks
        miss = await client.get(f"{CLIP}?width=160")
        assert miss.headers["X-Cache-Status"] == "MISS"
        for _ in range(hits):
            hit = await client.get(f"{CLIP}?width=160")
            assert hit.headers["X-Cache-Status"] == "HIT"
        frame = await client.get(f"{CLIP}?mode=frame&time=1s&width=80")
        assert frame.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        # A request is observed as it ends, just after its last byte left: the worker that
        # answered /healthz may record it a moment after this client has the answer.
        health = {"route": "health", "cache_status": "none"}
        duration = "resizer_request_duration_seconds_count"
        with trio.fail_after(5):
            while True:
                text = (await client.get("/metrics")).text
                if labelled(text, duration, **health) > labelled(before, duration, **health):
                    break
                await trio.sleep(0.05)

    missing = [name for name in documented_metrics() if name not in sample_names(text)]
    assert not missing, missing
    workers = set(two_workers.workers())
    files = {path.name for path in two_workers.metrics_dir().iterdir()}
    assert {f"histogram_{pid}.db" for pid in workers} <= files  # both observed requests
    assert labelled(text, duration, route="media", cache_status="HIT") == hits
    assert labelled(text, duration, route="media") == hits + 2
    assert labelled(text, duration, **health) - labelled(before, duration, **health) == 1
    assert labelled(text, "resizer_time_to_first_byte_seconds_count", route="media") == hits + 2
    sent = len(miss.content) + hits * len(hit.content) + len(frame.content)
    assert labelled(text, "resizer_body_bytes_sent_total", route="media") == sent
    assert scrape(text, "resizer_ffmpeg_run_seconds_count") == 4  # 2 probes, a video, a frame
    assert labelled(text, "resizer_ffmpeg_run_seconds_count", mode="probe") == 2
    assert labelled(text, "resizer_ffmpeg_run_seconds_count", mode="frame") == 1
    assert labelled(text, "resizer_origin_fetch_seconds_count", source="filesystem") == 2
    assert scrape(text, "resizer_active_requests") >= 1  # this scrape, at least
    for name in ("resizer_process_resident_memory_bytes", "resizer_process_open_fds"):
        assert pids_of(text, name) == workers, name
        assert labelled(text, name) > 0
    for klass in ("high", "medium", "low"):
        assert f'resizer_queue_depth{{class="{klass}"}} 0.0' in text


async def test_a_miss_and_a_hit_count_ffmpeg_runs_origin_fetches_and_body_bytes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """One transcode: a probe and a video run, one filesystem fetch of the whole source; the
    body bytes of the miss (streamed) and of the hit (sendfile) are all counted."""
    media = tmp_path / "media"
    media.mkdir()
    make_test_video(media / "clip.mp4", 160, 120, seconds=2)
    server = await start_server(nursery, server_config(media, tmp_path / "cache"))
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        miss = await client.get(f"{CLIP}?width=80")
        hit = await client.get(f"{CLIP}?width=80")
        text = (await client.get("/metrics")).text
    assert (miss.headers["X-Cache-Status"], hit.headers["X-Cache-Status"]) == ("MISS", "HIT")
    assert labelled(text, "resizer_ffmpeg_run_seconds_count", mode="probe") == 1
    assert labelled(text, "resizer_ffmpeg_run_seconds_count", mode="video") == 1
    assert labelled(text, "resizer_ffmpeg_run_seconds_sum", mode="video") > 0
    assert labelled(text, "resizer_origin_fetch_seconds_count", source="filesystem") == 1
    size = (media / "clip.mp4").stat().st_size
    assert labelled(text, "resizer_origin_bytes_fetched_total", source="filesystem") == size
    assert labelled(text, "resizer_body_bytes_sent_total", route="media") == 2 * len(hit.content)
    duration = "resizer_request_duration_seconds_count"
    assert labelled(text, duration, route="media", cache_status="MISS") == 1
    assert labelled(text, duration, route="media", cache_status="HIT") == 1
    assert labelled(text, "resizer_process_open_fds", pid=str(os.getpid())) > 0


async def test_hits_handed_to_nginx_send_no_body_bytes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Behind nginx (X-Accel-Redirect) a hit's body is nginx's: resizer counts 0 bytes for
    it, while the miss it streamed itself counts whole."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"source" * 100)
    text = server_config_text(media, tmp_path / "cache")
    config = load_config(text=text, env={"RESIZER_SERVER_ACCEL_REDIRECT": "/_resizer_cache/"})
    server = await start_server(nursery, config, FakeTransformer(size=5_000))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        miss = await client.get(CLIP)
        hit = await client.get(CLIP)
        text = (await client.get("/metrics")).text
    assert len(miss.content) == 5_000
    assert hit.headers["X-Accel-Redirect"].startswith("/_resizer_cache/")
    assert hit.content == b""
    assert labelled(text, "resizer_body_bytes_sent_total", route="media") == 5_000
    assert labelled(text, "resizer_request_duration_seconds_count", cache_status="HIT") == 1


def test_labels_stay_within_their_fixed_sets() -> None:
    """Unknown classes, modes, sources and cache statuses become "other"; routes come from
    a fixed set whatever the path."""
    metrics = Metrics()
    metrics.observe_queue_wait("urgent", 1.5)
    metrics.set_queue_depth("high", 3)
    metrics.observe_ffmpeg_run("mystery", 1.0)
    metrics.origin_fetched("fake", 0.1, 10)
    text = metrics.render().decode()
    assert 'resizer_queue_wait_seconds_count{class="other"} 1.0' in text
    assert 'resizer_queue_depth{class="high"} 3.0' in text
    assert 'resizer_ffmpeg_run_seconds_count{mode="other"} 1.0' in text
    assert 'resizer_origin_bytes_fetched_total{source="other"} 10.0' in text
    assert cache_status_label(None) == "none"
    assert cache_status_label("HIT-STALE") == "HIT-STALE"
    assert cache_status_label("hit; <script>") == "other"
    assert route_of("GET", "/videos/a.mp4") == "media"
    assert route_of("HEAD", "/healthz") == "health"
    assert route_of("GET", "/readyz") == "health"
    assert route_of("GET", "/metrics") == "metrics"
    assert route_of("GET", "/admin/inflight") == "admin"
    assert route_of("OPTIONS", "/videos/a.mp4") == "other"
    assert route_of("GET", "/administrator.mp4") == "media"
