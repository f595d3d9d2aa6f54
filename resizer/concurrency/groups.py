"""Exception-group helpers for nurseries whose helper tasks never fail."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Around a nursery: let a lone exception leave as itself instead of in a group.

    trio wraps whatever leaves a nursery in an ExceptionGroup. When the background tasks
    cannot fail, the group holds only the body's exception, and callers (and the
    ``except ResizerError`` clauses that map errors to HTTP statuses) want that one. Groups
    of several (e.g. a Cancelled from each task) pass through for trio to handle. The
    exception is re-raised outside the ``except`` block so the group is not its context.
    """
    escaped: BaseException | None = None
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        escaped = group.exceptions[0]
    if escaped is not None:
        raise escaped
