"""Agent cgroups: one per container, enforcing its memory, CPU and pids limits (v1 or v2).

Where the agent cgroups live:
- no systemd as PID 1 (this machine kind): the daemon owns the whole tree, so a `hyperhive`
  parent directly under each hierarchy root: `/sys/fs/cgroup/memory/hyperhive/<container>` on
  v1 (one directory per hierarchy), `/sys/fs/cgroup/hyperhive/<container>` on v2;
- systemd as PID 1: systemd owns the tree and only a delegated cgroup (`Delegate=yes`, seen as
  the `trusted.delegate`/`user.delegate` xattr) is ours, so the `hyperhive` parent goes under
  the daemon's own cgroup (from /proc/self/cgroup). On v2 a cgroup with processes cannot pass
  controllers on, so the daemon's processes first move into a `supervisor` leaf beside it (the
  pattern systemd documents for delegation). Without delegation nothing is managed. The same
  move happens in a v2 cgroup namespace whose root is not the host's root cgroup.

Everything here blocks: call it through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hyperhive.protocol.agent_config import Limits
from hyperhive.protocol.errors import BadParams, Internal

DEFAULT_PIDS_MAX = 4096
"""Tasks (processes and threads) per agent when the config names no limit: far above what
claude, node and their tools use, far below what a fork bomb needs to hurt the host."""
CPU_PERIOD_US = 100_000
"""The scheduler period quotas are expressed in (systemd's default for CPUQuota=)."""
PARENT = "hyperhive"
SUPERVISOR = "supervisor"
"""The leaf the daemon moves itself into under a delegated v2 cgroup."""
CONTROLLERS = ("memory", "cpu", "pids")
JOIN_FAILED = 125
"""Exit status of `join_argv` when a cgroup cannot be joined: the command never runs."""
KILL_ROUNDS = 20
KILL_WAIT = 5.0
"""Seconds `remove` waits for SIGKILLed processes to die, per round."""

_SIZE = re.compile(r"^([1-9][0-9]*)([KMGT]?)$")
_PERCENT = re.compile(r"^([1-9][0-9]*)%$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MAX_BYTES = (1 << 63) - 1
_MAX_PERCENT = 100_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")

# Runs as `sh -c SCRIPT hive-cgroup-join PROCS... -- ARGV...`: writes its own pid into every
# cgroup.procs, then becomes ARGV (exec keeps the pid), so the container's first process and
# all it forks are inside the cgroups. The procs files are absolute paths, never "--".
JOIN_SCRIPT = (
    'while [ "$1" != -- ]; do'
    f' echo $$ > "$1" || {{ echo "hive: cannot join cgroup $1" >&2; exit {JOIN_FAILED}; }};'
    ' shift; done; shift; exec "$@"'
)


@dataclass(frozen=True)
class CgroupLimits:
    """Limits in kernel units; None is no limit."""

    memory_bytes: int | None = None
    cpu_quota_percent: int | None = None
    """100 = one core."""
    pids_max: int | None = DEFAULT_PIDS_MAX


def parse_size(text: str, what: str) -> int:
    """A size in systemd syntax ("4G", "512M", bytes) as bytes, or BadParams saying why."""
    size = _SIZE.match(text)
    if size is None:
        raise BadParams(
            f"{what}: {text!r} is not a size"
            ' (a positive integer with an optional K, M, G or T suffix, e.g. "4G")'
        )
    value = int(size.group(1)) * _UNITS[size.group(2)]
    if value > _MAX_BYTES:
        raise BadParams(f"{what}: {text!r} is too large")
    return value


def parse_limits(limits: Limits, pids_max: int | None = None) -> CgroupLimits:
    """agent.toml's limits (systemd syntax: "4G", "200%") in kernel units.

    pids_max None means DEFAULT_PIDS_MAX: every agent gets a pids limit.
    """
    memory = None
    if limits.memory_max is not None:
        memory = parse_size(limits.memory_max, "limits.memory_max")
    cpu = None
    if limits.cpu_quota is not None:
        percent = _PERCENT.match(limits.cpu_quota)
        if percent is None:
            raise BadParams(
                f"limits.cpu_quota: {limits.cpu_quota!r} is not a percentage"
                ' (a positive integer followed by %, e.g. "200%" for two cores)'
            )
        cpu = int(percent.group(1))
        if cpu > _MAX_PERCENT:
            raise BadParams(f"limits.cpu_quota: {limits.cpu_quota!r} is more than {_MAX_PERCENT}%")
    if pids_max is None:
        pids_max = DEFAULT_PIDS_MAX
    elif pids_max < 1:
        raise BadParams(f"limits.pids_max: {pids_max} is not a positive number of tasks")
    return CgroupLimits(memory_bytes=memory, cpu_quota_percent=cpu, pids_max=pids_max)


@dataclass(frozen=True)
class Unavailable:
    """Why this host's cgroups cannot be managed by the daemon."""

    reason: str


@dataclass(frozen=True)
class CgroupUsage:
    """What an agent's cgroup uses now (None: its controller is not managed here)."""

    memory_bytes: int | None
    pids: int | None
    oom_kills: int | None
    """Processes the kernel's OOM killer ended in this cgroup since it was made."""


def _container_name(container: str) -> str:
    if not _NAME.match(container):
        raise BadParams(f"cgroup name {container!r}: letters, digits and _.@- only, at most 128")
    return container


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value, "ascii")
    except OSError as exc:
        raise Internal(f"cgroup: writing {value!r} to {path} was refused: {exc.strerror}") from None


def _try_write(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value, "ascii")


def _read_int(path: Path, key: str | None = None) -> int | None:
    """A number file, or the value of `key` in a flat-keyed file; None if absent."""
    try:
        text = path.read_text("ascii")
    except OSError:
        return None
    if key is None:
        return int(text) if text.strip().isdigit() else None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


@dataclass(frozen=True)
class AgentCgroup:
    """One container's cgroup: a directory per v1 hierarchy, or one v2 directory."""

    container: str
    version: Literal[1, 2]
    dirs: dict[str, Path]
    """Controller → its directory (on v2 the same one for each)."""

    @property
    def paths(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    @property
    def procs_files(self) -> list[Path]:
        """The cgroup.procs files a process writes its pid to, to join the agent's cgroup."""
        return [d / "cgroup.procs" for d in self.paths]

    def join_argv(self, argv: list[str]) -> list[str]:
        """argv, run so that its process joins the cgroup before it execs (nothing escapes).

        If a cgroup cannot be joined the command does not run; the exit status is JOIN_FAILED.
        """
        procs = [str(p) for p in self.procs_files]
        return ["/bin/sh", "-c", JOIN_SCRIPT, "hive-cgroup-join", *procs, "--", *argv]

    def pids(self) -> set[int]:
        """Every process in the cgroup and the cgroups below it (a container may make some)."""
        found: set[int] = set()
        for top in self.paths:
            for directory in _walk(top):
                with contextlib.suppress(OSError):
                    found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL everything in the cgroup and wait until it is gone (or raise Internal)."""
        for _ in range(KILL_ROUNDS):
            if self._killed_all():
                return
        raise Internal(f"cgroup {self.container}: processes still running after SIGKILL")

    def remove(self) -> None:
        """Kill what is left in the cgroup and delete its directories (those below it too).

        A process that joins meanwhile (a `join_argv` started just before) makes rmdir fail
        with EBUSY: it is killed in the next round. One that tries after the rmdir cannot join
        and does not run.
        """
        for _ in range(KILL_ROUNDS):
            self._killed_all()
            try:
                for top in self.paths:
                    for directory in reversed(list(_walk(top))):
                        with contextlib.suppress(FileNotFoundError):
                            directory.rmdir()
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise Internal(
                        f"cgroup: cannot remove {exc.filename}: {exc.strerror}"
                    ) from None
        raise Internal(f"cgroup {self.container}: processes keep it busy after SIGKILL")

    def _killed_all(self) -> bool:
        """One round of SIGKILL to everything listed; True if nothing was listed."""
        pids = self.pids()
        if not pids:
            return True
        fds = _pidfds(pids)
        try:
            cgroup_kill = self.paths[0] / "cgroup.kill"
            if self.version == 2 and cgroup_kill.exists():
                _write(cgroup_kill, "1")
            else:
                # A pid still listed after its pidfd was opened names the process the pidfd
                # holds (or one that joined since): never an unrelated process that took over
                # the pid of one that exited.
                still = self.pids()
                for pid, fd in fds.items():
                    if pid in still:
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
            _wait_exited(list(fds.values()))
        finally:
            for fd in fds.values():
                os.close(fd)
        return False

    def usage(self) -> CgroupUsage:
        memory = self.dirs.get("memory")
        pids = self.dirs.get("pids")
        if memory is None:
            used = oom = None
        elif self.version == 2:
            used = _read_int(memory / "memory.current")
            oom = _read_int(memory / "memory.events", "oom_kill")
        else:
            used = _read_int(memory / "memory.usage_in_bytes")
            oom = _read_int(memory / "memory.oom_control", "oom_kill")
        tasks = None if pids is None else _read_int(pids / "pids.current")
        return CgroupUsage(memory_bytes=used, pids=tasks, oom_kills=oom)


def _walk(top: Path) -> Iterator[Path]:
    """top and the cgroups below it, parents first; nothing if top does not exist."""
    if not top.is_dir():
        return
    for root, dirs, _files in os.walk(top):
        dirs.sort()
        yield Path(root)


def _pidfds(pids: Iterable[int]) -> dict[int, int]:
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    return fds


def _wait_exited(fds: list[int]) -> None:
    """Wait up to KILL_WAIT for these processes to exit (a pidfd turns readable then)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending = len(fds)
    deadline = time.monotonic() + KILL_WAIT
    while pending and (left := deadline - time.monotonic()) > 0:
        for fd, _event in poller.poll(left * 1000):
            poller.unregister(fd)
            pending -= 1


@dataclass(frozen=True)
class CgroupHost:
    """This host's cgroups as the daemon manages them: the version and where agents go."""

    version: Literal[1, 2]
    bases: dict[str, Path]
    """Controller → the cgroup under which the `hyperhive` parent is made."""
    supervisor_leaf: bool = False
    """v2, base not the root cgroup (systemd's delegation, or a cgroup namespace): the base's
    processes (the daemon's) move into a `supervisor` leaf before controllers are enabled."""

    def agent(self, container: str) -> AgentCgroup:
        """The container's cgroup, as it is (nothing is made or changed; adopt with this)."""
        name = _container_name(container)
        dirs = {ctl: base / PARENT / name for ctl, base in self.bases.items()}
        return AgentCgroup(container=name, version=self.version, dirs=dirs)

    def prepare(self, container: str, limits: CgroupLimits) -> AgentCgroup:
        """Make the container's cgroup (emptied of any leftover process) with these limits.

        Idempotent. Limits of controllers this host lacks are skipped (see unenforceable_note);
        a write the kernel refuses raises Internal.
        """
        agent = self.agent(container)
        if self.version == 2:
            self._prepare_v2_parent()
        for directory in agent.paths:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise Internal(f"cgroup: cannot make {directory}: {exc.strerror}") from None
        agent.kill()
        if self.version == 2:
            _limit_v2(agent, limits)
        else:
            _limit_v1(agent, limits)
        return agent

    def _prepare_v2_parent(self) -> None:
        base = next(iter(self.bases.values()))
        if self.supervisor_leaf:
            # A v2 cgroup that holds processes cannot enable controllers for its children.
            leaf = base / SUPERVISOR
            leaf.mkdir(exist_ok=True)
            for pid in (base / "cgroup.procs").read_text().split():
                try:
                    (leaf / "cgroup.procs").write_text(pid, "ascii")
                except ProcessLookupError:
                    pass  # exited meanwhile
                except OSError as exc:
                    raise Internal(f"cgroup: cannot move {pid} to {leaf}: {exc.strerror}") from None
        _enable(base, self.bases)
        parent = base / PARENT
        parent.mkdir(exist_ok=True)
        _enable(parent, self.bases)


def _enable(directory: Path, controllers: Iterable[str]) -> None:
    """Pass controllers on to the children of a v2 cgroup."""
    enabled = set((directory / "cgroup.subtree_control").read_text().split())
    for ctl in sorted(set(controllers) - enabled):
        _write(directory / "cgroup.subtree_control", f"+{ctl}")


def _limit_v2(agent: AgentCgroup, limits: CgroupLimits) -> None:
    if (memory := agent.dirs.get("memory")) is not None:
        _write(memory / "memory.max", _or_max(limits.memory_bytes))
        # memory_max covers swap too, as memory.memsw does on v1: an agent at its limit is
        # OOM-killed instead of swapping the host to a crawl.
        if (memory / "memory.swap.max").exists():
            _try_write(memory / "memory.swap.max", "max" if limits.memory_bytes is None else "0")
    if (cpu := agent.dirs.get("cpu")) is not None:
        quota = _quota_us(limits.cpu_quota_percent)
        _write(cpu / "cpu.max", f"{'max' if quota is None else quota} {CPU_PERIOD_US}")
    if (pids := agent.dirs.get("pids")) is not None:
        _write(pids / "pids.max", _or_max(limits.pids_max))


def _limit_v1(agent: AgentCgroup, limits: CgroupLimits) -> None:
    if (memory := agent.dirs.get("memory")) is not None:
        memsw = memory / "memory.memsw.limit_in_bytes"
        value = "-1" if limits.memory_bytes is None else str(limits.memory_bytes)
        # memsw must never be below limit_in_bytes: lift it first, set both, in that order.
        # Without swap accounting (swapaccount=0) the file is missing; the limit still holds.
        _try_write(memsw, "-1")
        _write(memory / "memory.limit_in_bytes", value)
        _try_write(memsw, value)
    if (cpu := agent.dirs.get("cpu")) is not None:
        quota = _quota_us(limits.cpu_quota_percent)
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", "-1" if quota is None else str(quota))
    if (pids := agent.dirs.get("pids")) is not None:
        _write(pids / "pids.max", _or_max(limits.pids_max))


def _or_max(value: int | None) -> str:
    return "max" if value is None else str(value)


def _quota_us(percent: int | None) -> int | None:
    return None if percent is None else percent * CPU_PERIOD_US // 100


# ---- detection ----


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem from /proc/self/mountinfo."""

    point: Path
    root: str
    """The cgroup shown at the mount point (not "/" for a bind of a subtree)."""
    version: Literal[1, 2]
    controllers: frozenset[str]
    """v1: the controllers of the hierarchy (and name=...); v2: empty (see cgroup.controllers)."""
    read_only: bool


def parse_mountinfo(text: str) -> list[Mount]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, (fstype, _source, options, *_rest) = left.split(), right.split()
        if fstype not in ("cgroup", "cgroup2") or len(fields) < 6:
            continue
        mount_options = set(fields[5].split(","))
        super_options = set(options.split(","))
        mounts.append(
            Mount(
                point=Path(_unescape(fields[4])),
                root=_unescape(fields[3]),
                version=2 if fstype == "cgroup2" else 1,
                controllers=frozenset(super_options - {"rw", "ro"} if fstype == "cgroup" else ()),
                read_only="ro" in mount_options or "ro" in super_options,
            )
        )
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup: controller → cgroup path; "" is the v2 hierarchy, "name=x" named."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctl in parts[1].split(",") if parts[1] else [""]:
            own[ctl] = parts[2]
    return own


def detect() -> CgroupHost | Unavailable:
    """How this host's cgroups can be managed for agents, or why they cannot."""
    if os.geteuid() != 0:
        return Unavailable("the daemon is not root")
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError as exc:
        return Unavailable(f"cannot read /proc/self: {exc.strerror}")
    # sd_booted(): systemd as PID 1 makes this directory.
    systemd = Path("/run/systemd/system").is_dir()
    return choose(parse_mountinfo(mountinfo), own, systemd=systemd)


def choose(mounts: list[Mount], own: dict[str, str], *, systemd: bool) -> CgroupHost | Unavailable:
    """Pick the version and the base of each controller (v1 wins where it holds controllers)."""
    if systemd and own.get("", "").endswith(f"/{SUPERVISOR}"):
        # The daemon moved itself into its leaf (prepare on v2): its cgroup is the one above.
        own = {**own, "": own[""].rsplit("/", 1)[0] or "/"}
    v1 = {ctl: m for m in mounts if m.version == 1 for ctl in m.controllers if ctl in CONTROLLERS}
    v2 = sorted(
        (m for m in mounts if m.version == 2),
        key=lambda m: m.point != Path("/sys/fs/cgroup"),
    )
    if systemd and not any(_delegated(_base(m, own, _key(m))) for m in _systemd_mounts(mounts)):
        return Unavailable(
            "systemd manages the cgroup tree and the daemon's own cgroup is not delegated"
            " to it (Delegate=yes on its unit)"
        )
    bases: dict[str, Path]
    version: Literal[1, 2]
    if v1:
        version = 1
        bases = {ctl: _base(m, own, ctl) if systemd else m.point for ctl, m in v1.items()}
        read_only = [m for m in v1.values() if m.read_only]
    elif v2:
        version, mount = 2, v2[0]
        base = _base(mount, own, "") if systemd else mount.point
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError as exc:
            return Unavailable(f"cannot read {base}/cgroup.controllers: {exc.strerror}")
        bases = {ctl: base for ctl in CONTROLLERS if ctl in available}
        read_only = [mount] if mount.read_only else []
    else:
        return Unavailable("no cgroup filesystem is mounted")
    if not bases:
        return Unavailable("none of the memory, cpu and pids cgroup controllers is available")
    if read_only:
        return Unavailable(f"the cgroup filesystem at {read_only[0].point} is read-only")
    for base in set(bases.values()):
        if not os.access(base, os.W_OK):
            return Unavailable(f"{base} is not writable")
    # Only the root cgroup lacks cgroup.type; any other may not hold processes and pass
    # controllers on at once.
    leaf = version == 2 and any((b / "cgroup.type").exists() for b in bases.values())
    return CgroupHost(version=version, bases=bases, supervisor_leaf=leaf)


def _key(mount: Mount) -> str:
    """The /proc/self/cgroup key of a mount's hierarchy."""
    if mount.version == 2:
        return ""
    return next((c for c in sorted(mount.controllers) if c.startswith("name=")), "")


def _systemd_mounts(mounts: list[Mount]) -> list[Mount]:
    """Where systemd marks delegation: its own hierarchy (v2, or name=systemd on v1)."""
    return [m for m in mounts if m.version == 2 or "name=systemd" in m.controllers]


def _base(mount: Mount, own: dict[str, str], ctl: str) -> Path:
    """The daemon's own cgroup in this mount (the mount point if it lies outside it)."""
    path = own.get(ctl, "/")
    relative = os.path.relpath(path, mount.root)
    if relative == "." or relative.startswith(".."):
        return mount.point
    return mount.point / relative


def _delegated(path: Path) -> bool:
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, attr).strip() == b"1":
                return True
    return False


_LIMIT_NAMES = (("memory", "memory_max"), ("cpu", "cpu_quota"), ("pids", "pids_max"))


def unenforceable_note(
    limits: Limits, host: CgroupHost | Unavailable, pids_max: int | None = None
) -> str | None:
    """What of the configured limits cannot be enforced here, and why (None: all of it).

    Only what the config asks for counts: the default pids limit is a safety net, not a
    promise, and is not reported.
    """
    asked = {
        "memory": limits.memory_max is not None,
        "cpu": limits.cpu_quota is not None,
        "pids": pids_max is not None,
    }
    if isinstance(host, Unavailable):
        names = [name for ctl, name in _LIMIT_NAMES if asked[ctl]]
        return f"{', '.join(names)} not enforced: {host.reason}" if names else None
    missing = [(ctl, name) for ctl, name in _LIMIT_NAMES if asked[ctl] and ctl not in host.bases]
    if not missing:
        return None
    return "; ".join(
        f"{name} not enforced: no {ctl} cgroup controller here (cgroup v{host.version})"
        for ctl, name in missing
    )
