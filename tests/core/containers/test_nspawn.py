"""The systemd-nspawn backend against the real systemd-nspawn: on its own, then under a daemon."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from hyperhive.core.containers.base import Bind, ContainerSpec, _write_pidfile
from hyperhive.core.containers.nspawn import (
    INIT_PIDFILE,
    NspawnBackend,
    _container_init,
    nspawn_available,
    runtime_paths,
)
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import AgentConfig, Limits
from tests.conftest import needs_claude
from tests.hive import hive_config, open_hive, sent_to, subscription, wait_for_event

needs_nspawn = pytest.mark.skipif(
    not nspawn_available(), reason="systemd-nspawn not installed (Debian: systemd-container)"
)
pytestmark = pytest.mark.container

GRACE = 5.0
SECRET = "sk-ant-" + secrets.token_hex(16)

# Reports what it sees over the socket dir, then waits for the test's "go" (so that nspawn is
# still running while the test looks at it).
PROBE = """
import json, os, socket  # {marker}
host = os.environ["PROBE_HOST"]
report = {{
    "env": dict(os.environ),
    "cwd": os.getcwd(),
    "hostname": socket.gethostname(),
    "uid": os.getuid(),
    "pid": os.getpid(),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "ro_bind": open("/ro/seen").read(),
    "host": sorted(os.listdir(host)),
    "hidden": sorted(os.listdir(host + "/daemon")),
    "status": dict(
        line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
    ),
}}
try:
    open("/ro/written", "w")
except OSError as exc:
    report["ro_write_errno"] = exc.errno
with open("/state/written", "w") as fh:
    fh.write("from the container")
s = socket.socket(socket.AF_UNIX)
s.connect("/run/hive/up.sock")
s.sendall(json.dumps(report).encode() + b"\\n")
s.recv(2)
"""

# Tells the test it is up, then waits to be stopped.
SLEEPER = """
import socket, time  # {marker}
s = socket.socket(socket.AF_UNIX)
s.connect("/run/hive/up.sock")
s.sendall(b"up\\n")
time.sleep(600)
"""


@pytest.fixture
def marker() -> Iterator[str]:
    """Tags a test's container processes so that the host finds them; none may outlive it."""
    tag = f"nspawn-test-{secrets.token_hex(6)}"
    yield tag
    left = processes_with(tag)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"container processes outlived the test: {left}"


def make_spec(
    root: Path, command: tuple[str, ...], config: AgentConfig | None = None
) -> ContainerSpec:
    sock, state, ro, daemon = root / "sock", root / "state", root / "ro:only", root / "host/daemon"
    for path in (sock, state, ro, daemon):
        path.mkdir(parents=True, exist_ok=True)
    (ro / "seen").write_text("from the host")
    (root / "host" / "visible").write_text("")
    (daemon / "token").write_text(SECRET)
    return ContainerSpec(
        name="probe",
        container=f"h-t{secrets.token_hex(4)}",
        role="agent",
        binds=(Bind(sock, "/run/hive"), Bind(state, "/state"), Bind(ro, "/ro", read_only=True)),
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/root",
            "HIVE_LABEL": "probe",
            "ANTHROPIC_API_KEY": SECRET,
            "PROBE_HOST": str(root / "host"),
        },
        command=command,
        log_path=root / "agent" / "container.log",
        config=config or AgentConfig(),
        hidden=(daemon,),
    )


def sleeper(root: Path, marker: str) -> ContainerSpec:
    return make_spec(root, (sys.executable, "-c", SLEEPER.format(marker=marker)))


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().split(b"\0")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


_LISTENERS: list[trio.socket.SocketType] = []


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    """Every listener a test opened is closed when it ends (pass or fail)."""
    yield
    while _LISTENERS:
        # The test's trio run is over: close the descriptor itself.
        fd = _LISTENERS.pop().detach()
        if fd >= 0:
            os.close(fd)


