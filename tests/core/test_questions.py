"""Questions: queued at once, resolved exactly once by an answer, a cancel or the TTL watchdog."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.core import events
from hyperhive.core.broker import Broker
from hyperhive.core.questions import MAX_TTL, Questions, _resolve
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import BadParams, Conflict, Forbidden, NotFound
from tests.hive import Hive, hive_config, open_broker, open_hive

_event = msgspec.json.Decoder(events.QuestionAsked | events.QuestionAnswered)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Jump only after the loop idled for a while in real time: sqlite runs in a worker thread.
    return trio.testing.MockClock(autojump_threshold=0.05)


# --------------------------------------------------------------------------- over a real daemon


async def quiet_agents(hive: Hive, *names: str) -> None:
    """Spawn stopped agents (their sockets stay open) with their spawn notices read."""
    for name in names:
        await hive.call(wire.Spawn(name=name))
        await hive.call(wire.Kill(name=name))
        await call_once(hive.agent_sock(name), wire.Recv())


async def inbox_events(
    hive: Hive, name: str
) -> list[events.QuestionAsked | events.QuestionAnswered]:
    """Every question event queued for `name` (other messages are read and ignored)."""
    found: list[events.QuestionAsked | events.QuestionAnswered] = []
    while True:
        got = await call_once(hive.agent_sock(name), wire.Recv())
        if got.message is None:
            return found
        if got.message.sender == "system" and '"question_' in got.message.body:
            found.append(_event.decode(got.message.body))


async def answers(hive: Hive, name: str) -> list[events.QuestionAnswered]:
    found = await inbox_events(hive, name)
    assert all(isinstance(e, events.QuestionAnswered) for e in found), found
    return [e for e in found if isinstance(e, events.QuestionAnswered)]


async def ask(hive: Hive, name: str, request: wire.Ask) -> int:
    return (await call_once(hive.agent_sock(name), request)).id


async def test_operator_answer_reaches_the_asker_once(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await quiet_agents(hive, "alice")
        qid = await ask(
            hive, "alice", wire.Ask(question="Deploy now?", options=["yes", "no"], ttl_seconds=60)
        )
        pending = await hive.call(wire.ListQuestions())
        [q] = pending.questions
        assert (q.id, q.asker, q.target, q.options) == (qid, "alice", None, ["yes", "no"])
        assert q.deadline_at == pytest.approx(q.asked_at + 60)
        assert await inbox_events(hive, "alice") == []  # nothing until it is answered

        done = await hive.call(wire.HostAnswer(id=qid, answer="yes"))
        assert (done.question.answer, done.question.answerer) == ("yes", "operator")
        with pytest.raises(Conflict):
            await hive.call(wire.HostAnswer(id=qid, answer="no"))
        with pytest.raises(Conflict):
            await hive.call(wire.CancelQuestion(id=qid))
        assert await inbox_events(hive, "alice") == [
            events.QuestionAnswered(
                agent="alice", id=qid, question="Deploy now?", answer="yes", answerer="operator"
            )
        ]
        assert (await hive.call(wire.ListQuestions())).questions == []
        with pytest.raises(NotFound):
            await hive.call(wire.HostAnswer(id=qid + 100, answer="?"))


async def test_peer_question_only_the_target_may_answer(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await quiet_agents(hive, "alice", "bob", "carol")
        qid = await ask(hive, "alice", wire.Ask(question="Which port?", to="bob", multi=True))
        assert await inbox_events(hive, "bob") == [
            events.QuestionAsked(agent="alice", id=qid, question="Which port?", multi=True)
        ]
        for outsider in ("carol", "alice"):
            with pytest.raises(Forbidden):
                await call_once(hive.agent_sock(outsider), wire.Answer(id=qid, answer="80"))
        done = await call_once(hive.agent_sock("bob"), wire.Answer(id=qid, answer="8080"))
        assert (done.question.target, done.question.answerer) == ("bob", "bob")
        with pytest.raises(Conflict):
            await call_once(hive.agent_sock("bob"), wire.Answer(id=qid, answer="again"))
        [answered] = await answers(hive, "alice")
        assert answered == events.QuestionAnswered(
            agent="alice", id=qid, question="Which port?", answer="8080", answerer="bob"
        )

        # An operator question is not the agents' to answer; the operator may answer peers'.
        op = await ask(hive, "alice", wire.Ask(question="for the operator"))
        with pytest.raises(Forbidden):
            await call_once(hive.agent_sock("bob"), wire.Answer(id=op, answer="me"))
        peer = await ask(hive, "carol", wire.Ask(question="bob?", to="bob"))
        await hive.call(wire.HostAnswer(id=peer, answer="overridden"))
        [overridden] = await answers(hive, "carol")
        assert (overridden.answer, overridden.answerer) == ("overridden", "operator")

        with pytest.raises(BadParams):
            await ask(hive, "alice", wire.Ask(question="me?", to="alice"))
        with pytest.raises(NotFound):
            await ask(hive, "alice", wire.Ask(question="anyone?", to="nobody"))
        with pytest.raises(BadParams):
            await ask(hive, "alice", wire.Ask(question="   "))


async def test_cancel_resolves_as_cancelled(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await quiet_agents(hive, "alice", "bob")
        qid = await ask(hive, "alice", wire.Ask(question="still needed?", to="bob"))
        done = await hive.call(wire.CancelQuestion(id=qid))
        assert (done.question.answer, done.question.answerer) == ("[cancelled]", "operator")
        with pytest.raises(Conflict):
            await call_once(hive.agent_sock("bob"), wire.Answer(id=qid, answer="late"))
        [cancelled] = await answers(hive, "alice")
        assert (cancelled.answer, cancelled.answerer) == ("[cancelled]", "operator")


async def test_deadline_survives_a_daemon_restart(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await quiet_agents(hive, "alice")
        qid = await ask(hive, "alice", wire.Ask(question="quick?", ttl_seconds=0.5))
        await hive.stop()
    await trio.sleep(0.6)  # the deadline passes while no daemon runs
    async with open_hive(cfg) as hive:
        # The watchdog's first pass ran before the daemon reported ready.
        [expired] = await answers(hive, "alice")
        assert (expired.id, expired.answer, expired.answerer) == (qid, "[expired]", "ttl-watchdog")
        assert (await hive.call(wire.ListQuestions())).questions == []


# --------------------------------------------------------------------------- on virtual time


@asynccontextmanager
async def open_questions(db: Path) -> AsyncIterator[tuple[Questions, Broker]]:
    async with open_broker(db) as (store, broker, nursery):
        questions = Questions(store, broker, clock=trio.current_time)
        await nursery.start(questions.serve_ttl)
        yield questions, broker


async def next_answer(broker: Broker, inbox: str) -> events.QuestionAnswered:
    while True:
        msg = await broker.recv(inbox, 180, lease=False)
        if msg is not None:
            event = _event.decode(msg.body)
            assert isinstance(event, events.QuestionAnswered)
            return event


async def test_ttl_expires_on_time_and_a_new_earlier_deadline_wakes_the_watchdog(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_questions(hive_root / "q.sqlite") as (questions, broker):
        start = trio.current_time()
        late = await questions.ask("alice", "later", ttl_seconds=3600)
        soon = await questions.ask("alice", "sooner", ttl_seconds=10)
        first = await next_answer(broker, "alice")
        assert (first.id, first.answer, first.answerer) == (soon, "[expired]", "ttl-watchdog")
        assert 10 <= trio.current_time() - start < 11
        second = await next_answer(broker, "alice")
        assert (second.id, second.answer) == (late, "[expired]")
        assert 3600 <= trio.current_time() - start < 3601
        assert await questions.pending() == []
        assert await broker.recv("alice", 0, lease=False) is None


async def test_ttl_is_capped_at_six_hours(hive_root: Path, clock: trio.testing.MockClock) -> None:
    async with open_questions(hive_root / "q.sqlite") as (questions, broker):
        qid = await questions.ask("alice", "forever?", ttl_seconds=10**8)
        unset = await questions.ask("bob", "no ttl")
        deadlines = {q.id: q.deadline_at for q in await questions.pending()}
        for q in await questions.pending():
            assert q.deadline_at - q.asked_at == MAX_TTL == 21_600
        # Each expires at its own deadline, never before. (Against the deadlines the daemon
        # recorded, and without an upper bound: on a loaded machine the virtual clock may jump
        # on while a worker thread is busy; test_ttl_expires_on_time… checks punctuality.)
        for inbox, expected in (("alice", qid), ("bob", unset)):
            answer = await next_answer(broker, inbox)
            assert answer.id == expected and answer.answer == "[expired]"
            assert trio.current_time() >= deadlines[expected]


async def test_an_answer_before_the_deadline_wins_over_expiry(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_questions(hive_root / "q.sqlite") as (questions, broker):
        qid = await questions.ask("alice", "q", ttl_seconds=5)
        await questions.answer(qid, "fine")
        assert (await next_answer(broker, "alice")).answer == "fine"
        await trio.sleep(60)  # the old deadline passes: nothing more arrives
        assert await broker.recv("alice", 0, lease=False) is None


async def test_concurrent_answer_and_cancel_resolve_exactly_once(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_questions(hive_root / "q.sqlite") as (questions, broker):
        for round_ in range(20):
            qid = await questions.ask("alice", f"race {round_}", ttl_seconds=1)
            outcomes: list[str] = []

            async def attempt(name: str, qid: int = qid, outcomes: list[str] = outcomes) -> None:
                try:
                    if name == "cancel":
                        await questions.cancel(qid)
                    else:
                        await questions.answer(qid, name)
                    outcomes.append(name)
                except Conflict:
                    pass

            async with trio.open_nursery() as nursery:
                for name in ("answer", "cancel", "answer-2"):
                    nursery.start_soon(attempt, name)
                # The watchdog joins in: the deadline passes while they race.
                nursery.start_soon(trio.sleep, 1.5)
            event = await next_answer(broker, "alice")
            assert event.id == qid
            assert len(outcomes) <= 1
            if outcomes:
                assert event.answer == {"cancel": "[cancelled]"}.get(outcomes[0], outcomes[0])
            else:
                assert event.answer == "[expired]"
            assert await broker.recv("alice", 0, lease=False) is None


async def test_a_resolution_whose_event_a_crash_lost_is_sent_at_start(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    db = hive_root / "q.sqlite"
    async with open_questions(db) as (questions, _):
        qid = await questions.ask("alice", "q")
        # The daemon dies right after the resolving transaction, before the event is sent.
        await questions.store.run(_resolve, qid, "yes", "operator", None, trio.current_time())
    async with open_questions(db) as (_, broker):
        event = await next_answer(broker, "alice")
        assert (event.id, event.answer) == (qid, "yes")
        assert await broker.recv("alice", 0, lease=False) is None
    async with open_questions(db) as (_, broker):
        assert await broker.recv("alice", 0, lease=False) is None  # sent once is enough


async def test_text_the_broker_could_not_store_is_refused_up_front(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_questions(hive_root / "q.sqlite") as (questions, _):
        for bad in ("\ud800", "nul\x00", "x" * 9000):
            with pytest.raises(BadParams):
                await questions.ask("alice", bad)
        qid = await questions.ask("alice", "ok?", options=["yes"])
        with pytest.raises(BadParams):
            await questions.ask("alice", "ok?", options=["\ud800"])
        with pytest.raises(BadParams):
            await questions.answer(qid, "\ud800")
        assert [q.id for q in await questions.pending()] == [qid]


async def test_an_asker_destroyed_meanwhile_does_not_stop_the_watchdog(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_questions(hive_root / "q.sqlite") as (questions, broker):
        await questions.ask("ghost", "anyone?", ttl_seconds=5)
        await questions.ask("alice", "after the ghost", ttl_seconds=10)
        assert (await next_answer(broker, "alice")).answer == "[expired]"
        gone = await questions.ask("ghost", "operator?")
        await questions.answer(gone, "too late")  # resolved; the event has nowhere to go
        assert await questions.pending() == []
