"""Compaction of a full claude context, in real containers with the real claude CLI and the
scripted model given a context limit: reactive, at the watermark, and forced by the operator."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import trio

from hyperhive.core.config import DaemonConfig
from hyperhive.demo.model import serve_model
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import Hive, hive_config, open_hive, subscription, wait_for_event
from tests.web.pages import json_of, login, open_http, open_post, take_ticket

pytestmark = [needs_bwrap, needs_claude]


@asynccontextmanager
async def open_limited_hive(
    root: Path, *, context_limit: int | None, compact_at: int | None = None
) -> AsyncIterator[Hive]:
    """A hive whose model answers "prompt is too long" beyond `context_limit` tokens, with
    alice's agent.toml (applied) setting `[context] compact_at_tokens`."""
    async with trio.open_nursery() as nursery:
        model_url = await nursery.start(partial(serve_model, port=0, context_limit=context_limit))
        cfg = hive_config(
            root,
            max_attempts=2,
            claude_env={"ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": "sk-ant-test"},
        )
        if compact_at is not None:
            applied = cfg.state_dir / "applied" / "alice"
            applied.mkdir(parents=True)
            (applied / "agent.toml").write_text(f"[context]\ncompact_at_tokens = {compact_at}\n")
        async with open_hive(cfg) as hive:
            yield hive
        nursery.cancel_scope.cancel()


@dataclass(frozen=True)
class Step:
    kind: str
    tokens: int | None = None
    trigger: str = ""
    ok: bool = True
    before: int | None = None
    after: int | None = None
    text: str = ""


def history(cfg: DaemonConfig) -> list[Step]:
    """alice's turns as her history has them: turn starts, model replies with their context
    size, compactions with theirs, turn ends."""
    db = cfg.agent_root("alice") / "state" / "hyperhive-events.sqlite"
    steps: list[Step] = []
    with sqlite3.connect(db) as conn:
        for kind, payload in conn.execute("SELECT kind, payload_json FROM events ORDER BY id"):
            event = msgspec.json.decode(payload)
            if kind == "turn_start":
                steps.append(Step("turn", text=event["body"][:40]))
            elif kind == "turn_end":
                steps.append(Step("end", ok=event["ok"], text=event["note"]))
            elif kind == "compacted":
                steps.append(
                    Step(
                        "compacted",
                        trigger=event["trigger"],
                        ok=event["ok"],
                        before=event["tokens_before"],
                        after=event["tokens_after"],
                    )
                )
            elif kind == "stream" and event["data"]["type"] == "assistant":
                usage = event["data"]["message"].get("usage") or {}
                tokens = sum(
                    usage.get(k, 0)
                    for k in (
                        "input_tokens",
                        "cache_creation_input_tokens",
                        "cache_read_input_tokens",
                    )
                )
                if tokens:
                    steps.append(Step("reply", tokens=tokens))
    return steps


async def spawn_idle(hive: Hive, events: Client) -> None:
    await hive.call(wire.Spawn(name="alice"))
    kick = await wait_for_event(
        events, lambda e: isinstance(e, wire.MessageSent) and e.message.to == "alice"
    )
    assert isinstance(kick, wire.MessageSent)
    await wait_for_event(
        events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == kick.message.id
    )


async def talk(hive: Hive, events: Client, body: str) -> int:
    """Send alice `body`; return its id once her answer is out and the message delivered."""
    sent = await hive.call(wire.OperatorSend(to="alice", body=body))
    mid = sent.ids[0]
    await wait_for_event(events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == mid)
    return mid


PAD = "x" * 3000
"""Each message of this size (echoed back by alice) grows her context by about 1,600 tokens,
from about 1,900 after the start-up turn; the scripted model counts bytes / 4."""


def show(steps: list[Step]) -> None:
    """The measurements, for `pytest -s`: context sizes per reply and per compaction."""
    for step in steps:
        print(step)


def compactions(steps: list[Step]) -> list[Step]:
    return [s for s in steps if s.kind == "compacted"]


async def no_message_failed(hive: Hive, mids: list[int]) -> None:
    assert (await hive.call(wire.DeadLetters())).messages == []
    with sqlite3.connect(hive.cfg.db_path) as conn:
        for mid in mids:
            state, attempts = conn.execute(
                "SELECT state, attempts FROM messages WHERE id = ?", (mid,)
            ).fetchone()
            assert (state, attempts) == ("delivered", 1), mid


