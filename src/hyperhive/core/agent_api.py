"""The per-agent (and manager) socket: whoever connects here acts as that agent, and only as it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.approval_queue import ApprovalQueue
from hyperhive.core.broker import MessageBroker
from hyperhive.core.lifecycle import Lifecycle
from hyperhive.core.questions import Questions
from hyperhive.core.reminders import Reminders
from hyperhive.core.server import EventStream, Handler, Peer, PeerRouter, Swarm
from hyperhive.core.tokens import LoginTokens
from hyperhive.core.turns import Turns
from hyperhive.core.upgrades import Upgrades
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import AgentConfig
from hyperhive.protocol.codec import AGENT_DECODER, MANAGER_DECODER, RequestDecoder
from hyperhive.protocol.errors import BadParams, Conflict, Forbidden, HiveError, Internal
from hyperhive.protocol.names import (
    BROADCAST,
    MANAGER,
    MANAGER_NAME,
    SELF,
    canonical_label,
    canonical_recipient,
    check_name,
)

NEXT_TURN_LIMIT = 20
"""`next_turn`s an agent may ask for in a row before it must wait for a real message."""

AppliedConfig = Callable[[AgentRecord], Awaitable[AgentConfig]]
"""The agent.toml in force for an agent's container (`Supervisor.applied_config`)."""


