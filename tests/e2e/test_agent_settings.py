"""agent.toml's effort, Bash allow rules and plugins reach a real harness and its claude."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import trio

from hyperhive.protocol import wire
from tests.conftest import needs_bwrap
from tests.core.test_agent_config import harness_pid
from tests.hive import hive_config, open_hive, subscription, wait_for_event

pytestmark = needs_bwrap


def _notes(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload_json FROM events WHERE kind = 'note' ORDER BY id")
        return [json.loads(p)["text"] for (p,) in rows]


async def test_effort_bash_rules_and_plugins_reach_the_harness(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text(
        'effort = "high"\nallowed_bash_patterns = ["echo hi", "git status"]\n'
        'claude_plugins = ["no-such-plugin@nowhere"]\n'
    )
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        # Its first turn (the spawn kick) starts only after the plugins were dealt with.
        thinking = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged)
                and e.agent.name == "alice"
                and e.agent.turn_state == "thinking"
            ),
        )
        assert isinstance(thinking, wire.AgentChanged) and thinking.agent.pid is not None
        harness = harness_pid(thinking.agent.pid)
        written = trio.Path(f"/proc/{harness}/root/run/harness/claude-settings.json")
        settings = json.loads(await written.read_text())
        assert settings["effortLevel"] == "high"
        assert settings["permissions"]["allow"] == ["Bash(echo hi)", "Bash(git status)"]
        # A plugin that cannot be installed is reported, and the agent works on.
        notes = _notes(cfg.agent_root("alice") / "state" / "hyperhive-events.sqlite")
        assert any(n.startswith("plugin no-such-plugin@nowhere not installed") for n in notes)
        await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged)
                and e.agent.name == "alice"
                and e.agent.turn_state == "idle"
                and e.agent.last_turn_at is not None
            ),
        )
        [stats] = (await hive.call(wire.Stats(name="alice"))).agents
        assert stats.last_turn is not None and stats.last_turn.outcome == "ok"