async def test_a_full_context_is_compacted_and_the_turn_retried(hive_root: Path) -> None:
    async with (
        open_limited_hive(hive_root, context_limit=5500) as hive,
        subscription(hive.sock) as events,
    ):
        await spawn_idle(hive, events)
        mids = [await talk(hive, events, f"message {n} {PAD}") for n in range(5)]
        await no_message_failed(hive, mids)
        operator = await hive.call(wire.HostRecent(name="operator", limit=10))
    steps = history(hive.cfg)
    show(steps)
    answers = [m.body.split(" " + PAD)[0] for m in operator.messages]
    # A turn that overflowed after its send runs again (told so), and the scripted model,
    # which does not read that note, sends again: every message is answered, some twice.
    assert sorted(set(answers)) == [f"alice here. You said: message {n}" for n in range(5)]
    done = compactions(steps)
    assert done and all(c.trigger == "reactive" and c.ok for c in done)
    for c in done:
        assert c.before is not None and c.after is not None and c.after < c.before
    # Each turn that overflowed was compacted, retried once and succeeded: every turn ended ok.
    assert [s.ok for s in steps if s.kind == "end"] == [True] * 6
    assert max(s.tokens or 0 for s in steps) <= 5500


async def test_above_the_watermark_a_checkpoint_then_compaction(hive_root: Path) -> None:
    async with (
        open_limited_hive(hive_root, context_limit=None, compact_at=4000) as hive,
        subscription(hive.sock) as events,
    ):
        await spawn_idle(hive, events)
        mids = [await talk(hive, events, f"message {n} {PAD}") for n in range(4)]
        await no_message_failed(hive, mids)
    notes = (hive.cfg.agent_root("alice") / "state" / "notes.md").read_text()
    assert "- checkpoint: handled" in notes
    steps = history(hive.cfg)
    show(steps)
    done = compactions(steps)
    assert done and all(c.trigger == "watermark" and c.ok for c in done)
    for c in done:
        assert c.before is not None and c.after is not None and c.after < c.before
        # It ran between turns: right after a turn's end, before the next turn's start.
        at = steps.index(c)
        assert [s.kind for s in steps[at + 1 : at + 2]] == ["turn"]
        previous = [s.kind for s in steps[:at] if s.kind in ("turn", "end")]
        assert previous[-1] == "end"
    # Nothing ever got near the window: no reply's context was far above the watermark.
    assert max(s.tokens or 0 for s in steps) < 4000 + 2 * 1700


async def test_the_operator_forces_a_compaction_from_the_agent_page(hive_root: Path) -> None:
    async with (
        open_limited_hive(hive_root, context_limit=None) as hive,
        subscription(hive.sock) as events,
    ):
        await spawn_idle(hive, events)
        mids = [await talk(hive, events, f"message {n} {PAD}") for n in range(2)]
        (alice,) = (await hive.call(wire.ListAgents())).agents
        token = (await call_once(hive.agent_sock("alice"), wire.FetchUiToken())).token
        with trio.fail_after(60):
            ticket = await take_ticket(alice.port, token, "/events/stream")
            async with open_http(alice.port, f"/events/stream?ticket={ticket}") as stream:
                async with open_post(alice.port, "/api/compact", {}, headers=login(token)) as r:
                    assert r.status == 200
                seen: list[object] = []
                while True:
                    event = await stream.event()
                    if event["kind"] == "state":
                        seen.append(event["state"])
                        if event["state"] == "compacting":
                            # A message arriving meanwhile waits for the compaction.
                            sent = await hive.call(
                                wire.OperatorSend(to="alice", body="still there?")
                            )
                    if event["kind"] == "compacted":
                        seen.append(event["trigger"])
                        break
            async with open_http(alice.port, "/api/state", headers=login(token)) as resp:
                state = json_of(await resp.read_body())
        assert seen == ["compacting", "operator"]
        assert state["compact_at_tokens"] == 150_000 and state["context_tokens"] > 0
        mids.append(sent.ids[0])
        await wait_for_event(
            events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == sent.ids[0]
        )
        await no_message_failed(hive, mids)
        operator = await hive.call(wire.HostRecent(name="operator", limit=10))
    assert operator.messages[-1].body == "alice here. You said: still there?"
    steps = history(hive.cfg)
    show(steps)
    (forced,) = compactions(steps)
    assert forced.ok and forced.before is not None and forced.after is not None
    assert forced.after < forced.before
    assert [s.kind for s in steps[steps.index(forced) + 1 :]][:1] == ["turn"]
    assert steps[steps.index(forced) + 1].text == "still there?"


