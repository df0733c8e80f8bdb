"""`hive-c0re doctor`: can this host run a hive, and is the hive that runs here healthy?

Each check runs the host's own tools (through `sh`) or reads its state, and says what it found
and, when something is missing or wrong, how to fix it. Blocking: this is a CLI command, run
outside the daemon's event loop.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import msgspec
import sh
import trio

from hyperhive.core.containers.rootfs import check_uid_range
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once

Status = Literal["ok", "warn", "fail"]

PINNED_CLAUDE = "2.1.197"
"""The claude CLI version the harness is tested with (scripts/setup.sh installs it)."""


class Check(msgspec.Struct, frozen=True):
    name: str
    status: Status
    detail: str
    fix: str = ""


class Report(msgspec.Struct, frozen=True):
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


def _version(tool: str, *args: str) -> str | None:
    """The first line `tool --version` prints, or None when it is not installed or fails."""
    try:
        command = sh.Command(tool)
    except sh.CommandNotFound:
        return None
    try:
        out = str(command(*(args or ("--version",)), _timeout=20, _err_to_out=True))
    except (sh.ErrorReturnCode, sh.TimeoutException, OSError):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def _tool(
    name: str, tool: str, fix: str, *, required: bool = True, args: tuple[str, ...] = ()
) -> Check:
    found = _version(tool, *args)
    if found is None:
        return Check(name, "fail" if required else "warn", f"`{tool}` not found", fix)
    return Check(name, "ok", found or "installed")


def _claude(claude: str) -> Check:
    found = _version(claude)
    fix = f"npm install -g @anthropic-ai/claude-code@{PINNED_CLAUDE}"
    if found is None:
        return Check("claude CLI", "fail", f"`{claude}` not found: agents cannot run turns", fix)
    if PINNED_CLAUDE not in found:
        return Check(
            "claude CLI", "warn", f"{found} (the harness is tested with {PINNED_CLAUDE})", fix
        )
    return Check("claude CLI", "ok", found)


def _cgroups() -> Check:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return Check("cgroups", "ok", "cgroup v2 (unified)")
    if Path("/sys/fs/cgroup/memory").is_dir():
        return Check("cgroups", "ok", "cgroup v1 (memory, cpu and pids controllers per agent)")
    return Check(
        "cgroups",
        "warn",
        "no cgroup hierarchy found: agents run without memory/cpu limits",
        "mount cgroup2 on /sys/fs/cgroup",
    )


def _tun() -> Check:
    if os.path.exists("/dev/net/tun"):
        return Check("/dev/net/tun", "ok", "present (slirp4netns gives agents their network)")
    return Check(
        "/dev/net/tun",
        "fail",
        "missing: agents' network namespaces cannot reach anything",
        "modprobe tun (or give the host's container /dev/net/tun)",
    )


def _uids(uid_base: int) -> Check:
    try:
        check_uid_range(uid_base)
    except ValueError as exc:
        return Check("agent uids", "fail", str(exc), "hive-c0re serve --agent-uid-base N")
    return Check("agent uids", "ok", f"{uid_base}-{uid_base + 999} are no host user's or group's")


def _root() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", "ok", "root: agents get their own uid, cgroup and network")
    return Check(
        "privileges",
        "warn",
        "not root: agents run as this user on the host's network (SPEC §4.1b)",
        "run the daemon as root (the NixOS module does)",
    )


def _daemon(run_dir: Path) -> Check:
    sock = run_dir / "host.sock"
    if not sock.exists():
        return Check("daemon", "warn", f"no {sock}: the daemon is not running", "hive-c0re serve")
    try:
        listed = trio.run(call_once, str(sock), wire.ListAgents())
    except Exception as exc:
        return Check("daemon", "fail", f"{sock} does not answer: {exc}", "check its log")
    agents = listed.agents
    bad = [a.name for a in agents if a.state in ("crashed", "stopped") and a.name]
    login = [a.name for a in agents if a.needs_login]
    detail = f"answers on {sock}: {len(agents)} agents"
    if bad or login:
        parts = []
        if bad:
            parts.append(f"not running: {', '.join(bad)}")
        if login:
            parts.append(f"need a login: {', '.join(login)}")
        return Check("daemon", "warn", f"{detail}; {'; '.join(parts)}", "hive-c0re list")
    return Check("daemon", "ok", detail)


def run_checks(
    *, backend: str, claude: str, uid_base: int, run_dir: Path
) -> Iterator[Callable[[], Check]]:
    """The checks for `backend`, in the order they are reported."""
    yield lambda: Check("python", "ok", sys.version.split()[0])
    yield _root
    yield lambda: _tool("git", "git", "apt install git")
    yield lambda: _claude(claude)
    if backend == "bwrap":
        yield lambda: _tool("bubblewrap", "bwrap", "apt install bubblewrap")
    if backend == "nspawn":
        yield lambda: _tool("systemd-nspawn", "systemd-nspawn", "apt install systemd-container")
    if backend in ("bwrap", "nspawn"):
        yield lambda: _tool("setpriv", "setpriv", "apt install util-linux")
        yield lambda: _tool("slirp4netns", "slirp4netns", "apt install slirp4netns")
        yield lambda: _tool("nftables", "nft", "apt install nftables")
        yield _tun
        yield _cgroups
        yield lambda: _uids(uid_base)
    if backend == "nixos":
        yield lambda: _tool("nixos-container", "nixos-container", "run on NixOS", args=("list",))
    yield lambda: _daemon(run_dir)


def doctor(*, backend: str, claude: str, uid_base: int, run_dir: Path) -> Report:
    checks = run_checks(backend=backend, claude=claude, uid_base=uid_base, run_dir=run_dir)
    return Report(checks=[check() for check in checks])


MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


def render(report: Report) -> str:
    lines = []
    for c in report.checks:
        lines.append(f"{MARK[c.status]}  {c.name:<16} {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"      {'':<16} fix: {c.fix}")
    return "\n".join(lines)
