"""The agent's controls and failure paths on the real harness, in real containers with the real
claude CLI and the scripted model: the model switch, a fresh session, cancel, a silent claude,
API refusals, nack and requeue."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from hyperhive.core.config import DaemonConfig
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import Hive, hive_config, open_hive, subscription, wait_for_event
from tests.web.pages import HttpReader, json_of, login, open_http, open_post, take_ticket

pytestmark = [needs_bwrap, needs_claude]

GUARD = 60.0
"""A safety net only: every wait below is on an event or a state."""


# --------------------------------------------------------------------------- helpers


@dataclass
class Turn:
    """One turn as alice's own history has it."""

    body: str
    message_id: int
    attempt: int
    redelivery: bool
    model: str = ""
    session_id: str = ""
    ok: bool | None = None
    note: str = ""
    notes: list[str] = field(default_factory=list)


def turns(cfg: DaemonConfig, name: str = "alice") -> list[Turn]:
    db = cfg.agent_root(name) / "state" / "hyperhive-events.sqlite"
    found: list[Turn] = []
    with sqlite3.connect(db) as conn:
        for kind, payload in conn.execute("SELECT kind, payload_json FROM events ORDER BY id"):
            event = msgspec.json.decode(payload)
            if kind == "turn_start":
                found.append(
                    Turn(event["body"], event["message_id"], event["attempt"], event["redelivery"])
                )
            elif not found:
                continue
            elif kind == "stream" and event["data"].get("subtype") == "init":
                found[-1].model = event["data"]["model"]
                found[-1].session_id = event["data"]["session_id"]
            elif kind == "note":
                found[-1].notes.append(event["text"])
            elif kind == "turn_end":
                found[-1].ok, found[-1].note = event["ok"], event["note"]
    return found


def turns_on(cfg: DaemonConfig, mid: int) -> list[Turn]:
    return [t for t in turns(cfg) if t.message_id == mid]


def message_row(cfg: DaemonConfig, mid: int) -> tuple[str, int, int]:
    """(state, attempts, uncounted) of a message in the broker."""
    with sqlite3.connect(cfg.db_path) as conn:
        state, attempts, uncounted = conn.execute(
            "SELECT state, attempts, uncounted FROM messages WHERE id = ?", (mid,)
        ).fetchone()
    return str(state), int(attempts), int(uncounted)


def sessions(cfg: DaemonConfig) -> list[Path]:
    return sorted((cfg.agent_root("alice") / "claude" / "projects").rglob("*.jsonl"))


def delivered(mid: int) -> Any:
    return lambda e: isinstance(e, wire.MessageDelivered) and e.id == mid


def leased(mid: int, attempt: int) -> Any:
    return lambda e: isinstance(e, wire.MessageLeased) and e.id == mid and e.attempt == attempt


def answered(text: str) -> Any:
    return lambda e: (
        isinstance(e, wire.MessageSent)
        and e.message.sender == "alice"
        and e.message.to == "operator"
        and e.message.body == f"alice here. You said: {text}"
    )


async def spawn_idle(hive: Hive, events: Client) -> int:
    """Spawn alice and wait until her start-up turn is done; the kick's id."""
    await hive.call(wire.Spawn(name="alice"))
    kick = await wait_for_event(
        events, lambda e: isinstance(e, wire.MessageSent) and e.message.to == "alice"
    )
    assert isinstance(kick, wire.MessageSent)
    await wait_for_event(events, delivered(kick.message.id))
    return kick.message.id


async def talk(hive: Hive, events: Client, body: str) -> int:
    """Send alice `body`; its id once the turn on it was acked."""
    sent = await hive.call(wire.OperatorSend(to="alice", body=body))
    await wait_for_event(events, delivered(sent.ids[0]))
    return sent.ids[0]


async def stats_of_turns(hive: Hive, events: Client, count: int) -> wire.AgentStats:
    """alice's stats once the daemon has `count` of her turn records (they come on their own
    connection, a little after the turn)."""
    while True:
        [stats] = (await hive.call(wire.Stats(name="alice"))).agents
        if stats.total.turns >= count:
            return stats
        await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.name == "alice"
        )


@dataclass
class Page:
    """alice's own page, driven like the browser does (her login token, the page's CSRF)."""

    port: int
    token: str

    async def post(self, path: str, data: object) -> Any:
        async with open_post(self.port, path, data, headers=login(self.token)) as resp:
            body = await resp.read_body()
            assert resp.status == 200, body
            return json_of(body)

    @asynccontextmanager
    async def live(self) -> AsyncIterator[HttpReader]:
        """The page's live event stream, from now on."""
        ticket = await take_ticket(self.port, self.token, "/events/stream")
        async with open_http(self.port, f"/events/stream?ticket={ticket}") as stream:
            yield stream


async def open_page(hive: Hive) -> Page:
    (alice,) = (await hive.call(wire.ListAgents())).agents
    token = (await call_once(hive.agent_sock("alice"), wire.FetchUiToken())).token
    return Page(alice.port, token)


