"""The container backend interface and the one way every backend runs and stops a process."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from hyperhive.core.containers import cgroups, netns
from hyperhive.protocol.agent_config import AgentConfig
from hyperhive.protocol.procgroup import killpg, signal_ladder, stop_process_group

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
    port: int = 0
    """The agent's web UI port."""
    bind: str = "127.0.0.1"
    """The host address its UI is served on (forwarded into its namespace, if it has one)."""
    config: AgentConfig = field(default_factory=AgentConfig)
    """The applied agent.toml (limits, private network, env, ...)."""
    config_dir: Path | None = None
    """The applied config repo (agent.toml, agent.nix) the container is built from."""
    hidden: tuple[Path, ...] = ()
    """Host paths the container must not see even though they lie under what it is given
    (the daemon's state and run dirs: every agent's credentials, the login tokens)."""
    uid: int | None = None
    """The agent's own unprivileged uid (and gid) the payload runs as; None: the backend's
    own user handling (nixos)."""
    etc_dir: Path | None = None
    """The container's generated /etc (passwd with the agent's user, hosts, resolv.conf)."""

    egress: netns.Egress | None = None
    """The container's own network namespace and what it may reach; None: the host's."""

    @property
    def private_network(self) -> bool:
        """A network namespace of its own: wired by the daemon (egress), or none at all."""
        return self.egress is not None or self.config.network_mode == "none"


OnStarted = Callable[[int], None]