async def test_a_context_that_cannot_be_compacted_hands_over_to_a_fresh_session(
    hive_root: Path,
) -> None:
    async with (
        open_limited_hive(hive_root, context_limit=5500) as hive,
        subscription(hive.sock) as events,
    ):
        await spawn_idle(hive, events)
        notes = hive.cfg.agent_root("alice") / "state" / "notes.md"
        notes.write_text("- working on the compaction test\n")
        # The model refuses to summarise a conversation holding this message's `!nocompact`
        # (claude summarises the older part and keeps the newest messages as they are).
        mids = [
            await talk(hive, events, f"!nocompact\nmessage 0 {PAD}"),
            await talk(hive, events, f"message 1 {PAD}"),
        ]
        # Too long: the compaction fails, a fresh session takes the message over; and stays.
        mids.append(await talk(hive, events, f"message 2 {PAD}"))
        mids.append(await talk(hive, events, f"message 3 {PAD}"))
        await no_message_failed(hive, mids)
        operator = await hive.call(wire.HostRecent(name="operator", limit=10))
    steps = history(hive.cfg)
    show(steps)
    answers = [m.body.split(" " + PAD)[0] for m in operator.messages]
    assert answers == [f"alice here. You said: message {n}" for n in range(4)]
    (failed,) = compactions(steps)
    assert failed.trigger == "reactive" and not failed.ok
    # The fresh session's first reply is small again.
    after = steps[steps.index(failed) + 1 :]
    first = next(s for s in after if s.kind == "reply")
    assert failed.before is not None and first.tokens is not None
    assert first.tokens < failed.before
    assert [s.ok for s in steps if s.kind == "end"] == [True] * 5
    # Its first prompt was the handoff: the message, then the agent's notes.
    sessions = hive.cfg.agent_root("alice") / "claude" / "projects"
    transcripts = [p.read_text() for p in sessions.rglob("*.jsonl")]
    assert len(transcripts) == 2
    handoff = [t for t in transcripts if "<hive-handoff/>" in t]
    assert len(handoff) == 1 and "working on the compaction test" in handoff[0]


async def test_a_compaction_the_api_fails_keeps_the_session_and_counts_nothing(
    hive_root: Path,
) -> None:
    """A server error during the compaction is not the message's fault: it goes back uncounted
    (leased again as the next attempt, a redelivery, but no failure counted towards the dead
    letters), and no fresh session is started."""
    async with (
        open_limited_hive(hive_root, context_limit=5500) as hive,
        subscription(hive.sock) as events,
    ):
        await spawn_idle(hive, events)
        await talk(hive, events, f"!nocompact 500\nmessage 0 {PAD}")
        await talk(hive, events, f"message 1 {PAD}")
        sent = await hive.call(wire.OperatorSend(to="alice", body=f"message 2 {PAD}"))
        mid = sent.ids[0]
        leases: list[int] = []
        while len(leases) < 2:
            lease = await wait_for_event(
                events, lambda e: isinstance(e, wire.MessageLeased) and e.id == mid
            )
            assert isinstance(lease, wire.MessageLeased)
            leases.append(lease.attempt)
        assert leases == [1, 2]
        with sqlite3.connect(hive.cfg.db_path) as conn:
            state, error, counted = conn.execute(
                "SELECT state, last_error, attempts - uncounted FROM messages WHERE id = ?",
                (mid,),
            ).fetchone()
        assert state == "leased" and error.startswith("compaction failed: ")
        assert counted == 1  # the lease it has now; the failed one did not count
    steps = history(hive.cfg)
    show(steps)
    failed = compactions(steps)[0]
    assert failed.trigger == "reactive" and not failed.ok
    sessions = hive.cfg.agent_root("alice") / "claude" / "projects"
    assert len(list(sessions.rglob("*.jsonl"))) == 1
