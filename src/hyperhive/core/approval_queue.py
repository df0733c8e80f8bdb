"""The approval queue: what the manager (or the operator) asked for, in sqlite; how each row
changes status, and who is told. The decisions are core/approvals.py's.

See core/approvals.py for the states of one approval.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from hyperhive.core.agents import Registry
from hyperhive.core.broker import EventHub
from hyperhive.core.deploys import DeployLog
from hyperhive.core.events import ApprovalResolved, Notices
from hyperhive.core.gitops import GitOps
from hyperhive.core.store import Store, next_id
from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams, Conflict, Forbidden, Internal, NotFound
from hyperhive.protocol.names import check_name, check_new_agent_name
from hyperhive.protocol.text import check_text

SHA = re.compile(r"[0-9a-f]{7,40}")
DIFF_CAP = 200 * 1024
MAX_TEXT = 4000
"""Bytes of a spawn's description or a denial's note."""


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
        "INSERT INTO approvals (id, agent, kind, commit_ref, fetched_sha, description,"
        f" requested_at) VALUES ({next_id('approvals')}, ?, ?, ?, ?, ?, ?)",
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


class ApprovalQueue:
    def __init__(
        self,
        store: Store,
        gitops: GitOps,
        registry: Registry,
        deploys: DeployLog,
        notices: Notices,
        hub: EventHub | None = None,
    ) -> None:
        self.store = store
        self.gitops = gitops
        self.registry = registry
        self.deploys = deploys
        self.notices = notices
        self.hub = hub

    async def get(self, aid: int) -> Approval:
        found = await self.store.run(_select, "id = ?", (aid,))
        if not found:
            raise NotFound(f"no approval #{aid}")
        return found[0]

    async def rows(self, where: str, args: tuple[object, ...] = ()) -> list[Approval]:
        return await self.store.run(_select, where, args)

    async def set(
        self, row: Approval, status: wire.ApprovalStatus, note: str = "", old_sha: str | None = None
    ) -> None:
        """Store `row`'s new status (before and after the git steps of a transition)."""
        resolved_at = (
            time.time() if status in ("deployed", "failed", "denied", "rolled_back") else None
        )
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

    async def resolved(self, row: Approval, tag: str) -> None:
        """Tell the manager how `row` ended (`tag`: the git tag that records it, if any)."""
        await self.notices.tell(
            ApprovalResolved(
                agent=row.agent,
                id=row.id,
                commit_ref=row.commit_ref,
                status=row.status,
                note=row.note,
                sha=row.sha,
                tag=tag,
            )
        )

    def hub_stream(self) -> AsyncGenerator[wire.HiveEvent, None]:
        """The hive's events (for watching a deploy's health)."""
        if self.hub is None:
            raise Internal("no event hub")
        return self.hub.stream((wire.AgentChanged, wire.AgentRemoved))

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
        async with self.deploys.lock:
            # Pinned at once: whatever happens to the proposed repo later, this sha is what builds.
            await self.gitops.pin(rec.name, sha)
            aid = await self.store.run(_insert, rec.name, "apply_commit", ref, sha, "")
            await self.gitops.tag(rec.name, f"proposal/{aid}", sha)
        row = await self.get(aid)
        self._publish(row)
        return row

    async def request_spawn(self, name: str, description: str = "") -> Approval:
        check_new_agent_name(name)
        check_text(description, "description", MAX_TEXT)
        rec = self.registry.find(name)
        if rec is not None and rec.alive:
            raise Conflict(f"agent {name!r} already exists")
        async with self.deploys.lock:
            waiting = await self.rows(
                "kind = 'spawn' AND agent = ? AND status = 'pending'", (name,)
            )
            if waiting:
                raise Conflict(f"a spawn of {name!r} is already pending (#{waiting[0].id})")
            aid = await self.store.run(_insert, name, "spawn", "", "", description)
        row = await self.get(aid)
        self._publish(row)
        return row

    async def request_flake_update(self, inputs: list[str], description: str = "") -> Approval:
        """A hive-wide update of the meta flake's `inputs` (all when empty): `commit_ref` holds
        them, space-separated; the row names no agent. One at a time may wait."""
        check_text(description, "description", MAX_TEXT)
        async with self.deploys.lock:
            waiting = await self.rows("kind = 'flake_update' AND status IN ('pending', 'building')")
            if waiting:
                raise Conflict(
                    f"flake update #{waiting[0].id} is already {waiting[0].status}: decide it"
                    " (or let it finish) first"
                )
            aid = await self.store.run(
                _insert, "", "flake_update", " ".join(inputs), "", description
            )
        row = await self.get(aid)
        self._publish(row)
        return row

    async def pending(self) -> list[wire.ApprovalInfo]:
        infos = []
        for row in await self.rows("status = 'pending'"):
            diff = ""
            if row.kind == "apply_commit":
                diff = await self.gitops.diff(row.agent, f"refs/tags/proposal/{row.id}", DIFF_CAP)
            infos.append(row.info(diff))
        return infos

    async def agent_destroyed(self, name: str) -> None:
        """A destroyed agent's pending proposals fail (tagged `failed/<id>`)."""
        async with self.deploys.lock:
            for row in await self.rows(
                "status = 'pending' AND kind = 'apply_commit' AND agent = ?", (name,)
            ):
                await self.gitops.tag(name, f"failed/{row.id}", row.sha, "agent destroyed")
                await self.set(row, "failed", "agent destroyed")
                await self.resolved(row, f"failed/{row.id}")