class Backend(Protocol):
    """One container technology. The supervisor calls these; `run` is the container's life."""

    name: str

    def limits_note(self, spec: ContainerSpec) -> str | None:
        """What of spec.config.limits this backend cannot enforce here (None: all of it)."""
        ...

    async def create(self, spec: ContainerSpec) -> None:
        """Make the container exist (idempotent): files, images, units."""
        ...

    async def rebuild(self, spec: ContainerSpec) -> None:
        """Re-apply the agent's config to the container (the next `run` uses it)."""
        ...

    async def destroy(self, spec: ContainerSpec) -> None:
        """Remove what `create` made (the agent's state is the supervisor's business)."""
        ...

    async def logs(self, spec: ContainerSpec, lines: int) -> list[str]:
        """The container's most recent log lines."""
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
    pass_fds: tuple[int, ...] = (),
) -> int:
    """Run argv in its own process group with output appended to log_path.

    If a container of this agent outlived a daemon that died (its pidfile names a live
    process), it is adopted instead: watched through a pidfd, never started twice.
    The process is a cancel scope: cancelling this call signals the whole group.
    """
    await trio.to_thread.run_sync(lambda: log_path.parent.mkdir(parents=True, exist_ok=True))
    pidfile = log_path.parent / "container.pid"
    adopted = await trio.to_thread.run_sync(read_live_pidfile, pidfile)
    if adopted is not None:
        return await _watch_adopted(adopted, pidfile, grace=grace, on_started=on_started)
    logfile = await trio.to_thread.run_sync(open_log, log_path)
    try:
        await trio.to_thread.run_sync(_log_line, logfile, f"starting: {' '.join(argv[:1])}")
        proc = await trio.lowlevel.open_process(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    finally:
        logfile.close()
    try:
        await trio.to_thread.run_sync(_write_pidfile, pidfile, proc.pid)
        on_started(proc.pid)
        return await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            await stop_process_group(proc, [(signal.SIGTERM, grace)])
        # Whatever is left of the group goes too: bwrap's outer process can exit on SIGTERM
        # while its in-namespace init (same group) lives on and would keep the agent running.
        killpg(proc.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_remove, pidfile)
            await trio.to_thread.run_sync(append_log_line, log_path, f"exited: {proc.returncode}")


@functools.cache
def cgroup_host() -> cgroups.CgroupHost | cgroups.Unavailable:
    """This host's cgroups, looked up once per daemon (a read of /proc/self/mountinfo)."""
    return cgroups.detect()


def cgroup_name(spec: ContainerSpec) -> str:
    """The container's cgroup: its name plus a digest of its agent dir, so that two hives on
    one host (or a test's) never share, or empty, each other's cgroups."""
    digest = hashlib.sha256(str(spec.log_path.parent).encode()).hexdigest()[:10]
    return f"{spec.container}.{digest}"


async def run_limited(
    argv: list[str],
    spec: ContainerSpec,
    *,
    grace: float,
    on_started: OnStarted,
    pass_fds: tuple[int, ...] = (),
) -> int:
    """`run_process_group` inside the agent's cgroup with its limits (memory, CPU, pids), on
    hosts where the daemon manages cgroups; the cgroup goes (with anything left in it) after."""
    host = await trio.to_thread.run_sync(cgroup_host)
    group = None
    if isinstance(host, cgroups.CgroupHost):
        name = cgroup_name(spec)
        pidfile = spec.log_path.parent / "container.pid"
        if await trio.to_thread.run_sync(read_live_pidfile, pidfile) is None:
            limits = cgroups.parse_limits(spec.config.limits)
            group = await trio.to_thread.run_sync(host.prepare, name, limits)
            argv = group.join_argv(argv)  # outermost: the container manager joins, then execs
        else:
            group = host.agent(name)  # adopted: it is in its cgroup already
    try:
        async with trio.open_nursery() as nursery:

            def started(pid: int) -> None:
                on_started(pid)
                if spec.egress is not None:
                    nursery.start_soon(_serve_network, pid, spec)

            try:
                return await run_process_group(
                    argv,
                    env=spec.env,
                    log_path=spec.log_path,
                    grace=grace,
                    on_started=started,
                    pass_fds=pass_fds,
                )
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if group is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(group.remove)


async def _serve_network(pid: int, spec: ContainerSpec) -> None:
    """The container's network wiring; a failure is logged in its log, never fatal."""
    assert spec.egress is not None
    failed: list[BaseException] = []
    try:
        await netns.serve_network(pid, spec.egress)
    except* (OSError, subprocess.CalledProcessError) as group:
        # Raised bare or from the wiring's own nursery (e.g. nft into the namespace of a
        # container that already exited).
        failed.extend(group.exceptions)
    for exc in failed:
        log.error("%s: network: %s", spec.container, exc)
        await trio.to_thread.run_sync(
            append_log_line, spec.log_path, f"network set-up failed: {exc}"
        )


def limits_note(spec: ContainerSpec) -> str | None:
    """What of the agent's limits this host cannot enforce through cgroups, and why."""
    return cgroups.unenforceable_note(spec.config.limits, cgroup_host())


ADOPTED_EXIT = -2
"""The exit status reported for an adopted container: not our child, so its status is unknown."""


async def _watch_adopted(pid: int, pidfile: Path, *, grace: float, on_started: OnStarted) -> int:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return ADOPTED_EXIT
    log.info("adopted container process group %d left running by a previous daemon", pid)
    try:
        on_started(pid)
        await trio.lowlevel.wait_readable(fd)
        return ADOPTED_EXIT
    finally:
        with trio.CancelScope(shield=True):
            exited = functools.partial(trio.lowlevel.wait_readable, fd)
            if not await signal_ladder(pid, exited, [(signal.SIGTERM, grace)]):
                log.warning("adopted group %d ignored SIGTERM for %.1fs; killing", pid, grace)
            killpg(pid, signal.SIGKILL)
        os.close(fd)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_remove, pidfile)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live pid (field 22 of /proc/pid/stat), to tell pid reuse
    apart; None for no such process, or one that already exited (a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _log_line(fh: BinaryIO, text: str) -> None:
    """A line of the daemon's own in a container's log, so the log viewer shows each start."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    fh.write(f"--- {stamp} hive-c0re: {text} ---\n".encode())
    fh.flush()


def open_log(path: Path) -> BinaryIO:
    """A container log opened for appending, 0600, never through a symlink, and only if it is
    a regular file (a FIFO planted there would block the daemon). Blocking."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file: refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def append_log_line(path: Path, text: str) -> None:
    """Add a line of the daemon's own to a container log (blocking; errors ignored)."""
    with contextlib.suppress(OSError), open_log(path) as fh:
        _log_line(fh, text)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_pidfile(path: Path, pid: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(f"{pid} {_start_time(pid) or ''}\n")


def read_live_pidfile(path: Path) -> int | None:
    """The pid in a container pidfile if that very process (same start time) still runs."""
    try:
        pid_text, _, start = path.read_text("ascii").strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if start and _start_time(pid) == start else None


async def reap_stale(pidfile: Path) -> None:
    """Kill the process group a pidfile names if it still runs, and wait until it is gone."""
    pid = await trio.to_thread.run_sync(read_live_pidfile, pidfile)
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        killpg(pid, signal.SIGKILL)
        with trio.move_on_after(10):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def tail_lines(path: Path, lines: int, *, max_bytes: int = 1 << 20) -> list[str]:
    """The last `lines` lines of a log file (reading at most max_bytes from its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:] if lines > 0 else []
