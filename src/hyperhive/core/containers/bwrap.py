"""The bubblewrap backend: a minimal read-only root, private pid/ipc/uts, the agent's uid."""

from __future__ import annotations

import os
import shutil

import trio

from hyperhive.core.containers import rootfs, seccomp
from hyperhive.core.containers.base import (
    ContainerSpec,
    OnStarted,
    limits_note,
    run_limited,
    tail_lines,
)

PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
"""What of /proc a namespace root could write: bound read-only over the container's /proc.
bwrap 0.8 does this for /proc/sys itself only when its own access() probe says it may."""
HARNESS_RUNTIME = "/run/harness"
"""A scratch dir the harness (as the agent's uid) writes claude's config files to."""


SCRATCH = ("/tmp", "/var/tmp", "/root", "/run")


def _parents(paths: list[str]) -> list[str]:
    """`--dir` for each missing ancestor of the mount points, 0755 (bwrap makes them 0700,
    which the agent's uid could not traverse); the scratch tmpfs dirs keep their own mode."""
    made: list[str] = []
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in made and parent not in SCRATCH and parent != "/usr":
                made.append(parent)
    args: list[str] = []
    for parent in made:
        args += ["--perms", "0755", "--dir", parent]
    return args


class BwrapBackend:
    name = "bwrap"
    agent_uids = os.geteuid() == 0
    """Agents run as their own uids, with cgroups and network namespaces, when the daemon is
    root; a daemon run by a user runs them as that user (SPEC §4.1b says what that loses)."""

    def __init__(self, bwrap: str = "bwrap", keep_paths: list[str] | None = None) -> None:
        self.bwrap = bwrap
        self.keep_paths = rootfs.runtime_paths() if keep_paths is None else keep_paths
        self.etc_bound = rootfs.host_etc_dirs()

    def root_args(self, spec: ContainerSpec) -> list[str]:
        """The minimal root on bwrap's fresh tmpfs: /usr and its links, the generated /etc,
        the runtime paths, all read-only (SPEC §4.1b)."""
        args = ["--ro-bind", "/usr", "/usr"]
        for target, path in rootfs.merged_usr_links():
            args += ["--symlink", target, path]
        if spec.etc_dir is not None:
            args += ["--ro-bind", str(spec.etc_dir), "/etc"]
            for path in self.etc_bound:
                args += ["--ro-bind", path, path]
        args += _parents(self.keep_paths)
        for path in self.keep_paths:
            args += ["--ro-bind", path, path]
        return args

    def argv(self, spec: ContainerSpec, seccomp_fd: int | None = None) -> list[str]:
        args = [
            self.bwrap,
            # No --die-with-parent: its PDEATHSIG fires when the *thread* that forked bwrap
            # exits, and trio forks from short-lived worker threads. Containers are stopped by
            # process group instead (see base.run_process_group).
            # bwrap started by root hands the sandbox every capability unless told otherwise.
            # The payload keeps only what setpriv needs to become the agent's uid (it drops
            # them, and the bounding set, before the harness runs).
            "--cap-drop",
            "ALL",
        ]
        if spec.uid is not None:
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            args += ["--cap-add", "CAP_SETPCAP"]
        args += [
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            spec.container,
        ]
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        if spec.private_network:
            args.append("--unshare-net")
        # Scratch space, the agent's own: sticky and world-writable like a host's /tmp (the
        # agent's uid is the only one inside). /root is HOME (its ~/.claude is bound below).
        # First, so that runtime paths below them (a pyenv under /root) are bound on top.
        args += ["--perms", "0755", "--dir", "/var"]
        for path in SCRATCH[:3]:
            args += ["--perms", "1777", "--tmpfs", path]
        args += ["--tmpfs", "/run", "--perms", "1777", "--dir", HARNESS_RUNTIME]
        args += self.root_args(spec)
        args += ["--dev", "/dev", "--proc", "/proc"]
        for path in PROC_READ_ONLY:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        for hidden in self.masked(spec):
            args += ["--tmpfs", hidden]
        args += _parents([bind.dest for bind in spec.binds])
        for bind in spec.binds:
            args += ["--ro-bind" if bind.read_only else "--bind", str(bind.source), bind.dest]
        # bwrap's own --chdir runs as uid 0 without CAP_DAC_OVERRIDE, which cannot enter the
        # agent's 0700 /state: the payload changes directory once it is the agent.
        args += ["--chdir", "/", "--", *self.payload(spec)]
        return args

    def masked(self, spec: ContainerSpec) -> list[str]:
        return rootfs.masked_paths(spec.hidden, ["/usr", *self.keep_paths])

    @staticmethod
    def payload(spec: ContainerSpec) -> list[str]:
        if spec.uid is None:
            return ["/bin/sh", "-c", 'cd "$0" && exec "$@"', spec.workdir, *spec.command]
        return [
            "/usr/bin/setpriv",
            f"--reuid={spec.uid}",
            f"--regid={spec.uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            "/bin/sh",
            "-c",
            'cd "$0" && exec "$@"',
            spec.workdir,
            *spec.command,
        ]

    def limits_note(self, spec: ContainerSpec) -> str | None:
        return limits_note(spec)

    async def create(self, spec: ContainerSpec) -> None:
        """Nothing to build: the container is a minimal read-only root plus binds."""

    async def rebuild(self, spec: ContainerSpec) -> None:
        """Nothing to rebuild: the next start reads the applied config."""

    async def destroy(self, spec: ContainerSpec) -> None:
        """Nothing to remove beyond the agent's own state."""

    async def logs(self, spec: ContainerSpec, lines: int) -> list[str]:
        return await trio.to_thread.run_sync(tail_lines, spec.log_path, lines)

    async def prepare(self, spec: ContainerSpec) -> None:
        """Write the container's /etc (blocking work off the loop)."""
        if spec.etc_dir is not None:
            await trio.to_thread.run_sync(rootfs.generate_etc, spec)

    async def run(self, spec: ContainerSpec, *, grace: float, on_started: OnStarted) -> int:
        await self.prepare(spec)
        fd = await trio.to_thread.run_sync(seccomp.open_program_fd)
        try:
            return await run_limited(
                self.argv(spec, fd), spec, grace=grace, on_started=on_started, pass_fds=(fd,)
            )
        finally:
            os.close(fd)


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None
