"""The hub tells subscribers of every approval and question as it is queued and resolved."""

from __future__ import annotations

from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once
from hyperhive.protocol.names import MANAGER_NAME
from tests.conftest import needs_bwrap
from tests.core.test_approvals import git, propose
from tests.hive import hive_config, open_hive, subscription, wait_for_event

pytestmark = needs_bwrap


def approval_changed(e: wire.HiveEvent) -> bool:
    return isinstance(e, wire.ApprovalChanged)


def question_changed(e: wire.HiveEvent) -> bool:
    return isinstance(e, wire.QuestionChanged)


async def next_approval(events: Client) -> wire.ApprovalInfo:
    event = await wait_for_event(events, approval_changed)
    assert isinstance(event, wire.ApprovalChanged)
    return event.approval


async def next_question(events: Client) -> wire.QuestionInfo:
    event = await wait_for_event(events, question_changed)
    assert isinstance(event, wire.QuestionChanged)
    return event.question


async def test_approvals_and_questions_are_published(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root, start_manager=True)) as hive:
        await hive.call(wire.Kill(name=MANAGER_NAME))
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        manager = hive.agent_sock(MANAGER_NAME)
        proposed = hive.cfg.proposed_dir / "alice" / "config"
        sha = await propose(proposed, 'model = "sonnet"\n')
        async with subscription(hive.sock) as events:
            # An operator's spawn request, then its denial with a note.
            queued = await hive.call(wire.HostRequestSpawn(name="bob", description="builds things"))
            spawn = await next_approval(events)
            assert (spawn.id, spawn.kind, spawn.agent, spawn.status) == (
                queued.id,
                "spawn",
                "bob",
                "pending",
            )
            assert spawn.description == "builds things" and spawn.resolved_at is None
            await hive.call(wire.Deny(id=queued.id, note="not today"))
            denied = await next_approval(events)
            assert (denied.id, denied.status, denied.note) == (queued.id, "denied", "not today")
            assert denied.resolved_at is not None

            # The manager's proposal: the event names the pinned sha but carries no diff.
            proposal = await call_once(
                manager, wire.RequestApplyCommit(agent="alice", commit_ref=sha)
            )
            pending = await next_approval(events)
            assert (pending.id, pending.kind, pending.agent, pending.sha, pending.status) == (
                proposal.id,
                "apply_commit",
                "alice",
                sha,
                "pending",
            )
            assert pending.diff == ""
            listed = await hive.call(wire.Pending())
            assert '+model = "sonnet"' in listed.approvals[0].diff
            await hive.call(wire.Deny(id=proposal.id))
            assert (await next_approval(events)).status == "denied"
            applied = hive.cfg.state_dir / "applied" / "alice"
            assert f"denied/{proposal.id}" in await git(applied, "tag")

            # A question for the operator: asked, then answered.
            ask = wire.Ask(question="Which colour?", options=["red", "green"], multi=True)
            qid = (await call_once(manager, ask)).id
            asked = await next_question(events)
            assert (asked.id, asked.asker, asked.target, asked.question) == (
                qid,
                "manager",
                None,
                "Which colour?",
            )
            assert (asked.options, asked.multi, asked.answered_at) == (["red", "green"], True, None)
            await hive.call(wire.HostAnswer(id=qid, answer="green"))
            answered = await next_question(events)
            assert (answered.id, answered.answer, answered.answerer) == (qid, "green", "operator")
            assert answered.answered_at is not None

            # A cancel and the TTL watchdog resolve a question too, and say so.
            qid = (await call_once(manager, wire.Ask(question="still?"))).id
            assert (await next_question(events)).id == qid
            await hive.call(wire.CancelQuestion(id=qid))
            cancelled = await next_question(events)
            assert (cancelled.id, cancelled.answer) == (qid, "[cancelled]")
            short = wire.Ask(question="quick?", ttl_seconds=0.2)
            qid = (await call_once(manager, short)).id
            assert (await next_question(events)).id == qid
            with trio.fail_after(30):
                expired = await next_question(events)
            assert (expired.id, expired.answer, expired.answerer) == (
                qid,
                "[expired]",
                "ttl-watchdog",
            )