async def next_live(stream: HttpReader, kind: str, **match: object) -> Any:
    """The next live event of `kind` whose fields (or, for `stream`, claude's) match."""
    while True:
        event = await stream.event()
        if event["kind"] != kind:
            continue
        fields = event["data"] if kind == "stream" else event
        if all(fields.get(k) == v for k, v in match.items()):
            return event


# --------------------------------------------------------------------------- 1. /model


async def test_a_model_switch_survives_a_harness_restart(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_idle(hive, events)
        page = await open_page(hive)
        with trio.fail_after(GUARD):
            assert (await page.post("/api/model", {"model": "sonnet"}))["model"] == "sonnet"
        await hive.call(wire.Restart(name="alice"))
        kick = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "alice"
                and e.message.body.startswith("Restarted.")
            ),
        )
        assert isinstance(kick, wire.MessageSent)
        await wait_for_event(events, delivered(kick.message.id))
        mid = await talk(hive, events, "which model?")
        stats = await stats_of_turns(hive, events, 3)
    assert (cfg.agent_root("alice") / "state" / "hyperhive-model").read_text() == "sonnet\n"
    seen = turns(cfg)
    assert "haiku" in seen[0].model  # the start-up turn, before the switch
    restarted = turns_on(cfg, kick.message.id)[0]
    assert "sonnet" in restarted.model and "sonnet" in turns_on(cfg, mid)[0].model
    assert any("harness up (model sonnet)" in n for t in seen for n in t.notes)
    # The restarted harness continued the same claude session with the new model.
    assert restarted.session_id == seen[0].session_id and len(sessions(cfg)) == 1
    assert stats.last_turn is not None and stats.last_turn.model == "sonnet"


# --------------------------------------------------------------------------- 2. /new-session


async def test_a_new_session_is_fresh_once_and_then_continued(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_idle(hive, events)
        one = await talk(hive, events, "one")
        page = await open_page(hive)
        with trio.fail_after(GUARD):
            await page.post("/api/new-session", {})
        two = await talk(hive, events, "two")
        three = await talk(hive, events, "three")
    (first,) = turns_on(cfg, one)
    (fresh,) = turns_on(cfg, two)
    (after,) = turns_on(cfg, three)
    assert turns(cfg)[0].session_id == first.session_id
    assert fresh.session_id and fresh.session_id != first.session_id
    assert after.session_id == fresh.session_id
    assert [p.stem for p in sessions(cfg)] == sorted([first.session_id, fresh.session_id])
    assert all(t.ok for t in turns(cfg))


# --------------------------------------------------------------------------- 3. cancel


async def test_cancel_mid_turn_consumes_the_message_and_keeps_the_session(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_idle(hive, events)
        page = await open_page(hive)
        with trio.fail_after(GUARD):
            async with page.live() as live:
                # The scripted model answers this one after 60 s: claude waits on it.
                sent = await hive.call(wire.OperatorSend(to="alice", body="!sleep 60\nslow"))
                mid = sent.ids[0]
                await next_live(live, "turn_start", message_id=mid)
                await next_live(live, "stream", type="system", subtype="init")
                assert (await page.post("/api/cancel", {})) == {"ok": True, "cancelled": True}
                end = await next_live(live, "turn_end")
                assert end["ok"] is False and end["note"] == "turn cancelled"
                assert (await next_live(live, "state"))["state"] == "idle"
        # An operator's cancel is a decision, not a failure: the message is consumed.
        await wait_for_event(events, delivered(mid))
        after = await talk(hive, events, "still there?")
        operator = await hive.call(wire.HostRecent(name="operator", limit=10))
        assert await page.post("/api/cancel", {}) == {"ok": True, "cancelled": False}
    assert message_row(cfg, mid) == ("delivered", 1, 0)
    assert [m.body for m in operator.messages] == ["alice here. You said: still there?"]
    (cancelled,) = turns_on(cfg, mid)
    # SIGINT to claude's process group: claude flushes its session and exits by itself.
    assert "claude stopped by SIGINT (exit status 0)" in cancelled.notes
    # The next turn continued the very same session (--continue), and it was not broken.
    (resumed,) = turns_on(cfg, after)
    assert resumed.ok and resumed.session_id == cancelled.session_id == turns(cfg)[0].session_id
    assert len(sessions(cfg)) == 1


# --------------------------------------------------------------------------- 4. silence


async def test_a_silent_claude_is_abandoned_and_its_message_redelivered(
    hive_root: Path,
) -> None:
    """claude waits for its MCP servers before it prints anything; one that never answers
    keeps it silent. After HIVE_FIRST_EVENT_TIMEOUT the turn is given up, claude's process
    group stopped, and the message comes back as the next attempt, a redelivery."""
    cfg = hive_config(hive_root, demo=True, claude_env={"HIVE_FIRST_EVENT_TIMEOUT": "2"})
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text(
        '[extra_mcp_servers.mute]\ncommand = "sleep"\nargs = ["600"]\n'
    )
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        kick = await wait_for_event(
            events, lambda e: isinstance(e, wire.MessageSent) and e.message.to == "alice"
        )
        assert isinstance(kick, wire.MessageSent)
        mid = kick.message.id
        await wait_for_event(events, leased(mid, 1))
        await wait_for_event(events, leased(mid, 2))
        state, attempts, uncounted = message_row(cfg, mid)
        assert (state, attempts, uncounted) == ("leased", 2, 0)
        stats = await stats_of_turns(hive, events, 1)
    first = turns_on(cfg, mid)[0]
    assert (first.attempt, first.redelivery, first.ok) == (1, False, False)
    assert first.note == "claude was silent for 2s; turn abandoned"
    assert first.model == ""  # claude never printed its init event
    assert any(n.startswith("claude stopped by SIG") for n in first.notes)
    second = turns_on(cfg, mid)[1]
    assert (second.attempt, second.redelivery) == (2, True)
    assert stats.last_turn is not None and stats.last_turn.outcome == "abandoned"


# --------------------------------------------------------------------------- 5. API refusals


@pytest.mark.parametrize(
    ("status", "shown"), [(429, "rate_limited"), (529, "rate_limited"), (401, "needs_login")]
)
async def test_an_api_refusal_is_retried_uncounted_and_shown(
    hive_root: Path, status: int, shown: str
) -> None:
    # claude retries a 529 itself (even told not to); once is enough here.
    cfg = hive_config(hive_root, demo=True, claude_env={"CLAUDE_CODE_MAX_RETRIES": "1"})
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_idle(hive, events)
        sent = await hive.call(
            wire.OperatorSend(to="alice", body=f"!error {status} until 2\nhello")
        )
        mid = sent.ids[0]
        changed = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged)
                and e.agent.name == "alice"
                and e.agent.turn_state == shown
            ),
        )
        assert isinstance(changed, wire.AgentChanged)
        # The harness waits (backs off) in that state before it takes the message again.
        (alice,) = (await hive.call(wire.ListAgents())).agents
        assert alice.turn_state == shown
        lease = await wait_for_event(events, leased(mid, 2))
        assert isinstance(lease, wire.MessageLeased)
        await wait_for_event(events, answered("hello"))
        await wait_for_event(events, delivered(mid))
        assert (await hive.call(wire.DeadLetters())).messages == []
    # Taken twice, neither failure counted towards the dead letters.
    assert message_row(cfg, mid) == ("delivered", 2, 1)
    failed, retried = turns_on(cfg, mid)
    assert (failed.attempt, failed.redelivery, failed.ok) == (1, False, False)
    assert (retried.attempt, retried.redelivery, retried.ok) == (2, True, True)
    assert f"{status}" in failed.note
    assert retried.session_id == failed.session_id  # the session survived the refusal


