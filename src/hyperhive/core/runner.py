"""The one way the daemon runs external one-shot commands (git, nix, nixos-container, journalctl).

Everything goes through `Runner.run`, so a test can see exactly which commands ran, in order.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hyperhive.protocol.errors import HiveError

log = logging.getLogger(__name__)


class CommandFailed(HiveError):
    code = "command_failed"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-20:]
        super().__init__(f"`{' '.join(argv)}` failed ({returncode}): " + "\n".join(tail))
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


Executor = Callable[
    [Sequence[str], bytes | None, Path | None, Mapping[str, str] | None], Awaitable[Completed]
]


async def _execute(
    argv: Sequence[str], stdin: bytes | None, cwd: Path | None, env: Mapping[str, str] | None
) -> Completed:
    proc = await trio.run_process(
        list(argv),
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        cwd=cwd,
        env=env,
        check=False,
    )
    return Completed(
        tuple(argv),
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


@dataclass
class Runner:
    executor: Executor = _execute
    history: list[tuple[str, ...]] = field(default_factory=list)
    """Every command run, in order (kept short: the last 1,000)."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> Completed:
        self.history.append(tuple(argv))
        del self.history[:-1000]
        log.debug("running %s", " ".join(argv))
        result = await self.executor(argv, stdin, cwd, env)
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode, result.stderr)
        return result
