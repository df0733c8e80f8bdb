"""Agent cgroups: limit parsing and host detection, then the real kernel enforcing the limits."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from hyperhive.core.containers.cgroups import (
    DEFAULT_PIDS_MAX,
    JOIN_FAILED,
    PARENT,
    AgentCgroup,
    CgroupHost,
    CgroupLimits,
    Unavailable,
    choose,
    detect,
    parse_limits,
    parse_mountinfo,
    parse_proc_cgroup,
    unenforceable_note,
)
from hyperhive.protocol.agent_config import Limits
from hyperhive.protocol.errors import BadParams

HOST = detect()
needs_cgroups = pytest.mark.skipif(
    isinstance(HOST, Unavailable),
    reason=f"cgroups cannot be managed here: {getattr(HOST, 'reason', '')}",
)

# Allocates (and touches) 200 MiB, one MiB at a time.
ALLOCATE = "chunks = [b'x' * (1 << 20) for _ in range(200)]\nprint('survived', len(chunks))"
# Forks children that wait to be killed until a fork fails, then reports how far it got.
FORK = """
import os, signal
children = []
try:
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            signal.pause()
        children.append(pid)
except OSError as exc:
    print(len(children), exc.strerror)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


@pytest.fixture
def host() -> CgroupHost:
    assert isinstance(HOST, CgroupHost)
    return HOST


@pytest.fixture
def name(host: CgroupHost) -> Iterator[str]:
    """A container name no other test (or engineer's test run) uses; its cgroup goes after."""
    name = f"test-{os.getpid()}-{secrets.token_hex(4)}"
    yield name
    host.agent(name).remove()


async def prepare(host: CgroupHost, name: str, limits: CgroupLimits) -> AgentCgroup:
    return await trio.to_thread.run_sync(host.prepare, name, limits)


def read(agent: AgentCgroup, controller: str, file: str) -> str:
    return (agent.dirs[controller] / file).read_text().strip()


async def start(nursery: trio.Nursery, argv: list[str]) -> trio.Process:
    """A process whose stdout the test reads; the nursery waits for it to end."""
    proc: trio.Process = await nursery.start(
        partial(trio.run_process, argv, stdout=subprocess.PIPE, check=False)
    )
    return proc


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        assert chunk, f"stream ended after {data!r}"
        data += chunk
    return data.decode().strip()


# ---- parsing ----


def test_parse_limits_in_kernel_units() -> None:
    limits = parse_limits(Limits(memory_max="512M", cpu_quota="200%"), pids_max=64)
    assert limits == CgroupLimits(memory_bytes=512 << 20, cpu_quota_percent=200, pids_max=64)
    assert parse_limits(Limits(memory_max="4G")).memory_bytes == 4 << 30
    assert parse_limits(Limits(memory_max="1T")).memory_bytes == 1 << 40
    assert parse_limits(Limits(memory_max="8K")).memory_bytes == 8192
    assert parse_limits(Limits(memory_max="100000")).memory_bytes == 100000


def test_every_agent_gets_a_pids_limit() -> None:
    assert parse_limits(Limits()) == CgroupLimits(None, None, DEFAULT_PIDS_MAX)


@pytest.mark.parametrize(
    ("limits", "pids_max", "message"),
    [
        (Limits(memory_max="4X"), None, "limits.memory_max: '4X' is not a size"),
        (Limits(memory_max="4GB"), None, "limits.memory_max: '4GB' is not a size"),
        (Limits(memory_max="1.5G"), None, "limits.memory_max: '1.5G' is not a size"),
        (Limits(memory_max="0"), None, "limits.memory_max: '0' is not a size"),
        (Limits(memory_max="-1"), None, "limits.memory_max: '-1' is not a size"),
        (Limits(memory_max="99999999T"), None, "limits.memory_max: '99999999T' is too large"),
        (Limits(cpu_quota="200"), None, "limits.cpu_quota: '200' is not a percentage"),
        (Limits(cpu_quota="0%"), None, "limits.cpu_quota: '0%' is not a percentage"),
        (Limits(cpu_quota="1.5%"), None, "limits.cpu_quota: '1.5%' is not a percentage"),
        (Limits(cpu_quota="100001%"), None, "limits.cpu_quota: '100001%' is more than 100000%"),
        (Limits(), 0, "limits.pids_max: 0 is not a positive number of tasks"),
    ],
)
def test_bad_limits_are_refused_clearly(limits: Limits, pids_max: int | None, message: str) -> None:
    with pytest.raises(BadParams) as caught:
        parse_limits(limits, pids_max)
    assert caught.value.message.startswith(message)


