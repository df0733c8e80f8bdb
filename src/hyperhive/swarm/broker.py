"""The broker on NATS JetStream: the same contract as the sqlite one (SPEC §5), across hosts.

- An inbox is the subject `hive.inbox.<recipient>` of the work-queue stream HIVE_INBOX; a
  message's id is its stream sequence (hive-wide). A send is acknowledged once JetStream has
  stored it (its PubAck: the servers run `sync_interval: always`, R3 with three servers). The
  publish carries `Nats-Msg-Id`, and is retried under the same id through a node's failover,
  so it is stored once.
- Each inbox has a durable pull consumer (explicit acks) that only the host running the agent
  pulls. A lease is a delivery: JetStream's ack wait, renewed (+WPI) while the lease is held;
  its reply subject is persisted here before the lease is handed out, so a restarted daemon
  settles the leases of the containers it adopts, and gives back the others. Attempts are
  JetStream's delivery count less the deliveries that were not the message's fault; our own
  fencing refuses an ack or nack for any attempt but the current one (JetStream itself takes a
  late ack).
- After `max_attempts` deliveries the message moves to HIVE_DEAD (`hive.dead.<id>`): kept,
  reported, and requeued under a new id by the operator.
- Messages to the operator go to HIVE_OPERATOR: every host's console shows the same inbox.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import msgspec
import trio
from prometheus_client import Histogram

from hyperhive.core.broker import EventHub, Resolver, check_body, report_dead
from hyperhive.core.store import Store
from hyperhive.protocol import wire
from hyperhive.protocol.errors import HiveError, NotFound
from hyperhive.protocol.names import BROADCAST, OPERATOR, SYSTEM
from hyperhive.protocol.text import MAX_BODY
from hyperhive.swarm import subjects as s
from hyperhive.swarm.link import Link, SwarmError

log = logging.getLogger(__name__)

MAX_WAIT = 180.0
FETCH_CHUNK = 10.0
"""A parked `recv` is a chain of pull requests this long: a reader that goes away leaves at
most one behind, whose message (if any) is given back at once, uncounted."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS swarm_leases (
    seq        INTEGER PRIMARY KEY,
    recipient  TEXT    NOT NULL,
    attempt    INTEGER NOT NULL,
    reply      TEXT    NOT NULL
) STRICT;
"""


class Payload(msgspec.Struct, frozen=True):
    """What a message carries on JetStream (its id is the stream's sequence)."""

    sender: str
    to: str
    body: str
    sent_at: float
    broadcast: bool = False
    origin: str = ""
    in_reply_to: int | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Payload).decode


@dataclass
class _Lease:
    seq: int
    recipient: str
    attempt: int
    reply: str


def _message(p: Payload, mid: int, state: str, attempt: int = 0) -> wire.Message:
    return wire.Message(
        id=mid,
        sender=p.sender,
        to=p.to,
        body=p.body,
        sent_at=p.sent_at,
        attempt=attempt,
        redelivery=attempt > 1,
        broadcast=p.broadcast,
        state=state,
        origin=p.origin,
        in_reply_to=p.in_reply_to,
    )


def _sent(msg: wire.Message, seq: int) -> wire.HiveEvent:
    return wire.MessageSent(seq=seq, message=msg)


def _delivered(mid: int, to: str, seq: int) -> wire.HiveEvent:
    return wire.MessageDelivered(seq=seq, id=mid, to=to)


def _leased(mid: int, to: str, attempt: int, seq: int) -> wire.HiveEvent:
    return wire.MessageLeased(seq=seq, id=mid, to=to, attempt=attempt)


def _save_lease(conn: sqlite3.Connection, lease: _Lease) -> None:
    with conn:
        conn.execute(
            "INSERT OR REPLACE INTO swarm_leases (seq, recipient, attempt, reply)"
            " VALUES (?, ?, ?, ?)",
            (lease.seq, lease.recipient, lease.attempt, lease.reply),
        )


def _drop_leases(conn: sqlite3.Connection, seqs: list[int]) -> None:
    with conn:
        conn.executemany("DELETE FROM swarm_leases WHERE seq = ?", [(q,) for q in seqs])


def _load_leases(conn: sqlite3.Connection) -> list[_Lease]:
    conn.executescript(SCHEMA)
    rows = conn.execute("SELECT seq, recipient, attempt, reply FROM swarm_leases").fetchall()
    return [_Lease(int(a), str(b), int(c), str(d)) for a, b, c, d in rows]


