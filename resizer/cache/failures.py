"""Negative caching: remember a key's recent failure for its origin's TTL.

A missing or broken source asked for by many clients would otherwise cost an origin request
(or an ffmpeg run) each time. Failures are kept in memory only, per process, for the TTL of
their class (``[[origins]] ttl = { client_error = 60, server_error = 10 }``) and never beyond;
without a TTL for the class nothing is remembered. Only outcomes of the key itself are
remembered (``ResizerError.key_outcome``: a missing or undecodable source, an origin or
transform failure), never what depends on one request (416, 412) or on load (503).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import RememberedFailure, ResizerError


def ttl_class(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    if 300 <= status < 400:
        return "redirects"
    if 400 <= status < 500:
        return "client_error"
    return "server_error"


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    code: str
    message: str
    headers: dict[str, str]
    expires: float


class FailureCache:
    def __init__(self, clock: Callable[[], float], max_entries: int = 10_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._failures: OrderedDict[str, _Failure] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def remember(self, key: str, error: ResizerError, ttl: Mapping[str, float]) -> None:
        """Keep ``error`` for its class's TTL (sets ``error.max_age`` for Cache-Control)."""
        if not error.key_outcome or error.status == 503:
            return  # another request may succeed; an open breaker's Retry-After says when
        seconds = ttl.get(ttl_class(error.status), 0)
        if seconds <= 0:
            return
        error.max_age = seconds
        message = error.public_message or error.message
        failure = _Failure(
            error.status, error.code, message, error.headers(), self._clock() + seconds
        )
        self._failures[key] = failure
        self._failures.move_to_end(key)
        while len(self._failures) > self._max_entries:
            self._failures.popitem(last=False)

    def recall(self, key: str) -> RememberedFailure | None:
        """The remembered failure for ``key`` if still fresh, with its remaining max-age."""
        failure = self._failures.get(key)
        if failure is None:
            return None
        remaining = failure.expires - self._clock()
        if remaining <= 0:
            del self._failures[key]
            return None
        return RememberedFailure(
            failure.status, failure.code, failure.message, failure.headers, remaining
        )
