"""moto's S3 server (and IAM) as a real process on 127.0.0.1, with SigV4 checks turned on."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from resizer.sources.sigv4 import Credentials, make_signer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running_moto(log_folder: Path) -> Iterator[str]:
    """``python -m moto.server`` on a free port until the block ends; yields its URL."""
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    with (log_folder / "moto.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_PORT": str(port)},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}")
            try:
                httpx.get(f"{endpoint_url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not answer within 60 s") from None
                time.sleep(0.1)
        yield endpoint_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def enforce_auth(endpoint_url: str, probe_url: str, unknown: Credentials, region: str) -> None:
    """Turn moto's IAM checks on, then prove a request signed with ``unknown`` is refused."""
    response = httpx.post(f"{endpoint_url}/moto-api/reset-auth", content=b"0", timeout=10)
    response.raise_for_status()
    probe = httpx.Request("HEAD", probe_url)
    make_signer(unknown, region)(probe)
    with httpx.Client(timeout=10) as client:
        status = client.send(probe).status_code
    if status != 403:
        raise RuntimeError(f"moto does not check signatures: an unknown key got {status}")
