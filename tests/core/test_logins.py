"""needs_login / logged_in: the manager hears once when an agent has no credentials, and once
when they appear; a daemon restart does not announce them again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from hyperhive.core.config import DaemonConfig
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client
from tests.hive import Hive, hive_config, open_hive, subscription, wait_for_event


def helper_event(kind: str, agent: str) -> Callable[[wire.HiveEvent], bool]:
    needle = msgspec.json.encode({"event": kind, "agent": agent}).decode()

    def check(event: wire.HiveEvent) -> bool:
        return (
            isinstance(event, wire.MessageSent)
            and event.message.to == "manager"
            and event.message.sender == "system"
            and event.message.body == needle
        )

    return check


async def login_events(hive: Hive) -> list[tuple[str, str]]:
    inbox = await hive.call(wire.HostRecent(name="manager", limit=200))
    found = []
    for m in inbox.messages:
        event = msgspec.json.decode(m.body) if m.body.startswith("{") else {}
        if event.get("event") in ("needs_login", "logged_in"):
            found.append((event["event"], event["agent"]))
    return found


async def spawn_stopped(hive: Hive, events: Client, name: str) -> None:
    """Spawn an agent (no container left running) and wait for its needs_login: a check pass
    that also looked at every other agent again."""
    await hive.call(wire.Spawn(name=name))
    await hive.call(wire.Kill(name=name))
    await wait_for_event(events, helper_event("needs_login", name))


def no_login_key(root: Path) -> DaemonConfig:
    cfg = hive_config(root, login_check_interval=0.05)
    assert not any(k.startswith(("ANTHROPIC_", "CLAUDE_")) for k in cfg.claude_env)
    return cfg


async def test_the_manager_hears_needs_login_and_logged_in_once_each(hive_root: Path) -> None:
    cfg = no_login_key(hive_root)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_stopped(hive, events, "alice")
        # Bob's pass (and the ticks every 50 ms) see alice still without credentials.
        await spawn_stopped(hive, events, "bob")
        creds = cfg.agent_root("alice") / "claude" / ".credentials.json"
        await trio.to_thread.run_sync(creds.write_text, '{"claudeAiOauth": {}}')
        flipped = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged)
                and e.agent.name == "alice"
                and not e.agent.needs_login
            ),
        )
        assert isinstance(flipped, wire.AgentChanged)
        await wait_for_event(events, helper_event("logged_in", "alice"))
        await spawn_stopped(hive, events, "carol")
        assert await login_events(hive) == [
            ("needs_login", "alice"),
            ("needs_login", "bob"),
            ("logged_in", "alice"),
            ("needs_login", "carol"),
        ]
        agents = await hive.call(wire.ListAgents())
        assert {a.name: a.needs_login for a in agents.agents} == {
            "alice": False,
            "bob": True,
            "carol": True,
        }


async def test_a_restart_does_not_announce_known_agents_again(hive_root: Path) -> None:
    cfg = no_login_key(hive_root)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_stopped(hive, events, "alice")
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_stopped(hive, events, "bob")
        assert await login_events(hive) == [("needs_login", "alice"), ("needs_login", "bob")]
