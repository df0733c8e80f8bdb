"""The approval queue: the manager proposes, the operator decides; each step in sqlite and git.

States of one approval (the tags live in the agent's applied repo):

    pending ──approve──▶ building ──ok──▶ deployed      proposal/ approved/ building/ deployed/
       │                    └──fail──▶ failed          … failed/ (annotated with the error)
       └──deny──▶ denied                               proposal/ denied/ (annotated with the note)
    pending(spawn) ──approve──▶ spawning ──▶ deployed | failed    (in the background)

A transition is written to sqlite before its git steps (with the old `main` for a rollback) and
after them, so `recover()` can finish or undo whatever a killed daemon left half done. A deploy
stages the agent's new pin in the meta repo before the rebuild and commits it only after
`deployed/<id>` is tagged; `deployed/<id>` is the commit point recovery goes by.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import trio

from hyperhive.core import events
from hyperhive.core.agents import AgentRecord, watch_agent
from hyperhive.core.approval_queue import MAX_TEXT, Approval, ApprovalQueue
from hyperhive.core.deploys import DeployLog
from hyperhive.core.faults import Faults
from hyperhive.core.lifecycle import Lifecycle
from hyperhive.core.meta import deploy_message
from hyperhive.core.upgrades import Upgrades
from hyperhive.protocol import agent_config
from hyperhive.protocol.agent_config import AGENT_TOML
from hyperhive.protocol.errors import BadParams, Conflict, HiveError, Internal, StorageFull
from hyperhive.protocol.text import check_text

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"
CRASH_LOOP = 2
"""Container exits within the health window that make a deploy unhealthy."""
FAILED_TURNS = 2
"""Failed turns in a row within the health window that make a deploy unhealthy."""


class Approvals:
    """The operator's decisions on the queue (approve, deny) and their effects; `recover`
    finishes or undoes what a killed daemon left half done."""

    def __init__(
        self,
        queue: ApprovalQueue,
        lifecycle: Lifecycle,
        deploys: DeployLog,
        faults: Faults,
        *,
        upgrades: Upgrades | None = None,
        health_window: float = 120.0,
    ) -> None:
        self.queue = queue
        self.lifecycle = lifecycle
        self.deploys = deploys
        self.gitops = deploys.gitops
        self.meta = deploys.meta
        self.faults = faults
        self.health_window = health_window
        self.upgrades = upgrades
        self._nursery: trio.Nursery | None = None
        self._watches: dict[str, trio.CancelScope] = {}
        """The deploy being watched per agent (a newer deploy or a rebuild replaces it)."""

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        """The nursery approved spawns finish in (in the background), until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    def _in_background(self, row: Approval, rec: AgentRecord, revived: bool) -> None:
        if self._nursery is None:
            raise Internal("approvals are not being served")
        self._nursery.start_soon(self._finish_spawn, row, rec, revived)

    # ------------------------------------------------------------------ health after a deploy

    def _watch(self, row: Approval, rec: AgentRecord) -> None:
        """Watch a fresh deploy for `health_window` seconds, in the background."""
        old = self._watches.pop(rec.name, None)
        if old is not None:
            old.cancel()
        if self._nursery is None or self.health_window <= 0:
            return
        scope = trio.CancelScope()
        self._watches[rec.name] = scope
        self._nursery.start_soon(self._watch_deploy, row, rec, scope)

    async def _watch_deploy(self, row: Approval, rec: AgentRecord, scope: trio.CancelScope) -> None:
        try:
            with scope:
                reason = await self._unhealthy(rec)
                if reason is not None:
                    # Not cancellable from here on: a rollback half done is worse than none.
                    scope.shield = True
                    await self._heal(row, rec, reason)
        except HiveError as exc:
            log.error("%s: rolling back deploy #%d failed: %s", rec.name, row.id, exc.message)
        finally:
            if self._watches.get(rec.name) is scope:
                del self._watches[rec.name]

    async def _unhealthy(self, rec: AgentRecord) -> str | None:
        """Why the freshly deployed agent is unhealthy, once it is within the window: its
        container exited `CRASH_LOOP` times, or `FAILED_TURNS` turns in a row failed."""
        crashes, failures = rec.restarts, rec.turn_failures

        def verdict() -> tuple[bool, str | None]:
            if rec.restarts - crashes >= CRASH_LOOP:
                return True, (
                    f"crash-looping after the deploy ({rec.restarts - crashes} exits within"
                    f" {self.health_window:g}s): {rec.last_error or 'no error'}"
                )
            if rec.turn_failures - failures >= FAILED_TURNS:
                return True, f"its first {FAILED_TURNS} turns after the deploy failed"
            return False, None

        # Destroyed meanwhile, or healthy through the window: nothing to roll back.
        _, reason = await watch_agent(self.queue.hub_stream(), rec, verdict, self.health_window)
        return reason

    async def _heal(self, row: Approval, rec: AgentRecord, reason: str) -> None:
        """Back to the deploy before `row`: its config, its pin in the meta repo, a rebuild;
        the attempt is tagged `failed/<id>` with the reason and everyone is told."""
        name = rec.name
        log.warning("%s: deploy #%d is unhealthy (%s): rolling back", name, row.id, reason)
        async with self.deploys.lock:
            if await self.gitops.resolve(self.gitops.applied(name), "main") != row.sha:
                return  # something newer was deployed meanwhile: not ours to undo
            await self.gitops.tag(name, f"failed/{row.id}", row.sha, f"rolled back: {reason}")
            await self.gitops.move_main(name, row.old_sha)
            tag = await self.deploys.deployed_tag(name, row.old_sha)
            await self.meta.prepare(name, row.old_sha, tag)
            await self.meta.finalize(f"rollback {name} {tag} {row.old_sha[:12]} (#{row.id})")
            await self.queue.set(row, "rolled_back", f"rolled back: {reason}")
        await self.queue.resolved(row, f"failed/{row.id}")
        ok, note = await self.lifecycle.rebuild_container(rec)
        await self.queue.notices.tell_operator(
            f"Deploy #{row.id} of {name} ({row.sha[:12]}) was rolled back to {tag}: {reason}."
            + ("" if ok else f" The rebuild on the old config failed too: {note}")
        )
        if ok:
            await self.lifecycle.kick(
                rec, f"Your config was rolled back to {tag}: the deploy #{row.id} was unhealthy."
            )

    # ------------------------------------------------------------------ decisions

    async def approve(self, aid: int) -> Approval:
        """Decide #aid. A deploy is done when this returns; a spawn is then `spawning`."""
        async with self.deploys.lock:
            row = await self.queue.get(aid)
            if row.status != "pending":
                raise Conflict(f"approval #{aid} is {row.status}, not pending")
            if row.kind == "spawn":
                await self._spawn(row)
            elif row.kind == "flake_update":
                if self.upgrades is None:
                    raise Conflict("flake updates are not available in this hive")
                # `building` once it has the deploy lock, in the background: it rebuilds
                # every agent the inputs reach, one at a time.
                await self.queue.set(row, "building")
                self.upgrades.start(row)
            else:
                await self._deploy(row)
            return row

    async def deny(self, aid: int, note: str = "") -> Approval:
        # It becomes a git tag's annotation: kept verbatim inside, trimmed at the edges (git
        # would hide leading blank lines from every reader of the tag).
        note = check_text(note, "note", MAX_TEXT).strip()
        async with self.deploys.lock:
            row = await self.queue.get(aid)
            if row.status != "pending":
                raise Conflict(f"approval #{aid} is {row.status}, not pending")
            tag = ""
            if row.kind == "apply_commit":
                tag = f"denied/{row.id}"
                await self.gitops.tag(row.agent, tag, row.sha, note or "denied")
            await self.queue.set(row, "denied", note)
            await self.queue.resolved(row, tag)
            return row

    async def _deploy(self, row: Approval) -> None:
        rec = self.queue.registry.find(row.agent)
        if rec is None or not rec.alive:
            await self.queue.set(row, "failed", "the agent no longer exists")
            await self.queue.resolved(row, "")
            return
        name, sha = row.agent, row.sha
        applied = self.gitops.applied(name)
        old = await self.gitops.resolve(applied, "main")
        assert old is not None
        await self.queue.set(row, "building", old_sha=old)
        await self.gitops.tag(name, f"approved/{row.id}", sha)
        await self.gitops.tag(name, f"building/{row.id}", sha)
        await self.gitops.move_main(name, sha)
        await self.meta.prepare(name, sha, f"deployed/{row.id}")
        self.faults.hit("mid_approve")
        rebuilt = False
        text = await self.gitops.show(name, sha, AGENT_TOML)
        try:
            if text is None:
                raise BadParams(f"{AGENT_TOML} is missing from {sha[:12]}")
            agent_config.parse(text, source=AGENT_TOML)
        except HiveError as exc:
            ok, note = False, exc.message
        else:
            ok, note = await self.lifecycle.rebuild_container(rec)
            rebuilt = True
        if ok:
            await self.gitops.tag(name, f"deployed/{row.id}", sha)
            self.faults.hit("before_meta_commit")
            await self.meta.finalize(deploy_message(name, f"deployed/{row.id}", sha))
            await self.queue.set(row, "deployed", note)
            await self.queue.resolved(row, f"deployed/{row.id}")
            await self.lifecycle.kick(rec, "Config update applied: your agent.toml changed.")
            self._watch(row, rec)
            return
        await self._rollback(row, note)
        if rebuilt:
            await self.lifecycle.relaunch(rec)

    async def _rollback(self, row: Approval, note: str) -> None:
        await self.gitops.tag(row.agent, f"failed/{row.id}", row.sha, note)
        await self.gitops.move_main(row.agent, row.old_sha)
        await self.meta.abort()
        await self.queue.set(row, "failed", note)
        await self.queue.resolved(row, f"failed/{row.id}")

    async def _spawn(self, row: Approval) -> None:
        # `spawning` is stored first: if even that does not fit on the disk, nothing was made
        # and the approval stays pending (`recover` resolves a spawning row without an agent).
        await self.queue.set(row, "spawning")
        try:
            rec, revived = await self.lifecycle.begin_spawn(row.agent)
        except Exception as exc:  # the approval must resolve, whatever broke
            # e.g. an operator spawned the name directly while the request waited.
            note = exc.message if isinstance(exc, HiveError) else f"{type(exc).__name__}: {exc}"
            await self._spawned(row, None, note)
            return
        self._in_background(row, rec, revived)

    async def _finish_spawn(self, row: Approval, rec: AgentRecord, revived: bool) -> None:
        """The background half of an approved spawn; a failure leaves a tombstone, not a wreck."""
        try:
            await self.lifecycle.finish_spawn(rec, revived)
        except Exception as exc:  # whatever broke, the approval must resolve
            note = exc.message if isinstance(exc, HiveError) else f"{type(exc).__name__}: {exc}"
            log.error("spawn of %s failed: %s", rec.name, note)
            with trio.CancelScope(shield=True):
                if not isinstance(exc, StorageFull):  # that one was undone already
                    await self.lifecycle.tombstone(rec, note)
                try:
                    await self._spawned(row, rec, note)
                except StorageFull as full:
                    # A background task must not end the daemon: the row stays `spawning`
                    # and the next start's `recover` resolves it.
                    log.error("approval #%d could not be resolved: %s", row.id, full.message)
            return
        await self._spawned(row, rec, "")

    async def _spawned(self, row: Approval, rec: AgentRecord | None, error: str) -> None:
        ok = not error
        await self.queue.set(row, "deployed" if ok else "failed", error)
        await self.queue.notices.tell(
            events.Spawned(agent=row.agent, ok=ok, note=error or "spawned")
        )
        await self.queue.resolved(row, "")

    # ------------------------------------------------------------------ start-up

    async def recover(self) -> list[str]:
        """Finish or undo transitions a killed daemon left half done; the agents rolled back.

        An interrupted spawn whose agent was registered is finished (in the background, as
        `approve` would); one that never got that far failed.
        """
        rolled_back: list[str] = []
        async with self.deploys.lock:
            for row in await self.queue.rows("status IN ('building', 'spawning')"):
                if row.kind == "flake_update":
                    if self.upgrades is not None:
                        rolled_back.extend(await self.upgrades.recover(row))
                    else:
                        await self.queue.set(row, "failed", INTERRUPTED)
                        await self.queue.resolved(row, "")
                elif row.kind == "spawn":
                    rec = self.queue.registry.find(row.agent)
                    if rec is not None and rec.alive:
                        self._in_background(row, rec, False)
                    else:
                        await self._spawned(row, None, INTERRUPTED)
                elif await self.gitops.has_ref(
                    self.gitops.applied(row.agent), f"refs/tags/deployed/{row.id}"
                ):
                    # Tagged deployed: the deploy happened; finish its records.
                    await self.gitops.move_main(row.agent, row.sha)
                    tag = f"deployed/{row.id}"
                    await self.meta.prepare(row.agent, row.sha, tag)
                    await self.meta.finalize(deploy_message(row.agent, tag, row.sha))
                    await self.queue.set(row, "deployed", "completed after a restart")
                    await self.queue.resolved(row, tag)
                else:
                    log.warning("approval #%d was interrupted mid-deploy: rolling back", row.id)
                    await self._rollback(row, INTERRUPTED)
                    rolled_back.append(row.agent)
            for row in await self.queue.rows("status = 'pending' AND kind = 'apply_commit'"):
                repo = self.gitops.applied(row.agent)
                if await self.gitops.has_ref(repo, f"refs/tags/proposal/{row.id}"):
                    continue
                if await self.gitops.resolve(repo, row.sha) is not None:
                    await self.gitops.tag(row.agent, f"proposal/{row.id}", row.sha)
                else:
                    await self.queue.set(row, "failed", "interrupted before the commit was pinned")
                    await self.queue.resolved(row, "")
        return rolled_back
