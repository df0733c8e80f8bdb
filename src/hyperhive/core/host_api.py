"""host.sock: the operator's admin socket. Whoever is let in here acts as `operator`.

The handler decodes and dispatches: agents' lifecycles are core/lifecycle.py's, decisions
core/approvals.py's, the queue core/approval_queue.py's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import trio

from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.approval_queue import DIFF_CAP, ApprovalQueue
from hyperhive.core.approvals import Approvals
from hyperhive.core.broker import EventHub, MessageBroker
from hyperhive.core.config import DaemonConfig
from hyperhive.core.forge import Forge
from hyperhive.core.lifecycle import Lifecycle
from hyperhive.core.logins import needs_login
from hyperhive.core.metrics import HiveMetrics
from hyperhive.core.notifications import Notifier
from hyperhive.core.questions import Questions
from hyperhive.core.reminders import Reminders
from hyperhive.core.server import EventStream, Peer, Router
from hyperhive.core.supervisor import Supervisor
from hyperhive.core.turns import Turns
from hyperhive.core.upgrades import Upgrades
from hyperhive.protocol import wire
from hyperhive.protocol.codec import encode_line
from hyperhive.protocol.errors import BadParams
from hyperhive.protocol.names import MANAGER, OPERATOR, canonical_recipient, check_name

log = logging.getLogger(__name__)


class HostHandler:
    def __init__(
        self,
        cfg: DaemonConfig,
        registry: Registry,
        broker: MessageBroker,
        hub: EventHub,
        lifecycle: Lifecycle,
        queue: ApprovalQueue,
        approvals: Approvals,
        questions: Questions,
        supervisor: Supervisor,
        forge: Forge | None,
        turns: Turns,
        notifier: Notifier,
        reminders: Reminders,
        upgrades: Upgrades,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.broker = broker
        self.hub = hub
        self.lifecycle = lifecycle
        self.queue = queue
        self.approvals = approvals
        self.questions = questions
        self.supervisor = supervisor
        self.forge = forge
        self.turns = turns
        self.notifier = notifier
        self.reminders = reminders
        self.upgrades = upgrades
        self.metrics = HiveMetrics(registry, broker, turns, queue)
        """The hive-forge, when the daemon runs with one (its health for `list`)."""
        self.forward: Router | None = None
        """Swarm mode: routes requests to the host that owns what they name."""
        self.dashboard: wire.ListenerStatus | None = None
        """The dashboard's port, as its server reports it (None without a dashboard)."""

    async def agent_infos(self) -> list[wire.AgentInfo]:
        recs = self.registry.all()
        logins = await trio.to_thread.run_sync(needs_login, self.cfg, [r.name for r in recs])
        self.registry.login_check.update(logins)
        return self.registry.infos(self.broker.queued)

    async def _stats(self, name: str | None) -> list[wire.AgentStats]:
        known = await self.turns.agents()
        if name is not None:
            if check_name(name) not in known:
                self.registry.get(name)  # not_found for a name the hive never had
            return [await self.turns.stats(name)]
        names = sorted({*known, *self.registry.live_names()})
        return [await self.turns.stats(n) for n in names]

    async def _tags(self, name: str) -> list[wire.TagInfo]:
        tags = await self.lifecycle.deploys.gitops.tag_history(name)
        return [wire.TagInfo(tag=t, sha=s, at=a, note=n) for t, s, a, n in tags]

    def _check_host(self, host: str | None) -> None:
        """A spawn for a host is done here only when it is this host (the forwarder sends the
        others on); a single-host hive has no hosts to pick."""
        if host is not None and host != self.registry.host:
            if self.registry.host is None:
                raise BadParams(f"--host {host}: this hive runs on one host (no --swarm)")
            raise BadParams(f"--host {host}: this is host {self.registry.host}")

    def _agent(self, rec: AgentRecord) -> wire.AgentReply:
        return wire.AgentReply(agent=self.registry.info(rec))

    async def handle(self, request: object, peer: Peer) -> wire.Reply | EventStream:
        """A swarm host first asks its forwarder (SPEC §11): a request about another host's
        agent, approval or question is answered there; the rest here."""
        if self.forward is not None:
            routed = await self.forward.route(request, self.handle_here)
            if routed is not None:
                return routed
        return await self.handle_here(request, peer)

    async def handle_here(self, request: object, peer: Peer) -> wire.Reply | EventStream:
        match request:
            case wire.ListAgents():
                forge = self.forge.last if self.forge is not None else None
                return wire.AgentList(
                    agents=await self.agent_infos(),
                    forge=forge,
                    dashboard=self.dashboard,
                    host=self.registry.host,
                )
            case wire.ListReminders(name=name):
                inbox = None if name is None else self.registry.get(check_name(name)).recipient
                return wire.ReminderList(reminders=await self.reminders.pending(inbox))
            case wire.CancelReminder(id=rid):
                await self.reminders.cancel(rid)
                return wire.Done()
            case wire.History(name=name):
                rec = self.registry.get(check_name(name))
                return wire.TagHistory(name=rec.name, tags=await self._tags(rec.name))
            case wire.Config(name=name):
                rec = self.registry.get(check_name(name))
                gitops = self.lifecycle.deploys.gitops
                return wire.ConfigView(
                    name=rec.name,
                    agent_toml=await gitops.show(rec.name, "main", "agent.toml") or "",
                    agent_nix=await gitops.show(rec.name, "main", "agent.nix") or "",
                    deployed=self.registry.deployed.get(rec.name),
                    tags=await self._tags(rec.name),
                )
            case wire.DiffConfig(name=name, old=old, new=new):
                rec = self.registry.get(check_name(name))
                gitops = self.lifecycle.deploys.gitops
                return wire.ConfigDiff(diff=await gitops.diff_between(rec.name, old, new, DIFF_CAP))
            case wire.Notifications():
                return wire.NotificationList(notifications=list(self.notifier.recent))
            case wire.Metrics():
                return wire.MetricsText(text=(await self.metrics.render()).decode())
            case wire.Stats(name=name):
                return wire.StatsReply(agents=await self._stats(name))
            case wire.Spawn(name=name, host=host):
                self._check_host(host)
                return self._agent(await self.lifecycle.spawn(name))
            case wire.Kill(name=name):
                return self._agent(await self.lifecycle.kill(name))
            case wire.Start(name=name):
                return self._agent(await self.lifecycle.start(name))
            case wire.Restart(name=name):
                return self._agent(await self.lifecycle.restart(name))
            case wire.ApprovalHistory(limit=limit):
                rows = await self.queue.rows(
                    "status IN ('deployed', 'failed', 'denied', 'rolled_back')"
                )
                return wire.ApprovalList(approvals=[r.info() for r in reversed(rows[-limit:])])
            case wire.Pending():
                return wire.ApprovalList(approvals=await self.queue.pending())
            case wire.Approve(id=aid):
                return wire.ApprovalReply(approval=(await self.approvals.approve(aid)).info())
            case wire.Deny(id=aid, note=note):
                return wire.ApprovalReply(approval=(await self.approvals.deny(aid, note)).info())
            case wire.HostRequestSpawn(name=name, description=description, host=host):
                self._check_host(host)
                row = await self.queue.request_spawn(name, description)
                return wire.ApprovalQueued(id=row.id)
            case wire.MetaInputs():
                return await self.upgrades.inputs()
            case wire.HostRequestFlakeUpdate(inputs=inputs, description=description):
                row = await self.upgrades.request(inputs, description)
                return wire.ApprovalQueued(id=row.id)
            case wire.Rebuild(name=name):
                return self._agent(await self.lifecycle.rebuild(name))
            case wire.Logs(name=name, lines=lines):
                rec = self.registry.get(check_name(name))
                return wire.LogLines(name=name, lines=await self.supervisor.logs(rec, lines))
            case wire.Destroy(name=name, purge=purge):
                await self.lifecycle.destroy(name, purge)
                return wire.Done()
            case wire.OperatorSend(to=to, body=body, in_reply_to=reply_to):
                msgs = await self.broker.send(
                    OPERATOR, canonical_recipient(to), body, origin=OPERATOR, in_reply_to=reply_to
                )
                return wire.Sent(ids=[m.id for m in msgs], recipients=[m.to for m in msgs])
            case wire.HostRecent(name=name, limit=limit):
                inbox = canonical_recipient(name)
                remote = self.registry.remote
                if inbox not in (OPERATOR, MANAGER) and not (
                    remote is not None and remote.host_of(check_name(name)) is not None
                ):  # an agent of another host: its inbox is the hive's (swarm mode)
                    inbox = self.registry.get(check_name(name)).recipient
                return wire.Inbox(messages=await self.broker.recent(inbox, limit))
            case wire.Flow(limit=limit):
                return wire.Inbox(messages=await self.broker.recent(None, limit))
            case wire.DeadLetters(limit=limit):
                return wire.Inbox(messages=await self.broker.recent(None, limit, state="dead"))
            case wire.Requeue(id=mid):
                return wire.Received(message=await self.broker.requeue(mid))
            case wire.ListQuestions():
                return wire.QuestionList(questions=await self.questions.pending())
            case wire.HostAnswer(id=qid, answer=answer):
                return wire.QuestionReply(question=await self.questions.answer(qid, answer))
            case wire.CancelQuestion(id=qid):
                return wire.QuestionReply(question=await self.questions.cancel(qid))
            case wire.Subscribe():
                return EventStream(wire.Subscribed(), self._events())
        raise BadParams(f"unsupported request {type(request).__name__}")

    async def _events(self) -> AsyncIterator[bytes]:
        # Closed with this generator (the server closes it when the client goes).
        async with aclosing(self.hub.stream()) as events:
            async for event in events:
                yield encode_line(event)
