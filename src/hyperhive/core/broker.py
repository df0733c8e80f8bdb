"""The message broker: durable inboxes, group commit, instant hand-off to parked readers, leases.

Every write goes through one writer task that commits whatever has queued up meanwhile as one
transaction (one fsync for the batch) and only then answers any of it. A reader parked in
`recv` is handed a new message in the same transaction that stores it, so waking costs nothing
beyond the sender's commit.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn, Protocol

import msgspec
import trio
from prometheus_client import Histogram

from hyperhive.core import messages as m
from hyperhive.core.faults import Faults
from hyperhive.core.quotas import Quotas
from hyperhive.core.store import Store
from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams, HiveError, Internal, NotFound, StorageFull
from hyperhive.protocol.fanout import FanOut
from hyperhive.protocol.names import BROADCAST, MANAGER, OPERATOR, SYSTEM
from hyperhive.protocol.text import MAX_BODY

log = logging.getLogger(__name__)

MAX_WAIT = 180.0
"""The longest a `recv` may park."""
MAX_BATCH = 1024


# ----------------------------------------------------------------------------- event hub


@dataclass
class EventHub:
    """Fans hive events out to subscribers; one that cannot keep up is dropped, never waited on."""

    buffer: int = 1024
    _fanout: FanOut[wire.HiveEvent] = field(init=False)
    _seq: int = 0
    subscribed: trio.Event = field(init=False)

    def __post_init__(self) -> None:
        self._fanout = FanOut(self.buffer)
        self.subscribed = trio.Event()  # set (and replaced) whenever someone subscribes

    def publish(
        self, make: Callable[[int], wire.HiveEvent], kind: type[wire.HiveEvent] | None = None
    ) -> None:
        """Number and send an event; with `kind` (what `make` makes), it is made only when a
        subscriber would take it (the broker's per-message events, on a hive nobody watches)."""
        self._seq += 1
        if kind is not None and not self._fanout.wants(kind):
            return
        self._fanout.send_nowait(make(self._seq))

    @property
    def seq(self) -> int:
        return self._seq

    def wants(self, kind: type[wire.HiveEvent]) -> bool:
        """Whether any subscriber now takes events of `kind`."""
        return self._fanout.wants(kind)

    @property
    def subscribers(self) -> int:
        return len(self._fanout)

    def subscribe(
        self, kinds: tuple[type[wire.HiveEvent], ...] | None = None
    ) -> trio.MemoryReceiveChannel[wire.HiveEvent]:
        """Every event from now on, or only those of `kinds` (a watcher is not woken by the
        message traffic it ignores)."""
        recv = self._fanout.subscribe(kinds)
        self.subscribed.set()
        self.subscribed = trio.Event()
        return recv

    async def stream(
        self, kinds: tuple[type[wire.HiveEvent], ...] | None = None
    ) -> AsyncGenerator[wire.HiveEvent, None]:
        recv = self.subscribe(kinds)
        with recv:
            async for event in recv:
                yield event
        yield wire.Dropped(seq=self._seq, reason="subscriber fell behind")


def _sent_event(row: m.Row, seq: int) -> wire.HiveEvent:
    return wire.MessageSent(seq=seq, message=m.to_message(row))


def _delivered_event(mid: int, to: str, seq: int) -> wire.HiveEvent:
    return wire.MessageDelivered(seq=seq, id=mid, to=to)


def _leased_event(msg: wire.Message, seq: int) -> wire.HiveEvent:
    return wire.MessageLeased(seq=seq, id=msg.id, to=msg.to, attempt=msg.attempt)


# ----------------------------------------------------------------------------- broker


def _bytes(body: str) -> int:
    return len(body.encode("utf-8"))


def _failure(what: str, error: BaseException) -> HiveError:
    """What a caller whose operation failed is told: a full disk as itself (each caller gets its
    own exception object: one batch's failure is raised in many tasks), the rest as internal."""
    if isinstance(error, StorageFull):
        return StorageFull(error.message)
    return Internal(f"{what}: {error}")


Resolver = Callable[[str, str], list[str]]
"""(to, sender) -> the inboxes a message goes to; raises NotFound for an unknown recipient."""


class MessageBroker(Protocol):
    """What the daemon asks of a broker (SPEC §5): the sqlite `Broker` on one host, the
    JetStream one (hyperhive.swarm.broker) for a hive across hosts (`--swarm`)."""

    commit_seconds: Histogram
    batch_ops: Histogram

    async def serve(self, *, task_status: trio.TaskStatus[None] = ...) -> NoReturn: ...

    async def serve_maintenance(self, *, task_status: trio.TaskStatus[None] = ...) -> NoReturn: ...

    async def recover(self, keep: tuple[str, ...] = ()) -> int: ...

    async def send(
        self, sender: str, to: str, body: str, *, origin: str = "", in_reply_to: int | None = None
    ) -> list[wire.Message]: ...

    async def recv(
        self, recipient: str, wait_seconds: float | None, *, lease: bool
    ) -> wire.Message | None: ...

    async def ack(self, recipient: str, mid: int, attempt: int) -> bool: ...

    async def nack(
        self, recipient: str, mid: int, attempt: int, error: str, *, count: bool
    ) -> bool: ...

    async def release(self, recipient: str) -> int: ...

    async def requeue(self, mid: int) -> wire.Message: ...

    async def recent(
        self, recipient: str | None, limit: int, *, state: str | None = None
    ) -> list[wire.Message]: ...

    def queued(self, recipient: str) -> int: ...

    async def counts(self, recipient: str) -> tuple[int, int]: ...

    async def census(self) -> tuple[dict[str, int], dict[str, float]]: ...


@dataclass(eq=False)
class _Reader:
    """A `recv` in progress: answered by a take, or by a hand-off while parked."""

    recipient: str
    lease: bool
    park: bool
    done: trio.Event = field(default_factory=trio.Event)
    message: wire.Message | None = None
    error: BaseException | None = None
    claimed: bool = False
    """A take or hand-off for this reader is in flight: it must wait for the answer."""


@dataclass(eq=False)
class _Pending:
    op: m.Op
    error: BaseException | None = None
    reader: _Reader | None = None
    handoff_to: list[_Reader | None] = field(default_factory=list)
    finished: bool = False
    _waiter: trio.lowlevel.Task | None = None

    def finish(self) -> None:
        self.finished = True
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None

    async def settled(self) -> None:
        """Until the writer has finished this op. No cancellation interrupts the wait: once
        submitted, the outcome must be observed (a send must not be reported as failed, or a
        lease left dangling, because its caller went away mid-commit). A shielded wait without
        the cost of a cancel scope; a cancellation is delivered at the caller's next checkpoint.
        """
        if not self.finished:
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


class Broker:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        resolve: Resolver,
        *,
        max_attempts: int = 5,
        group_commit: bool = True,
        faults: Faults | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._faults = faults or Faults()
        self.quotas = quotas or Quotas()
        """Undelivered bytes per inbox and per sending agent, moved in step with the table."""
        self._store = store
        self._hub = hub
        self._resolve = resolve
        self.commit_seconds = Histogram(
            "hive_broker_commit_seconds",
            "Time to commit one batch of broker operations (one sqlite transaction, fsynced).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=None,
        )
        self.batch_ops = Histogram(
            "hive_broker_batch_operations",
            "Operations committed together in one batch (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=None,
        )
        self.max_attempts = max_attempts
        self._batch_limit = MAX_BATCH if group_commit else 1
        self._send, self._recv = trio.open_memory_channel[_Pending](math.inf)
        self._backlog = 0
        """Ops handed to the writer and not yet in a batch being written."""
        self._writing = False
        """A batch is being committed (by the writer, or by a submitter in `_submit`)."""
        self._written = trio.Event()
        """Set (and replaced) when a submitter's own commit ends: the writer waits for it."""
        self._parked: dict[str, deque[_Reader]] = {}
        self._queued: dict[str, int] = {}
        """Queued messages per inbox, mirrored from the table so an empty inbox costs no I/O."""
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._recount = True
        self.batches = 0
        self.batched_ops = 0

    # ------------------------------------------------------------------ the writer

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    while True:
                        batch = [await self._recv.receive()]
                        try:
                            while self._writing:  # a submitter is committing its own op
                                await self._written.wait()
                        except BaseException:
                            self._backlog -= 1
                            self._fail(batch[0], Internal("the broker is shutting down"))
                            raise
                        while len(batch) < self._batch_limit:
                            try:
                                batch.append(self._recv.receive_nowait())
                            except trio.WouldBlock:
                                break
                        self._backlog -= len(batch)
                        self._writing = True
                        try:
                            await self._commit(batch)
                        finally:
                            self._writing = False
                finally:
                    # Before the nursery waits for its tasks: one of them (a dead-letter
                    # report) may wait, shielded, for an op only this loop would commit.
                    self._closed = True
                    self._fail_queued(Internal("the broker is shutting down"))
        finally:
            self._closed = True
            self._fail_queued(Internal("the broker is shutting down"))
        raise AssertionError("unreachable")

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                pending = self._recv.receive_nowait()
            except trio.WouldBlock:
                return
            self._backlog -= 1
            self._fail(pending, error)

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        pending.error = error
        if pending.reader is not None:
            pending.reader.error = error
            pending.reader.done.set()
        for reader in pending.handoff_to:
            if reader is not None:
                self._park(reader, front=True)
        pending.finish()

    def _enqueue(self, pending: _Pending) -> None:
        if self._closed:
            raise Internal("the broker is shutting down")
        if pending.reader is not None:
            pending.reader.claimed = True
        self._backlog += 1
        self._send.send_nowait(pending)

    async def _submit(self, op: m.Op) -> _Pending:
        pending = _Pending(op)
        if self._writing or self._backlog or self._closed:
            self._enqueue(pending)
            await pending.settled()
        else:
            # Nothing is being written and nothing waits to be: commit it here and now, a
            # batch of one, rather than wake the writer for it (a scheduler pass less on a
            # quiet hive's every send). What arrives meanwhile waits for the writer's next
            # batch, so the order of commits is still the order of submission.
            self._writing = True
            try:
                await self._commit([pending])
            finally:
                self._writing = False
                written, self._written = self._written, trio.Event()
                written.set()
        if pending.error is not None:
            raise _failure("the broker could not store that", pending.error)
        return pending

    def _plan(self, batch: list[_Pending]) -> list[m.Op]:
        """Order a batch (inserts first, takes last) and assign hand-offs to parked readers."""
        order = {m.Insert: 0, m.Take: 2}
        batch.sort(key=lambda p: order.get(type(p.op), 1))
        for pending in batch:
            op = pending.op
            if isinstance(op, m.Insert):
                op.handoffs, pending.handoff_to = [], []
                for recipient in op.recipients:
                    parked = self._parked.get(recipient)
                    reader = parked.popleft() if parked else None
                    if reader is not None:
                        reader.claimed = True
                    pending.handoff_to.append(reader)
                    op.handoffs.append(
                        None if reader is None else ("leased" if reader.lease else "delivered")
                    )
        return [p.op for p in batch]

    async def _commit(self, batch: list[_Pending]) -> None:
        ops = self._plan(batch)
        if any(isinstance(op, m.Ack) for op in ops):
            self._faults.hit("before_ack")
        self._faults.hit("before_commit")
        try:
            # A batch that started is finished and answered, even during shutdown: its
            # senders must learn the truth about what was committed.
            started = trio.current_time()
            await self._store.run_to_end(m.execute, ops)
            self.commit_seconds.observe(trio.current_time() - started)
            self.batch_ops.observe(len(ops))
        except Exception as exc:
            log.error("broker commit of %d operations failed: %s", len(ops), exc)
            for pending in batch:
                self._fail(pending, exc)
            return
        self._faults.hit("after_commit")
        if any(isinstance(op, m.Take) and op.row is not None for op in ops):
            self._faults.hit("after_take")
        self.batches += 1
        self.batched_ops += len(batch)
        requeued: set[str] = set()
        for pending in batch:
            if pending.op.failed is not None:
                log.warning(
                    "broker operation %s failed: %s", type(pending.op).__name__, pending.op.failed
                )
                self._fail(pending, Internal(pending.op.failed))
                continue
            self._complete(pending, requeued)
            pending.finish()
        for recipient in requeued:
            self._retake(recipient)

    def _complete(self, pending: _Pending, requeued: set[str]) -> None:
        op = pending.op
        if isinstance(op, m.Insert):
            for row, reader in zip(op.rows, pending.handoff_to, strict=True):
                msg = m.to_message(row, handed_out=reader is not None)
                if msg.state == "delivered":
                    # To the operator, or handed to a reader that only peeks: never waited.
                    self.quotas.remove(msg.to, msg.origin, _bytes(msg.body))
                self._hub.publish(partial(_sent_event, row), wire.MessageSent)
                if reader is not None:
                    self._answer(reader, msg)
                elif msg.state == "queued":
                    self._count(msg.to, +1)
                    if self._parked.get(msg.to):
                        # A reader parked while this batch was being written.
                        requeued.add(msg.to)
        elif isinstance(op, m.Take):
            reader = pending.reader
            assert reader is not None
            if op.dead:
                self._count(op.recipient, -len(op.dead))
                for row in op.dead:
                    self.quotas.remove(op.recipient, row[8], _bytes(row[3]))
                self._spawn(self._report_dead, [m.to_message(r, handed_out=True) for r in op.dead])
            if op.row is not None:
                self._count(op.recipient, -1)
                if op.row[7] == "delivered":
                    self.quotas.remove(op.recipient, op.row[8], _bytes(op.row[3]))
                self._answer(reader, m.to_message(op.row, handed_out=True))
            elif reader.park:
                self._park(reader)
            else:
                self._answer(reader, None)
        elif isinstance(op, m.Ack):
            for origin, size in op.freed:
                self.quotas.remove(op.recipient, origin, size)
            if op.acked:
                self._hub.publish(
                    partial(_delivered_event, op.id, op.recipient), wire.MessageDelivered
                )
        elif isinstance(op, m.Nack) and op.done:
            self._count(op.recipient, 1 + op.also)
            requeued.add(op.recipient)
        elif isinstance(op, m.Release) and op.released:
            if op.recipient is None:
                self._recount = True
                requeued.update(self._parked)
            else:
                self._count(op.recipient, op.released)
                requeued.add(op.recipient)
        elif isinstance(op, m.Requeue) and op.row is not None:
            self._count(op.row[2], +1)
            self.quotas.add(op.row[2], op.row[8], _bytes(op.row[3]))
            requeued.add(op.row[2])

    def _count(self, recipient: str, delta: int) -> None:
        self._queued[recipient] = max(0, self._queued.get(recipient, 0) + delta)

    def _answer(self, reader: _Reader, msg: wire.Message | None) -> None:
        reader.message = msg
        reader.claimed = False
        if msg is not None and msg.state == "delivered":
            self._hub.publish(partial(_delivered_event, msg.id, msg.to), wire.MessageDelivered)
        elif msg is not None and msg.state == "leased":
            self._hub.publish(partial(_leased_event, msg), wire.MessageLeased)
        reader.done.set()

    def _park(self, reader: _Reader, *, front: bool = False) -> None:
        reader.claimed = False
        parked = self._parked.setdefault(reader.recipient, deque())
        if front:
            parked.appendleft(reader)
        else:
            parked.append(reader)

    def _retake(self, recipient: str) -> None:
        """Messages went back to a queue: let the readers parked on it look again."""
        parked = self._parked.pop(recipient, None)
        for reader in parked or ():
            self._enqueue(
                _Pending(m.Take(recipient, reader.lease, self.max_attempts), reader=reader)
            )

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ API

    async def census(self) -> tuple[dict[str, int], dict[str, float]]:
        """Messages per state, and each inbox's oldest queued send time (for /metrics)."""
        return await self._store.run(m.census)

    async def recover(self, keep: tuple[str, ...] = ()) -> int:
        """At start-up a lease belongs to a process that is gone, unless its container outlived
        the previous daemon and is adopted (`keep`): hand the others out again."""
        pending = await self._submit(m.Release(None, keep=keep))
        assert isinstance(pending.op, m.Release)
        self._queued = await self._store.run(m.queued_counts)
        self.quotas.load(await self._store.run(m.undelivered_bytes))
        self._recount = False
        return pending.op.released

    async def send(
        self, sender: str, to: str, body: str, *, origin: str = "", in_reply_to: int | None = None
    ) -> list[wire.Message]:
        """Store a message durably (committed before this returns) and wake its readers."""
        size = check_body(body)
        recipients = self._resolve(to, sender)
        if not recipients:
            if to == BROADCAST:
                return []
            raise NotFound(f"no recipients for {to!r}")
        # Checked and counted before the write, so concurrent sends cannot overshoot together.
        self.quotas.check(recipients, origin, size)
        for recipient in recipients:
            self.quotas.add(recipient, origin, size)
        op = m.Insert(sender, recipients, body, to == BROADCAST, origin, in_reply_to)
        try:
            await self._submit(op)
        except BaseException:
            for recipient in recipients:
                self.quotas.remove(recipient, origin, size)
            raise
        return [m.to_message(row) for row in op.rows]

    async def recv(
        self, recipient: str, wait_seconds: float | None, *, lease: bool
    ) -> wire.Message | None:
        """Hand out the oldest queued message; park up to `wait_seconds` for one to arrive."""
        wait = min(max(wait_seconds or 0.0, 0.0), MAX_WAIT)
        reader = _Reader(recipient, lease, park=wait > 0)
        deadline = trio.current_time() + wait
        if self._recount or self._queued.get(recipient, 0) > 0:
            self._enqueue(_Pending(m.Take(recipient, lease, self.max_attempts), reader=reader))
        elif reader.park:
            # Nothing is queued: park at once. A send planned from now on hands over directly;
            # one being written right now sees us parked when it completes (see _complete).
            self._park(reader)
        else:
            return None
        try:
            with trio.move_on_at(deadline):
                await reader.done.wait()
            if not reader.done.is_set():
                parked = self._parked.get(recipient)
                if not reader.claimed and parked is not None and reader in parked:
                    parked.remove(reader)
                    return None
                with trio.CancelScope(shield=True):
                    await reader.done.wait()
            if reader.error is not None:
                raise _failure("the broker could not read the inbox", reader.error)
            return reader.message
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._abandon(reader)
            raise

    async def _abandon(self, reader: _Reader) -> None:
        """The caller went away: un-park it, or give back what was handed to it meanwhile."""
        parked = self._parked.get(reader.recipient)
        if parked is not None and reader in parked:
            parked.remove(reader)
            return
        await reader.done.wait()
        msg = reader.message
        if msg is not None and msg.state == "leased":
            await self._submit(m.Release(reader.recipient, id=msg.id, uncount=True))

    async def ack(self, recipient: str, mid: int, attempt: int) -> bool:
        """Complete a lease (and the turn's other leases); a stale attempt is ignored."""
        pending = await self._submit(m.Ack(recipient, mid, attempt))
        assert isinstance(pending.op, m.Ack)
        return pending.op.acked

    async def nack(
        self, recipient: str, mid: int, attempt: int, error: str, *, count: bool
    ) -> bool:
        pending = await self._submit(m.Nack(recipient, mid, attempt, error, count))
        assert isinstance(pending.op, m.Nack)
        return pending.op.done

    async def release(self, recipient: str) -> int:
        """Return an inbox's in-flight messages to the queue (its reader is gone).

        The `recv`s parked on it are answered with nothing: they belong to the process that
        is gone (a harness parked in `recv` when its container stopped), and one left parked
        would be handed the next message, leased to a connection nobody reads any more.
        """
        pending = await self._submit(m.Release(recipient))
        assert isinstance(pending.op, m.Release)
        for reader in self._parked.pop(recipient, None) or ():
            self._answer(reader, None)
        return pending.op.released

    async def requeue(self, mid: int) -> wire.Message:
        pending = await self._submit(m.Requeue(mid))
        assert isinstance(pending.op, m.Requeue)
        if pending.op.row is None:
            raise NotFound(f"message #{mid} is not a dead letter")
        return m.to_message(pending.op.row)

    async def vacuum(self, older_than_days: float = 30.0) -> int:
        pending = await self._submit(m.Vacuum(older_than_days))
        assert isinstance(pending.op, m.Vacuum)
        return pending.op.deleted

    async def checkpoint(self) -> tuple[int, int, int]:
        return await self._store.run(m.checkpoint)

    async def serve_maintenance(
        self,
        *,
        vacuum_every: float = 3600.0,
        keep_days: float = 30.0,
        checkpoint_every: float = 60.0,
        report: trio.MemorySendChannel[str] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Hourly: drop delivered messages older than `keep_days` (undelivered ones never).
        Every minute: checkpoint the WAL so long-lived readers cannot make it grow unbounded."""
        task_status.started()
        next_vacuum = trio.current_time() + vacuum_every
        while True:
            await trio.sleep(checkpoint_every)
            try:
                if trio.current_time() >= next_vacuum:
                    next_vacuum += vacuum_every
                    deleted = await self.vacuum(keep_days)
                    if deleted:
                        log.info(
                            "vacuumed %d delivered messages older than %g days", deleted, keep_days
                        )
                    if report is not None:
                        await report.send(f"vacuum {deleted}")
                busy, wal, moved = await self.checkpoint()
                if busy:
                    log.debug("checkpoint blocked by a reader: %d/%d pages", moved, wal)
                if report is not None:
                    await report.send(f"checkpoint {busy}")
            except (HiveError, sqlite3.Error) as exc:
                log.error("broker maintenance failed: %s", exc)

    async def _report_dead(self, dead: list[wire.Message]) -> None:
        await report_dead(self.send, dead)

    # ------------------------------------------------------------------ reads

    async def recent(
        self, recipient: str | None, limit: int, *, state: str | None = None
    ) -> list[wire.Message]:
        limit = max(1, min(limit, 2000))
        rows = await self._store.run(m.recent, recipient, limit, state)
        return [m.to_message(r) for r in rows]

    def queued(self, recipient: str) -> int:
        return self._queued.get(recipient, 0)

    async def counts(self, recipient: str) -> tuple[int, int]:
        """(queued, in flight) for one inbox."""
        return await self._store.run(m.counts, recipient)


def check_body(body: object) -> int:
    """A message body a broker accepts: its size in UTF-8 bytes, or a clear BadParams."""
    if not isinstance(body, str):
        raise BadParams("body must be a string")
    if "\x00" in body:
        raise BadParams("message body contains a NUL character")
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadParams("message body is not valid Unicode (lone surrogate)") from None
    if size > MAX_BODY:
        raise BadParams(f"message body is {size} bytes; the limit is {MAX_BODY}")
    return size


class _Send(Protocol):
    async def __call__(
        self, sender: str, to: str, body: str, *, origin: str = ""
    ) -> list[wire.Message]: ...


async def report_dead(send: _Send, dead: list[wire.Message]) -> None:
    """Dead letters are kept, shown to the operator and reported to the manager."""
    for msg in dead:
        note = (
            f"Message #{msg.id} from {msg.sender} to {msg.to} was dead-lettered after"
            f" {msg.attempt} attempts: no turn on it completed. It is kept; requeue it with"
            f" `hive-c0re requeue {msg.id}`."
        )
        event = msgspec.json.encode(
            {
                "event": "dead_letter",
                "id": msg.id,
                "from": msg.sender,
                "to": msg.to,
                "attempts": msg.attempt,
            }
        ).decode()
        try:
            await send(SYSTEM, OPERATOR, note, origin=SYSTEM)
            if msg.to != MANAGER:
                await send(SYSTEM, MANAGER, event, origin=SYSTEM)
        except HiveError as exc:
            log.error("could not report dead letter #%d: %s", msg.id, exc.message)
