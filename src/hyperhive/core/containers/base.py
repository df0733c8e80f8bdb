"""The container backend interface and the one way every backend runs and stops a process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bind:
    source: Path
    dest: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a backend needs to run one agent's container."""

    name: str
    container: str
    role: str
    binds: tuple[Bind, ...]
    env: dict[str, str]
    command: tuple[str, ...]
    log_path: Path
    workdir: str = "/state"
    private_network: bool = False
    memory_max: str | None = None
    cpu_quota: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


OnStarted = Callable[[int], None]


class Backend(Protocol):
    name: str

    def argv(self, spec: ContainerSpec) -> list[str]:
        """The exact command line that runs this container in the foreground."""
        ...

    async def run(self, spec: ContainerSpec, *, grace: float, on_started: OnStarted) -> int:
        """Run the container until it exits; on_started(pid) once it is up. Returns its exit code.

        Cancelling the call stops the container: SIGTERM to its process group, SIGKILL after
        `grace` seconds.
        """
        ...


async def run_process_group(
    argv: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    grace: float,
    on_started: OnStarted,
) -> int:
    """Run argv in its own process group with output appended to log_path.

    The process is a cancel scope: cancelling this call signals the whole group.
    """
    await trio.to_thread.run_sync(lambda: log_path.parent.mkdir(parents=True, exist_ok=True))
    logfile = await trio.to_thread.run_sync(open, log_path, "ab")
    try:
        proc = await trio.lowlevel.open_process(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        logfile.close()
    try:
        on_started(proc.pid)
        return await proc.wait()
    finally:
        if proc.returncode is None:
            with trio.CancelScope(shield=True):
                await stop_process_group(proc, grace)


async def stop_process_group(proc: trio.Process, grace: float) -> None:
    _killpg(proc.pid, signal.SIGTERM)
    with trio.move_on_after(grace):
        await proc.wait()
        return
    log.warning("process group %d ignored SIGTERM for %.1fs; killing", proc.pid, grace)
    _killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