async def listen(path: Path) -> trio.socket.SocketType:
    listener = trio.socket.socket(socket.AF_UNIX)
    _LISTENERS.append(listener)
    await listener.bind(str(path))
    listener.listen()
    return listener


async def accept_line(listener: trio.socket.SocketType) -> tuple[trio.socket.SocketType, bytes]:
    """The container's first connection and the line it sends."""
    with trio.fail_after(30):
        conn, _ = await listener.accept()
        data = b""
        while not data.endswith(b"\n"):
            chunk = await conn.recv(65536)
            assert chunk, f"the container hung up after {data!r}"
            data += chunk
    return conn, data


async def wait_until_up(listener: trio.socket.SocketType) -> None:
    conn, line = await accept_line(listener)
    conn.close()
    assert line == b"up\n"


async def wait_for_file(path: Path) -> None:
    # The backend writes it as soon as it sees the container's init; nothing to wait on.
    for _ in range(500):
        if await trio.Path(path).exists():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


async def start_orphan(backend: NspawnBackend, spec: ContainerSpec) -> trio.Process:
    """nspawn started the way the backend does, but by no backend: what a dead daemon leaves."""
    await trio.Path(spec.log_path.parent).mkdir(parents=True, exist_ok=True)
    return await trio.lowlevel.open_process(
        backend.argv(spec),
        env=spec.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# ---------------------------------------------------------------------------- argv


def test_argv_names_env_vars_but_never_carries_their_values(hive_root: Path) -> None:
    spec = make_spec(hive_root, ("/bin/true",), AgentConfig(private_network=True))
    argv = NspawnBackend(keep_paths=["/etc", "/opt/py"]).argv(spec)

    assert not any(SECRET in arg for arg in argv)
    assert "--setenv=ANTHROPIC_API_KEY" in argv and "--setenv=HIVE_LABEL" in argv
    assert argv[:10] == [
        "systemd-nspawn",
        "--quiet",
        "--directory=/",
        "--volatile=yes",
        "--register=no",
        "--keep-unit",
        "--link-journal=no",
        "--as-pid2",
        "--console=pipe",
        f"--machine={spec.container}",
    ]
    assert "--private-network" in argv
    assert "--bind-ro=/opt/py:/opt/py" in argv
    ro = str(hive_root / "ro:only").replace(":", "\\:")
    assert f"--bind-ro={ro}:/ro" in argv
    assert f"--bind={hive_root / 'state'}:/state" in argv
    assert "--chdir=/state" in argv
    assert argv[argv.index("--") + 1 :] == ["/bin/true"]
    assert not any(arg.startswith("--property") for arg in argv)


def test_runtime_paths_leave_out_usr() -> None:
    paths = NspawnBackend().keep_paths
    assert "/etc" not in paths  # every container has a generated /etc of its own
    assert not any(p == "/usr" or p.startswith("/usr/") for p in paths)
    assert any(sys.prefix == p or sys.prefix.startswith(p + "/") for p in paths)


# ---------------------------------------------------------------------------- the container


@needs_nspawn
@pytest.mark.parametrize("private_network", [False, True], ids=["host-net", "private-net"])
async def test_container_sees_its_binds_env_and_identity(
    hive_root: Path, marker: str, private_network: bool
) -> None:
    spec = make_spec(
        hive_root,
        (sys.executable, "-c", PROBE.format(marker=marker)),
        AgentConfig(private_network=private_network),
    )
    backend = NspawnBackend(keep_paths=[*runtime_paths(), str(hive_root / "host")])
    listener = await listen(hive_root / "sock" / "up.sock")
    pids: list[int] = []
    codes: list[int] = []

    async def run() -> None:
        codes.append(await backend.run(spec, grace=GRACE, on_started=pids.append))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        conn, line = await accept_line(listener)
        with conn:
            # nspawn waits for the container, which waits for us: nspawn's argv is still there.
            nspawn_argv = cmdline(pids[0])
            await conn.send(b"go")
    assert codes == [0], spec.log_path.read_text()

    assert nspawn_argv[0] == b"systemd-nspawn"
    assert b"--setenv=ANTHROPIC_API_KEY" in nspawn_argv
    assert not any(SECRET.encode() in arg for arg in nspawn_argv)

    report = json.loads(line)
    assert report["env"]["ANTHROPIC_API_KEY"] == SECRET
    assert report["env"]["HIVE_LABEL"] == "probe"
    assert report["env"]["HOME"] == "/root"
    assert report["cwd"] == "/state"
    assert report["hostname"] == spec.container
    assert report["pid"] == 2
    assert report["uid"] == 0
    # Root inside, but without a single capability, and none to regain by exec.
    status = report["status"]
    assert (status["CapPrm"], status["CapEff"], status["CapBnd"]) == ("0" * 16,) * 3
    assert status["NoNewPrivs"] == "1"
    assert report["ro_bind"] == "from the host"
    assert report["ro_write_errno"] == errno.EROFS
    assert not (hive_root / "ro:only" / "written").exists()
    assert (hive_root / "state" / "written").read_text() == "from the container"
    # A hidden path under a kept one is an empty tmpfs.
    assert report["host"] == ["daemon", "visible"]
    assert report["hidden"] == []
    host_interfaces = sorted(name for _, name in socket.if_nameindex())
    assert report["interfaces"] == (["lo"] if private_network else host_interfaces)
    # Its pidfiles are gone once it has exited.
    assert sorted(p.name for p in spec.log_path.parent.iterdir()) == ["container.log"]


@needs_nspawn
async def test_cancelling_stops_the_container_within_the_grace_period(
    hive_root: Path, marker: str
) -> None:
    spec = sleeper(hive_root, marker)
    listener = await listen(hive_root / "sock" / "up.sock")
    pids: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(NspawnBackend().run, spec, grace=GRACE, on_started=pids.append))
        await wait_until_up(listener)
        assert len(processes_with(marker)) == 2  # nspawn and the payload
        stopped_at = trio.current_time()
        nursery.cancel_scope.cancel()
    # nspawn SIGKILLs the container on SIGTERM and exits: no need for the SIGKILL after grace.
    assert trio.current_time() - stopped_at < GRACE
    assert not group_alive(pids[0])
    assert processes_with(marker) == []


