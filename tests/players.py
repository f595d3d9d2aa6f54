"""Real players for integration tests: headless Chromium and Firefox ESR, and hls.js in them.

``tests/players/install.sh`` (``make players``, run by ``make test``) installs the browsers and
hls.js. A ``PageServer`` serves the pages of ``tests/players/`` from its own port, so media
from resizer comes from another origin, and collects the one final report each page POSTs.
``run_page`` starts a browser on a page in a session of its own with a fresh profile and kills
that whole session afterwards, whatever happened, checking that no process of it is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import h11
import trio

from resizer.units import SECONDS

PAGES = Path(__file__).parent / "players"
HLS_JS = PAGES / "node_modules" / "hls.js" / "dist" / "hls.min.js"

Browser = Literal["chromium", "firefox"]

# What the page server answers: path -> (file, content type).
STATIC = {
    "/progressive.html": (PAGES / "progressive.html", "text/html; charset=utf-8"),
    "/hls.html": (PAGES / "hls.html", "text/html; charset=utf-8"),
    "/harness.js": (PAGES / "harness.js", "text/javascript"),
    "/hls.min.js": (HLS_JS, "text/javascript"),
}

# Beyond the page's own deadline: a browser's start (Firefox takes a few seconds cold).
START_MARGIN = 20 * SECONDS
KILL_GRACE = 5 * SECONDS

# As root, on a machine whose network is closed (the flags stop Chromium's own connections).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--autoplay-policy=no-user-gesture-required",
    "--enable-logging=stderr",
]

# A fresh Firefox profile: autoplay, and none of its first-run pages or own network traffic.
FIREFOX_PREFS: dict[str, bool | int | str] = {
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "network.proxy.type": 0,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "startup.homepage_welcome_url": "about:blank",
    "startup.homepage_welcome_url.additional": "",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.policy.firstRunURL": "",
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.server": "",
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "app.shield.optoutstudies.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "services.settings.server": "http://127.0.0.1:9/",
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "browser.newtabpage.enabled": False,
    "browser.sessionstore.resume_from_crash": False,
    "media.gmp-manager.updateEnabled": False,
    "media.gmp-gmpopenh264.enabled": False,
}


class PlayerError(AssertionError):
    """A page gave no final report (browser exited, deadline) or left processes behind."""

    def __init__(self, message: str, browser: BrowserProcesses | None = None) -> None:
        super().__init__(message)
        self.browser = browser


MARKER = "RESIZER_PLAYER_RUN"


@dataclass(frozen=True)
class BrowserProcesses:
    """The processes of one browser run: its session, and any that left it (Firefox's crash
    helper calls setsid) but carry the run's marker in their environment."""

    session: int  # the first process's pid
    marker: str  # the value of MARKER in their environment

    def alive(self) -> list[str]:
        """Live (not zombie) processes of the run, as "pid command"."""
        needle = f"{MARKER}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                environ = (entry / "environ").read_bytes()
            except OSError:  # exited meanwhile
                continue
            # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, _ppid, _pgrp, sid = stat[stat.rindex(")") + 2 :].split()[:4]
            ours = int(sid) == self.session or needle in environ.split(b"\0")
            if ours and state not in ("Z", "X"):
                found.append(f"{entry.name} {comm}")
        return found


@dataclass(frozen=True)
class Page:
    url: str
    token: str
    timeout: float  # the page's own deadline