class AgentHandler:
    def __init__(
        self,
        rec: AgentRecord,
        broker: MessageBroker,
        registry: Registry,
        questions: Questions,
        reminders: Reminders,
        *,
        turns: Turns,
        queue: ApprovalQueue,
        applied_config: AppliedConfig,
        ui_token: str,
        peers: PeerRouter | None = None,
    ) -> None:
        self.peers = peers
        """Swarm mode: answers to questions that live on another host go there."""
        self.rec = rec
        self.turns = turns
        self.queue = queue
        self.broker = broker
        self.registry = registry
        self.questions = questions
        self.reminders = reminders
        self.applied_config = applied_config
        # This agent's web UI token: its harness asks for it here, never in its environment.
        self.ui_token = ui_token

    @property
    def principal(self) -> str:
        return self.rec.recipient

    def _check_label(self, label: str) -> str:
        """The label's canonical form (names.canonical_label); the manager has no name of its
        own to label with (`hm1nd` is a principal), a sub-agent may use its own."""
        own = self.rec.name if self.rec.role == "agent" else None
        return canonical_label(label, agents=[r.name for r in self.registry.all()], own=own)

    async def _check_recipient(self, to: str) -> None:
        """agent.toml's `allowed_recipients`, enforced here too: the MCP tool's check is only a
        courtesy, as an agent can write to its socket directly. The manager is always allowed;
        an empty list allows anyone; a broadcast would reach everyone, so a list refuses it."""
        if self.rec.role == "manager" or to == MANAGER:
            return
        try:
            allowed = (await self.applied_config(self.rec)).allowed_recipients
        except HiveError as err:
            raise Forbidden(
                f"your agent.toml cannot be read ({err.message}); only the manager can be reached"
            ) from None
        if not allowed or to in {canonical_recipient(a) for a in allowed}:
            return
        listed = f"your allowed recipients ({', '.join(allowed)}, manager)"
        if to == BROADCAST:
            raise Forbidden(f"a broadcast ('*') would reach agents beyond {listed}")
        raise Forbidden(
            f"{to[:40]!r} is not among {listed}; ask the manager if you need to reach someone else"
        )

    async def handle(self, request: object, peer: Peer) -> wire.Reply | EventStream:
        match request:
            case wire.Send(to=to, body=body, in_reply_to=reply_to):
                await self._check_recipient(canonical_recipient(to))
                msgs = await self.broker.send(
                    self.principal,
                    canonical_recipient(to),
                    body,
                    origin=self.rec.name,
                    in_reply_to=reply_to,
                )
                return wire.Sent(ids=[m.id for m in msgs], recipients=[m.to for m in msgs])
            case wire.Recv(wait_seconds=wait, lease=lease):
                msg = await self.broker.recv(self.principal, wait, lease=lease)
                if msg is not None and msg.sender != SELF and self.rec.next_turns:
                    self.registry.note_quietly(self.rec, next_turns=0)
                return wire.Received(message=msg, unread=self.broker.queued(self.principal))
            case wire.Ack(id=mid, attempt=attempt):
                acked = await self.broker.ack(self.principal, mid, attempt)
                return wire.Acked(acked=acked)
            case wire.Nack(id=mid, attempt=attempt, error=error, count=count):
                done = await self.broker.nack(self.principal, mid, attempt, error, count=count)
                return wire.Acked(acked=done)
            case wire.Status():
                queued, in_flight = await self.broker.counts(self.principal)
                return wire.StatusReply(
                    name=self.rec.name, role=self.rec.role, unread=queued, in_flight=in_flight
                )
            case wire.Recent(limit=limit):
                return wire.Inbox(messages=await self.broker.recent(self.principal, limit))
            case wire.Wake(sender=label, body=body):
                msgs = await self.broker.send(
                    self._check_label(label), self.principal, body, origin=self.rec.name
                )
                return wire.Sent(ids=[m.id for m in msgs], recipients=[m.to for m in msgs])
            case wire.Ask(question=q, options=options, multi=multi, ttl_seconds=ttl, to=to):
                if to:
                    # A question to a peer is a message to it; the operator is always askable.
                    await self._check_recipient(canonical_recipient(to))
                qid = await self.questions.ask(
                    self.principal, q, options=options, multi=multi, ttl_seconds=ttl, to=to
                )
                return wire.QuestionQueued(id=qid)
            case wire.Answer(id=qid, answer=answer):
                if self.peers is not None:  # swarm mode: the question may be another host's
                    routed = await self.peers.answer(qid, answer, self.rec.name, self.principal)
                    if routed is not None:
                        return routed
                info = await self.questions.answer(
                    qid, answer, answerer=self.rec.name, as_peer=self.principal
                )
                return wire.QuestionReply(question=info)
            case wire.Remind(
                message=text, delay_seconds=delay, at_unix_timestamp=at, file_path=path
            ):
                rid, due = await self.reminders.schedule(
                    self.principal, text, delay_seconds=delay, at_unix_timestamp=at, file_path=path
                )
                return wire.ReminderQueued(id=rid, due_at=due)
            case wire.FetchUiToken():
                return wire.UiToken(token=self.ui_token)
            case wire.OpenThreads():
                return await self._open_threads()
            case wire.NextTurn():
                return await self._next_turn()
            case wire.ReportTurns(turns=turns):
                return wire.TurnsStored(ids=await self.turns.record(self.rec, turns))
            case wire.ReportState(state=state, since=since):
                self.registry.note(self.rec, turn_state=state, turn_since=since)
                return wire.Done()
        raise BadParams(f"unsupported request {type(request).__name__}")

    async def _open_threads(self) -> wire.Threads:
        """What is open that involves this agent; the manager sees the hive's."""
        hive = self.rec.role == "manager"
        rows = await self.queue.rows("status = 'pending'")
        approvals = [r.info() for r in rows if hive or r.agent == self.rec.name]
        questions = [
            q
            for q in await self.questions.pending()
            if hive or self.principal in (q.asker, q.target)
        ]
        reminders = await self.reminders.pending(self.principal)
        return wire.Threads(approvals=approvals, questions=questions, reminders=reminders)

    async def _next_turn(self) -> wire.Sent:
        if self.rec.next_turns >= NEXT_TURN_LIMIT:
            raise Conflict(
                f"{NEXT_TURN_LIMIT} turns in a row were asked for: wait for a message (or set a"
                " reminder) before asking for another"
            )
        msgs = await self.broker.send(SELF, self.principal, "continue", origin=self.rec.name)
        self.registry.note_quietly(self.rec, next_turns=self.rec.next_turns + 1)
        return wire.Sent(ids=[m.id for m in msgs], recipients=[m.to for m in msgs])


