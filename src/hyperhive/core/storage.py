"""What a full disk looks like in each form it surfaces in (sqlite, the OS, a git command), as one
`StorageFull`."""

from __future__ import annotations

import errno
import os
import sqlite3

from hyperhive.core.runner import CommandFailed
from hyperhive.protocol.errors import StorageFull

SQLITE_FULL = 13
"""sqlite's primary result code for "database or disk is full" (extended codes keep it in the
low byte)."""
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXTS = tuple(os.strerror(e) for e in sorted(FULL_ERRNOS))
"""How a child process (git) reports them on stderr: strerror in the C locale."""


def storage_full(exc: BaseException) -> StorageFull | None:
    """The `StorageFull` that `exc` amounts to, or None when it is not about a full disk.

    Exception groups count when every failure in them is about a full disk.
    """
    if isinstance(exc, StorageFull):
        return exc
    detail: str | None = None
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == SQLITE_FULL:
            detail = str(exc)
    elif isinstance(exc, OSError):
        if exc.errno in FULL_ERRNOS:
            detail = exc.strerror or os.strerror(exc.errno)
    elif isinstance(exc, CommandFailed):
        detail = next((text for text in _FULL_TEXTS if text in exc.stderr), None)
    elif isinstance(exc, BaseExceptionGroup):
        inner = [storage_full(e) for e in exc.exceptions]
        if inner and all(e is not None for e in inner):
            return inner[0]
    if detail is None:
        return None
    return StorageFull(
        f"the disk is full ({detail}): the hive's state cannot grow, so this was not done;"
        " free some space on the state disk and try again"
    )