@dataclass
class PageServer:
    """The pages' origin: serves ``STATIC`` and keeps the reports POSTed to /report/<token>."""

    url: str = ""
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    _final: dict[str, trio.Event] = field(default_factory=dict)

    def page(self, name: str, timeout: float = 20 * SECONDS, **params: object) -> Page:
        """Page ``name`` with query ``params``; it reports a failure after ``timeout`` itself."""
        token = secrets.token_hex(8)
        self._final[token] = trio.Event()
        query = urlencode({**{k: str(v) for k, v in params.items()}, "timeout": timeout})
        return Page(url=f"{self.url}/{name}?{query}&token={token}", token=token, timeout=timeout)

    async def final_report(self, token: str) -> dict[str, Any]:
        await self._final[token].wait()
        return self.reports[token]

    async def handle(self, stream: trio.SocketStream) -> None:
        """One keep-alive connection; a browser killed mid-request just ends it."""
        connection = h11.Connection(h11.SERVER)
        with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
            async with stream:
                while await self._exchange(connection, stream):
                    connection.start_next_cycle()

    async def _exchange(self, connection: h11.Connection, stream: trio.SocketStream) -> bool:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                break
            else:  # ConnectionClosed (or a PAUSED that cannot happen before our answer)
                return False
        status, content_type, content = self._answer(request, bytes(body))
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(content))),
            ("Cache-Control", "no-store"),
        ]
        await stream.send_all(connection.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(connection.send(h11.Data(data=content)))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        return connection.our_state is h11.DONE and connection.their_state is h11.DONE

    def _answer(self, request: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        path = urlsplit(request.target.decode()).path
        text = "text/plain"
        if request.method == b"POST" and path.startswith("/report/"):
            token = path.removeprefix("/report/")
            if token not in self._final:
                return 404, text, b"unknown token\n"
            report: dict[str, Any] = json.loads(body)
            if not self._final[token].is_set():  # a late progress report must not replace it
                self.reports[token] = report
                if report.get("done"):
                    self._final[token].set()
            return 200, text, b"ok\n"
        if request.method == b"GET" and path in STATIC:
            file, content_type = STATIC[path]
            return 200, content_type, file.read_bytes()
        return 404, text, b"not found\n"


async def start_page_server(nursery: trio.Nursery) -> PageServer:
    """Serve the pages on a free port of 127.0.0.1 in ``nursery`` (cancelled with it)."""
    if not HLS_JS.is_file():
        raise PlayerError(f"{HLS_JS} is missing: run tests/players/install.sh (make players)")
    pages = PageServer()
    listeners = await nursery.start(partial(trio.serve_tcp, pages.handle, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    pages.url = f"http://{host}:{port}"
    return pages


@dataclass(frozen=True)
class PageRun:
    report: dict[str, Any]
    seconds: float  # browser start to final report
    browser: BrowserProcesses  # all gone by now
    log: str  # the browser's stdout and stderr


def browser_command(
    browser: Browser, workdir: Path, url: str, marker: str
) -> tuple[list[str], dict[str, str]]:
    """How to start ``browser`` headless on ``url``, with a fresh profile in ``workdir``."""
    profile = workdir / "profile"
    home = workdir / "home"
    profile.mkdir(parents=True)
    home.mkdir()
    env = {
        **os.environ,
        # Browsers write caches and settings under HOME: keep them in the test's folder.
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "MOZ_HEADLESS": "1",
        "MOZ_CRASHREPORTER_DISABLE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        MARKER: marker,
    }
    if browser == "chromium":
        return ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url], env
    prefs = "".join(
        f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in FIREFOX_PREFS.items()
    )
    (profile / "user.js").write_text(prefs)
    return ["firefox-esr", "--headless", "--no-remote", "--profile", str(profile), url], env


async def run_page(
    browser: Browser,
    pages: PageServer,
    page: Page,
    workdir: Path,
    deadline: float | None = None,
) -> PageRun:
    """Open ``page`` in ``browser`` and return the page's final report.

    ``deadline`` defaults to the page's own plus ``START_MARGIN``. Raises ``PlayerError`` with
    the browser's log when no final report comes by then, or when a process of the browser's
    session outlives the kill.
    """
    marker = secrets.token_hex(8)
    argv, env = browser_command(browser, workdir, page.url, marker)
    log_path = workdir / "browser.log"
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    started = trio.current_time()
    try:
        process = await trio.lowlevel.open_process(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        os.close(log)  # the browser has its own copy
    processes = BrowserProcesses(session=process.pid, marker=marker)
    report = None
    try:
        with trio.move_on_after(page.timeout + START_MARGIN if deadline is None else deadline):
            report = await _first(pages.final_report(page.token), _exited(process))
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_GRACE):
            await kill(process, processes)
    seconds = trio.current_time() - started
    text = await trio.Path(log_path).read_text(errors="replace")
    if left := processes.alive():
        raise PlayerError(f"{browser} left processes behind: {left}\n{text[-4000:]}", processes)
    if report is None:
        partial = pages.reports.get(page.token)
        raise PlayerError(
            f"{browser}: no final report after {seconds:.1f} s (exit status "
            f"{process.returncode}); last progress report:\n"
            f"{describe(partial) if partial else None}\nlog:\n{text[-4000:]}",
            processes,
        )
    return PageRun(report=report, seconds=seconds, browser=processes, log=text)


async def _exited(process: trio.Process) -> None:
    await process.wait()


async def _first(
    report: Awaitable[dict[str, Any]], exited: Awaitable[None]
) -> dict[str, Any] | None:
    """The report, or None if the browser exits first."""
    result: dict[str, Any] | None = None

    async def wait_report(cancel: Callable[[], None]) -> None:
        nonlocal result
        result = await report
        cancel()

    async def wait_exit(cancel: Callable[[], None]) -> None:
        await exited
        cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_report, nursery.cancel_scope.cancel)
        nursery.start_soon(wait_exit, nursery.cancel_scope.cancel)
    return result


async def kill(process: trio.Process, processes: BrowserProcesses) -> None:
    """SIGKILL the browser's process group, then any other process of the run, until none."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
    while left := processes.alive():
        for entry in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.split()[0]), signal.SIGKILL)
        await trio.sleep(0.05)


@dataclass
class Exchange:
    """One request a player made to resizer, and the head of resizer's answer."""

    method: str
    target: str
    range: str | None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0
    complete: bool = False  # the last body message was sent

    def __str__(self) -> str:
        answer = ", ".join(
            f"{k}: {self.headers[k]}"
            for k in ("content-range", "content-length", "accept-ranges", "x-cache-status")
            if k in self.headers
        )
        return (
            f"{self.method} {self.target} Range: {self.range} -> {self.status} ({answer}); "
            f"{self.body_bytes} bytes sent{'' if self.complete else ', incomplete'}"
        )


class RequestLog:
    """ASGI wrapper recording each HTTP exchange (for what a browser asked and got)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        target = scope["path"] + (
            f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
        )
        exchange = Exchange(scope["method"], target, headers.get("range"))
        self.exchanges.append(exchange)

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                exchange.body_bytes += len(message.get("body", b""))
                exchange.complete = not message.get("more_body", False)
            await send(message)

        await self.app(scope, receive, recording_send)

    def __str__(self) -> str:
        return "\n".join(str(exchange) for exchange in self.exchanges)


def describe(run: PageRun | dict[str, Any], requests: RequestLog | None = None) -> str:
    """A report made legible for an assertion message: its fields, its events one a line
    (repeats of an event folded), and what resizer was asked."""
    report = run.report if isinstance(run, PageRun) else run
    lines = [f"{k}: {json.dumps(v)}" for k, v in report.items() if k != "events"]
    lines.append("events (ms type currentTime readyState buffered):")
    previous = ""
    for event in report.get("events", []):
        line = f"{event['type']} {event['currentTime']} {event['readyState']} {event['buffered']}"
        if event["type"] != previous:
            lines.append(f"  {event['t']:>6} {line}")
        previous = event["type"]
    if requests is not None:
        lines += ["requests:", *(f"  {exchange}" for exchange in requests.exchanges)]
    return "\n".join(lines)
