"""The bubblewrap backend: host root read-only, private pid/ipc/uts, the agent's dirs bound in."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import trio

import hyperhive
from hyperhive.core.containers.base import ContainerSpec, OnStarted, run_process_group, tail_lines

_MASKED = ("/tmp", "/run", "/root", "/home")
"""Host directories replaced by an empty tmpfs inside the container: scratch space, and the
places where users (and the operator) keep what no agent should read."""


def _under_masked(path: str) -> bool:
    return any(path == m or path.startswith(m + "/") for m in _MASKED)


def runtime_paths() -> list[str]:
    """Host paths the harness needs that a masked directory would hide (venv, python, claude)."""
    candidates = {sys.prefix, sys.base_prefix, str(Path(hyperhive.__file__).parent.parent)}
    claude = shutil.which("claude")
    if claude:
        candidates.add(os.path.dirname(os.path.realpath(claude)))
    found: set[str] = set()
    for path in candidates:
        for p in (path, os.path.realpath(path)):
            if _under_masked(p) and os.path.exists(p):
                found.add(p)
    # A path inside another one is covered by it.
    return sorted(p for p in found if not any(p != q and p.startswith(q + "/") for q in found))


class BwrapBackend:
    name = "bwrap"

    def __init__(self, bwrap: str = "bwrap", keep_paths: list[str] | None = None) -> None:
        self.bwrap = bwrap
        self.keep_paths = runtime_paths() if keep_paths is None else keep_paths

    def root_args(self, spec: ContainerSpec) -> list[str]:
        """The host's top-level directories, read-only, on bwrap's fresh tmpfs root.

        Binding them one by one (instead of `/` itself) leaves the root writable for the
        container's own mount points (/state, /agents, ...) without touching the host.
        """
        skip = {"proc", "dev", *(m.lstrip("/") for m in _MASKED)}
        skip |= {b.dest.strip("/").split("/")[0] for b in spec.binds}
        args: list[str] = []
        for entry in sorted(os.listdir("/")):
            if entry in skip:
                continue
            path = "/" + entry
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        return args

    def argv(self, spec: ContainerSpec) -> list[str]:
        args = [
            self.bwrap,
            # No --die-with-parent: its PDEATHSIG fires when the *thread* that forked bwrap
            # exits, and trio forks from short-lived worker threads. Containers are stopped by
            # process group instead (see base.run_process_group).
            # bwrap started by root hands the sandbox every capability unless told otherwise: an
            # agent needs none, and with none it cannot remount, load modules or chown its way
            # out of the read-only binds.
            "--cap-drop",
            "ALL",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            spec.container,
            *self.root_args(spec),
            "--dev",
            "/dev",
            "--proc",
            "/proc",
        ]
        if spec.private_network:
            args.append("--unshare-net")
        for masked in _MASKED:
            args += ["--tmpfs", masked]
        for hidden in spec.hidden:
            if not _under_masked(str(hidden)):
                args += ["--tmpfs", str(hidden)]
        for path in self.keep_paths:
            args += ["--ro-bind", path, path]
        for bind in spec.binds:
            args += ["--ro-bind" if bind.read_only else "--bind", str(bind.source), bind.dest]
        args += ["--chdir", spec.workdir, "--", *spec.command]
        return args

    def limits_note(self, spec: ContainerSpec) -> str | None:
        limits = spec.config.limits
        if limits.memory_max or limits.cpu_quota:
            return "bubblewrap cannot enforce memory_max/cpu_quota here (no cgroup delegation)"
        return None

    async def create(self, spec: ContainerSpec) -> None:
        """Nothing to build: the container is the host's root, read-only, plus binds."""

    async def rebuild(self, spec: ContainerSpec) -> None:
        """Nothing to rebuild: the next start reads the applied config."""

    async def destroy(self, spec: ContainerSpec) -> None:
        """Nothing to remove beyond the agent's own state."""

    async def logs(self, spec: ContainerSpec, lines: int) -> list[str]:
        return await trio.to_thread.run_sync(tail_lines, spec.log_path, lines)

    async def run(self, spec: ContainerSpec, *, grace: float, on_started: OnStarted) -> int:
        return await run_process_group(
            self.argv(spec),
            env=spec.env,
            log_path=spec.log_path,
            grace=grace,
            on_started=on_started,
        )


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None