@needs_nspawn
async def test_a_sigkilled_nspawn_does_not_leave_its_container_running(
    hive_root: Path, marker: str
) -> None:
    spec = sleeper(hive_root, marker)
    listener = await listen(hive_root / "sock" / "up.sock")
    pids: list[int] = []
    codes: list[int] = []

    async def run() -> None:
        codes.append(await NspawnBackend().run(spec, grace=GRACE, on_started=pids.append))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until_up(listener)
        await wait_for_file(spec.log_path.parent / INIT_PIDFILE)
        os.killpg(pids[0], signal.SIGKILL)
    assert codes == [-signal.SIGKILL]
    assert processes_with(marker) == []
    assert not (spec.log_path.parent / INIT_PIDFILE).exists()


@needs_nspawn
async def test_a_container_left_by_a_dead_daemon_is_adopted_not_doubled(
    hive_root: Path, marker: str
) -> None:
    spec = sleeper(hive_root, marker)
    listener = await listen(hive_root / "sock" / "up.sock")
    backend = NspawnBackend()
    # A daemon killed with -9 leaves nspawn running in its own session, and its pidfiles.
    nspawn = await start_orphan(backend, spec)
    await wait_until_up(listener)
    init = await trio.to_thread.run_sync(_container_init, nspawn.pid)
    assert init is not None
    await trio.to_thread.run_sync(
        _write_pidfile, spec.log_path.parent / "container.pid", nspawn.pid
    )
    await trio.to_thread.run_sync(_write_pidfile, spec.log_path.parent / INIT_PIDFILE, init)

    started = trio.Event()
    pids: list[int] = []

    def on_started(pid: int) -> None:
        pids.append(pid)
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(backend.run, spec, grace=GRACE, on_started=on_started))
        await started.wait()
        assert pids == [nspawn.pid]
        assert len(processes_with(marker)) == 2  # still the one nspawn and its payload
        nursery.cancel_scope.cancel()
    await nspawn.wait()
    assert processes_with(marker) == []


