"""End to end: a real daemon, a bubblewrap container, the real claude CLI, the scripted model."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from hyperhive.protocol import wire
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import hive_config, open_hive, sent_to, subscription, wait_for_event

pytestmark = [needs_bwrap, needs_claude]


def _history_kinds(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [k for (k,) in conn.execute("SELECT kind FROM events ORDER BY id")]


def _stream_types(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload_json FROM events WHERE kind = 'stream' ORDER BY id")
        return [msgspec.json.decode(p)["data"]["type"] for (p,) in rows]


async def test_operator_message_answered_by_agent_through_mcp(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        spawned = await hive.call(wire.Spawn(name="alice"))
        assert spawned.agent.name == "alice"
        # The spawn kick is the first turn; answer it, then talk to alice.
        sent = await hive.call(wire.OperatorSend(to="alice", body="hello alice"))
        event = await wait_for_event(
            events,
            lambda e: (
                sent_to("operator")(e)
                and isinstance(e, wire.MessageSent)
                and "hello alice" in e.message.body
            ),
        )
        assert isinstance(event, wire.MessageSent)
        assert event.message.sender == "alice"
        assert event.message.body == "alice here. You said: hello alice"

        # The harness acknowledges the message once the turn that consumed it completed.
        await wait_for_event(
            events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == sent.ids[0]
        )
        inbox = await hive.call(wire.HostRecent(name="operator", limit=10))
        assert [m.sender for m in inbox.messages] == ["alice"]

        # alice's own history shows the turn: start, claude's stream-json events, end.
        db = cfg.agent_root("alice") / "state" / "hyperhive-events.sqlite"
        kinds = _history_kinds(db)
        assert "turn_start" in kinds and "turn_end" in kinds
        types = _stream_types(db)
        assert types[0] == "system" and "assistant" in types and types[-1] == "result"
        assert "user" in types  # the tool_result of the MCP send

        # Both turns (the spawn kick, then hello) are reported to the daemon with what claude
        # said they took, for `list` and `stats`.
        def two_turns(e: wire.HiveEvent) -> bool:
            return isinstance(e, wire.AgentChanged) and e.agent.name == "alice"

        while True:
            [stats] = (await hive.call(wire.Stats(name="alice"))).agents
            [info] = (await hive.call(wire.ListAgents())).agents
            if stats.total.turns >= 2 and info.turn_state == "idle":
                break
            await wait_for_event(events, two_turns)
        assert stats.last_turn is not None and stats.last_turn.outcome == "ok"
        assert stats.last_turn.message_id == sent.ids[0]
        assert stats.total.input_tokens > 0 and stats.total.output_tokens > 0
        assert stats.today.turns == stats.total.turns
        assert info.last_turn_at == stats.last_turn.ended_at
