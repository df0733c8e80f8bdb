"""Attention states (SPEC §4.4): derived by the daemon, one per agent, in `list` and events."""

from __future__ import annotations

import time
from pathlib import Path

from hyperhive.core.agents import STALL_SECONDS, AgentRecord, attention_of
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from tests.conftest import needs_bwrap
from tests.hive import hive_config, open_hive, subscription, wait_for_event


def _rec(**fields: object) -> AgentRecord:
    rec = AgentRecord(name="alice", role="agent", port=8100, created_at=0.0, state="running")
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


def test_the_first_state_that_holds_wins() -> None:
    now = time.time()
    old = now - STALL_SECONDS - 1
    cases: list[tuple[dict[str, object], int, bool, str]] = [
        ({"state": "crashed", "last_error": "exit 1"}, 0, False, "crash_looping"),
        ({"state": "stopped"}, 3, True, "stopped"),
        ({"turn_state": "idle", "turn_since": now}, 0, True, "needs_login"),
        ({"turn_state": "rate_limited", "turn_since": now}, 0, False, "rate_limited"),
        ({"turn_state": "compacting", "turn_since": now}, 0, False, "compacting"),
        (
            {"turn_state": "thinking", "waiting_on": ("bob", "operator")},
            0,
            False,
            "waiting_on_operator",
        ),
        ({"turn_state": "thinking", "waiting_on": ("bob",)}, 0, False, "waiting_on_agent"),
        ({"turn_state": "thinking", "turn_since": old}, 0, False, "stalled"),
        ({"turn_state": "idle", "turn_since": old}, 2, False, "stalled"),
        ({"turn_state": "idle", "turn_since": old}, 0, False, "idle"),
        ({"turn_state": "thinking", "turn_since": now}, 0, False, "working"),
    ]
    for fields, unread, needs_login, expected in cases:
        state, _, _ = attention_of(_rec(**fields), unread, needs_login, now)
        assert state == expected, (fields, unread, needs_login)
    _, _, detail = attention_of(_rec(turn_state="idle", waiting_on=("bob",)), 0, False, now)
    assert detail == "bob"


def _attention(name: str, state: str) -> object:
    def check(e: wire.HiveEvent) -> bool:
        return (
            isinstance(e, wire.AgentChanged) and e.agent.name == name and e.agent.attention == state
        )

    return check


@needs_bwrap
async def test_questions_make_an_agent_wait_and_answers_release_it(hive_root: Path) -> None:
    async with (
        open_hive(hive_config(hive_root, demo=True)) as hive,
        subscription(hive.sock) as events,
    ):
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Spawn(name="bob"))
        await wait_for_event(events, _attention("alice", "idle"))  # type: ignore[arg-type]
        sock = hive.agent_sock("alice")
        asked = await call_once(sock, wire.Ask(question="Ship it?", options=["yes", "no"]))
        waiting = await wait_for_event(
            events,
            _attention("alice", "waiting_on_operator"),  # type: ignore[arg-type]
        )
        assert isinstance(waiting, wire.AgentChanged)
        assert waiting.agent.attention_detail == "operator"
        assert waiting.agent.attention_since is not None
        [listed] = [a for a in (await hive.call(wire.ListAgents())).agents if a.name == "alice"]
        assert listed.attention == "waiting_on_operator"

        await call_once(sock, wire.Ask(question="Which branch?", to="bob"))
        await hive.call(wire.HostAnswer(id=asked.id, answer="yes"))
        peer = await wait_for_event(
            events,
            _attention("alice", "waiting_on_agent"),  # type: ignore[arg-type]
        )
        assert isinstance(peer, wire.AgentChanged) and peer.agent.attention_detail == "bob"

        await hive.call(wire.Kill(name="alice"))
        await wait_for_event(events, _attention("alice", "stopped"))  # type: ignore[arg-type]
