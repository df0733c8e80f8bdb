"""Crash points for fault-injection tests: `HIVE_CRASH_AT=label:n` kills the daemon at the nth hit.

Off unless configured; a crash is `os._exit(137)`, as abrupt as `kill -9`. In-process tests may
have it raise `SimulatedCrash` instead, which ends the daemon's task at that very point.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LABELS = (
    "before_commit",
    "after_commit",
    "after_take",
    "before_ack",
    "mid_approve",
    "before_meta_commit",
)


class SimulatedCrash(BaseException):
    """A crash point reached in `raises` mode: a BaseException, so no `except Exception` on the
    way out stops it before it ends the daemon's run (tests only)."""


@dataclass
class Faults:
    label: str | None = None
    at: int = 0
    raises: bool = False
    """Raise `SimulatedCrash` instead of exiting the process (an in-process daemon under test)."""
    _hits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | None, *, raises: bool = False) -> Faults:
        """`label:n`, e.g. `after_commit:40`; empty or None disables crash points."""
        if not spec:
            return cls()
        label, _, count = spec.partition(":")
        if label not in LABELS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad crash point {spec!r}: use one of {', '.join(LABELS)} as label:n")
        return cls(label, int(count), raises)

    def hit(self, label: str) -> None:
        if label != self.label:
            return
        n = self._hits[label] = self._hits.get(label, 0) + 1
        if n == self.at:
            log.critical("crash point %s:%d reached; exiting abruptly", label, n)
            if self.raises:
                raise SimulatedCrash(f"{label}:{n}")
            os._exit(137)
