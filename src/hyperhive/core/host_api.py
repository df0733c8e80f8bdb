"""host.sock: the operator's admin socket. Whoever is let in here acts as `operator`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from hyperhive.core import events
from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.approvals import Approvals
from hyperhive.core.broker import Broker, EventHub
from hyperhive.core.config import DaemonConfig
from hyperhive.core.forge import Forge
from hyperhive.core.logins import needs_login
from hyperhive.core.questions import Questions
from hyperhive.core.server import EventStream, Peer
from hyperhive.core.storage import storage_full
from hyperhive.core.supervisor import Supervisor
from hyperhive.protocol import wire
from hyperhive.protocol.codec import encode_line
from hyperhive.protocol.errors import BadParams, Conflict, Forbidden
from hyperhive.protocol.names import (
    MANAGER,
    MANAGER_NAME,
    OPERATOR,
    SYSTEM,
    canonical_recipient,
    check_name,
    check_new_agent_name,
)

log = logging.getLogger(__name__)


def _remove(repo: Path) -> None:
    """Remove a config repo and its agent's directory around it, if that is left empty.
    `rmtree` neither follows nor removes a symlink planted in its place."""
    if os.path.lexists(repo) and not os.path.islink(repo):
        shutil.rmtree(repo)
    with contextlib.suppress(OSError):
        repo.parent.rmdir()


class HostHandler:
    def __init__(
        self,
        cfg: DaemonConfig,
        registry: Registry,
        broker: Broker,
        supervisor: Supervisor,
        hub: EventHub,
        approvals: Approvals,
        questions: Questions,
    ) -> None:
        self.approvals = approvals
        self.questions = questions
        self.cfg = cfg
        self.registry = registry
        self.broker = broker
        self.supervisor = supervisor
        self.hub = hub
        self.forge: Forge | None = None
        """The hive-forge, when the daemon runs with one (provisioning and health)."""
        self.dashboard: wire.ListenerStatus | None = None
        """The dashboard's port, as its server reports it (None without a dashboard)."""

    async def agent_infos(self) -> list[wire.AgentInfo]:
        recs = self.registry.all()
        logins = await trio.to_thread.run_sync(needs_login, self.cfg, [r.name for r in recs])
        self.registry.login_check.update(logins)
        infos = []
        for rec in recs:
            # The broker mirrors queue depths in memory: no sqlite round trip per agent.
            infos.append(self.registry.info(rec, unread=self.broker.queued(rec.recipient)))
        return infos

    async def kick(self, rec: AgentRecord, reason: str) -> None:
        """Tell an agent it was (re)started, so its next turn picks up where it left off."""
        await self.broker.send(
            SYSTEM,
            rec.recipient,
            f"{reason}\n\nYou were just (re)started by the operator. If you were mid-task, check"
            " /state/ for your notes and pick up where you left off. Your claude session is"
            " intact, so prior context is still in your window.",
            origin=SYSTEM,
        )

    async def spawn(self, name: str) -> AgentRecord:
        """The operator's direct spawn (no approval): both halves, in the foreground."""
        rec, revived = await self.begin_spawn(name)
        await self.finish_spawn(rec, revived)
        return rec

    async def begin_spawn(self, name: str) -> tuple[AgentRecord, bool]:
        check_new_agent_name(name)
        revived = self.registry.find(name) is not None
        async with self._undone_if_full(name, revived):
            # The proposed and applied config repos (kept as they are when reviving).
            await self.approvals.gitops.seed(name)
            rec = await self.registry.add(name, "agent")
        self.registry.set_state(rec, "spawning")
        return rec, revived

    async def finish_spawn(self, rec: AgentRecord, revived: bool) -> None:
        async with self._undone_if_full(rec.name, revived):
            await self.supervisor.open_socket(rec)
            await self.supervisor.create(rec)
            await self.approvals.record_spawn(rec, revived)
            if self.forge is not None:
                # Its Forgejo user and /state/forge-token (best-effort: failures only warn).
                await self.forge.ensure_user_for(rec.name)
            await self.supervisor.launch(rec)
            await self.kick(rec, "Revived from kept state." if revived else "Spawned.")

    @asynccontextmanager
    async def _undone_if_full(self, name: str, revived: bool) -> AsyncIterator[None]:
        """A spawn step that runs out of disk undoes the spawn and raises `StorageFull`.

        A new agent leaves nothing behind (no directory, no registry row, no meta repo entry);
        a revived one keeps its state and is a tombstone again, as before the spawn.
        """
        try:
            yield
        except Exception as exc:
            full = storage_full(exc)
            if full is None:
                raise
            log.error("spawn of %s ran out of disk; undoing it: %s", name, exc)
            with trio.CancelScope(shield=True):
                await self._undo_spawn(name, revived, full.message)
            raise full from exc

    async def _undo_spawn(self, name: str, revived: bool, note: str) -> None:
        """Each step on its own: one that fails (still no space) must not stop the others.
        Deleting comes first, so that what follows has the space it frees."""
        rec = self.registry.find(name)
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if rec is not None:
            steps.append(("stop", partial(self.supervisor.stop, rec)))
        steps.append(("close socket", partial(self.supervisor.close_socket, name)))
        if not revived:
            if rec is not None:
                steps.append(("destroy container", partial(self.supervisor.destroy, rec)))
            proposed = self.approvals.gitops.proposed(name)
            steps.append(("remove config", partial(trio.to_thread.run_sync, _remove, proposed)))
            # The registry may not have it (its row was what did not fit): purge goes by name.
            gone = rec or AgentRecord(name=name, role="agent", port=0, created_at=time.time())
            steps.append(("remove state", partial(self.supervisor.purge, gone)))
        steps.append(("leave meta repo", partial(self._leave_meta, name)))
        if rec is not None and revived and rec.alive:
            steps.append(("tombstone", partial(self._retombstone, rec, note)))
        elif rec is not None:
            steps.append(("forget", partial(self.registry.forget, name)))
        for what, step in steps:
            try:
                await step()
            except Exception as exc:
                log.error("undoing the spawn of %s: %s failed: %s", name, what, exc)

    async def _leave_meta(self, name: str) -> None:
        meta = self.approvals.meta
        if name in await meta.pins() or name in await meta.pins(committed=False):
            await meta.record(f"destroy {name}", name, None)

    async def _retombstone(self, rec: AgentRecord, note: str) -> None:
        rec.desired = "stopped"
        rec.destroyed_at = time.time()
        self.registry.set_state(rec, "destroyed", last_error=note)
        await self.registry.save(rec)

    async def kill(self, name: str) -> wire.AgentInfo:
        rec = self.registry.live(check_name(name))
        rec.desired = "stopped"
        await self.registry.save(rec)
        await self.supervisor.stop(rec)
        await self.supervisor.notify_manager(events.Killed(agent=rec.name))
        return self.registry.info(rec)

    async def start(self, name: str) -> wire.AgentInfo:
        rec = self.registry.live(check_name(name))
        rec.desired = "running"
        await self.registry.save(rec)
        await self.supervisor.launch(rec)
        await self.kick(rec, "Started.")
        return self.registry.info(rec)

    async def restart(self, name: str) -> wire.AgentInfo:
        rec = self.registry.live(check_name(name))
        self.registry.set_state(rec, "restarting")
        await self.supervisor.stop(rec)
        rec.desired = "running"
        await self.registry.save(rec)
        await self.supervisor.launch(rec)
        await self.kick(rec, "Restarted.")
        return self.registry.info(rec)

    async def rebuild(self, name: str) -> wire.AgentInfo:
        """Re-apply the agent's config and restart it; `conflict` with the error if it fails."""
        rec = self.registry.live(check_name(name))
        ok, note = await self.supervisor.rebuild(rec)
        if not ok:
            raise Conflict(f"rebuild of {name} failed: {note}")
        await self.approvals.record_rebuild(rec.name)
        await self.kick(rec, "Rebuilt: your configuration was re-applied.")
        return self.registry.info(rec)

    async def ensure_manager(self) -> AgentRecord | None:
        """Create hm1nd when missing; returns the record only when it was just created."""
        rec = self.registry.find(MANAGER_NAME)
        if rec is not None and rec.alive:
            return None
        rec = await self.registry.add(MANAGER_NAME, "manager")
        await self.supervisor.open_socket(rec)
        await self.supervisor.create(rec)
        await self.kick(rec, "The hive is up and you are its manager.")
        return rec

    async def handle(self, request: object, peer: Peer) -> wire.Reply | EventStream:
        match request:
            case wire.ListAgents():
                forge = self.forge.last if self.forge is not None else None
                return wire.AgentList(
                    agents=await self.agent_infos(), forge=forge, dashboard=self.dashboard
                )
            case wire.Spawn(name=name):
                rec = await self.spawn(name)
                return wire.AgentReply(agent=self.registry.info(rec))
            case wire.Kill(name=name):
                return wire.AgentReply(agent=await self.kill(name))
            case wire.Start(name=name):
                return wire.AgentReply(agent=await self.start(name))
            case wire.Restart(name=name):
                return wire.AgentReply(agent=await self.restart(name))
            case wire.Pending():
                return wire.ApprovalList(approvals=await self.approvals.pending())
            case wire.Approve(id=aid):
                row = await self.approvals.approve(aid, self)
                if row.kind == "apply_commit" and row.status == "deployed":
                    rec = self.registry.get(row.agent)
                    await self.kick(rec, "Config update applied: your agent.toml changed.")
                return wire.ApprovalReply(approval=row.info())
            case wire.Deny(id=aid, note=note):
                return wire.ApprovalReply(approval=(await self.approvals.deny(aid, note)).info())
            case wire.HostRequestSpawn(name=name, description=description):
                row = await self.approvals.request_spawn(name, description)
                return wire.ApprovalQueued(id=row.id)
            case wire.Rebuild(name=name):
                return wire.AgentReply(agent=await self.rebuild(name))
            case wire.Logs(name=name, lines=lines):
                rec = self.registry.get(check_name(name))
                return wire.LogLines(name=name, lines=await self.supervisor.logs(rec, lines))
            case wire.Destroy(name=name, purge=purge):
                return await self._destroy(check_name(name), purge)
            case wire.OperatorSend(to=to, body=body):
                msgs = await self.broker.send(
                    OPERATOR, canonical_recipient(to), body, origin=OPERATOR
                )
                return wire.Sent(ids=[m.id for m in msgs], recipients=[m.to for m in msgs])
            case wire.HostRecent(name=name, limit=limit):
                inbox = canonical_recipient(name)
                if inbox not in (OPERATOR, MANAGER):
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

    async def _destroy(self, name: str, purge: bool) -> wire.Reply:
        rec = self.registry.get(name)
        if rec.role == "manager":
            raise Forbidden("the manager cannot be destroyed")
        if rec.alive:
            self.registry.set_state(rec, "destroying")
            await self.supervisor.stop(rec)
            await self.supervisor.destroy(rec)
            await self.supervisor.close_socket(name)
            rec.desired = "stopped"
            rec.destroyed_at = time.time()
            self.registry.set_state(rec, "destroyed")
            await self.registry.save(rec)
            await self.approvals.record_destroy(name)
        if purge:
            await self.supervisor.purge(rec)
            await self.registry.forget(name)
        await self.supervisor.notify_manager(events.Destroyed(agent=name, purged=purge))
        return wire.Done()

    async def _events(self) -> AsyncIterator[bytes]:
        # Closed with this generator (the server closes it when the client goes).
        async with aclosing(self.hub.stream()) as events:
            async for event in events:
                yield encode_line(event)
