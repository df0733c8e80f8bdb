"""The systemd-nspawn backend: host /usr on a fresh tmpfs root, the agent's dirs bound in."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import trio

from hyperhive.core.containers import rootfs
from hyperhive.core.containers.base import (
    ContainerSpec,
    OnStarted,
    _write_pidfile,
    limits_note,
    read_live_pidfile,
    reap_stale,
    run_limited,
    tail_lines,
)

log = logging.getLogger(__name__)

HARNESS_RUNTIME = "/run/harness"
SYSCALL_DENY = (
    "@keyring",
    "@module",
    "@mount",
    "@debug",
    "@swap",
    "@reboot",
    "@clock",
    "@raw-io",
    "@obsolete",
    "userfaultfd",
    "bpf",
    "unshare",
    "setns",
    "open_by_handle_at",
    "kcmp",
    "pidfd_getfd",
)

INIT_PIDFILE = "container-init.pid"
"""Next to container.pid: the container's pid 1, which outlives a SIGKILLed nspawn."""
INIT_POLL = 0.02
INIT_ATTEMPTS = 500
"""Ten seconds of looking for it."""


runtime_paths = rootfs.runtime_paths
"""Host paths the harness needs that the volatile root lacks (with `--volatile=yes` only /usr
comes from the host; everything else must be bound)."""


NSPAWN_DEFAULT_CAPS = (
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_NICE",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TTY_CONFIG",
)
"""Every capability systemd-nspawn(1) keeps for its payload by default (CAP_NET_ADMIN with
--private-network): all of them are dropped."""


