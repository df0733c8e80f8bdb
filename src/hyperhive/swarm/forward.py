"""One console for the whole hive: operator requests go to the host that owns what they name.

On any host, host.sock (and so the CLI and the dashboard) works on every agent: a request that
names an agent of another host, an approval or question or reminder id of another host (each
host's ids live in its own range, `slot * ID_SPAN + n`), or a spawn placed on another host, is
forwarded over NATS request/reply to `hive.host.<host>.admin` and answered there, by that
host's daemon, exactly as its own host.sock would. The lists the operator works through
(pending approvals, open questions, approval history, reminders) are gathered from every live
host. A host that is down answers nothing: the operator is told so (`unavailable`).

Trust: the NATS cluster is the boundary — whoever can publish on `hive.host.*.admin` acts as
the operator. Run NATS on a private network with TLS and credentials (README, Swarm).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NoReturn

import msgspec
import trio

from hyperhive.core.broker import EventHub
from hyperhive.core.questions import Questions
from hyperhive.core.server import EventStream, Here, Peer
from hyperhive.protocol import wire
from hyperhive.protocol.client import decode_reply, reply_type
from hyperhive.protocol.codec import HOST_DECODER, encode_line, error_line
from hyperhive.protocol.errors import BadParams, HiveError, Internal, NotFound, Unavailable
from hyperhive.swarm import subjects as s
from hyperhive.swarm.directory import Directory
from hyperhive.swarm.link import Link, SwarmError

log = logging.getLogger(__name__)

FORWARDED = Peer(pid=0, uid=0, gid=0)
"""Whom a forwarded request is handled as: the operator (the NATS cluster is trusted)."""

FORWARD_TIMEOUT = 120.0
"""A forwarded request may do a host's git work and start a container."""

_BY_NAME = (
    wire.Config,
    wire.Destroy,
    wire.DiffConfig,
    wire.History,
    wire.Kill,
    wire.Start,
    wire.Restart,
    wire.Rebuild,
    wire.Logs,
    wire.Stats,
    wire.ListReminders,
)
_BY_ID = (wire.Approve, wire.Deny, wire.HostAnswer, wire.CancelQuestion, wire.CancelReminder)
_GATHERED = (wire.Pending, wire.ListQuestions, wire.ApprovalHistory, wire.ListReminders)


