"""structlog set-up. Under trio use the sync methods (``log.info``): ``ainfo`` needs asyncio."""

from __future__ import annotations

import logging
import sys

import structlog

# Whether info lines are written (set by configure_logging): the access log of a hit skips
# building its fields when they would be dropped (a hit costs about 90 us in all).
_info_enabled = True


def info_enabled() -> bool:
    return _info_enabled


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    global _info_enabled
    numeric = logging.getLevelNamesMapping()[level.upper()]
    _info_enabled = numeric <= logging.INFO
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:  # the console renderer formats exceptions itself
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
