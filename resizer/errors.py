"""One exception tree. Every leaf carries the HTTP status and error code clients see.

Adapters translate foreign exceptions (OSError, httpx errors, ffmpeg failures) into these
at their boundary with ``raise ... from``, so the web layer renders any ``ResizerError``
without knowing where it came from, and anything else is a genuine bug (500).
"""

from __future__ import annotations


class ResizerError(Exception):
    """Base of every error resizer raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    # Whether ``message`` may reach clients; internal details (ffmpeg's stderr) stay in logs.
    public_message: str | None = None
    # Seconds clients may cache this error (the origin's TTL for its class); 0: no-store.
    max_age: float = 0
    # True for outcomes of the key itself (the source, the options), which may be remembered
    # and answered again to everyone asking for that key; never for anything that depends
    # on the request's headers (a Range, a precondition) or on the moment (load shedding).
    key_outcome: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers this error implies (e.g. Content-Range, Retry-After)."""
        return {}


class RememberedFailure(ResizerError):
    """A recent failure for the same key, answered again without asking the origin."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str], max_age: float
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self._headers = headers
        self.max_age = max_age

    def headers(self) -> dict[str, str]:
        return dict(self._headers)


class InvalidOption(ResizerError):
    """A transformation option has a bad value; the message names it and what is allowed."""

    status = 400
    code = "invalid_option"
    key_outcome = True

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class Forbidden(ResizerError):
    """The request names something resizer must not fetch (e.g. a host not allowed)."""

    status = 403
    code = "forbidden"


class NotFound(ResizerError):
    status = 404
    code = "not_found"
    key_outcome = True


class NoOriginMatched(NotFound):
    """No configured origin's matcher accepts the request path."""

    code = "no_origin"


class SourceNotFound(NotFound):
    """The origin matched but the source object does not exist."""

    code = "source_not_found"


class SourceTooLarge(ResizerError):
    """The source exceeds ``[limits] max_source_size`` (checked while reading, not only from
    Content-Length)."""

    status = 413
    code = "source_too_large"
    key_outcome = True


class SourceLimitExceeded(ResizerError):
    """The source decodes but is beyond a configured limit (duration, pixels)."""

    status = 422
    code = "source_limit_exceeded"
    key_outcome = True


class OriginFailed(ResizerError):
    """A remote origin answered with an error or could not be reached."""

    status = 502
    code = "origin_failed"
    key_outcome = True


class OriginTimeout(ResizerError):
    status = 504
    code = "origin_timeout"
    key_outcome = True


class UnsupportedMedia(ResizerError):
    """The source decodes but holds no video stream (e.g. an audio file or an image)."""

    status = 415
    code = "unsupported_media"
    key_outcome = True


class UndecodableSource(ResizerError):
    """ffmpeg cannot read the source as media at all."""

    status = 422
    code = "undecodable_source"
    key_outcome = True


class RangeNotSatisfiable(ResizerError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of the requested range lies within 0-{size - 1}")
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class PreconditionFailed(ResizerError):
    """An If-Match or If-Unmodified-Since condition does not hold (RFC 9110 13.2.2)."""

    status = 412
    code = "precondition_failed"


class TransformFailed(ResizerError):
    """ffmpeg failed on a source it had accepted (a bug or a resource problem, not input)."""

    status = 500
    code = "transform_failed"
    key_outcome = True
    public_message = "the transformation failed; the details are in the server log"


class TransformTimeout(ResizerError):
    status = 504
    code = "transform_timeout"
    key_outcome = True


class ServiceUnavailable(ResizerError):
    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists (key, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))
        self.problems = problems
