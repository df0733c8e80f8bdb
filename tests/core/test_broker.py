"""The broker on its own: a real sqlite file under tmp_path, no sockets, no containers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.core import messages as m
from hyperhive.core.broker import Broker, EventHub, Resolver
from hyperhive.core.store import connect, open_store
from hyperhive.protocol import wire
from hyperhive.protocol.errors import NotFound
from hyperhive.protocol.names import BROADCAST, MANAGER, OPERATOR, SYSTEM
from tests.hive import open_broker, resolve_direct


@asynccontextmanager
async def open_unrecovered_broker(
    db: Path, resolve: Resolver = resolve_direct
) -> AsyncIterator[Broker]:
    """Like `open_broker`, but the test runs `recover()` itself (or not at all)."""
    async with open_store(str(db)) as store, trio.open_nursery() as nursery:
        broker = Broker(store, EventHub(), resolve)
        await nursery.start(broker.serve)
        yield broker
        nursery.cancel_scope.cancel()


async def lease(broker: Broker, recipient: str) -> wire.Message:
    msg = await broker.recv(recipient, None, lease=True)
    assert msg is not None, f"nothing queued for {recipient}"
    assert msg.state == "leased"
    return msg


async def test_send_then_a_leased_recv_then_ack_delivers_once(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        [sent] = await broker.send("alice", "bob", "hello", origin="alice")
        assert (sent.sender, sent.to, sent.body, sent.state) == ("alice", "bob", "hello", "queued")
        assert (sent.attempt, sent.redelivery, sent.broadcast) == (0, False, False)
        assert broker.queued("bob") == 1

        got = await lease(broker, "bob")
        assert (got.id, got.body, got.attempt, got.redelivery) == (sent.id, "hello", 1, False)
        assert await broker.counts("bob") == (0, 1)
        assert broker.queued("bob") == 0
        assert await broker.recv("bob", None, lease=True) is None  # leased is not queued

        assert await broker.ack("bob", got.id, got.attempt)
        assert await broker.counts("bob") == (0, 0)
        assert [m.state for m in await broker.recent("bob", 10)] == ["delivered"]
        assert not await broker.ack("bob", got.id, got.attempt)  # already delivered


async def test_a_recv_without_lease_delivers_at_once(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        await broker.send("alice", "bob", "peek")
        got = await broker.recv("bob", None, lease=False)
        assert got is not None
        assert (got.state, got.attempt) == ("delivered", 1)
        assert await broker.counts("bob") == (0, 0)


async def test_an_ack_with_a_stale_attempt_is_ignored(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        await broker.send("alice", "bob", "hi")
        first = await lease(broker, "bob")
        assert await broker.nack("bob", first.id, first.attempt, "turn failed", count=True)
        second = await lease(broker, "bob")
        assert not await broker.ack("bob", first.id, first.attempt)
        assert not await broker.nack("bob", first.id, first.attempt, "late", count=True)
        assert await broker.counts("bob") == (0, 1)
        assert await broker.ack("bob", second.id, second.attempt)


async def test_nack_counted_and_uncounted_and_redelivery_marking(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        [sent] = await broker.send("alice", "bob", "flaky")
        first = await lease(broker, "bob")
        assert (first.attempt, first.redelivery) == (1, False)

        # The turn failed because of the message: the attempt counts.
        assert await broker.nack("bob", sent.id, first.attempt, "boom", count=True)
        assert await broker.counts("bob") == (1, 0)
        second = await lease(broker, "bob")
        assert (second.id, second.attempt, second.redelivery) == (sent.id, 2, True)

        # The turn failed for another reason (the container stopped): it does not count towards
        # a dead letter, but a turn did run: the next lease is a new attempt, marked redelivery.
        assert await broker.nack("bob", sent.id, second.attempt, "stopped", count=False)
        third = await lease(broker, "bob")
        assert (third.attempt, third.redelivery) == (3, True)
        assert not await broker.ack("bob", sent.id, second.attempt)  # fenced off


async def test_an_uncounted_nack_of_a_first_attempt_is_still_a_redelivery(tmp_path: Path) -> None:
    """A turn ran on the message: its next delivery says so, with an attempt of its own (the
    old turn's ack cannot complete the new lease), and uncounted failures never dead-letter."""
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        [sent] = await broker.send("alice", "bob", "rate limited")
        first = await lease(broker, "bob")
        assert (first.attempt, first.redelivery) == (1, False)
        for _ in range(broker.max_attempts * 2):
            got = await lease(broker, "bob") if _ else first
            assert await broker.nack("bob", sent.id, got.attempt, "429", count=False)
        again = await lease(broker, "bob")
        assert again.redelivery and again.attempt == broker.max_attempts * 2 + 1
        assert not await broker.ack("bob", sent.id, first.attempt)
        # Counted failures still dead-letter after max_attempts of them.
        for _ in range(broker.max_attempts):
            assert await broker.nack("bob", sent.id, again.attempt, "boom", count=True)
            taken = await broker.recv("bob", None, lease=True)
            if taken is None:
                break
            again = taken
        [dead] = await broker.recent("bob", 10, state="dead")
        assert dead.id == sent.id

        # A requeued dead letter is delivered again, as a redelivery, with fresh attempts.
        await broker.requeue(sent.id)
        back = await lease(broker, "bob")
        assert back.id == sent.id and back.redelivery
        assert await broker.ack("bob", back.id, back.attempt)


async def test_a_message_nacked_max_attempts_times_becomes_a_dead_letter(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        [sent] = await broker.send("alice", "bob", "poison")
        for attempt in range(1, broker.max_attempts + 1):
            got = await lease(broker, "bob")
            assert got.attempt == attempt
            assert await broker.nack("bob", got.id, got.attempt, "crashed", count=True)
        assert broker.queued("bob") == 1
        # The next take finds it out of attempts: dead, not handed out.
        assert await broker.recv("bob", None, lease=True) is None
        assert broker.queued("bob") == 0
        assert await broker.counts("bob") == (0, 0)
        [dead] = await broker.recent("bob", 10, state="dead")
        assert dead.id == sent.id

        # The manager is told (parked until the report arrives), and the operator too.
        report = await broker.recv(MANAGER, 60, lease=False)
        assert report is not None
        assert report.sender == SYSTEM
        event = msgspec.json.decode(report.body)
        assert {k: event[k] for k in ("event", "id", "from", "to")} == {
            "event": "dead_letter",
            "id": sent.id,
            "from": "alice",
            "to": "bob",
        }
        [note] = await broker.recent(OPERATOR, 10)
        assert f"Message #{sent.id} from alice to bob was dead-lettered" in note.body


async def test_a_dead_letter_report_says_how_many_attempts_were_made(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        await broker.send("alice", "bob", "poison")
        for _ in range(broker.max_attempts):
            got = await lease(broker, "bob")
            await broker.nack("bob", got.id, got.attempt, "crashed", count=True)
        assert await broker.recv("bob", None, lease=True) is None
        report = await broker.recv(MANAGER, 60, lease=False)
        assert report is not None
        assert msgspec.json.decode(report.body)["attempts"] == broker.max_attempts
        [note] = await broker.recent(OPERATOR, 10)
        assert f"after {broker.max_attempts} attempts" in note.body


async def test_requeue_gives_a_dead_letter_fresh_attempts(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        [sent] = await broker.send("alice", "bob", "second chance")
        with pytest.raises(NotFound):
            await broker.requeue(sent.id)  # queued, not dead
        for _ in range(broker.max_attempts):
            got = await lease(broker, "bob")
            await broker.nack("bob", got.id, got.attempt, "crashed", count=True)
        assert await broker.recv("bob", None, lease=True) is None

        requeued = await broker.requeue(sent.id)
        assert (requeued.id, requeued.state) == (sent.id, "queued")
        assert broker.queued("bob") == 1
        again = await lease(broker, "bob")
        # Its attempts count from zero again, but turns did run on it: a redelivery, fenced
        # off from every earlier attempt.
        assert (again.id, again.redelivery) == (sent.id, True)
        assert again.attempt == broker.max_attempts + 1
        with pytest.raises(NotFound):
            await broker.requeue(10_000)


async def test_each_senders_messages_arrive_in_the_order_sent(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):

        async def sender(name: str) -> None:
            for i in range(25):
                await broker.send(name, "bob", f"{name}-{i}")

        # Concurrent senders share commit batches; each one's own order must hold.
        async with trio.open_nursery() as nursery:
            for name in ("alice", "carol", "dave"):
                nursery.start_soon(sender, name)
        received: list[wire.Message] = []
        while (msg := await broker.recv("bob", None, lease=False)) is not None:
            received.append(msg)
        assert len(received) == 75
        assert [m.id for m in received] == sorted(m.id for m in received)
        for name in ("alice", "carol", "dave"):
            bodies = [m.body for m in received if m.sender == name]
            assert bodies == [f"{name}-{i}" for i in range(25)]


async def test_commits_follow_the_order_of_submission(tmp_path: Path) -> None:
    """On an idle broker a send is committed by its own caller (no writer to wake); sends that
    arrive meanwhile wait for the writer's next batch, behind it: ids in submission order."""
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        before = broker.batches
        submitted: list[str] = []
        ids: dict[str, int] = {}

        async def sender(name: str) -> None:
            for i in range(3):  # the next right after the last: no checkpoint in between
                body = f"{name}-{i}"
                submitted.append(body)  # nor between this and the broker's queue
                [msg] = await broker.send(name, "bob", body)
                ids[body] = msg.id

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(sender, f"s{i}")
        assert [ids[name] for name in submitted] == sorted(ids.values())
        # The first alone, the rest grouped behind it.
        assert broker.batches - before < 30


async def test_a_broadcast_stores_one_copy_per_recipient(tmp_path: Path) -> None:
    agents: tuple[str, ...] = ("alice", "bob", "carol")

    def resolve(to: str, sender: str) -> list[str]:
        if to == BROADCAST:
            return [a for a in agents if a != sender]
        return resolve_direct(to, sender)

    async with open_unrecovered_broker(tmp_path / "b.sqlite", resolve) as broker:
        await broker.recover()
        copies = await broker.send("alice", BROADCAST, "all hands")
        assert sorted(m.to for m in copies) == ["bob", "carol"]
        assert len({m.id for m in copies}) == 2
        assert all(m.broadcast and m.body == "all hands" for m in copies)
        for name in ("bob", "carol"):
            got = await lease(broker, name)
            assert got.broadcast
            assert await broker.recv(name, None, lease=True) is None  # exactly one copy
        assert await broker.recv("alice", None, lease=True) is None
        agents = ("alice",)
        assert await broker.send("alice", BROADCAST, "anyone?") == []  # nobody else: no error


async def test_recover_on_restart_releases_leases_except_kept_inboxes(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite"
    async with open_broker(db) as (_, broker, _):
        for name in ("bob", "carol", "dave"):
            await broker.send("alice", name, f"for {name}")
            await lease(broker, name)
    # The daemon restarted: bob's and dave's readers are gone, carol's container was adopted.
    async with open_unrecovered_broker(db) as broker:
        assert await broker.recover(keep=("carol",)) == 2
        assert await broker.counts("bob") == (1, 0)
        assert await broker.counts("carol") == (0, 1)
        assert broker.queued("bob") == 1
        again = await lease(broker, "bob")
        assert (again.attempt, again.redelivery) == (2, True)  # a lost turn counts


async def test_release_returns_an_inboxs_leases_to_the_queue(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        await broker.send("alice", "bob", "one")
        await broker.send("alice", "bob", "two")
        await lease(broker, "bob")
        await lease(broker, "bob")
        assert await broker.release("bob") == 2
        assert await broker.counts("bob") == (2, 0)
        assert [(await lease(broker, "bob")).body for _ in range(2)] == ["one", "two"]


async def test_release_answers_the_receivers_parked_on_the_inbox(tmp_path: Path) -> None:
    """A harness parked in `recv` when its container stopped: the next message must not be
    handed to that dead connection, but wait for the next harness."""
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, nursery):
        ghost: list[wire.Message | None] = []
        returned = trio.Event()

        async def parked() -> None:
            ghost.append(await broker.recv("bob", 180, lease=True))
            returned.set()

        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        assert await broker.release("bob") == 0
        with trio.fail_after(5):
            await returned.wait()
        assert ghost == [None]
        await broker.send("alice", "bob", "after the restart")
        assert (await lease(broker, "bob")).body == "after the restart"


async def test_a_parked_receiver_is_woken_by_a_send(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        received: list[wire.Message | None] = []
        woken = trio.Event()

        async def receiver() -> None:
            received.append(await broker.recv("bob", 180, lease=True))
            woken.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                assert not woken.is_set()  # parked: nothing is queued
                [sent] = await broker.send("alice", "bob", "wake up")
                await woken.wait()
        [got] = received
        assert got is not None
        assert (got.id, got.state, got.attempt) == (sent.id, "leased", 1)
        assert await broker.counts("bob") == (0, 1)


async def test_a_parked_receiver_is_woken_by_a_nack(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        await broker.send("alice", "bob", "retry me")
        first = await lease(broker, "bob")
        received: list[wire.Message | None] = []
        woken = trio.Event()

        async def receiver() -> None:
            received.append(await broker.recv("bob", 180, lease=True))
            woken.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                assert not woken.is_set()
                await broker.nack("bob", first.id, first.attempt, "boom", count=True)
                await woken.wait()
        [got] = received
        assert got is not None
        assert (got.id, got.attempt, got.redelivery) == (first.id, 2, True)


async def test_a_parked_receiver_gives_up_after_its_wait_on_virtual_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        start = trio.current_time()
        assert await broker.recv("bob", 42, lease=True) is None
        assert trio.current_time() - start == pytest.approx(42)
        # Nothing is left parked: a later send is queued, not handed to the departed reader.
        await broker.send("alice", "bob", "later")
        assert await broker.counts("bob") == (1, 0)


async def test_a_cancelled_parked_receiver_takes_nothing_with_it(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(broker.recv, "bob", 180, lease=True))
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        await broker.send("alice", "bob", "for the next reader")
        assert await broker.counts("bob") == (1, 0)
        assert (await lease(broker, "bob")).body == "for the next reader"


async def test_a_broker_stopping_while_a_dead_letter_is_reported_stops(tmp_path: Path) -> None:
    """The report of a dead letter is a broker task that submits sends: stopping the broker
    right after a take dead-lettered a message must fail those sends, not wait for them."""
    with trio.fail_after(30):  # a guard: this used to hang forever
        async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
            await broker.send("alice", "bob", "poison")
            for _ in range(broker.max_attempts):
                got = await lease(broker, "bob")
                await broker.nack("bob", got.id, got.attempt, "crashed", count=True)
            assert await broker.recv("bob", None, lease=True) is None
            # One more round trip: the report task has submitted its send when the block ends.
            assert len(await broker.recent("bob", 10, state="dead")) == 1


async def test_a_reply_carries_the_message_it_answers(tmp_path: Path) -> None:
    """`in_reply_to` is stored with the message and handed out, listed and leased with it."""
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _):
        [question] = await broker.send("alice", "bob", "which branch?")
        [answer] = await broker.send("bob", "alice", "main", in_reply_to=question.id)
        assert answer.in_reply_to == question.id
        got = await lease(broker, "alice")
        assert (got.id, got.in_reply_to) == (answer.id, question.id)
        [listed] = await broker.recent("alice", 10)
        assert listed.in_reply_to == question.id
        assert (await lease(broker, "bob")).in_reply_to is None


@pytest.mark.parametrize("where", [0, 2, 4])
def test_an_op_that_fails_in_a_batch_fails_alone(tmp_path: Path, where: int) -> None:
    """A batch is written in one go; when one op fails (here a row sqlite refuses), the batch
    is redone op by op: that op reports its failure, every other op's result is as if it had
    been committed alone (also those that ran before it on the first try), nothing twice."""
    conn = connect(str(tmp_path / "b.sqlite"))
    try:
        inserts = [m.Insert("alice", ["bob"], f"m{i}", False, "alice") for i in range(3)]
        take = m.Take("bob", False, 5)
        bad = m.Insert("alice", ["bob"], "refused", False, None)  # type: ignore[arg-type]
        ops: list[m.Op] = [inserts[0], take, inserts[1], inserts[2]]
        ops.insert(where, bad)
        m.execute(conn, ops)
        assert bad.failed is not None and "NOT NULL" in bad.failed
        stored = conn.execute("SELECT id, body, state FROM messages ORDER BY id").fetchall()
        assert [(body, state) for _, body, state in stored] == [
            ("m0", "delivered"),
            ("m1", "queued"),
            ("m2", "queued"),
        ]
        assert all(op.failed is None and len(op.rows) == 1 for op in inserts)
        assert [op.rows[0][0] for op in inserts] == [mid for mid, *_ in stored]
        assert take.failed is None and take.row is not None and take.row[3] == "m0"
        assert take.dead == []
    finally:
        conn.close()


def test_an_op_that_fails_alone_in_its_own_batch_leaves_the_connection_clean(
    tmp_path: Path,
) -> None:
    conn = connect(str(tmp_path / "b.sqlite"))
    try:
        bad = m.Insert("alice", ["bob"], "refused", False, None)  # type: ignore[arg-type]
        m.execute(conn, [bad])
        assert bad.failed is not None and "NOT NULL" in bad.failed
        assert not conn.in_transaction
        good = m.Insert("alice", ["bob"], "fine", False, "alice")
        m.execute(conn, [good])
        assert good.failed is None
        assert conn.execute("SELECT body FROM messages").fetchall() == [("fine",)]
    finally:
        conn.close()