class Forwarder:
    def __init__(self, link: Link, directory: Directory, host: str, slot: int) -> None:
        self._link = link
        self._directory = directory
        self.host = host
        self.slot = slot
        self.messages: trio.MemoryReceiveChannel[wire.HiveEvent] | None = None
        """This host's message events, shared with the other consoles (the broker's)."""

    # ------------------------------------------------------------------ routing

    def _owner(self, request: object) -> str | None:
        """The other host that owns what `request` names, if one does."""
        if isinstance(request, wire.Spawn | wire.HostRequestSpawn):
            if request.host is not None:
                return None if request.host == self.host else request.host
            owner = self._directory.host_of(request.name)
            return owner if owner not in (None, self.host) else self._place()
        if isinstance(request, _BY_NAME):
            name = getattr(request, "name", None)
            owner = None if name is None else self._directory.host_of(name)
            return owner if owner != self.host else None
        if isinstance(request, _BY_ID):
            return self._host_of_id(request.id)
        return None

    def _place(self) -> str | None:
        """Where a spawn with no `host` goes (SPEC §11): the live host with the most available
        memory, then the fewest agents, then by name; None: here."""
        best = self._directory.placement()
        return None if best in (None, self.host) else best

    async def route(self, request: object, here: Here) -> wire.Reply | EventStream | None:
        """Forwarded (or gathered) reply, or None: handle it here as usual."""
        if isinstance(request, _GATHERED) and getattr(request, "name", None) is None:
            return await self._gather(request, here)
        owner = self._owner(request)
        if owner is None:
            return None
        if isinstance(request, wire.Spawn | wire.HostRequestSpawn) and request.host is None:
            request = msgspec.structs.replace(request, host=owner)
        return await self.forward(owner, request)

    async def forward(self, host: str, request: Any) -> wire.Reply:
        if host not in self._directory.beats:
            raise NotFound(f"no host named {host!r} in this hive")
        if self._directory.is_down(host):
            raise Unavailable(f"host {host} is down: it cannot act on that now")
        try:
            ans = await self._link.call(
                "request",
                subject=s.admin(host),
                data=encode_line(request).decode(),
                timeout=FORWARD_TIMEOUT,
            )
        except SwarmError as exc:
            raise Unavailable(f"host {host} did not answer: {exc.message}") from None
        reply: wire.Reply = decode_reply(str(ans["data"]).encode(), reply_type(request))
        return reply

    async def _gather(self, request: Any, here: Here) -> wire.Reply:
        local = await here(request, FORWARDED)
        assert isinstance(local, wire.Reply)
        field = _list_field(local)
        merged = list(getattr(local, field))
        others = [h for h in self._directory.live_hosts() if h != self.host]
        replies: dict[str, wire.Reply] = {}

        async def one(host: str) -> None:
            try:
                with trio.fail_after(10):
                    replies[host] = await self.forward(host, request)
            except (HiveError, trio.TooSlowError) as exc:
                log.warning("swarm: %s from %s failed: %s", type(request).__name__, host, exc)

        async with trio.open_nursery() as nursery:
            for host in others:
                nursery.start_soon(one, host)
        for host in others:
            if host in replies:
                merged.extend(getattr(replies[host], field))
        merged.sort(key=lambda item: getattr(item, "id", 0))
        return msgspec.structs.replace(local, **{field: merged})

    def _host_of_id(self, ident: int) -> str | None:
        """The other host whose range `ident` is in (None: this host's, or a single host's)."""
        slot = int(ident) // s.ID_SPAN
        if slot in (0, self.slot):
            return None
        owner = self._directory.slot_host(slot)
        if owner is None:
            raise BadParams(f"no host of this hive has ids like #{ident}")
        return owner

    async def answer(
        self, qid: int, answer: str, answerer: str, as_peer: str
    ) -> wire.QuestionReply | None:
        """An agent here answers a question that lives on another host: answered there."""
        owner = self._host_of_id(qid)
        if owner is None:
            return None
        request = _PeerAnswer(id=qid, answer=answer, answerer=answerer, as_peer=as_peer)
        try:
            ans = await self._link.call(
                "request", subject=s.peer(owner), data=_encode(request).decode(), timeout=30
            )
        except SwarmError as exc:
            raise Unavailable(f"host {owner} did not answer: {exc.message}") from None
        reply: wire.QuestionReply = decode_reply(str(ans["data"]).encode(), wire.QuestionReply)
        return reply

    # ------------------------------------------------------------------ serving

    async def serve(
        self,
        here: Here,
        questions: Questions,
        hub: EventHub,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Answer what other hosts forward here (each request in its own task); pass this
        host's approval and question events to the other consoles, and theirs to ours."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._subscribed, s.admin(self.host), partial(self._answer, here))
            await nursery.start(
                self._subscribed, s.peer(self.host), partial(self._peer_answer, questions)
            )
            await nursery.start(self._subscribed, f"{s.EVENTS}.>", partial(self._event, hub))
            nursery.start_soon(self._share_events, hub)
            if self.messages is not None:
                nursery.start_soon(self._share_messages, self.messages)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def _subscribed(
        self,
        subject: str,
        handle: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        started = False
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await self._link.wait_up()
                    async with self._link.subscribe("serve", subject=subject) as pushes:
                        if not started:
                            started = True
                            task_status.started()
                        async for push in pushes:
                            nursery.start_soon(handle, push)
                except SwarmError as exc:
                    log.warning("swarm: serving %s ended: %s", subject, exc.message)
                await trio.sleep(0.5)

    async def _respond(self, push: dict[str, Any], line: bytes) -> None:
        try:
            await self._link.call("respond", reply=push["reply"], data=line.decode())
        except SwarmError as exc:
            log.warning("swarm: could not answer a forwarded request: %s", exc.message)

    async def _answer(self, here: Here, push: dict[str, Any]) -> None:
        try:
            request = HOST_DECODER.decode(str(push["data"]).encode())
            if isinstance(request, wire.Subscribe):
                raise BadParams("subscribe is not forwarded: subscribe on the host itself")
            reply = await here(request, FORWARDED)
            if isinstance(reply, EventStream):
                raise Internal("a forwarded request answered with a stream")
            line = encode_line(reply)
        except HiveError as exc:
            line = error_line(exc)
        except Exception as exc:
            log.exception("swarm: forwarded request failed")
            line = error_line(Internal(f"{type(exc).__name__}: {exc}"))
        await self._respond(push, line)

    async def _peer_answer(self, questions: Questions, push: dict[str, Any]) -> None:
        try:
            req = _peer_decoder.decode(str(push["data"]).encode())
            info = await questions.answer(
                req.id, req.answer, answerer=req.answerer, as_peer=req.as_peer
            )
            line = encode_line(wire.QuestionReply(question=info))
        except (HiveError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            err = exc if isinstance(exc, HiveError) else BadParams(str(exc))
            line = error_line(err)
        await self._respond(push, line)

    async def _share_events(self, hub: EventHub) -> NoReturn:
        recv = hub.subscribe((wire.ApprovalChanged, wire.QuestionChanged))
        with recv:
            async for event in recv:
                ident = _event_id(event)
                if ident is None or ident // s.ID_SPAN != self.slot:
                    continue  # another host's, passed on to us: not ours to share
                await self._publish_live(f"{s.EVENTS}.{self.host}", _encode(event))
        raise AssertionError("the event hub dropped the swarm's event relay")

    async def _share_messages(self, events: trio.MemoryReceiveChannel[wire.HiveEvent]) -> None:
        """This host's message events, to the other consoles in batches (one NATS message per
        50 ms at most, whatever the traffic)."""
        async for first in events:
            batch = [first]
            await trio.sleep(0.05)
            while len(batch) < 1000:
                try:
                    batch.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._publish_live(f"{s.EVENTS}.{self.host}.messages", _encode(batch))

    async def _publish_live(self, subject: str, data: bytes) -> None:
        """Events for the other consoles: best effort (a console's live view, not a record)."""
        try:
            await self._link.call("publish_core", subject=subject, data=data.decode())
        except SwarmError as exc:
            log.debug("swarm: events on %s not shared: %s", subject, exc.message)

    async def _event(self, hub: EventHub, push: dict[str, Any]) -> None:
        data = str(push["data"]).encode()
        try:
            if data.startswith(b"["):
                for event in _batch_decoder.decode(data):
                    if event.seq == 0 and isinstance(event, _MESSAGE_EVENTS):
                        hub.publish(partial(_renumbered, event), type(event))
                return
            event = _event_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("swarm: unreadable event from another host: %s", exc)
            return
        ident = _event_id(event)
        if ident is not None and ident // s.ID_SPAN != self.slot:
            hub.publish(partial(_renumbered, event))


class _PeerAnswer(msgspec.Struct, frozen=True):
    id: int
    answer: str
    answerer: str
    as_peer: str


_encode = msgspec.json.Encoder().encode
_peer_decoder = msgspec.json.Decoder(_PeerAnswer)
_event_decoder: msgspec.json.Decoder[wire.HiveEvent] = msgspec.json.Decoder(wire.HiveEvents)
_batch_decoder: msgspec.json.Decoder[list[wire.HiveEvent]] = msgspec.json.Decoder(
    list[wire.HiveEvents]
)
_MESSAGE_EVENTS = (wire.MessageSent, wire.MessageDelivered, wire.MessageLeased)


def _event_id(event: wire.HiveEvent) -> int | None:
    if isinstance(event, wire.ApprovalChanged):
        return int(event.approval.id)
    if isinstance(event, wire.QuestionChanged):
        return int(event.question.id)
    return None


def _renumbered(event: wire.HiveEvent, seq: int) -> wire.HiveEvent:
    return msgspec.structs.replace(event, seq=seq)


def _list_field(reply: wire.Reply) -> str:
    fields = [
        f.name for f in msgspec.structs.fields(reply) if isinstance(getattr(reply, f.name), list)
    ]
    if len(fields) != 1:
        raise Internal(f"cannot merge a {type(reply).__name__}")
    return fields[0]