def test_container_names_must_be_one_path_component(tmp_path: Path) -> None:
    host = CgroupHost(version=1, bases={"memory": tmp_path})
    assert host.agent("alice").dirs == {"memory": tmp_path / PARENT / "alice"}
    for bad in ("../alice", "a/b", "", ".", "..", "x" * 200):
        with pytest.raises(BadParams):
            host.agent(bad)


# ---- detection ----

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / {memory} rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / {pids} rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / {unified} rw,relatime - cgroup2 cgroup2 rw
"""
SELF_HYBRID = """\
9:name=systemd:/system.slice/hive.service
8:pids:/system.slice/hive.service
4:memory:/system.slice/hive.service
1:cpu,cpuacct:/system.slice/hive.service
0::/system.slice/hive.service
"""


def test_mountinfo_and_proc_cgroup_are_read() -> None:
    mounts = parse_mountinfo(
        HYBRID.format(memory="/sys/fs/cgroup/mem\\040ory", pids="/p", unified="/u")
        + "50 31 0:40 /sub /mnt/ro ro,relatime - cgroup2 cgroup2 rw\n"
    )
    assert [(str(m.point), m.version) for m in mounts] == [
        ("/sys/fs/cgroup/cpu,cpuacct", 1),
        ("/sys/fs/cgroup/mem ory", 1),
        ("/p", 1),
        ("/sys/fs/cgroup/systemd", 1),
        ("/u", 2),
        ("/mnt/ro", 2),
    ]
    assert mounts[0].controllers == {"cpu", "cpuacct"}
    assert mounts[3].controllers == {"name=systemd"}
    assert (mounts[5].root, mounts[5].read_only, mounts[4].read_only) == ("/sub", True, False)
    own = parse_proc_cgroup(SELF_HYBRID)
    assert own["cpu"] == own["cpuacct"] == own[""] == "/system.slice/hive.service"
    assert own["name=systemd"] == "/system.slice/hive.service"


def hybrid(tmp_path: Path) -> tuple[list[Path], list[str]]:
    dirs = [tmp_path / "memory", tmp_path / "pids", tmp_path / "unified"]
    for d in dirs:
        (d / "system.slice" / "hive.service").mkdir(parents=True)
    text = HYBRID.format(memory=dirs[0], pids=dirs[1], unified=dirs[2])
    # Only the hierarchies under tmp_path can be looked at, not the real ones.
    lines = [line for line in text.splitlines() if " /sys/fs/cgroup" not in line]
    return dirs, lines


def test_without_systemd_agents_go_under_each_hierarchy_root(tmp_path: Path) -> None:
    (memory, pids, _), lines = hybrid(tmp_path)
    own = parse_proc_cgroup(SELF_HYBRID)
    chosen = choose(parse_mountinfo("\n".join(lines)), own, systemd=False)
    assert chosen == CgroupHost(version=1, bases={"memory": memory, "pids": pids})
    assert chosen.agent("alice").procs_files == [
        memory / PARENT / "alice" / "cgroup.procs",
        pids / PARENT / "alice" / "cgroup.procs",
    ]


def test_under_systemd_agents_go_under_the_daemons_delegated_cgroup(tmp_path: Path) -> None:
    (memory, pids, unified), lines = hybrid(tmp_path)
    own = parse_proc_cgroup(SELF_HYBRID)
    refused = choose(parse_mountinfo("\n".join(lines)), own, systemd=True)
    assert isinstance(refused, Unavailable)
    assert "not delegated" in refused.reason and "Delegate=yes" in refused.reason
    try:
        os.setxattr(unified / "system.slice" / "hive.service", "user.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"{tmp_path} takes no user xattrs: {exc.strerror}")
    chosen = choose(parse_mountinfo("\n".join(lines)), own, systemd=True)
    service = Path("system.slice", "hive.service")
    assert chosen == CgroupHost(
        version=1, bases={"memory": memory / service, "pids": pids / service}
    )


def test_v2_takes_the_controllers_it_lists(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb\n")
    mounts = parse_mountinfo(f"41 31 0:38 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n")
    chosen = choose(mounts, {"": "/"}, systemd=False)
    assert chosen == CgroupHost(version=2, bases={"memory": tmp_path, "cpu": tmp_path})
    # Not the root cgroup (a cgroup namespace): the daemon's processes must leave it first.
    (tmp_path / "cgroup.type").write_text("domain\n")
    chosen = choose(mounts, {"": "/"}, systemd=False)
    assert isinstance(chosen, CgroupHost) and chosen.supervisor_leaf
    (tmp_path / "cgroup.controllers").write_text("cpuset io\n")
    unavailable = choose(mounts, {"": "/"}, systemd=False)
    assert unavailable == Unavailable(
        "none of the memory, cpu and pids cgroup controllers is available"
    )


def test_a_read_only_cgroupfs_is_unavailable(tmp_path: Path) -> None:
    mounts = parse_mountinfo(f"35 31 0:32 / {tmp_path} ro,relatime - cgroup cgroup rw,memory\n")
    assert choose(mounts, {}, systemd=False) == Unavailable(
        f"the cgroup filesystem at {tmp_path} is read-only"
    )
    assert choose([], {}, systemd=False) == Unavailable("no cgroup filesystem is mounted")


def test_unenforceable_note_names_what_the_config_asked_for(tmp_path: Path) -> None:
    memory_and_cpu = Limits(memory_max="1G", cpu_quota="50%")
    gone = Unavailable("the daemon is not root")
    assert unenforceable_note(memory_and_cpu, gone) == (
        "memory_max, cpu_quota not enforced: the daemon is not root"
    )
    assert unenforceable_note(Limits(), gone) is None
    assert unenforceable_note(Limits(), gone, pids_max=10) == (
        "pids_max not enforced: the daemon is not root"
    )
    host = CgroupHost(version=1, bases={"memory": tmp_path, "pids": tmp_path})
    assert unenforceable_note(memory_and_cpu, host) == (
        "cpu_quota not enforced: no cpu cgroup controller here (cgroup v1)"
    )
    assert unenforceable_note(Limits(memory_max="1G"), host, pids_max=10) is None


# ---- the real kernel ----


@needs_cgroups
async def test_memory_limit_kills_what_goes_over_it(host: CgroupHost, name: str) -> None:
    agent = await prepare(host, name, parse_limits(Limits(memory_max="64M")))
    with trio.fail_after(60):
        done = await trio.run_process(
            agent.join_argv([sys.executable, "-c", ALLOCATE]), capture_stdout=True, check=False
        )
    assert done.returncode == -9, done.stdout
    assert b"survived" not in done.stdout
    usage = await trio.to_thread.run_sync(agent.usage)
    assert usage.oom_kills is not None and usage.oom_kills >= 1
    assert usage.pids == 0


@needs_cgroups
async def test_pids_limit_stops_forks(host: CgroupHost, name: str) -> None:
    agent = await prepare(host, name, parse_limits(Limits(), pids_max=20))
    assert read(agent, "pids", "pids.max") == "20"
    with trio.fail_after(60):
        done = await trio.run_process(
            agent.join_argv([sys.executable, "-c", FORK]), capture_stdout=True
        )
    # The python process itself is one of the twenty.
    assert done.stdout.decode().strip() == "19 Resource temporarily unavailable"


@needs_cgroups
async def test_default_limits_are_written(host: CgroupHost, name: str) -> None:
    agent = await prepare(host, name, parse_limits(Limits()))
    assert read(agent, "pids", "pids.max") == str(DEFAULT_PIDS_MAX)
    if host.version == 1:
        assert int(read(agent, "memory", "memory.limit_in_bytes")) >= 1 << 62
        assert read(agent, "cpu", "cpu.cfs_quota_us") == "-1"
    else:
        assert read(agent, "memory", "memory.max") == "max"
        assert read(agent, "cpu", "cpu.max") == "max 100000"


@needs_cgroups
async def test_cpu_quota_is_a_share_of_the_period(host: CgroupHost, name: str) -> None:
    agent = await prepare(host, name, parse_limits(Limits(cpu_quota="150%")))
    if host.version == 1:
        period = int(read(agent, "cpu", "cpu.cfs_period_us"))
        assert int(read(agent, "cpu", "cpu.cfs_quota_us")) == 150 * period // 100 == 150000
    else:
        assert read(agent, "cpu", "cpu.max") == "150000 100000"


@needs_cgroups
async def test_join_argv_passes_arguments_unchanged(host: CgroupHost, name: str) -> None:
    agent = await prepare(host, name, parse_limits(Limits()))
    args = ["a b", "--", "$HOME", "", "'\"", "*", "-c", "x\ny"]
    script = "import json, sys; print(json.dumps([sys.argv[1:], open('/proc/self/cgroup').read()]))"
    with trio.fail_after(30):
        done = await trio.run_process(
            agent.join_argv([sys.executable, "-c", script, *args]), capture_stdout=True
        )
    seen_args, cgroups = json.loads(done.stdout)
    assert seen_args == args
    # In every hierarchy the agent has a directory in, the process is in that directory.
    own = parse_proc_cgroup(cgroups)
    for controller, directory in agent.dirs.items():
        key = controller if host.version == 1 else ""
        assert own[key].endswith(f"/{PARENT}/{name}"), (controller, directory, cgroups)


@needs_cgroups
async def test_join_fails_closed(host: CgroupHost, name: str) -> None:
    agent = host.agent(name)  # never prepared: its directories do not exist
    with trio.fail_after(30):
        done = await trio.run_process(
            agent.join_argv(["/bin/echo", "ran"]),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == JOIN_FAILED
    assert done.stdout == b""
    assert f"hive: cannot join cgroup {agent.procs_files[0]}" in done.stderr.decode()


@needs_cgroups
async def test_remove_kills_what_is_left_and_deletes_the_cgroup(
    host: CgroupHost, name: str
) -> None:
    agent = await prepare(host, name, parse_limits(Limits(memory_max="256M")))
    # A direct child, and one in a session of its own (a process-group kill misses it).
    script = "setsid sh -c 'echo $$; exec sleep 600 >/dev/null' & exec sleep 600 >/dev/null"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc = await start(nursery, agent.join_argv(["/bin/sh", "-c", script]))
            assert proc.stdout is not None
            escaped = int(await read_line(proc.stdout))
            pidfd = os.pidfd_open(escaped)
            try:
                assert {proc.pid, escaped} <= await trio.to_thread.run_sync(agent.pids)
                usage = await trio.to_thread.run_sync(agent.usage)
                assert usage.pids == 2 and usage.memory_bytes
                await trio.to_thread.run_sync(agent.remove)
                assert select.select([pidfd], [], [], 0)[0] == [pidfd], "escaped one still runs"
            finally:
                os.close(pidfd)
            assert await proc.wait() == -9
    assert not any(d.exists() for d in agent.paths)
    await trio.to_thread.run_sync(agent.remove)  # gone already: nothing to do


@needs_cgroups
async def test_prepare_twice_is_idempotent_and_empties_the_cgroup(
    host: CgroupHost, name: str
) -> None:
    small = parse_limits(Limits(memory_max="64M", cpu_quota="50%"), pids_max=30)
    first = await prepare(host, name, small)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            leftover = await start(
                nursery, first.join_argv(["/bin/sh", "-c", "echo up; exec sleep 600"])
            )
            assert leftover.stdout is not None
            assert await read_line(leftover.stdout) == "up"
            # Up and down again: on v1 memsw must be moved out of the way in the right order.
            bigger = parse_limits(Limits(memory_max="1G"), pids_max=30)
            second = await prepare(host, name, bigger)
            assert await leftover.wait() == -9
    assert second == first
    third = await prepare(host, name, small)
    assert third == first
    memory_file = "memory.limit_in_bytes" if host.version == 1 else "memory.max"
    assert read(third, "memory", memory_file) == str(64 << 20)
    if host.version == 1:
        with contextlib.suppress(FileNotFoundError):
            assert read(third, "memory", "memory.memsw.limit_in_bytes") == str(64 << 20)
        assert read(third, "cpu", "cpu.cfs_quota_us") == "50000"
    assert read(third, "pids", "pids.max") == "30"
    assert await trio.to_thread.run_sync(third.pids) == set()


def writable_cgroup2() -> Path | None:
    """A cgroup2 mount root may write to (on a hybrid host: `unified`, without controllers)."""
    if os.geteuid() != 0:
        return None
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return next((m.point for m in mounts if m.version == 2 and not m.read_only), None)


UNIFIED = writable_cgroup2()


@pytest.mark.skipif(UNIFIED is None, reason="not root, or no writable cgroup2 hierarchy")
async def test_v2_joins_kills_with_cgroup_kill_and_removes(tmp_path: Path) -> None:
    # On a hybrid host the v2 hierarchy holds no controller, so this is only the mechanics:
    # joining, cgroup.kill, and the removal of a cgroup a container made below its own.
    assert UNIFIED is not None
    directory = UNIFIED / PARENT / f"test-{os.getpid()}-{secrets.token_hex(4)}"
    agent = AgentCgroup(container=directory.name, version=2, dirs={"unified": directory})
    (directory / "payload").mkdir(parents=True)
    script = "setsid sh -c 'echo $$; exec sleep 600 >/dev/null' & exec sleep 600 >/dev/null"
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                proc = await start(nursery, agent.join_argv(["/bin/sh", "-c", script]))
                assert proc.stdout is not None
                escaped = int(await read_line(proc.stdout))
                assert await trio.to_thread.run_sync(agent.pids) == {proc.pid, escaped}
                await trio.to_thread.run_sync(agent.remove)
                assert await proc.wait() == -9
        assert not directory.exists()
    finally:
        await trio.to_thread.run_sync(agent.remove)


def test_under_systemd_v2_the_daemons_supervisor_leaf_is_seen_through(tmp_path: Path) -> None:
    service = tmp_path / "system.slice" / "hive.service"
    (service / "supervisor").mkdir(parents=True)
    (service / "cgroup.controllers").write_text("memory pids\n")
    (service / "cgroup.type").write_text("domain\n")
    try:
        os.setxattr(service, "trusted.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"{tmp_path} takes no trusted xattrs: {exc.strerror}")
    mounts = parse_mountinfo(f"41 31 0:38 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n")
    # After the first prepare the daemon runs in the leaf; its cgroup is still the service's.
    for own in ("/system.slice/hive.service", "/system.slice/hive.service/supervisor"):
        chosen = choose(mounts, {"": own}, systemd=True)
        assert chosen == CgroupHost(
            version=2, bases={"memory": service, "pids": service}, supervisor_leaf=True
        )