class ManagerHandler(AgentHandler):
    """The manager's socket: an agent's commands plus proposing approvals and lifecycle verbs.

    The decoder already refuses these commands on agent sockets; the lifecycle does the work
    exactly as for the operator, but the manager can never target itself.
    """

    def __init__(
        self,
        rec: AgentRecord,
        broker: MessageBroker,
        registry: Registry,
        questions: Questions,
        reminders: Reminders,
        lifecycle: Lifecycle,
        queue: ApprovalQueue,
        *,
        upgrades: Upgrades,
        turns: Turns,
        applied_config: AppliedConfig,
        ui_token: str,
        forward: Swarm | None = None,
    ) -> None:
        self.upgrades = upgrades
        self.forward = forward
        super().__init__(
            rec,
            broker,
            registry,
            questions,
            reminders,
            turns=turns,
            queue=queue,
            applied_config=applied_config,
            ui_token=ui_token,
            peers=forward,
        )
        self.lifecycle = lifecycle

    async def handle(self, request: object, peer: Peer) -> wire.Reply | EventStream:
        if self.forward is not None:
            # Swarm mode: an agent of another host is acted on there (SPEC §11).
            as_operator = _host_request(request)
            if as_operator is not None:
                routed = await self.forward.route(as_operator, _never_here)
                if routed is not None:
                    return routed
        life = self.lifecycle
        match request:
            case wire.RequestSpawn(name=name, description=description, host=host):
                if host is not None and host != self.registry.host:
                    raise BadParams(f"host {host!r}: this hive has no such host")
                row = await self.queue.request_spawn(name, description)
                return wire.ApprovalQueued(id=row.id)
            case wire.RequestApplyCommit(agent=agent, commit_ref=ref):
                row = await self.queue.request_apply_commit(agent, ref)
                return wire.ApprovalQueued(id=row.id, sha=row.sha)
            case wire.RequestFlakeUpdate(inputs=inputs, description=description):
                row = await self.upgrades.request(inputs, description)
                return wire.ApprovalQueued(id=row.id)
            case wire.KillAgent(name=name):
                return self._agent(await life.kill(refuse_manager_target(name)))
            case wire.StartAgent(name=name):
                return self._agent(await life.start(refuse_manager_target(name)))
            case wire.RestartAgent(name=name):
                return self._agent(await life.restart(refuse_manager_target(name)))
            case wire.UpdateAgent(name=name):
                return self._agent(await life.rebuild(refuse_manager_target(name)))
            case wire.ManagerListAgents():
                return wire.AgentList(agents=self.registry.infos(self.broker.queued))
        return await super().handle(request, peer)

    def _agent(self, rec: AgentRecord) -> wire.AgentReply:
        return wire.AgentReply(agent=self.registry.info(rec))


def _host_request(request: object) -> object | None:
    """The host.sock request a manager's request amounts to, for forwarding (swarm mode)."""
    match request:
        case wire.RequestSpawn(name=name, description=description, host=host):
            return wire.HostRequestSpawn(name=name, description=description, host=host)
        case wire.KillAgent(name=name):
            return wire.Kill(name=refuse_manager_target(name))
        case wire.StartAgent(name=name):
            return wire.Start(name=refuse_manager_target(name))
        case wire.RestartAgent(name=name):
            return wire.Restart(name=refuse_manager_target(name))
        case wire.UpdateAgent(name=name):
            return wire.Rebuild(name=refuse_manager_target(name))
    return None


async def _never_here(request: object, peer: Peer) -> wire.Reply | EventStream:
    raise Internal("a manager's request was to be gathered from every host")


def refuse_manager_target(name: str) -> str:
    """The manager may stop, start and restart agents, never itself."""
    if name in (MANAGER, MANAGER_NAME):
        raise Forbidden("the manager cannot target itself")
    return check_name(name)


@dataclass(frozen=True)
class AgentServices:
    """What an agent's socket serves: `handler_for` gives each agent its role's decoder and
    handler (for `AgentSockets.serve`)."""

    broker: MessageBroker
    registry: Registry
    questions: Questions
    reminders: Reminders
    lifecycle: Lifecycle
    queue: ApprovalQueue
    upgrades: Upgrades
    turns: Turns
    applied_config: AppliedConfig
    tokens: LoginTokens
    forward: Swarm | None = None
    """Swarm mode: the forwarder to the other hosts."""

    def handler_for(self, rec: AgentRecord) -> tuple[RequestDecoder[object], Handler[object]]:
        common = (rec, self.broker, self.registry, self.questions, self.reminders)
        token = self.tokens.agent(rec.name)
        if rec.role == "manager":
            manager = ManagerHandler(
                *common,
                self.lifecycle,
                self.queue,
                upgrades=self.upgrades,
                turns=self.turns,
                applied_config=self.applied_config,
                ui_token=token,
                forward=self.forward,
            )
            return MANAGER_DECODER, manager
        agent = AgentHandler(
            *common,
            turns=self.turns,
            queue=self.queue,
            applied_config=self.applied_config,
            ui_token=token,
            peers=self.forward,
        )
        return AGENT_DECODER, agent
