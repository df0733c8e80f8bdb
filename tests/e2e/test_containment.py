"""Escapes tried from inside real agent containers (bwrap and nspawn), through the real claude CLI.

Each probe is a Bash tool call the scripted model makes an agent run; the test reads what the
agent saw from its /state and checks the host afterwards. Every check here failed before the
containment work of issue 10 (agents as root with the host's root visible, a writable
/proc/sys on bwrap, the manager binding every agent's state, agents on the host's loopback).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from hyperhive.core.containers import netns, rootfs
from hyperhive.core.containers.base import Bind, ContainerSpec, open_log
from hyperhive.core.containers.bwrap import BwrapBackend
from hyperhive.core.containers.nspawn import nspawn_available
from hyperhive.core.containers.rootfs import ETC_BOUND, ETC_COPIED, UID_BASE, runtime_paths
from hyperhive.core.gitops import GitOps
from hyperhive.core.runner import Runner
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import Hive, hive_config, open_hive, subscription, wait_for_event

pytestmark = [needs_bwrap, needs_claude, pytest.mark.container]

BACKENDS = [
    "bwrap",
    pytest.param(
        "nspawn",
        marks=pytest.mark.skipif(not nspawn_available(), reason="systemd-nspawn not installed"),
    ),
]

# Everything an agent sees, as JSON, written to /state/probe.json by the agent itself.
PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
r = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
def attempt(name, fn):
    try:
        fn(); r[name] = "ok"
    except OSError as exc:
        r[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def write(path, text):
    with open(path, "w") as fh: fh.write(text)
attempt("core_pattern", lambda: write("/proc/sys/kernel/core_pattern", "|/state/pwn"))
attempt("sysrq", lambda: write("/proc/sysrq-trigger", "h"))
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("secret", lambda: open(sys.argv[1]).read())
def sys_call(nr, *args):
    if libc.syscall(nr, *args) != 0:
        raise OSError(ctypes.get_errno(), "")
attempt("keyctl", lambda: sys_call(250, 0, 0, 0, 0, 0))  # keyctl(GET_KEYRING_ID)
attempt("userfaultfd", lambda: sys_call(323, 0))
attempt("unshare_user", lambda: sys_call(272, 0x10000000))
attempt("mount", lambda: sys_call(165, b"none", b"/tmp", b"tmpfs", 0, 0))
attempt("ptrace", lambda: sys_call(101, 16, 1, 0, 0))  # PTRACE_ATTACH to pid 1
def connect(port):
    s = socket.socket(); s.settimeout(3); s.connect(("127.0.0.1", port)); s.close()
attempt("host_listener", lambda: connect(int(sys.argv[2])))
def bind(port):
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(1); r["bound_fd"] = s.fileno()
    globals()["held"] = s
attempt("bind_host_port", lambda: bind(int(sys.argv[3])))
r["top"] = sorted(os.listdir("/"))
seen = []
for top in r["top"]:
    if top in ("proc", "sys", "dev"):
        continue
    for root, dirs, files in os.walk("/" + top):
        seen.append(root)
        if len(seen) > 200000:
            break
r["dirs"] = seen
r["var"] = sorted(os.listdir("/var")) if os.path.isdir("/var") else []
r["etc"] = sorted(os.listdir("/etc"))
r["state_owner"] = os.stat("/state").st_uid
r["home_write"] = "ok"
try:
    write("/root/probe-home", "x")
except OSError as exc:
    r["home_write"] = errno.errorcode[exc.errno]
r["agents"] = sorted(os.listdir("/agents")) if os.path.isdir("/agents") else None
r["agents_entries"] = (
    {a: sorted(os.listdir("/agents/" + a)) for a in r["agents"]} if r["agents"] else None
)
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines())
harness = [p for p in os.listdir("/proc") if p.isdigit()
           and b"hyperhive.agent" in open(f"/proc/{p}/cmdline", "rb").read()
           and b"serve" in open(f"/proc/{p}/cmdline", "rb").read()]
r["harness_found"] = bool(harness)
def peek(path):
    return os.listdir(path) if path.endswith("/fd") else open(path, "rb").read(1)
for what in ("environ", "mem", "fd"):
    attempt("harness_" + what, lambda: peek(f"/proc/{harness[0]}/{what}"))
r["harness_cmdline"] = open(f"/proc/{harness[0]}/cmdline", "rb").read().decode(errors="replace")
pp = os.environ.get("PYTHONPATH", "")
r["pythonpath"] = pp
attempt("plant_in_pythonpath", lambda: write(os.path.join(pp, "hyperhive", "planted.py"), "x"))
attempt("plant_sitecustomize", lambda: write(os.path.join(pp, "sitecustomize.py"), "x"))
bridge = "/run/harness/mcp-bridge.sock"
st = os.stat(bridge) if os.path.exists(bridge) else None
r["bridge"] = [oct(st.st_mode & 0o777), st.st_uid] if st else None
r["caps"] = [status[k].strip() for k in ("CapPrm", "CapEff", "CapBnd")]
r["nnp"] = status["NoNewPrivs"].strip()
r["seccomp"] = status["Seccomp"].strip()
json.dump(r, open("/state/probe.json", "w"))
"""


