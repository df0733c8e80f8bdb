"""Supervision on virtual time: restart backoff, its reset, intended stops, transient states.

The container is a scripted stand-in (a container's life is only "runs until it exits"), so the
policy can be driven through hours of virtual time; real containers are in tests/e2e and
tests/core/containers.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.core.agents import Registry
from hyperhive.core.broker import Broker, EventHub
from hyperhive.core.containers.base import ContainerSpec, OnStarted
from hyperhive.core.events import Notices
from hyperhive.core.store import open_store
from hyperhive.core.supervisor import Supervisor
from hyperhive.protocol import wire
from tests.hive import hive_config


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Jump only after the loop idled for a while in real time, so that sqlite's worker-thread
    # round trips (milliseconds) never count as idleness and skew the virtual timeline.
    return trio.testing.MockClock(autojump_threshold=0.05)


@dataclass
class ScriptedBackend:
    """A container that runs until the test says it crashed."""

    name: str = "scripted"
    start_runs_current: bool = True
    starts: trio.MemorySendChannel[float] | None = None
    exits: list[trio.Event] = field(default_factory=list)

    def limits_note(self, spec: ContainerSpec) -> str | None:
        return None

    async def create(self, spec: ContainerSpec) -> None:
        pass

    async def rebuild(self, spec: ContainerSpec) -> None:
        pass

    async def destroy(self, spec: ContainerSpec) -> None:
        pass

    async def logs(self, spec: ContainerSpec, lines: int) -> list[str]:
        return []

    async def run(self, spec: ContainerSpec, *, grace: float, on_started: OnStarted) -> int:
        exit_ = trio.Event()
        self.exits.append(exit_)
        on_started(4000 + len(self.exits))
        assert self.starts is not None
        await self.starts.send(trio.current_time())
        await exit_.wait()
        return 1


@dataclass
class World:
    supervisor: Supervisor
    registry: Registry
    broker: Broker
    backend: ScriptedBackend
    starts: trio.MemoryReceiveChannel[float]
    states: list[str]


@asynccontextmanager
async def world(root: Path) -> AsyncIterator[World]:
    cfg = hive_config(root, restart_initial=10, restart_max=300, restart_reset_after=600)
    cfg.state_dir.mkdir(parents=True)
    send, recv = trio.open_memory_channel[float](100)
    backend = ScriptedBackend(starts=send)
    async with open_store(str(cfg.db_path)) as store, trio.open_nursery() as nursery:
        hub = EventHub()
        registry = Registry(store, hub, ui_port_base=cfg.ui_port_base, backend="scripted")
        broker = Broker(store, hub, registry.resolve)
        await nursery.start(broker.serve)
        await broker.recover()

        supervisor = Supervisor(cfg, registry, broker, backend, Notices(broker))
        await nursery.start(supervisor.serve)
        states: list[str] = []

        async def watch() -> None:
            async with aclosing(hub.stream()) as stream:
                async for event in stream:
                    if isinstance(event, wire.AgentChanged) and event.agent.name == "alice":
                        states.append(event.agent.state)

        nursery.start_soon(watch)
        yield World(supervisor, registry, broker, backend, recv, states)
        nursery.cancel_scope.cancel()


async def test_crashes_restart_with_doubling_backoff_capped_and_reset(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with world(hive_root) as w:
        rec = await w.registry.add("alice", "agent")
        await w.supervisor.launch(rec)
        starts = [await w.starts.receive()]
        for _ in range(7):
            w.backend.exits[-1].set()  # crash right away
            starts.append(await w.starts.receive())
        delays = [round(b - a) for a, b in itertools.pairwise(starts)]
        assert delays == [10, 20, 40, 80, 160, 300, 300]
        assert rec.restarts == 7

        await trio.sleep(700)  # healthy for longer than the reset period
        w.backend.exits[-1].set()
        t = await w.starts.receive()
        crash_at = starts[-1] + 700
        assert round(t - crash_at) == 10  # back to the initial delay

        crashes = await w.broker.recent("manager", 100)
        events = [msgspec.json.decode(m.body) for m in crashes]
        assert [e["event"] for e in events] == ["container_crash"] * 8
        assert events[0]["agent"] == "alice" and events[0]["status"] == 1


async def test_an_intended_stop_is_not_a_crash_and_is_not_restarted(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with world(hive_root) as w:
        rec = await w.registry.add("alice", "agent")
        await w.supervisor.launch(rec)
        await w.starts.receive()
        await w.supervisor.stop(rec)
        assert rec.state == "stopped" and rec.restarts == 0
        await trio.sleep(3600)
        with pytest.raises(trio.WouldBlock):
            w.starts.receive_nowait()
        assert await w.broker.recent("manager", 10) == []
        await trio.testing.wait_all_tasks_blocked()
        assert w.states == ["stopped", "starting", "starting", "running", "stopping", "stopped"]


async def test_transient_states_of_a_rebuild_and_a_crash(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with world(hive_root) as w:
        rec = await w.registry.add("alice", "agent")
        await w.supervisor.launch(rec)
        await w.starts.receive()
        ok, _ = await w.supervisor.rebuild(rec)
        assert ok
        await w.starts.receive()
        w.backend.exits[-1].set()
        await w.starts.receive()
        await trio.testing.wait_all_tasks_blocked()  # let the state watcher catch up
        seen = [s for i, s in enumerate(w.states) if i == 0 or w.states[i - 1] != s]
        assert seen == [
            "stopped",
            "starting",
            "running",
            "rebuilding",
            "stopping",
            "stopped",
            "rebuilding",
            "starting",
            "running",
            "crashed",
            "starting",
            "running",
        ]
        events = [msgspec.json.decode(m.body) for m in await w.broker.recent("manager", 10)]
        assert [e["event"] for e in events] == ["rebuilt", "container_crash"]


async def test_which_hyperhive_a_container_runs(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    """bwrap/nspawn: a fresh start runs this daemon's hyperhive. nixos (a start runs the closure
    the container was built with): only a create or a rebuild makes it current."""
    async with world(hive_root) as w:
        w.registry.revision = "rev-2"
        rec = await w.registry.add("alice", "agent")
        await w.supervisor.launch(rec)
        await w.starts.receive()
        assert rec.built_rev == "rev-2"
        await w.supervisor.stop(rec)

        w.backend.start_runs_current = False
        w.registry.revision = "rev-3"
        await w.supervisor.launch(rec)
        await w.starts.receive()
        assert rec.built_rev == "rev-2"  # started, but still the old closure
        assert w.registry.info(rec).needs_update
        ok, _ = await w.supervisor.rebuild(rec)
        await w.starts.receive()
        assert ok and rec.built_rev == "rev-3"
        assert not w.registry.info(rec).needs_update


async def test_concurrent_spawns_never_share_a_web_ui_port(hive_root: Path) -> None:
    """Each new agent's port is taken before its row is written: spawns that interleave there
    (200 at once in scripts/bench_supervisor.py) must not pick the same free port."""
    async with open_store(str(hive_root / "broker.sqlite")) as store:
        registry = Registry(store, EventHub(), ui_port_base=20000, backend="scripted")
        # Names chosen to collide: many hash to the same few ports.
        names = [f"b{i}" for i in range(200)]
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(registry.add, name, "agent")
        ports = [r.port for r in registry.all()]
        assert len(ports) == len(names) and len(set(ports)) == len(names)
