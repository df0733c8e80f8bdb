"""Container lifecycle with real bubblewrap containers and a real daemon process."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from tests.conftest import needs_bwrap
from tests.e2e.test_turn_faults import _descendants
from tests.hive import daemon_process, hive_config, open_hive, subscription, wait_for_event

pytestmark = needs_bwrap


def _containers(root: Path, name: str) -> list[int]:
    """Host pids of the outer bwrap processes running `name` of the hive under `root`."""
    bind = f"{root}/run/agents/{name}".encode()
    found, parents = [], {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        # bwrap itself, or the shell that joins the agent's cgroup and then execs it.
        if argv and bind in argv and (argv[0].endswith(b"bwrap") or b"hive-cgroup-join" in argv):
            found.append(int(entry))
    return [pid for pid in found if parents.get(pid) not in found]


def _kill_leftovers(root: Path) -> None:
    """A failed test must not leave containers behind (they outlive their daemon on purpose)."""
    for name in ("alice", "bob"):
        for pid in _containers(root, name):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


async def _when_running(root: Path, names: set[str]) -> dict[str, wire.AgentInfo]:
    """The agents' records once each of them is running (adoption takes a moment)."""
    async with open_client(str(root / "run" / "host.sock")) as client:
        await client.call(wire.Subscribe())
        agents = await _list(root)
        waiting = {n for n in names if agents[n].state != "running"}
        while waiting:
            event = await wait_for_event(
                client, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
            )
            assert isinstance(event, wire.AgentChanged)
            agents[event.agent.name] = event.agent
            waiting.discard(event.agent.name)
        return agents


async def _list(root: Path) -> dict[str, wire.AgentInfo]:
    reply = await call_once(str(root / "run" / "host.sock"), wire.ListAgents())
    return {a.name: a for a in reply.agents}


# A key and an unreachable API: harnesses log in and take their start-up notice (proof that
# they run and are connected); their turns then fail, which does not matter here.
CLAUDE = (
    "--claude-env",
    "ANTHROPIC_API_KEY=sk-ant-x",
    "--claude-env",
    "ANTHROPIC_BASE_URL=http://127.0.0.1:9",
)


async def _spawn_then_kill_the_daemon(
    root: Path,
    names: set[str],
    *,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = CLAUDE,
) -> dict[str, wire.AgentInfo]:
    """Spawn agents under a daemon process, wait until their harnesses work, kill -9 it."""
    host = str(root / "run" / "host.sock")
    async with daemon_process(root, env=env, args=args) as daemon:
        async with open_client(host) as client:
            await client.call(wire.Subscribe())
            for name in sorted(names):
                await call_once(host, wire.Spawn(name=name))
            taken: set[str] = set()
            while taken != names:
                leased = await wait_for_event(client, lambda e: isinstance(e, wire.MessageLeased))
                assert isinstance(leased, wire.MessageLeased)
                taken.add(leased.to)
        before = await _list(root)
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait()
    return before


def _slirps_for(roots: list[int]) -> list[int]:
    """slirp4netns processes serving a namespace of a process under one of `roots`."""
    tree = {d for root in roots for d in [root, *_descendants(root)]}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            target = argv[-3] if len(argv) > 2 else b""
            if argv[0].endswith(b"slirp4netns") and target.isdigit() and int(target) in tree:
                found.append(int(entry))
    return found


async def _until_slirps(roots: list[int], count: int) -> None:
    """Wait (bounded) until `count` slirp4netns serve those containers."""
    with trio.fail_after(20):
        for _ in range(1000):
            if len(_slirps_for(roots)) == count:
                return
            await trio.sleep(0.02)
    raise AssertionError(f"slirp4netns for {roots}: {_slirps_for(roots)}, wanted {count}")


async def test_containers_outlive_a_killed_daemon_and_are_adopted_not_doubled(
    hive_root: Path,
) -> None:
    try:
        await _outlive_and_adopt(hive_root)
    finally:
        _kill_leftovers(hive_root)


async def _outlive_and_adopt(hive_root: Path) -> None:
    host = str(hive_root / "run" / "host.sock")
    before = await _spawn_then_kill_the_daemon(hive_root, {"alice", "bob"})
    # The containers live on without their daemon; their slirp4netns do not (they would hold
    # the namespaces forever): each one's exit pipe closed with the daemon.
    assert all(len(_containers(hive_root, n)) == 1 for n in ("alice", "bob"))
    pids = [info.pid for info in before.values() if info.pid is not None]
    await _until_slirps(pids, 0)

    async with daemon_process(hive_root, args=CLAUDE):
        after = await _when_running(hive_root, {"alice", "bob"})
        await _until_slirps(pids, 2)  # the new daemon wired each namespace again
        for name in ("alice", "bob"):
            assert after[name].state == "running"
            assert after[name].pid == before[name].pid  # adopted, not started again
            assert _containers(hive_root, name) == [after[name].pid]
        # The adopted harness found its way back to the new socket: it is served.
        await call_once(host, wire.OperatorSend(to="alice", body="still with us?"))
        await call_once(host, wire.Kill(name="alice"))
        assert _containers(hive_root, "alice") == []  # stopping an adopted one stops it
    assert _containers(hive_root, "bob") == []  # and a clean daemon stop stops the rest