@asynccontextmanager
async def host_listener() -> AsyncIterator[int]:
    """A TCP service on the host's loopback that no agent may reach; yields its port."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def read_core_pattern() -> str:
    with open("/proc/sys/kernel/core_pattern") as fh:
        return fh.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def bash_turn(hive: Hive, name: str, command: str) -> None:
    """One turn of agent `name` in which the scripted model runs `command` with claude's Bash
    tool; returns once the turn completed (its message delivered)."""
    body = "!tool Bash " + msgspec.json.encode({"command": command}).decode()
    async with subscription(hive.sock) as events:
        sent = await hive.call(wire.OperatorSend(to=name, body=body))
        await wait_for_event(
            events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == sent.ids[0]
        )


async def run_probe(hive: Hive, name: str, *args: str) -> dict[str, Any]:
    """Make agent `name` run PROBE through claude's Bash tool; returns what it reported."""
    script = hive.cfg.agent_root(name) / "state" / "probe.py"
    script.write_text(PROBE)
    command = "python3 /state/probe.py " + " ".join(args) + " > /state/probe.out 2>&1"
    await bash_turn(hive, name, command)
    out = hive.cfg.agent_root(name) / "state" / "probe.json"
    assert out.exists(), (hive.cfg.agent_root(name) / "state" / "probe.out").read_text()
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@pytest.fixture
def secret_file() -> Iterator[Path]:
    """A root-only file in a directory every container shows (/usr): visible, not readable."""
    path = Path("/usr/local/share") / f"hh-secret-{secrets.token_hex(4)}"
    path.write_text("root only")
    os.chmod(path, 0o600)
    yield path
    path.unlink()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_agent_cannot_escape_its_container(
    hive_root: Path, backend: str, secret_file: Path
) -> None:
    cfg = hive_config(hive_root, demo=True, backend=backend)
    core_pattern = read_core_pattern()
    dashboard_like = free_port()
    async with open_hive(cfg) as hive, host_listener() as listener:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Spawn(name="bob"))
        (cfg.agent_root("bob") / "claude" / ".credentials.json").write_text("bobs-secret")
        seen = await run_probe(hive, "alice", str(secret_file), str(listener), str(dashboard_like))
        # The agent bound "the dashboard's port" inside its own namespace: the host's is free.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", dashboard_like))
        alice = (await hive.call(wire.ListAgents())).agents
    assert read_core_pattern() == core_pattern
    port = next(a.port for a in alice if a.name == "alice")
    uid = UID_BASE + port - cfg.ui_port_base
    assert seen["uid"] == uid and seen["gid"] == uid and seen["groups"] in ([], [uid])
    assert seen["core_pattern"] in ("EROFS", "EACCES"), seen
    assert seen["sysrq"] in ("EROFS", "EACCES", "ENOENT"), seen
    assert seen["shadow"] == "ENOENT"  # a generated /etc: no shadow at all
    assert seen["secret"] == "EACCES"  # visible under /usr, but root's
    for call in ("keyctl", "userfaultfd", "unshare_user", "mount", "ptrace"):
        assert seen[call] in ("EPERM", "ENOSYS", "EACCES"), (call, seen[call])
    assert seen["host_listener"] in ("ECONNREFUSED", "ENETUNREACH", "ETIMEDOUT"), seen
    assert seen["bind_host_port"] == "ok"
    assert seen["caps"] == ["0000000000000000"] * 3 and seen["nnp"] == "1"
    assert seen["seccomp"] == "2"
    # The harness (which holds the UI token) is not readable by the agent's own tools.
    assert seen["harness_found"]
    for what in ("environ", "mem", "fd"):
        assert seen["harness_" + what] in ("EACCES", "EPERM"), (what, seen["harness_" + what])
    assert "TOKEN" not in seen["harness_cmdline"].upper()
    # The harness imports the daemon's own hyperhive (PYTHONPATH), which the agent cannot touch:
    # planting a module there would run in the daemon's next harness, or the daemon itself.
    assert seen["pythonpath"] == rootfs.HYPERHIVE_ROOT
    for plant in ("plant_in_pythonpath", "plant_sitecustomize"):
        assert seen[plant] in ("EROFS", "EACCES"), (plant, seen[plant])
    # The harness's MCP bridge socket is the agent's own, in its container-private runtime dir.
    assert seen["bridge"] == ["0o600", uid], seen["bridge"]
    assert seen["state_owner"] == uid and seen["home_write"] == "ok"
    # The minimal root: nothing from /var, /srv, /opt, /mnt, /media, /home or users' trees.
    top = set(seen["top"])
    assert not top & {"srv", "opt", "mnt", "media", "home", "boot", "old_root", "farm"}, top
    assert set(seen["var"]) <= {"tmp"}, seen["var"]
    dirs: list[str] = seen["dirs"]
    allowed: tuple[str, ...] = ("/usr", "/etc", "/tmp", "/var/tmp", "/run", "/root", "/state")
    allowed += ("/nix", "/bin", "/sbin", "/lib", "/lib64", "/var")
    runtime = {d for d in dirs if not d.startswith(allowed) and d != "/"}
    # What else is there is the harness's runtime (venv, python, hyperhive), read-only.
    kept = runtime_paths()
    assert all(
        any(d == k or d.startswith(k + "/") or k.startswith(d + "/") for k in kept) for d in runtime
    ), sorted(runtime)[:20]
    assert str(cfg.state_dir) not in dirs or all(
        not d.startswith(str(cfg.state_dir) + "/") for d in dirs
    )
    generated = {"passwd", "group", "hostname", "hosts", "resolv.conf", "nsswitch.conf"}
    assert set(seen["etc"]) <= generated | set(ETC_COPIED) | set(ETC_BOUND), seen["etc"]
    # bob's state and credentials are nowhere in alice's view.
    assert not [d for d in dirs if d.startswith((str(hive_root), "/agents"))]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_manager_sees_configs_not_agents(hive_root: Path, backend: str) -> None:
    cfg = hive_config(hive_root, demo=True, start_manager=True, backend=backend)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="bob"))
        (cfg.agent_root("bob") / "claude" / ".credentials.json").write_text("bobs-secret")
        seen = await run_probe(hive, MANAGER_NAME, "/nonexistent", "1", str(free_port()))
    assert seen["agents"] == ["bob"]
    assert seen["agents_entries"] == {"bob": ["config"]}
    dirs: list[str] = seen["dirs"]
    assert "/agents/bob/config/.git" in dirs
    assert not any(d.startswith(("/agents/bob/claude", "/agents/bob/state")) for d in dirs)
    manager_uid = UID_BASE
    assert seen["uid"] == manager_uid
    # The manager owns the proposed repos; the applied ones are the daemon's (read-only).
    assert (cfg.proposed_dir / "bob" / "config").stat().st_uid == manager_uid
    assert (cfg.state_dir / "applied" / "bob").stat().st_uid == os.getuid()