def _escape(path: str) -> str:
    """nspawn splits --bind=SRC:DEST at colons; it reads backslash escapes in both halves."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _container_init(nspawn_pid: int) -> int | None:
    """nspawn's child that is pid 1 of the container's pid namespace, once it exists."""
    try:
        with open(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children", encoding="ascii") as fh:
            children = [int(c) for c in fh.read().split()]
    except (OSError, ValueError):
        return None
    for child in children:
        try:
            with open(f"/proc/{child}/status", encoding="ascii", errors="replace") as fh:
                nspid = next((line.split()[1:] for line in fh if line.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(nspid) > 1 and nspid[-1] == "1":
            return child
    return None


async def _record_init(nspawn_pid: int, pidfile: Path) -> None:
    # Nothing signals when nspawn has forked the container's init: look for it for a while.
    for _ in range(INIT_ATTEMPTS):
        init = await trio.to_thread.run_sync(_container_init, nspawn_pid)
        if init is not None:
            await trio.to_thread.run_sync(_write_pidfile, pidfile, init)
            return
        await trio.sleep(INIT_POLL)
    log.warning("cannot find the init of nspawn %d: a SIGKILL would leave it running", nspawn_pid)


class NspawnBackend:
    """The host's /usr read-only on a fresh tmpfs root (`--volatile=yes`), the payload as pid 2.

    Without systemd as PID 1 and without D-Bus there is no machined and no scope unit, so the
    container stays in the daemon's own unit (`--register=no --keep-unit`) and is stopped by
    process group like every other backend.
    """

    name = "nspawn"
    agent_uids = os.geteuid() == 0
    """Agents run as their own uids, with cgroups and network namespaces, when the daemon is
    root; a daemon run by a user runs them as that user (SPEC §4.1b says what that loses)."""

    def __init__(self, nspawn: str = "systemd-nspawn", keep_paths: list[str] | None = None) -> None:
        self.nspawn = nspawn
        self.keep_paths = runtime_paths() if keep_paths is None else keep_paths
        self.etc_bound = rootfs.host_etc_dirs()

    def argv(self, spec: ContainerSpec) -> list[str]:
        """The command line. It names the environment variables but never carries their values.

        /proc/<pid>/cmdline is world-readable, and the environment holds secrets (the API key,
        the UI token, whatever claude_env adds). `--setenv=NAME` without a value makes nspawn
        copy NAME from its own environment, which `run` sets to spec.env; /proc/<pid>/environ
        is readable only by the daemon's user. Every variable goes that way, so no backend code
        has to decide which of them are secret.
        """
        args = [
            self.nspawn,
            "--quiet",
            "--directory=/",
            "--volatile=yes",
            # No systemd PID 1 or D-Bus: no machine registration, no transient scope.
            "--register=no",
            "--keep-unit",
            # /etc is the host's, so the machine id is too: nspawn would refuse to link the
            # journal with a warning on every start.
            "--link-journal=no",
            "--as-pid2",
            "--console=pipe",
            f"--machine={spec.container}",
            # nspawn grants its payload CAP_SYS_ADMIN, CAP_DAC_OVERRIDE and more by default; without
            # a user namespace those are the host's. An agent needs none of them.
            f"--drop-capability={','.join(NSPAWN_DEFAULT_CAPS)}",
            "--no-new-privileges=yes",
            # On top of nspawn's own filter: what bwrap's filter refuses too (see seccomp.py).
            f"--system-call-filter=~{' '.join(SYSCALL_DENY)}",
        ]
        if spec.private_network:
            args.append("--private-network")
        if spec.uid is not None:
            # The payload runs as the agent's user from its generated /etc; HOME (/root) and the
            # harness's scratch dir are tmpfs it owns.
            args.append(f"--user={rootfs.user_name(spec.name)}")
            own = f"uid={spec.uid},gid={spec.uid}"
            args.append(f"--tmpfs=/root:mode=0700,{own}")
            args.append(f"--tmpfs={HARNESS_RUNTIME}:mode=0700,{own}")
        if spec.etc_dir is not None:
            args.append(f"--bind-ro={_escape(str(spec.etc_dir))}:/etc")
            args += [f"--bind-ro={_escape(p)}:{_escape(p)}" for p in self.etc_bound]
        for path in self.keep_paths:
            args.append(f"--bind-ro={_escape(path)}:{_escape(path)}")
        for bind in spec.binds:
            flag = "--bind-ro" if bind.read_only else "--bind"
            args.append(f"{flag}={_escape(str(bind.source))}:{_escape(bind.dest)}")
        # nspawn mounts parents before children, whatever the order on the command line.
        args += [f"--tmpfs={_escape(path)}" for path in self.masked(spec)]
        args.append(f"--chdir={spec.workdir}")
        args += [f"--setenv={key}" for key in sorted(spec.env)]
        args += ["--", *spec.command]
        return args

    def masked(self, spec: ContainerSpec) -> list[str]:
        return rootfs.masked_paths(spec.hidden, ["/usr", *self.keep_paths])

    def limits_note(self, spec: ContainerSpec) -> str | None:
        # Without systemd as PID 1 nspawn's --property= has no scope to act on: the daemon
        # puts nspawn into the agent's cgroup itself (base.run_limited).
        return limits_note(spec)

    async def create(self, spec: ContainerSpec) -> None:
        """Nothing to build: the root is a fresh tmpfs over the host's /usr on every start."""

    async def rebuild(self, spec: ContainerSpec) -> None:
        """Nothing to rebuild: the next start reads the applied config."""

    async def destroy(self, spec: ContainerSpec) -> None:
        """Nothing to remove: the volatile root vanishes with the container, and no machine is
        registered; the agent's state is the supervisor's business."""

    async def logs(self, spec: ContainerSpec, lines: int) -> list[str]:
        return await trio.to_thread.run_sync(tail_lines, spec.log_path, lines)

    async def run(self, spec: ContainerSpec, *, grace: float, on_started: OnStarted) -> int:
        """Run nspawn in its own process group (see base.run_process_group).

        nspawn answers SIGTERM by SIGKILLing the container's init, which takes everything in
        the container with it, and exits at once. But that init runs in a session of its own:
        a SIGKILL of nspawn's process group alone would leave it, and the agent, running. So
        its pid is recorded, and killed once nspawn is gone.
        """
        if spec.etc_dir is not None:
            await trio.to_thread.run_sync(rootfs.generate_etc, spec)
        init_pidfile = spec.log_path.parent / INIT_PIDFILE
        adoptable = await trio.to_thread.run_sync(
            read_live_pidfile, spec.log_path.parent / "container.pid"
        )
        if adoptable is None:
            # Nothing to adopt, but nspawn may have been SIGKILLed under a container.
            await reap_stale(init_pidfile)
        try:
            async with trio.open_nursery() as nursery:

                def started(pid: int) -> None:
                    on_started(pid)
                    nursery.start_soon(_record_init, pid, init_pidfile)

                try:
                    # nspawn's environment is spec.env: `--setenv=NAME` hands it on (see argv).
                    return await run_limited(self.argv(spec), spec, grace=grace, on_started=started)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await reap_stale(init_pidfile)
                await trio.to_thread.run_sync(_remove, init_pidfile)


def nspawn_available() -> bool:
    return shutil.which("systemd-nspawn") is not None
