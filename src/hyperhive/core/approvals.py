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
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Protocol

import trio

from hyperhive.core import events
from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.broker import EventHub
from hyperhive.core.containers.nixgen import MetaAgent
from hyperhive.core.faults import Faults
from hyperhive.core.gitops import BRANCH, GitOps
from hyperhive.core.meta import MetaRepo, Pin, deploy_message, spawn_message
from hyperhive.core.store import Store
from hyperhive.core.supervisor import Supervisor
from hyperhive.protocol import agent_config, wire
from hyperhive.protocol.agent_config import AGENT_TOML
from hyperhive.protocol.errors import (
    BadParams,
    Conflict,
    Forbidden,
    HiveError,
    NotFound,
    StorageFull,
)
from hyperhive.protocol.names import MANAGER, MANAGER_NAME, check_name, check_new_agent_name
from hyperhive.protocol.text import check_text

log = logging.getLogger(__name__)

SHA = re.compile(r"[0-9a-f]{7,40}")
DIFF_CAP = 200 * 1024
MAX_TEXT = 4000
"""Bytes of a spawn's description or a denial's note."""
INTERRUPTED = "interrupted"


class SpawnHooks(Protocol):
    """How an approved spawn makes the agent (the host handler implements it)."""

    async def begin_spawn(self, name: str) -> tuple[AgentRecord, bool]:
        """Register the agent (state `spawning`); quick. Returns it and whether it was revived."""
        ...

    async def finish_spawn(self, rec: AgentRecord, revived: bool) -> None:
        """Create and start the container, then greet the agent; may take minutes.

        Either half raises `StorageFull` having undone the spawn itself (see `HostHandler`).
        """
        ...


@dataclass
class Approval:
    id: int
    agent: str
    kind: wire.ApprovalKind
    commit_ref: str
    sha: str
    description: str
    requested_at: float
    status: wire.ApprovalStatus
    resolved_at: float | None
    note: str
    old_sha: str

    def info(self, diff: str = "") -> wire.ApprovalInfo:
        return wire.ApprovalInfo(
            id=self.id,
            agent=self.agent,
            kind=self.kind,
            status=self.status,
            requested_at=self.requested_at,
            commit_ref=self.commit_ref,
            sha=self.sha,
            description=self.description,
            resolved_at=self.resolved_at,
            note=self.note,
            diff=diff,
        )


_COLUMNS = (
    "id, agent, kind, commit_ref, fetched_sha, description, requested_at, status, resolved_at,"
    " note, old_sha"
)


def _insert(
    conn: sqlite3.Connection, agent: str, kind: str, ref: str, sha: str, description: str
) -> int:
    cur = conn.execute(
        "INSERT INTO approvals (agent, kind, commit_ref, fetched_sha, description, requested_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (agent, kind, ref, sha, description, time.time()),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _select(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[Approval]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM approvals WHERE {where} ORDER BY id", args)
    return [Approval(*row) for row in rows]


def _set(
    conn: sqlite3.Connection,
    aid: int,
    status: str,
    note: str,
    old_sha: str | None,
    resolved_at: float | None,
) -> None:
    conn.execute(
        "UPDATE approvals SET status = ?, note = ?, old_sha = COALESCE(?, old_sha),"
        " resolved_at = ? WHERE id = ?",
        (status, note, old_sha, resolved_at, aid),
    )