async def test_the_daemon_never_runs_git_inside_a_proposed_repo(hive_root: Path) -> None:
    """The manager controls the proposed repo's .git/config: fsmonitor, hooks, pagers, aliases
    all run commands when git runs *in* that repo. The daemon only fetches from it."""
    cfg = hive_config(hive_root)
    marker = hive_root / "pwned"
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="bob"))
        repo = cfg.proposed_dir / "bob" / "config"
        git = ["git", "-C", str(repo), "-c", "user.name=m", "-c", "user.email=m@h"]
        git += ["-c", "safe.directory=*"]  # the test acts as the manager (its uid owns it)
        (repo / "agent.toml").write_text('model = "sonnet"\n')
        await trio.run_process([*git, "commit", "-qam", "change"])
        done = await trio.run_process([*git, "rev-parse", "HEAD"], capture_stdout=True)
        sha = done.stdout.decode().strip()
        evil = f"touch {marker}"
        for key in ("core.fsmonitor", "core.pager", "core.sshCommand", "core.hooksPath"):
            await trio.run_process([*git, "config", key, evil])
        hook = repo / ".git" / "hooks" / "post-checkout"
        hook.write_text(f"#!/bin/sh\n{evil}\n")
        hook.chmod(0o755)
        ops = GitOps(Runner(), cfg.state_dir, proposed_uid=cfg.agent_uid_base)
        assert await ops.resolve_proposed("bob", sha[:10]) == sha
        assert await ops.resolve_proposed("bob", sha) == sha
        await ops.pin("bob", sha)
    assert not marker.exists()


