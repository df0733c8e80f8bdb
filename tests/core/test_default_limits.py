"""`--agent-memory-max` / `--agent-cpu-quota`: the limits of every agent whose agent.toml sets
none (services.hive-c0re's agentMemoryMax / agentCpuQuota); agent.toml's own always win."""

from __future__ import annotations

from pathlib import Path

from hyperhive.core.config import DaemonConfig
from hyperhive.core.supervisor import with_default_limits
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import AgentConfig, Limits
from tests.conftest import needs_bwrap
from tests.core.test_agent_config import joined_limit
from tests.hive import hive_config, open_hive, subscription, wait_for_event

DEFAULTS = DaemonConfig(agent_memory_max="4G", agent_cpu_quota="200%")


def test_unset_limits_take_the_defaults() -> None:
    assert with_default_limits(AgentConfig(), DEFAULTS).limits == Limits(
        memory_max="4G", cpu_quota="200%"
    )


def test_agent_toml_limits_win_one_by_one() -> None:
    config = AgentConfig(model="sonnet", limits=Limits(memory_max="1G"))
    limited = with_default_limits(config, DEFAULTS)
    assert limited.limits == Limits(memory_max="1G", cpu_quota="200%")
    assert limited.model == "sonnet"


def test_without_defaults_nothing_changes() -> None:
    config = AgentConfig(limits=Limits(cpu_quota="50%"))
    assert with_default_limits(config, DaemonConfig()) is config


@needs_bwrap
async def test_the_defaults_reach_the_backend(hive_root: Path) -> None:
    """With defaults, every agent has limits, enforced through its cgroup."""
    cfg = hive_config(hive_root, agent_memory_max="2G")
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        running = await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
        )
        assert isinstance(running, wire.AgentChanged)
        assert running.agent.limits_note is None and running.agent.pid is not None
        assert await joined_limit(running.agent.pid) == 2 << 30
