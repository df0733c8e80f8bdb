"""Stopping a child by its process group: a ladder of signals, each with its own grace."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence

import trio

log = logging.getLogger(__name__)

Ladder = Sequence[tuple[signal.Signals, float]]
"""(signal, seconds to wait for the process to exit after it), tried in order."""


def killpg(pgid: int, sig: int) -> None:
    """Signal a process group; a group that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def signal_ladder(pgid: int, wait: Callable[[], Awaitable[object]], ladder: Ladder) -> bool:
    """Signal the group step by step until `wait` returns within a step's grace.

    True once it did; False if the process outlived every step (SIGKILL is the caller's).
    """
    for sig, grace in ladder:
        killpg(pgid, sig)
        with trio.move_on_after(grace) as waited:
            await wait()
        if not waited.cancelled_caught:
            return True
    return False


async def stop_process_group(proc: trio.Process, ladder: Ladder) -> None:
    """Walk the ladder on `proc`'s group, then SIGKILL it if `proc` still runs; returns once
    `proc` is reaped. Run it shielded: a stop must not be cut short."""
    if proc.returncode is not None:
        return
    if await signal_ladder(proc.pid, proc.wait, ladder):
        return
    if ladder:
        sig, grace = ladder[-1]
        log.warning("process group %d ignored %s for %.1fs; killing", proc.pid, sig.name, grace)
    killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
