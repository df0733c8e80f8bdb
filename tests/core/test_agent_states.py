"""The agent state table (SPEC §4.4): every change goes through `Registry.move`, which refuses a
move the table does not allow, and only core/agents.py writes a record's fields."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hyperhive.core.agents import TRANSITIONS, Registry
from hyperhive.core.broker import EventHub
from hyperhive.core.store import open_store
from hyperhive.protocol.errors import Internal

CORE = Path(__file__).resolve().parents[2] / "src" / "hyperhive" / "core"
RECORD_FIELDS = {
    "state",
    "desired",
    "destroyed_at",
    "pid",
    "restarts",
    "last_error",
    "limits_note",
    "built_rev",
    "port_conflict",
    "network",
}


async def test_moves_follow_the_table(tmp_path: Path) -> None:
    async with open_store(str(tmp_path / "hive.sqlite")) as store:
        hub = EventHub()
        registry = Registry(store, hub, ui_port_base=8000, backend="scripted")
        rec = await registry.add("alice", "agent")
        with pytest.raises(Internal, match="from stopped to running"):
            registry.move(rec, "running")
        with pytest.raises(Internal, match="from stopped to crashed"):
            registry.move(rec, "crashed")
        registry.move(rec, "spawning")
        registry.move(rec, "starting")
        registry.move(rec, "running", pid=42)
        assert (rec.state, rec.pid) == ("running", 42)
        with pytest.raises(Internal, match="from running to spawning"):
            registry.move(rec, "spawning")
        registry.move(rec, "crashed", pid=None)
        await registry.bury(rec, "gone")
        assert (rec.state, rec.desired, rec.last_error) == ("destroyed", "stopped", "gone")
        assert rec.destroyed_at is not None
        for state in TRANSITIONS:
            if state != "destroyed":
                with pytest.raises(Internal, match="from destroyed"):
                    registry.move(rec, state)
        # Only reviving leaves a tombstone.
        assert await registry.add("alice", "agent") is rec
        assert rec.destroyed_at is None
        assert (rec.state, rec.desired) == ("stopped", "running")
        with pytest.raises(Internal, match="not an observation"):
            registry.note(rec, state="running")


def test_only_the_registry_writes_an_agent_record() -> None:
    """`rec.state = ...` (or any record field) outside core/agents.py would bypass the table."""
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path.name == "agents.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if (
                        isinstance(sub, ast.Attribute)
                        and sub.attr in RECORD_FIELDS
                        and not (isinstance(sub.value, ast.Name) and sub.value.id == "self")
                    ):
                        offenders.append(f"{path.relative_to(CORE)}:{sub.lineno} .{sub.attr}")
    assert offenders == []