class JetStreamBroker:
    def __init__(
        self,
        link: Link,
        store: Store,
        hub: EventHub,
        resolve: Resolver,
        *,
        host: str,
        max_attempts: int = 5,
        ack_wait: float = s.ACK_WAIT,
    ) -> None:
        self.ack_wait = ack_wait
        self._link = link
        self._store = store
        self._hub = hub
        self._resolve = resolve
        self.host = host
        self.max_attempts = max_attempts
        self.commit_seconds = Histogram(
            "hive_broker_commit_seconds",
            "Time to store one message durably (JetStream publish to its PubAck).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5),
            registry=None,
        )
        self.batch_ops = Histogram(
            "hive_broker_batch_operations",
            "Operations per store (always 1 on JetStream).",
            buckets=(1,),
            registry=None,
        )
        self._ids = itertools.count(1)
        self._boot = f"{host}.{os.getpid()}.{time.time_ns()}"
        self._leases: dict[int, _Lease] = {}
        self._uncounted: dict[int, int] = {}
        self._consumers: set[str] = set()
        self._depth: dict[str, int] = {}
        self._readers: dict[str, set[trio.CancelScope]] = {}
        self._fetching: dict[str, int] = {}
        """Pull requests in flight per inbox (a reader's, or one its reader left behind)."""
        self._checked: set[str] = set()
        """Inboxes whose JetStream deliveries all reached this daemon (see `_reconcile`)."""
        self._paused: dict[str, float] = {}
        self._given_back: dict[str, set[int]] = {}
        """Messages this daemon gave back (-NAK) that JetStream has not delivered again yet:
        still pending there, but not lost."""
        self._nursery: trio.Nursery | None = None
        self.share: trio.MemorySendChannel[wire.HiveEvent] | None = None
        """Where this host's message events go for the other hosts' consoles (the forwarder
        batches them); a full channel drops them (a console's live view, not the record)."""
        self.share_wanted: Callable[[], bool] = lambda: True
        """Whether another host's console follows the flow now (its heartbeat says so)."""

    # ------------------------------------------------------------------ services

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._renew_leases)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def serve_maintenance(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, **_: Any
    ) -> NoReturn:
        """JetStream keeps its own retention; here: the unread counts of this host's inboxes."""
        task_status.started()
        while True:
            for recipient in list(self._consumers):
                with contextlib.suppress(HiveError):
                    await self.counts(recipient)
            await trio.sleep(2.0)

    async def _renew_leases(self) -> NoReturn:
        while True:
            await trio.sleep(self.ack_wait * s.RENEW / s.ACK_WAIT)
            for lease in list(self._leases.values()):
                try:
                    await self._link.call("settle", reply=lease.reply, kind="+WPI")
                except SwarmError as exc:
                    log.warning("could not renew the lease on #%d: %s", lease.seq, exc.message)

    def _event(self, make: Callable[[int], wire.HiveEvent], kind: type[wire.HiveEvent]) -> None:
        """A message event: to this host's subscribers, and to the other hosts' consoles."""
        self._hub.publish(make, kind)
        if self.share is not None and self.share_wanted():
            with contextlib.suppress(trio.WouldBlock):
                self.share.send_nowait(make(0))

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ helpers

    async def _retrying(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self._link.retrying(op, within=s.PUBLISH_RETRY, **fields)

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> int:
        started = trio.current_time()
        ans = await self._retrying("publish", subject=subject, data=payload.decode(), msg_id=msg_id)
        self.commit_seconds.observe(trio.current_time() - started)
        self.batch_ops.observe(1)
        return int(ans["seq"])

    async def _consumer(self, recipient: str) -> str:
        name = s.durable(recipient)
        if recipient not in self._consumers:
            await self._retrying(
                "consumer", durable=name, filter=s.inbox(recipient), ack_wait=self.ack_wait
            )
            self._consumers.add(recipient)
        return name

    async def _settle(self, reply: str, kind: str) -> None:
        if kind == "+ACK":
            # Confirmed by the server, and safe to repeat (a repeated ack is answered too).
            await self._retrying("settle", reply=reply, kind=kind)
            return
        try:
            await self._link.call("settle", reply=reply, kind=kind)
        except SwarmError as exc:
            log.warning(
                "%s on %s failed (JetStream redelivers after its ack wait): %s",
                kind,
                reply,
                exc.message,
            )

    # ------------------------------------------------------------------ API

    async def send(
        self, sender: str, to: str, body: str, *, origin: str = "", in_reply_to: int | None = None
    ) -> list[wire.Message]:
        check_body(body)
        recipients = self._resolve(to, sender)
        if not recipients:
            if to == BROADCAST:
                return []
            raise NotFound(f"no recipients for {to!r}")
        out = []
        now = time.time()
        for recipient in recipients:
            p = Payload(sender, recipient, body, now, to == BROADCAST, origin, in_reply_to)
            subject = s.OPERATOR_SUBJECT if recipient == OPERATOR else s.inbox(recipient)
            with trio.CancelScope(shield=True):
                # Once sent, the caller learns the truth (as the sqlite broker's shielded commit).
                seq = await self._publish(subject, _encode(p), f"{self._boot}.{next(self._ids)}")
            msg = _message(p, seq, "delivered" if recipient == OPERATOR else "queued")
            if recipient != OPERATOR:
                self._depth[recipient] = self._depth.get(recipient, 0) + 1
            self._event(partial(_sent, msg), wire.MessageSent)
            out.append(msg)
        return out

    async def recv(
        self, recipient: str, wait_seconds: float | None, *, lease: bool
    ) -> wire.Message | None:
        wait = min(max(wait_seconds or 0.0, 0.0), MAX_WAIT)
        durable = await self._consumer(recipient)
        deadline = trio.current_time() + wait
        scope = trio.CancelScope()
        self._readers.setdefault(recipient, set()).add(scope)
        try:
            with scope:
                while True:
                    if recipient not in self._checked:
                        await self._reconcile(recipient)
                    until = self._paused.get(recipient, 0.0)
                    if trio.current_time() < until:
                        # Order (SPEC §5.5): a delivery lost on its way must come back first.
                        await trio.sleep_until(min(until, deadline))
                        if deadline <= until:
                            return None
                    chunk = min(max(deadline - trio.current_time(), 0.0), FETCH_CHUNK)
                    self._fetching[recipient] = self._fetching.get(recipient, 0) + 1
                    try:
                        ans = await self._link.call(
                            "fetch",
                            durable=durable,
                            wait=chunk,
                            orphan=partial(self._give_back, recipient),
                        )
                    except SwarmError as exc:
                        self._fetching[recipient] -= 1
                        self._checked.discard(recipient)
                        # A consumer's leader moving (a node down) or the sidecar restarting:
                        # the reader waits on, as long as it would have waited anyway, and is
                        # then told nothing came (what JetStream may have sent meanwhile comes
                        # back to this inbox first: `_reconcile`).
                        if deadline - trio.current_time() <= 0.05:
                            log.info("swarm: reading %s: %s", recipient, exc.message)
                            return None
                        log.info("swarm: reading %s: %s (retrying)", recipient, exc.message)
                        with trio.move_on_at(deadline):
                            await self._link.wait_up()
                            await trio.sleep(0.2)
                        continue
                    self._fetching[recipient] -= 1
                    got = ans.get("msg")
                    if got is not None:
                        msg = await self._taken(recipient, got, lease)
                        if msg is not None:
                            return msg
                        continue
                    if deadline - trio.current_time() <= 0.05:
                        return None
            return None  # released: the reader's process is gone
        finally:
            self._readers[recipient].discard(scope)

    async def _reconcile(self, recipient: str) -> None:
        """A message JetStream delivered that reached no reader (a node or this daemon died
        while the pull was answered) stays pending until its ack wait ends, and only then is
        delivered again, while newer ones would flow past it. So when JetStream counts more
        deliveries in flight than this daemon holds (at the first read after a start, after a
        failed pull), the inbox waits out one ack wait: the lost one comes back first."""
        held = sum(1 for x in self._leases.values() if x.recipient == recipient)
        held += self._fetching.get(recipient, 0) + len(self._given_back.get(recipient, ()))
        try:
            ans = await self._link.call("consumer_info", durable=s.durable(recipient))
            lost = int(ans["ack_pending"]) > held
        except SwarmError:
            lost = True
        if lost:
            log.info("swarm: %s has a delivery in limbo; its inbox waits one ack wait", recipient)
            self._paused[recipient] = trio.current_time() + self.ack_wait + 1.0
        self._checked.add(recipient)

    def _give_back(self, recipient: str, answer: dict[str, Any] | None) -> None:
        """A fetch whose reader went away brought a message: back to the queue, uncounted."""
        self._fetching[recipient] -= 1
        if answer is None:
            self._checked.discard(recipient)
            return
        got = answer.get("msg")
        if got is not None:
            seq = int(got["seq"])
            self._uncounted[seq] = self._uncounted.get(seq, 0) + 1
            self._given_back.setdefault(recipient, set()).add(seq)
            self._spawn(self._settle, str(got["reply"]), "-NAK")

    async def _taken(self, recipient: str, got: dict[str, Any], lease: bool) -> wire.Message | None:
        seq, reply = int(got["seq"]), str(got["reply"])
        self._given_back.get(recipient, set()).discard(seq)
        held = self._leases.get(seq)
        if held is not None and held.recipient == recipient:
            # Delivered again while its lease is held here: its ack wait ran out while this
            # daemon was down (a container it adopts holds it) or could not renew it. The
            # holder keeps its lease and its attempt; the lease moves to this delivery.
            self._uncounted[seq] = self._uncounted.get(seq, 0) + 1
            held.reply = reply
            with trio.CancelScope(shield=True):
                await self._store.run(_save_lease, held)
            return None
        try:
            p = _decode(got["data"])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Not a message any daemon wrote (something else published into the inbox): kept
            # among the dead letters as it came, so the inbox is not stuck behind it.
            raw = str(got["data"])[: MAX_BODY // 4]
            p = Payload(sender="?", to=recipient, body=raw, sent_at=time.time(), origin="?")
            log.warning("swarm: #%d in %s's inbox is not a message (%s)", seq, recipient, exc)
            with trio.CancelScope(shield=True):
                await self._dead(seq, reply, p, 0, why=f"not a hyperhive message: {exc}")
            return None
        attempt = int(got["delivered"]) - self._uncounted.get(seq, 0)
        with trio.CancelScope(shield=True):
            if attempt > self.max_attempts:
                await self._dead(seq, reply, p, attempt - 1)
                return None
            if not lease:
                await self._settle(reply, "+ACK")
                self._forget(seq)
                self._count(recipient, -1)
                msg = _message(p, seq, "delivered", attempt)
                self._event(partial(_delivered, seq, recipient), wire.MessageDelivered)
                return msg
            held = _Lease(seq, recipient, attempt, reply)
            await self._store.run(_save_lease, held)
            self._leases[seq] = held
        self._count(recipient, -1)
        msg = _message(p, seq, "leased", attempt)
        self._event(partial(_leased, seq, recipient, attempt), wire.MessageLeased)
        return msg

    async def _dead(
        self, seq: int, reply: str, p: Payload, attempts: int, *, why: str | None = None
    ) -> None:
        await self._publish(f"{s.DEAD}.{seq}", _encode(p), f"dead.{seq}")
        await self._settle(reply, "+ACK")
        self._forget(seq)
        self._count(p.to, -1)
        msg = _message(p, seq, "dead", attempts)
        if why is None:
            self._spawn(report_dead, self.send, [msg])
        else:
            note = f"#{seq} in {p.to}'s inbox was dead-lettered: {why}. It is kept (dead-letters)."
            self._spawn(self._tell_operator, note)

    async def _tell_operator(self, note: str) -> None:
        try:
            await self.send(SYSTEM, OPERATOR, note, origin=SYSTEM)
        except HiveError as exc:
            log.error("could not tell the operator: %s", exc.message)

    def _forget(self, seq: int) -> None:
        self._leases.pop(seq, None)
        self._uncounted.pop(seq, None)

    def _count(self, recipient: str, delta: int) -> None:
        self._depth[recipient] = max(0, self._depth.get(recipient, 0) + delta)

    def _held(self, recipient: str, mid: int, attempt: int) -> _Lease | None:
        lease = self._leases.get(mid)
        if lease is None or lease.recipient != recipient or lease.attempt != attempt:
            return None
        return lease

    async def ack(self, recipient: str, mid: int, attempt: int) -> bool:
        lease = self._held(recipient, mid, attempt)
        if lease is None:
            return False
        # Messages the turn drained itself (the recv tool) are consumed by the same turn.
        also = [x for x in self._leases.values() if x.recipient == recipient and x.seq != mid]
        with trio.CancelScope(shield=True):
            for held in [lease, *also]:
                await self._settle(held.reply, "+ACK")
                self._forget(held.seq)
                self._event(partial(_delivered, held.seq, recipient), wire.MessageDelivered)
            await self._store.run(_drop_leases, [x.seq for x in [lease, *also]])
        return True

    async def nack(
        self, recipient: str, mid: int, attempt: int, error: str, *, count: bool
    ) -> bool:
        lease = self._held(recipient, mid, attempt)
        if lease is None:
            return False
        if not count:
            self._uncounted[mid] = self._uncounted.get(mid, 0) + 1
        await self._give_back_leases(recipient)
        log.info("nack of #%d (%s): %s", mid, recipient, error[:200])
        return True

    async def _give_back_leases(self, recipient: str | None, *, keep: tuple[str, ...] = ()) -> int:
        held = [
            x
            for x in self._leases.values()
            if (recipient is None or x.recipient == recipient) and x.recipient not in keep
        ]
        with trio.CancelScope(shield=True):
            for lease in held:
                self._given_back.setdefault(lease.recipient, set()).add(lease.seq)
                await self._settle(lease.reply, "-NAK")
                self._leases.pop(lease.seq, None)
                self._count(lease.recipient, +1)
            if held:
                await self._store.run(_drop_leases, [x.seq for x in held])
        return len(held)

    async def release(self, recipient: str) -> int:
        """The inbox's reader is gone: its leases go back, its parked `recv`s end."""
        for scope in self._readers.get(recipient, ()):
            scope.cancel()
        return await self._give_back_leases(recipient)

    async def recover(self, keep: tuple[str, ...] = ()) -> int:
        """Leases persisted by the previous daemon: kept for adopted containers (renewed from
        now on), given back for the others."""
        for lease in await self._store.run(_load_leases):
            self._leases[lease.seq] = lease
            self._consumers.discard(lease.recipient)
        return await self._give_back_leases(None, keep=keep)

    async def requeue(self, mid: int) -> wire.Message:
        ans = await self._retrying("last", stream=s.DEAD_STREAM, subject=f"{s.DEAD}.{mid}")
        got = ans.get("msg")
        if got is None:
            raise NotFound(f"message #{mid} is not a dead letter")
        p = _decode(got["data"])
        seq = await self._publish(s.inbox(p.to), _encode(p), f"requeue.{mid}.{got['seq']}")
        try:
            await self._link.call("delete", stream=s.DEAD_STREAM, seq=int(got["seq"]))
        except SwarmError as exc:
            log.warning("requeued dead letter #%d kept in HIVE_DEAD: %s", mid, exc.message)
        self._count(p.to, +1)
        return _message(p, seq, "queued")

    async def recent(
        self, recipient: str | None, limit: int, *, state: str | None = None
    ) -> list[wire.Message]:
        """The console's views: the operator's inbox, the dead letters, an inbox's queue (what
        JetStream still holds: queued and leased), newest last."""
        limit = max(1, min(limit, 2000))
        if state == "dead":
            stream, subject, shown = s.DEAD_STREAM, None, "dead"
        elif recipient == OPERATOR:
            stream, subject, shown = s.OPERATOR_STREAM, None, "delivered"
        else:
            stream = s.INBOX_STREAM
            subject = None if recipient is None else s.inbox(recipient)
            shown = "queued"
        ans = await self._retrying("tail", stream=stream, limit=limit, subject=subject)
        out = []
        for got in ans["msgs"]:
            try:
                p = _decode(got["data"])
            except (msgspec.DecodeError, msgspec.ValidationError):
                p = Payload(
                    sender="?", to=recipient or "?", body=str(got["data"])[:2000], sent_at=0
                )
            mid = int(got["subject"].rsplit(".", 1)[1]) if shown == "dead" else int(got["seq"])
            leased = self._leases.get(mid)
            out.append(
                _message(p, mid, "leased" if leased else shown, leased.attempt if leased else 0)
            )
        out = out[:limit]
        out.reverse()
        return out

    def queued(self, recipient: str) -> int:
        return self._depth.get(recipient, 0)

    async def counts(self, recipient: str) -> tuple[int, int]:
        ans = await self._retrying("consumer_info", durable=s.durable(recipient))
        self._depth[recipient] = int(ans["pending"])
        return int(ans["pending"]), int(ans["ack_pending"])

    async def census(self) -> tuple[dict[str, int], dict[str, float]]:
        queued = sum(self._depth.values())
        return {"queued": queued, "leased": len(self._leases)}, {}