async def test_a_crashed_container_is_restarted_and_the_manager_told(hive_root: Path) -> None:
    cfg = hive_config(hive_root, restart_initial=0.2)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        running = await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
        )
        assert isinstance(running, wire.AgentChanged) and running.agent.pid is not None
        os.killpg(running.agent.pid, signal.SIGKILL)  # the container dies under us
        await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "crashed"
        )
        again = await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
        )
        assert isinstance(again, wire.AgentChanged)
        assert again.agent.pid != running.agent.pid and again.agent.restarts == 1
        inbox = await hive.call(wire.HostRecent(name="manager"))
        event = msgspec.json.decode(inbox.messages[-1].body)
        assert event["event"] == "container_crash" and event["agent"] == "alice"
        logs = await hive.call(wire.Logs(name="alice", lines=50))
        assert logs.lines  # the container's own output, for the dashboard's log viewer


async def test_destroy_keeps_a_tombstone_revive_reuses_it_purge_wipes_only_that_agent(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        for name in ("alice", "bob"):
            await hive.call(wire.Spawn(name=name))
        note = cfg.agent_root("alice") / "state" / "notes.md"
        note.write_text("remember me")
        await hive.call(wire.Destroy(name="alice"))
        listed = {a.name: a for a in (await hive.call(wire.ListAgents())).agents}
        assert listed["alice"].state == "destroyed" and note.exists()
        assert not _containers(hive_root, "alice")

        await hive.call(wire.Spawn(name="alice"))  # revive
        assert note.read_text() == "remember me"
        await hive.call(wire.Destroy(name="alice", purge=True))
        listed = {a.name: a for a in (await hive.call(wire.ListAgents())).agents}
        assert "alice" not in listed and listed["bob"].state in ("starting", "running")
        assert not cfg.agent_root("alice").exists()
        assert cfg.agent_root("bob").exists()


async def test_twenty_agents_spawned_at_once_all_run(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    names = [f"a{i}" for i in range(20)]
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(hive.call, wire.Spawn(name=name))
        running: set[str] = set()
        while running != set(names):
            event = await wait_for_event(
                events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
            )
            assert isinstance(event, wire.AgentChanged)
            running.add(event.agent.name)
        listed = (await hive.call(wire.ListAgents())).agents
        assert len({a.port for a in listed}) == 20  # every UI has its own port
        counts = {n: len(_containers(hive_root, n)) for n in names}
        assert set(counts.values()) == {1}, (
            counts,
            [(a.name, a.state, a.last_error) for a in listed],
        )


async def test_an_adopted_container_from_an_older_hyperhive_is_rebuilt(hive_root: Path) -> None:
    try:
        await _adopt_after_upgrade(hive_root)
    finally:
        _kill_leftovers(hive_root)


async def _adopt_after_upgrade(hive_root: Path) -> None:
    host = str(hive_root / "run" / "host.sock")
    old_pid = (await _spawn_then_kill_the_daemon(hive_root, {"alice"}))["alice"].pid
    # As if the running container had been started by an older hyperhive.
    with sqlite3.connect(hive_root / "state" / "broker.sqlite") as conn:
        conn.execute("UPDATE agents SET built_rev = 'older' WHERE name = 'alice'")

    async with daemon_process(hive_root, args=CLAUDE), open_client(host) as client:
        await client.call(wire.Subscribe())
        rebuilt = await wait_for_event(
            client,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "manager"
                and '"rebuilt"' in e.message.body
            ),
        )
        assert isinstance(rebuilt, wire.MessageSent)
        notes = await call_once(host, wire.HostRecent(name="manager"))
        kinds = [msgspec.json.decode(m.body)["event"] for m in notes.messages]
        assert kinds[-2:] == ["needs_update", "rebuilt"]
        running = await wait_for_event(
            client, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
        )
        assert isinstance(running, wire.AgentChanged)
        assert running.agent.pid not in (None, old_pid) and not running.agent.needs_update
        assert _containers(hive_root, "alice") == [running.agent.pid]


async def test_a_web_port_held_by_a_stranger_is_reported_not_moved(hive_root: Path) -> None:
    from hyperhive.core.agents import PORT_SPAN, fnv1a_32

    cfg = hive_config(hive_root)
    port = cfg.ui_port_base + 100 + fnv1a_32(b"alice") % PORT_SPAN
    stranger = trio.socket.socket()
    stranger.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await stranger.bind(("127.0.0.1", port))
    stranger.listen(1)
    with stranger:
        async with open_hive(cfg) as hive, subscription(hive.sock) as events:
            await hive.call(wire.Spawn(name="alice"))
            # It runs anyway; the daemon's relay of its UI port reports the stranger.
            running = await wait_for_event(
                events,
                lambda e: (
                    isinstance(e, wire.AgentChanged)
                    and e.agent.state == "running"
                    and e.agent.port_conflict
                ),
            )
            assert isinstance(running, wire.AgentChanged)
            assert running.agent.port == port and running.agent.port_conflict