async def test_planted_symlinks_and_fifos_are_refused(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="bob"))
        await hive.call(wire.Kill(name="bob"))
        # bob's credentials dir swapped for a symlink to a host directory (the escape the
        # manager could do through its old /agents view): the start is refused, loudly.
        target = hive_root / "host-dir"
        target.mkdir()
        claude = cfg.agent_root("bob") / "claude"
        os.rename(claude, hive_root / "kept")
        claude.symlink_to(target)
        async with subscription(hive.sock) as events:
            await hive.call(wire.Start(name="bob"))
            refused = await wait_for_event(
                events,
                lambda e: (
                    isinstance(e, wire.AgentChanged)
                    and e.agent.name == "bob"
                    and "symlink" in (e.agent.last_error or "")
                ),
            )
        assert isinstance(refused, wire.AgentChanged) and refused.agent.state == "crashed"
        assert list(target.iterdir()) == []
        # A FIFO as the container log would block the daemon's open: refused instead.
        fifo = hive_root / "fifo.log"
        os.mkfifo(fifo)
        with pytest.raises(OSError):  # ENXIO (no reader) or "not a regular file": never blocks
            open_log(fifo)
        link = hive_root / "link.log"
        link.symlink_to(hive_root / "victim")
        with pytest.raises(OSError):
            open_log(link)
        assert not (hive_root / "victim").exists()
        # A new agent's proposed path pre-planted by the manager as a symlink: refused.
        (cfg.proposed_dir / "carol").symlink_to(target)
        with pytest.raises(Exception, match="not a directory"):
            await hive.call(wire.Spawn(name="carol"))
        assert list(target.iterdir()) == []


NET_PROBE = r"""
import json, socket, sys
r = {"ifaces": sorted(n for _, n in socket.if_nameindex())}
s = socket.socket(); s.settimeout(3)
try:
    s.connect(("127.0.0.1", int(sys.argv[1]))); r["allowed"] = "ok"
except OSError as exc:
    r["allowed"] = str(exc)
json.dump(r, open("/state/net.json", "w"))
"""


async def net_probe(hive: Hive, name: str, port: int) -> dict[str, Any]:
    (hive.cfg.agent_root(name) / "state" / "net.py").write_text(NET_PROBE)
    command = f"python3 /state/net.py {port} > /state/net.out 2>&1"
    await bash_turn(hive, name, command)
    report: dict[str, Any] = json.loads(
        (hive.cfg.agent_root(name) / "state" / "net.json").read_text()
    )
    return report