class Approvals:
    def __init__(
        self,
        store: Store,
        gitops: GitOps,
        registry: Registry,
        supervisor: Supervisor,
        faults: Faults,
        hub: EventHub | None = None,
        meta: MetaRepo | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.gitops = gitops
        self.meta = meta or MetaRepo(gitops, gitops.state_dir, None)
        self.registry = registry
        self.supervisor = supervisor
        self.faults = faults
        self._lock = trio.Lock()
        """One transition at a time: they share the applied repos and the rollback bookkeeping."""

    async def _get(self, aid: int) -> Approval:
        found = await self.store.run(_select, "id = ?", (aid,))
        if not found:
            raise NotFound(f"no approval #{aid}")
        return found[0]

    async def _set(
        self, row: Approval, status: wire.ApprovalStatus, note: str = "", old_sha: str | None = None
    ) -> None:
        resolved_at = time.time() if status in ("deployed", "failed", "denied") else None
        await self.store.run(_set, row.id, status, note, old_sha, resolved_at)
        row.status, row.note, row.resolved_at = status, note, resolved_at
        if old_sha is not None:
            row.old_sha = old_sha
        self._publish(row)

    def _publish(self, row: Approval) -> None:
        """Tell subscribers (the dashboard) that `row` was queued or changed status."""
        if self.hub is not None:
            info = row.info()
            self.hub.publish(lambda seq: wire.ApprovalChanged(seq=seq, approval=info))

    # ------------------------------------------------------------------ requests

    async def request_apply_commit(self, agent: str, commit_ref: str) -> Approval:
        rec = self.registry.live(check_name(agent))
        if rec.role == "manager":
            raise Forbidden("the manager's own config is not deployed through approvals")
        ref = commit_ref.strip().lower()
        if not SHA.fullmatch(ref):
            raise BadParams(f"commit_ref {commit_ref[:60]!r} is not a 7-40 digit hex sha")
        await self.gitops.seed(rec.name)
        sha = await self.gitops.resolve_proposed(rec.name, ref)
        if sha is None:
            raise NotFound(f"no commit {ref} in {rec.name}'s proposed repo")
        async with self._lock:
            # Pinned at once: whatever happens to the proposed repo later, this sha is what builds.
            await self.gitops.pin(rec.name, sha)
            aid = await self.store.run(_insert, rec.name, "apply_commit", ref, sha, "")
            await self.gitops.tag(rec.name, f"proposal/{aid}", sha)
        row = await self._get(aid)
        self._publish(row)
        return row

    async def request_spawn(self, name: str, description: str = "") -> Approval:
        check_new_agent_name(name)
        check_text(description, "description", MAX_TEXT)
        rec = self.registry.find(name)
        if rec is not None and rec.alive:
            raise Conflict(f"agent {name!r} already exists")
        async with self._lock:
            waiting = await self.store.run(
                _select, "kind = 'spawn' AND agent = ? AND status = 'pending'", (name,)
            )
            if waiting:
                raise Conflict(f"a spawn of {name!r} is already pending (#{waiting[0].id})")
            aid = await self.store.run(_insert, name, "spawn", "", "", description)
        row = await self._get(aid)
        self._publish(row)
        return row

    async def pending(self) -> list[wire.ApprovalInfo]:
        rows = await self.store.run(_select, "status = 'pending'", ())
        infos = []
        for row in rows:
            diff = ""
            if row.kind == "apply_commit":
                diff = await self.gitops.diff(row.agent, f"refs/tags/proposal/{row.id}", DIFF_CAP)
            infos.append(row.info(diff))
        return infos

    # ------------------------------------------------------------------ decisions

    async def approve(self, aid: int, hooks: SpawnHooks) -> Approval:
        """Decide #aid. A deploy is done when this returns; a spawn is then `spawning`."""
        async with self._lock:
            row = await self._get(aid)
            if row.status != "pending":
                raise Conflict(f"approval #{aid} is {row.status}, not pending")
            if row.kind == "spawn":
                await self._spawn(row, hooks)
            else:
                await self._deploy(row)
            return row

    async def deny(self, aid: int, note: str = "") -> Approval:
        # It becomes a git tag's annotation: kept verbatim inside, trimmed at the edges (git
        # would hide leading blank lines from every reader of the tag).
        note = check_text(note, "note", MAX_TEXT).strip()
        async with self._lock:
            row = await self._get(aid)
            if row.status != "pending":
                raise Conflict(f"approval #{aid} is {row.status}, not pending")
            tag = ""
            if row.kind == "apply_commit":
                tag = f"denied/{row.id}"
                await self.gitops.tag(row.agent, tag, row.sha, note or "denied")
            await self._set(row, "denied", note)
            await self._resolved(row, tag)
            return row

    async def _deploy(self, row: Approval) -> None:
        rec = self.registry.find(row.agent)
        if rec is None or not rec.alive:
            await self._set(row, "failed", "the agent no longer exists")
            await self._resolved(row, "")
            return
        name, sha = row.agent, row.sha
        applied = self.gitops.applied(name)
        old = await self.gitops.resolve(applied, "main")
        assert old is not None
        await self._set(row, "building", old_sha=old)
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
            ok, note = await self.supervisor.rebuild(rec)
            rebuilt = True
        if ok:
            await self.gitops.tag(name, f"deployed/{row.id}", sha)
            self.faults.hit("before_meta_commit")
            await self.meta.finalize(deploy_message(name, f"deployed/{row.id}", sha))
            await self._set(row, "deployed", note)
            await self._resolved(row, f"deployed/{row.id}")
            return
        await self._rollback(row, note)
        if rebuilt:
            await self._restart(rec)

    async def _rollback(self, row: Approval, note: str) -> None:
        await self.gitops.tag(row.agent, f"failed/{row.id}", row.sha, note)
        await self.gitops.move_main(row.agent, row.old_sha)
        await self.meta.abort()
        await self._set(row, "failed", note)
        await self._resolved(row, f"failed/{row.id}")

    async def _restart(self, rec: AgentRecord) -> None:
        """Bring the agent back on the restored config after a failed rebuild."""
        await self.supervisor.stop(rec)
        if rec.desired == "running":
            await self.supervisor.launch(rec)

    async def _spawn(self, row: Approval, hooks: SpawnHooks) -> None:
        # `spawning` is stored first: if even that does not fit on the disk, nothing was made
        # and the approval stays pending (`recover` resolves a spawning row without an agent).
        await self._set(row, "spawning")
        try:
            rec, revived = await hooks.begin_spawn(row.agent)
        except Exception as exc:  # the approval must resolve, whatever broke
            # e.g. an operator spawned the name directly while the request waited.
            note = exc.message if isinstance(exc, HiveError) else f"{type(exc).__name__}: {exc}"
            await self._spawned(row, None, note)
            return
        self.supervisor.nursery.start_soon(self._finish_spawn, row, rec, revived, hooks)

    async def _finish_spawn(
        self, row: Approval, rec: AgentRecord, revived: bool, hooks: SpawnHooks
    ) -> None:
        """The background half of an approved spawn; a failure leaves a tombstone, not a wreck."""
        try:
            await hooks.finish_spawn(rec, revived)
        except Exception as exc:  # whatever broke, the approval must resolve
            note = exc.message if isinstance(exc, HiveError) else f"{type(exc).__name__}: {exc}"
            log.error("spawn of %s failed: %s", rec.name, note)
            with trio.CancelScope(shield=True):
                if not isinstance(exc, StorageFull):  # that one was undone already
                    await self._tombstone(rec, note)
                try:
                    await self._spawned(row, rec, note)
                except StorageFull as full:
                    # A background task must not end the daemon: the row stays `spawning`
                    # and the next start's `recover` resolves it.
                    log.error("approval #%d could not be resolved: %s", row.id, full.message)
            return
        await self._spawned(row, rec, "")

    async def _tombstone(self, rec: AgentRecord, note: str) -> None:
        await self.supervisor.stop(rec)
        await self.supervisor.close_socket(rec.name)
        rec.desired = "stopped"
        rec.destroyed_at = time.time()
        self.registry.set_state(rec, "destroyed", last_error=note)
        await self.registry.save(rec)
        # If it got as far as the meta repo, it leaves it again (a no-op otherwise).
        await self.meta.record(f"destroy {rec.name}", rec.name, None)

    async def _spawned(self, row: Approval, rec: AgentRecord | None, error: str) -> None:
        ok = not error
        await self._set(row, "deployed" if ok else "failed", error)
        await self.supervisor.notify_manager(
            events.Spawned(agent=row.agent, ok=ok, note=error or "spawned")
        )
        await self._resolved(row, "")

    # ------------------------------------------------------------------ the meta repo

    async def record_spawn(self, rec: AgentRecord, revived: bool) -> None:
        """The meta repo learns of a new (or revived) agent, pinned at its applied `main`."""
        repo = self.gitops.applied(rec.name)
        sha = await self.gitops.resolve(repo, BRANCH)
        if sha is None:
            return
        tag = "deployed/0"
        if revived:
            tags = await self.gitops.out(repo, "tag", "--points-at", BRANCH, "--list", "deployed/*")
            ids = [int(t.split("/")[1]) for t in tags.split() if t.split("/")[1].isdigit()]
            tag = f"deployed/{max(ids, default=0)}"
        message = spawn_message(rec.name, tag, sha)
        if revived:
            message = f"revive {rec.name} {tag} {sha[:12]}"
        await self.meta.record(message, rec.name, Pin(rev=sha, tag=tag), self.meta_agent(rec))

    async def record_rebuild(self, name: str) -> None:
        """A rebuild outside approvals may relock the agent's input (nixos): commit that alone.

        Under the approvals lock, so a deploy's staged pin is never swept into this commit.
        """
        async with self._lock:
            await self.meta.finalize(f"rebuild {name}")

    async def sync_meta(self) -> None:
        """At start-up: every live agent is in the meta repo (agents from before it existed)."""
        pins = await self.meta.pins()
        for rec in self.registry.all():
            if rec.alive and rec.role == "agent" and rec.name not in pins:
                await self.gitops.seed(rec.name)
                await self.record_spawn(rec, revived=False)

    def meta_agent(self, rec: AgentRecord) -> MetaAgent:
        return MetaAgent(
            name=rec.name,
            container=rec.container,
            role=rec.role,
            port=rec.port,
            applied=str(self.gitops.applied(rec.name)),
        )

    async def record_destroy(self, name: str) -> None:
        """Drop a destroyed agent from the meta repo, and its pending proposals from the queue."""
        await self.meta.record(f"destroy {name}", name, None)
        async with self._lock:
            for row in await self.store.run(
                _select, "status = 'pending' AND kind = 'apply_commit' AND agent = ?", (name,)
            ):
                await self.gitops.tag(name, f"failed/{row.id}", row.sha, "agent destroyed")
                await self._set(row, "failed", "agent destroyed")
                await self._resolved(row, f"failed/{row.id}")

    async def _resolved(self, row: Approval, tag: str) -> None:
        await self.supervisor.notify_manager(
            events.ApprovalResolved(
                agent=row.agent,
                id=row.id,
                commit_ref=row.commit_ref,
                status=row.status,
                note=row.note,
                sha=row.sha,
                tag=tag,
            )
        )

    # ------------------------------------------------------------------ start-up

    async def recover(self, hooks: SpawnHooks) -> list[str]:
        """Finish or undo transitions a killed daemon left half done; the agents rolled back.

        An interrupted spawn whose agent was registered is finished (in the background, as
        `approve` would); one that never got that far failed.
        """
        rolled_back: list[str] = []
        async with self._lock:
            for row in await self.store.run(_select, "status IN ('building', 'spawning')", ()):
                if row.kind == "spawn":
                    rec = self.registry.find(row.agent)
                    if rec is not None and rec.alive:
                        self.supervisor.nursery.start_soon(
                            self._finish_spawn, row, rec, False, hooks
                        )
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
                    await self._set(row, "deployed", "completed after a restart")
                    await self._resolved(row, tag)
                else:
                    log.warning("approval #%d was interrupted mid-deploy: rolling back", row.id)
                    await self._rollback(row, INTERRUPTED)
                    rolled_back.append(row.agent)
            for row in await self.store.run(
                _select, "status = 'pending' AND kind = 'apply_commit'", ()
            ):
                repo = self.gitops.applied(row.agent)
                if await self.gitops.has_ref(repo, f"refs/tags/proposal/{row.id}"):
                    continue
                if await self.gitops.resolve(repo, row.sha) is not None:
                    await self.gitops.tag(row.agent, f"proposal/{row.id}", row.sha)
                else:
                    await self._set(row, "failed", "interrupted before the commit was pinned")
                    await self._resolved(row, "")
        return rolled_back


def refuse_manager_target(name: str) -> str:
    """The manager may stop, start and restart agents, never itself."""
    if name in (MANAGER, MANAGER_NAME):
        raise Forbidden("the manager cannot target itself")
    return check_name(name)