@needs_nspawn
async def test_the_next_start_kills_a_container_whose_nspawn_was_sigkilled(
    hive_root: Path, marker: str
) -> None:
    spec = sleeper(hive_root, marker)
    listener = await listen(hive_root / "sock" / "up.sock")
    backend = NspawnBackend()
    # nspawn SIGKILLed while no daemon watched: its container's init lives on in its own session.
    nspawn = await start_orphan(backend, spec)
    await wait_until_up(listener)
    init = await trio.to_thread.run_sync(_container_init, nspawn.pid)
    assert init is not None
    await trio.to_thread.run_sync(_write_pidfile, spec.log_path.parent / INIT_PIDFILE, init)
    nspawn.kill()
    await nspawn.wait()
    assert len(processes_with(marker)) == 1  # the payload

    quick = make_spec(hive_root, (sys.executable, "-c", "pass"))
    with trio.fail_after(30):
        assert await backend.run(quick, grace=GRACE, on_started=lambda pid: None) == 0
    assert processes_with(marker) == []


# ---------------------------------------------------------------------------- limits


def test_limits_note_is_empty_where_the_daemon_enforces_limits(hive_root: Path) -> None:
    """nspawn's --property= cannot act here (no scope unit), but the daemon's own cgroup does:
    nothing to report on a host where root manages cgroups (this one)."""
    backend = NspawnBackend(keep_paths=[])
    assert backend.limits_note(make_spec(hive_root, ("/bin/true",))) is None
    limited = AgentConfig(limits=Limits(memory_max="64M", cpu_quota="50%"))
    assert backend.limits_note(make_spec(hive_root, ("/bin/true",), limited)) is None


@needs_nspawn
async def test_nspawn_ignores_property_with_keep_unit(hive_root: Path) -> None:
    """Why the note is true: with --keep-unit nspawn has no scope to set MemoryMax on."""
    spec = make_spec(hive_root, ("/bin/true",))
    argv = NspawnBackend().argv(spec)
    argv.insert(argv.index("--"), "--property=MemoryMax=64M")
    argv.remove("--quiet")
    with trio.fail_after(30):
        done = await trio.run_process(argv, env=spec.env, capture_stderr=True, check=False)
    assert done.returncode == 0
    assert b"--property= settings will have no effect" in done.stderr


# ---------------------------------------------------------------------------- under a daemon


@needs_nspawn
@needs_claude
async def test_agent_in_nspawn_answers_the_operator(hive_root: Path) -> None:
    cfg = hive_config(hive_root, backend="nspawn", demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        spawned = await hive.call(wire.Spawn(name="alice"))
        sent = await hive.call(wire.OperatorSend(to="alice", body="hello from nspawn"))
        assert spawned.agent.backend == "nspawn" and sent.recipients == ["alice"]

        def answered(event: wire.HiveEvent) -> bool:
            return (
                sent_to("operator")(event)
                and isinstance(event, wire.MessageSent)
                and "hello from nspawn" in event.message.body
            )

        event = await wait_for_event(events, answered)
        assert isinstance(event, wire.MessageSent)
        assert event.message.sender == "alice"
        assert event.message.body == "alice here. You said: hello from nspawn"

        # The pid the daemon supervises is nspawn's, and alice never had to restart.
        listed = await hive.call(wire.ListAgents())
        [alice] = [a for a in listed.agents if a.name == "alice"]
        assert alice.pid is not None and alice.restarts == 0
        argv = cmdline(alice.pid)
        assert argv[0].endswith(b"systemd-nspawn")
        assert b"--machine=h-alice" in argv
        assert not any(b"HIVE_UI_TOKEN=" in arg for arg in argv)