async def test_network_modes_are_enforced_per_agent(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive, host_listener() as port:
        modes = {"nonet": "none", "walled": "anthropic", "opened": "open"}
        for name, mode in modes.items():
            applied = cfg.state_dir / "applied" / name
            applied.mkdir(parents=True)
            (applied / "agent.toml").write_text(
                f'[network]\nmode = "{mode}"\nallow = ["127.0.0.1:{port}"]\n'
            )
            await hive.call(wire.Spawn(name=name))
        seen = {name: await net_probe(hive, name, port) for name in modes}
        listed = (await hive.call(wire.ListAgents())).agents
        shown = {a.name: a.network for a in listed}
        assert shown == {"nonet": "none +1", "walled": "anthropic +1", "opened": "open +1"}
        walled = next(a for a in listed if a.name == "walled")
        assert walled.pid is not None
        inside = await netns.find_namespace_pid(walled.pid)
        rules = await trio.run_process(
            ["nsenter", "-t", str(inside), "--net", "nft", "list", "ruleset"], capture_stdout=True
        )
        opened = next(a for a in listed if a.name == "opened")
        assert opened.pid is not None
        open_inside = await netns.find_namespace_pid(opened.pid)
        open_rules = await trio.run_process(
            ["nsenter", "-t", str(open_inside), "--net", "nft", "list", "ruleset"],
            capture_stdout=True,
        )
        host_ips = await netns.host_addresses()
    assert seen["nonet"]["ifaces"] == ["lo"]
    assert seen["opened"]["ifaces"] == ["lo", "tap0"] == seen["walled"]["ifaces"]
    # The allowed host service answers inside as 127.0.0.1:<port>, in every mode.
    assert {s["allowed"] for s in seen.values()} == {"ok"}, seen
    ruleset = rules.stdout.decode()
    assert "policy drop" in ruleset and "dport 53 accept" in ruleset
    # `open`: the outside, but not the host's own addresses (services bound to all interfaces).
    opened_rules = open_rules.stdout.decode()
    assert "policy accept" in opened_rules
    assert all(f"daddr {ip} drop" in opened_rules for ip in host_ips), (host_ips, opened_rules)


async def test_memory_limit_is_enforced_inside_the_container(hive_root: Path) -> None:
    """agent.toml's memory_max holds on bwrap: an allocation beyond it is OOM-killed (its
    process alone: the harness and claude keep running and report it)."""
    cfg = hive_config(hive_root, demo=True)
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text('[limits]\nmemory_max = "640M"\n')
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        command = (
            "python3 -c 'b = bytearray(1500 << 20); b[::4096] = b\"x\" * len(b[::4096])';"
            " echo $? > /state/oom.txt"
        )
        await bash_turn(hive, "alice", command)
        listed = (await hive.call(wire.ListAgents())).agents
    assert (cfg.agent_root("alice") / "state" / "oom.txt").read_text().strip() == "137"
    alice = next(a for a in listed if a.name == "alice")
    assert alice.limits_note is None and alice.state == "running"


async def test_state_quota_is_a_volume_of_its_own(hive_root: Path) -> None:
    """[limits] state_max: /state is an ext4 volume of that size; filling it answers ENOSPC
    to the agent and the host's disk never sees more. Files from before are carried over."""
    cfg = hive_config(hive_root, demo=True)
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text('[limits]\nstate_max = "32M"\n')
    kept = cfg.agent_root("alice") / "state" / "notes.md"
    kept.parent.mkdir(parents=True)
    kept.write_text("from before the quota")
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        command = (
            "dd if=/dev/zero of=/state/big bs=1M count=64 2>/state/dd.err; echo $? > /state/dd.rc;"
            " rm -f /state/big; cat /state/notes.md > /state/seen.txt"
        )
        await bash_turn(hive, "alice", command)
        state = cfg.agent_root("alice") / "state"
        assert is_mount(state)
        assert (state / "dd.rc").read_text().strip() != "0"
        assert "No space left on device" in (state / "dd.err").read_text()
        assert (state / "seen.txt").read_text() == "from before the quota"
        assert os.statvfs(state).f_blocks * os.statvfs(state).f_frsize <= 32 << 20
        assert (
            os.stat(state).st_uid
            == UID_BASE
            + next(a.port for a in (await hive.call(wire.ListAgents())).agents)
            - cfg.ui_port_base
        )
        await hive.call(wire.Destroy(name="alice", purge=True))
    assert not is_mount(state) and not state.exists()


FOREIGN_ABI = r"""
import ctypes, mmap, sys
abi = sys.argv[1]
if abi == "i386":  # mov eax, 288 (keyctl); xor ebx, ebx; int 0x80; ret
    code = b"\xb8" + (288).to_bytes(4, "little") + b"\x31\xdb\xcd\x80\xc3"
else:  # x32: mov eax, 250 | __X32_SYSCALL_BIT; xor edi, edi; syscall; ret
    code = b"\xb8" + (250 | 0x40000000).to_bytes(4, "little") + b"\x31\xff\x0f\x05\xc3"
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
call = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
print("returned", call(), flush=True)
"""


@pytest.mark.parametrize("abi", ["i386", "x32"])
async def test_the_seccomp_filter_cannot_be_bypassed_through_another_abi(
    hive_root: Path, abi: str
) -> None:
    """keyctl through the i386 (int 0x80) or x32 syscall ABI: the filter is for the native ABI
    only, and libseccomp kills a process that uses another one (SIGSYS)."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 only")
    state = hive_root / "state"
    state.mkdir()
    (state / "abi.py").write_text(FOREIGN_ABI)
    os.chown(state, UID_BASE + 1, UID_BASE + 1)
    spec = ContainerSpec(
        name="alice",
        container="h-alice",
        role="agent",
        binds=(Bind(state, "/state"),),
        env={"PATH": "/usr/bin:/bin"},
        command=(sys.executable, "/state/abi.py", abi),
        log_path=hive_root / "container.log",
        uid=UID_BASE + 1,
        etc_dir=hive_root / "etc",
    )
    code = await BwrapBackend().run(spec, grace=2, on_started=lambda pid: None)
    assert code == 128 + signal.SIGSYS, (hive_root / "container.log").read_text()
    assert "returned" not in (hive_root / "container.log").read_text()


async def test_a_held_ui_port_is_reported_and_taken_once_free(hive_root: Path) -> None:
    """Someone else on the agent's UI port: the agent runs anyway, `port_conflict` says so, and
    the daemon binds the port (retrying with backoff) once it is free."""
    cfg = hive_config(hive_root, demo=True)
    from hyperhive.core.agents import PORT_SPAN, fnv1a_32

    port = cfg.ui_port_base + 100 + fnv1a_32(b"alice") % PORT_SPAN
    squatter = trio.socket.socket()
    await squatter.bind((cfg.bind, port))
    squatter.listen(1)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        held = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged)
                and e.agent.name == "alice"
                and e.agent.port_conflict
            ),
        )
        assert isinstance(held, wire.AgentChanged) and held.agent.port == port
        squatter.close()
        await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged)
                and e.agent.name == "alice"
                and not e.agent.port_conflict
                and e.agent.state == "running"
            ),
        )
        # The port is the daemon's now, relaying into alice's namespace: her UI answers once
        # the harness listens there (a refused relay closes the connection at once).
        with trio.fail_after(30):
            for _ in range(300):
                if reply := await http_get(cfg.bind, port):
                    break
                await trio.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 ")


async def http_get(host: str, port: int) -> bytes:
    """One request's first bytes; b"" when the relay closed it (nobody listens inside yet)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        try:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return b""


async def test_a_slirp4netns_serving_no_container_is_swept(hive_root: Path) -> None:
    """One left behind (its namespace's process gone) is SIGKILLed at the next daemon start;
    one whose process lives is left alone."""
    holders = [
        await trio.lowlevel.open_process(["unshare", "--net", "sleep", "60"]) for _ in range(2)
    ]
    slirps = []
    for holder in holders:
        inside = await netns.find_namespace_pid(holder.pid)
        slirps.append(
            await trio.lowlevel.open_process(
                ["slirp4netns", "--configure", "--disable-host-loopback", str(inside), "tap0"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    # Both configured (slirp made tap0 in each namespace) before one namespace's process dies.
    with trio.fail_after(10):
        for holder in holders:
            net_dev = trio.Path(f"/proc/{holder.pid}/net/dev")
            for _ in range(500):
                if "tap0" in await net_dev.read_text():
                    break
                await trio.sleep(0.02)
    holders[0].kill()
    await holders[0].wait()
    swept = await trio.to_thread.run_sync(netns.sweep_orphans)
    assert slirps[0].pid in swept and slirps[1].pid not in swept
    with trio.fail_after(10):
        assert await slirps[0].wait() == -signal.SIGKILL
    assert slirps[1].returncode is None
    for proc in (slirps[1], holders[1]):
        proc.kill()
        await proc.wait()


SOCKET_PROBE = r"""
import json, socket
def call(req):
    s = socket.socket(socket.AF_UNIX)
    s.connect("/run/hive/mcp.sock")
    f = s.makefile("rwb")
    f.write(json.dumps(req).encode() + b"\n"); f.flush()
    reply = json.loads(f.readline())
    s.close()
    return reply
turn = {"id": "forged", "started_at": 1, "ended_at": 2, "cost_usd": 5.0, "outcome": "ok"}
seen = {
    # Forged records only ever count for the socket's own agent; bad ones are refused.
    "own_turn": call({"cmd": "report_turns", "turns": [turn]}),
    "bad_id": call({"cmd": "report_turns", "turns": [dict(turn, id="../bob")]}),
    "too_many": call({"cmd": "report_turns", "turns": [dict(turn, id=str(i)) for i in range(101)]}),
    "huge_cost": call({"cmd": "report_turns", "turns": [dict(turn, id="x", cost_usd=1e12)]}),
    "as_bob": call({"cmd": "report_turns", "agent": "bob", "turns": [dict(turn, id="b")]}),
    "state": call({"cmd": "report_state", "state": "compacting", "since": 1}),
    "threads": call({"cmd": "open_threads"}),
    "reply_to": call({"cmd": "send", "to": "manager", "body": "x", "in_reply_to": -1}),
    # Host and manager requests are not the agent's.
    "history": call({"cmd": "history", "name": "bob"}),
    "config": call({"cmd": "config", "name": "bob"}),
    "list_agents": call({"cmd": "list_agents"}),
}
seen["next_turn"] = [call({"cmd": "next_turn"}).get("ok") for _ in range(21)]
json.dump(seen, open("/state/socket-probe.json", "w"))
"""


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_new_socket_commands_cannot_reach_beyond_the_agent(
    hive_root: Path, backend: str
) -> None:
    """From inside alice's container: turn reports, state reports, open threads, replies and
    next_turn act as alice only, refuse what is malformed, and host/manager requests stay out."""
    cfg = hive_config(hive_root, demo=True, backend=backend)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Spawn(name="bob"))
        await hive.call(wire.Kill(name="bob"))
        bob_question = await call_once(hive.agent_sock("bob"), wire.Ask(question="bob's secret?"))
        (cfg.agent_root("alice") / "state" / "socket_probe.py").write_text(SOCKET_PROBE)
        await bash_turn(hive, "alice", "python3 /state/socket_probe.py > /state/sp.out 2>&1")
        out = cfg.agent_root("alice") / "state" / "socket-probe.json"
        assert out.exists(), (cfg.agent_root("alice") / "state" / "sp.out").read_text()
        seen = json.loads(out.read_text())
        [alice] = (await hive.call(wire.Stats(name="alice"))).agents
        [bob] = (await hive.call(wire.Stats(name="bob"))).agents
        listed = {a.name: a for a in (await hive.call(wire.ListAgents())).agents}
    assert seen["own_turn"] == {"ok": True, "ids": ["forged"]}
    for refused in ("bad_id", "too_many", "huge_cost", "reply_to"):
        assert seen[refused]["ok"] is False and seen[refused]["code"] == "invalid_request", refused
    # An "agent" field is no field of the request: the socket is the identity, so it is alice's.
    assert seen["as_bob"] == {"ok": True, "ids": ["b"]}
    assert bob.total.turns == 0 and alice.total.turns >= 2
    assert seen["state"]["ok"] is True and listed["bob"].turn_state is None
    assert seen["threads"]["ok"] is True
    assert bob_question.id not in [q["id"] for q in seen["threads"]["questions"]]
    for host_only in ("history", "config", "list_agents"):
        assert seen[host_only]["code"] == "unknown_command", (host_only, seen[host_only])
    assert seen["next_turn"].count(True) <= 20 and seen["next_turn"][-1] is False
