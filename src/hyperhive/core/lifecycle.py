"""An agent's lifecycle, in one place: spawn (and revive), start, kill, restart, rebuild, destroy,
tombstone, and the kick messages that tell an agent what just happened to it.

The handlers (host.sock, the manager's socket) and the approvals only call in here; the record's
state changes through `Registry.move` (validated against the state table, SPEC §4.4), its
desired state through `Registry.set_desired` / `Registry.bury`. Containers are the supervisor's,
sockets `AgentSockets`', the meta repo's record the deploy log's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from hyperhive.core import events
from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.approval_queue import ApprovalQueue
from hyperhive.core.broker import MessageBroker
from hyperhive.core.deploys import DeployLog
from hyperhive.core.events import Notices
from hyperhive.core.forge import Forge
from hyperhive.core.sockets import AgentSockets
from hyperhive.core.storage import storage_full
from hyperhive.core.supervisor import Supervisor
from hyperhive.protocol.errors import Conflict, Forbidden
from hyperhive.protocol.names import MANAGER_NAME, SYSTEM, check_name, check_new_agent_name

log = logging.getLogger(__name__)


def _remove(repo: Path) -> None:
    """Remove a config repo and its agent's directory around it, if that is left empty.
    `rmtree` neither follows nor removes a symlink planted in its place."""
    if os.path.lexists(repo) and not os.path.islink(repo):
        shutil.rmtree(repo)
    with contextlib.suppress(OSError):
        repo.parent.rmdir()


class Lifecycle:
    def __init__(
        self,
        registry: Registry,
        broker: MessageBroker,
        supervisor: Supervisor,
        sockets: AgentSockets,
        deploys: DeployLog,
        queue: ApprovalQueue,
        notices: Notices,
        forge: Forge | None = None,
    ) -> None:
        self.registry = registry
        self.broker = broker
        self.supervisor = supervisor
        self.sockets = sockets
        self.deploys = deploys
        self.queue = queue
        self.notices = notices
        self.forge = forge

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

    async def launch(self, rec: AgentRecord) -> None:
        """Its socket served and its container supervised (each a no-op if it already is)."""
        await self.sockets.open(rec)
        await self.supervisor.launch(rec)

    async def resume(self) -> None:
        """At start-up: every live agent's socket, and its container if it should run. One
        agent that cannot have its socket (its socket dir is its container's /run/hive, the
        agent's to mess up) must not cost the others theirs."""
        for rec in self.registry.all():
            if not rec.alive:
                continue
            try:
                await self.sockets.open(rec)
            except Exception as exc:
                log.error("%s: cannot open its socket: %s; not started", rec.name, exc)
                self.registry.note(rec, last_error=f"socket: {exc}")
                continue
            if rec.desired == "running":
                await self.supervisor.launch(rec)

    # ------------------------------------------------------------------ spawning

    async def spawn(self, name: str) -> AgentRecord:
        """The operator's direct spawn (no approval): both halves, in the foreground."""
        rec, revived = await self.begin_spawn(name)
        await self.finish_spawn(rec, revived)
        return rec

    async def begin_spawn(self, name: str) -> tuple[AgentRecord, bool]:
        """Register the agent (state `spawning`); quick. Returns it and whether it was revived."""
        check_new_agent_name(name)
        revived = self.registry.find(name) is not None
        async with self._undone_if_full(name, revived):
            # The proposed and applied config repos (kept as they are when reviving).
            await self.deploys.gitops.seed(name)
            rec = await self.registry.add(name, "agent")
        self.registry.move(rec, "spawning")
        return rec, revived

    async def finish_spawn(self, rec: AgentRecord, revived: bool) -> None:
        """Create and start the container, then greet the agent; may take minutes. Either
        half raises `StorageFull` having undone the spawn itself."""
        async with self._undone_if_full(rec.name, revived):
            await self.sockets.open(rec)
            await self.supervisor.create(rec)
            await self.deploys.record_spawn(rec, revived)
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
        steps.append(("close socket", partial(self.sockets.close, name)))
        if not revived:
            if rec is not None:
                steps.append(("destroy container", partial(self.supervisor.destroy, rec)))
            proposed = self.deploys.gitops.proposed(name)
            steps.append(("remove config", partial(trio.to_thread.run_sync, _remove, proposed)))
            # The registry may not have it (its row was what did not fit): purge goes by name.
            gone = rec or AgentRecord(name=name, role="agent", port=0, created_at=time.time())
            steps.append(("remove state", partial(self.supervisor.purge, gone)))
        steps.append(("leave meta repo", partial(self.deploys.leave, name)))
        if rec is not None and revived and rec.alive:
            steps.append(("tombstone", partial(self.registry.bury, rec, note)))
        elif rec is not None:
            steps.append(("forget", partial(self.registry.forget, name)))
        for what, step in steps:
            try:
                await step()
            except Exception as exc:
                log.error("undoing the spawn of %s: %s failed: %s", name, what, exc)

    async def tombstone(self, rec: AgentRecord, note: str) -> None:
        """A spawn that failed leaves a tombstone (its state kept), not a wreck."""
        await self.supervisor.stop(rec)
        await self.sockets.close(rec.name)
        await self.registry.bury(rec, note)
        # If it got as far as the meta repo, it leaves it again (a no-op otherwise).
        await self.deploys.record_destroy(rec.name)

    async def ensure_manager(self) -> AgentRecord | None:
        """Create hm1nd when missing; returns the record only when it was just created."""
        rec = self.registry.find(MANAGER_NAME)
        if rec is not None and rec.alive:
            return None
        rec = await self.registry.add(MANAGER_NAME, "manager")
        await self.sockets.open(rec)
        await self.supervisor.create(rec)
        await self.kick(rec, "The hive is up and you are its manager.")
        return rec

    # ------------------------------------------------------------------ running

    async def kill(self, name: str) -> AgentRecord:
        rec = self.registry.live(check_name(name))
        await self.registry.set_desired(rec, "stopped")
        await self.supervisor.stop(rec)
        await self.notices.tell(events.Killed(agent=rec.name))
        return rec

    async def start(self, name: str) -> AgentRecord:
        rec = self.registry.live(check_name(name))
        await self.registry.set_desired(rec, "running")
        await self.launch(rec)
        await self.kick(rec, "Started.")
        return rec

    async def restart(self, name: str) -> AgentRecord:
        rec = self.registry.live(check_name(name))
        self.registry.move(rec, "restarting")
        await self.supervisor.stop(rec)
        await self.registry.set_desired(rec, "running")
        await self.launch(rec)
        await self.kick(rec, "Restarted.")
        return rec

    async def rebuild(self, name: str) -> AgentRecord:
        """Re-apply the agent's config and restart it; `conflict` with the error if it fails."""
        rec = self.registry.live(check_name(name))
        ok, note = await self.rebuild_container(rec)
        if not ok:
            raise Conflict(f"rebuild of {name} failed: {note}")
        await self.deploys.record_rebuild(rec.name)
        await self.kick(rec, "Rebuilt: your configuration was re-applied.")
        return rec

    async def rebuild_container(self, rec: AgentRecord) -> tuple[bool, str]:
        """Stop, rebuild in the backend, start (if it should run). Returns (ok, note)."""
        await self.sockets.open(rec)
        return await self.supervisor.rebuild(rec)

    async def relaunch(self, rec: AgentRecord) -> None:
        """Back on the config it has now (after a failed deploy's rollback)."""
        await self.supervisor.stop(rec)
        if rec.desired == "running":
            await self.launch(rec)

    # ------------------------------------------------------------------ ending

    async def destroy(self, name: str, purge: bool) -> None:
        """Stop and remove the container; the state stays (a tombstone) unless `purge`."""
        rec = self.registry.get(check_name(name))
        if rec.role == "manager":
            raise Forbidden("the manager cannot be destroyed")
        if rec.alive:
            self.registry.move(rec, "destroying")
            await self.supervisor.stop(rec)
            await self.supervisor.destroy(rec)
            await self.sockets.close(name)
            await self.registry.bury(rec)
            await self.deploys.record_destroy(name)
            await self.queue.agent_destroyed(name)
        if purge:
            await self.supervisor.purge(rec)
            await self.registry.forget(name)
        await self.notices.tell(events.Destroyed(agent=name, purged=purge))
