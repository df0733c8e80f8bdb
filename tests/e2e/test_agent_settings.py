"""agent.toml's effort, Bash allow rules and plugins reach a real harness and its claude."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import trio

from hyperhive.protocol import wire
from tests.conftest import needs_bwrap
from tests.hive import hive_config, open_hive, subscription, wait_for_event

pytestmark = needs_bwrap


def _harness(container_pid: int) -> int:
    """The harness's python (`hyperhive.agent serve`) among the container's processes."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            group = os.getpgid(int(entry))
        except OSError:
            continue
        if group == container_pid and cmdline[1:4] == [b"-m", b"hyperhive.agent", b"serve"]:
            return int(entry)
    raise AssertionError("no harness process")


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
        harness = _harness(thinking.agent.pid)
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