# --------------------------------------------------------------------------- 6. nack, requeue


async def test_a_failed_turn_is_redelivered_and_a_requeued_dead_letter_answered(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root, demo=True, max_attempts=2)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await spawn_idle(hive, events)
        # A counted failure (the API rejects the request): nacked, then redelivered.
        first = await talk(hive, events, "!error 400 until 2\nfirst")
        assert message_row(cfg, first) == ("delivered", 2, 0)

        # Two counted failures: dead-lettered; requeued, it is delivered again and answered.
        sent = await hive.call(wire.OperatorSend(to="alice", body="!error 400 until 3\nsecond"))
        mid = sent.ids[0]
        notice = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "operator"
                and e.message.sender == "system"
                and f"#{mid}" in e.message.body
            ),
        )
        assert isinstance(notice, wire.MessageSent) and "dead-lettered" in notice.message.body
        dead = await hive.call(wire.DeadLetters())
        assert [(m.id, m.state) for m in dead.messages] == [(mid, "dead")]
        await hive.call(wire.Requeue(id=mid))
        await wait_for_event(events, leased(mid, 3))
        await wait_for_event(events, answered("second"))
        await wait_for_event(events, delivered(mid))
        assert (await hive.call(wire.DeadLetters())).messages == []
    # The requeue gave it a new round: its two failures no longer count.
    assert message_row(cfg, mid) == ("delivered", 3, 2)
    seen = [(t.attempt, t.redelivery, t.ok) for t in turns_on(cfg, first)]
    assert seen == [(1, False, False), (2, True, True)]
    seen = [(t.attempt, t.redelivery, t.ok) for t in turns_on(cfg, mid)]
    assert seen == [(1, False, False), (2, True, False), (3, True, True)]
    # The wake prompt told claude each time it was a redelivery.
    (session,) = sessions(cfg)
    transcript = session.read_text().replace('\\"', '"')  # JSON lines: unescape quotes
    assert 'attempt="3" redelivery="true"' in transcript
    assert "This is a redelivery, attempt 3" in transcript
