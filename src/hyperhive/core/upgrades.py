"""Hive-wide rebuilds, one agent at a time, each gated on its health: upgrades and flake updates.

Two roll-outs share one path (SPEC §4.4a):

- **An upgrade.** The daemon runs a new hyperhive. At start-up every container built from (or,
  bwrap/nspawn, an adopted one still running) an older one is stale (`needs_update`). On the
  nixos backend the meta flake's `hyperhive` input is first updated to the daemon's flake and
  committed (`update hyperhive <old>..<new>`). With `auto_update` (the default) the stale agents
  are then rebuilt, sub-agents by name and the manager last; without it the manager is told
  (`needs_update`) and `update <name>` does it.
- **A flake update** (approval kind `flake_update`). Approved, `nix flake update <inputs>` runs
  on the meta repo and the new lock is committed (`update <input> <old>..<new>, …`); then the
  agents the inputs reach are rebuilt (an `agent-<name>` input: that agent; anything else, such
  as `hyperhive` or `hyperhive/nixpkgs`: every agent).

Each agent is rebuilt and must pass the health gate before the next one starts: it comes back
`running` and its new harness reports (its first `report_state`) within the health window, and
its container does not exit `CRASH_LOOP` times meanwhile. The first one that fails ends the
roll-out, and the operator is told who was left as they were:

- an upgrade: that container goes back to its previous build where the backend keeps one (nixos:
  the previous generation of its system profile); bwrap/nspawn run the host's hyperhive, which
  has no older one to go back to, so it is reported and stays `needs_update`;
- a flake update: the lock goes back to what it was (committed as `rollback …`), every agent
  already rebuilt is rebuilt on it again, and the approval ends `rolled_back`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec
import trio

from hyperhive.core import events
from hyperhive.core.agents import AgentRecord, watch_agent
from hyperhive.core.approval_queue import Approval, ApprovalQueue
from hyperhive.core.broker import EventHub
from hyperhive.core.deploys import DeployLog
from hyperhive.core.lifecycle import Lifecycle
from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams, Conflict, HiveError

log = logging.getLogger(__name__)

CRASH_LOOP = 2
"""Container exits during the health gate that make a rebuilt agent unhealthy."""
HYPERHIVE_INPUT = "hyperhive"
AGENT_INPUT_PREFIX = "agent-"
INTERRUPTED = "interrupted: the daemon stopped during the update; the lock was rolled back"

UpdateInputs = Callable[[Sequence[str]], Awaitable[None]]
"""Runs `nix flake update` of the given inputs (all when empty) on the meta repo, staged."""


# ---------------------------------------------------------------------- the meta flake's lock


def _short_rev(locked: dict[str, Any]) -> str:
    rev = locked.get("rev")
    if isinstance(rev, str) and rev:
        return rev[:12]
    nar = str(locked.get("narHash", ""))
    return nar.removeprefix("sha256-")[:12]


def _source(original: dict[str, Any]) -> str:
    """A flake input's `original` as the flake reference one would write."""
    kind = original.get("type", "")
    if kind in ("github", "gitlab", "sourcehut"):
        ref = f"{kind}:{original.get('owner', '')}/{original.get('repo', '')}"
        return ref + (f"/{original['ref']}" if original.get("ref") else "")
    if kind == "path":
        return f"path:{original.get('path', '')}"
    if kind == "indirect":
        return str(original.get("id", ""))
    url = str(original.get("url", ""))
    return f"{kind}+{url}" if kind in ("git", "tarball", "file") and url else url or kind


def meta_inputs(raw: bytes, agents: Sequence[str]) -> list[wire.MetaInput]:
    """The inputs of a meta flake.lock two levels deep (the flake's inputs and theirs), each
    with what an update of it rebuilds; inputs that follow another are not listed (they are
    updated with the one they follow). Nothing when there is no lock or it is unreadable."""
    try:
        lock = msgspec.json.decode(raw) if raw else {}
        nodes: dict[str, Any] = lock["nodes"]
        root: dict[str, Any] = nodes[lock.get("root", "root")]
    except (msgspec.DecodeError, KeyError, TypeError):
        return []
    found: list[wire.MetaInput] = []

    def add(name: str, node: object) -> None:
        if not isinstance(node, dict) or not isinstance(node.get("locked"), dict):
            return
        modified = node["locked"].get("lastModified")
        found.append(
            wire.MetaInput(
                name=name,
                rev=_short_rev(node["locked"]),
                last_modified=float(modified) if isinstance(modified, int | float) else None,
                url=_source(node.get("original") or {}),
                agents=reached_by([name], agents),
            )
        )

    for name, key in sorted((root.get("inputs") or {}).items()):
        if not isinstance(key, str):
            continue  # follows another input
        node = nodes.get(key)
        add(name, node)
        inner = node.get("inputs") if isinstance(node, dict) else None
        for sub, sub_key in sorted((inner or {}).items()):
            if isinstance(sub_key, str):
                add(f"{name}/{sub}", nodes.get(sub_key))
    return found


def reached_by(inputs: Iterable[str], agents: Sequence[str]) -> list[str]:
    """The agents an update of `inputs` rebuilds (all of them for an empty list)."""
    wanted: set[str] = set()
    names = list(inputs)
    if not names:
        return list(agents)
    for name in names:
        top = name.split("/", 1)[0]
        if top.startswith(AGENT_INPUT_PREFIX):
            agent = top.removeprefix(AGENT_INPUT_PREFIX)
            wanted.update(a for a in agents if a == agent)
        else:
            return list(agents)
    return [a for a in agents if a in wanted]


def _changes(old: list[wire.MetaInput], new: list[wire.MetaInput]) -> list[str]:
    before = {i.name: i.rev for i in old}
    return [
        f"{i.name} {before.get(i.name, 'none')}..{i.rev}"
        for i in new
        if before.get(i.name) != i.rev
    ]


# ---------------------------------------------------------------------- the roll-outs


class Upgrades:
    def __init__(
        self,
        lifecycle: Lifecycle,
        queue: ApprovalQueue,
        deploys: DeployLog,
        hub: EventHub,
        *,
        update_inputs: UpdateInputs | None,
        auto_update: bool = True,
        health_window: float = 120.0,
    ) -> None:
        """`update_inputs` is the backend's (nixos); None where containers are not built from
        the meta flake (bwrap, nspawn: they run the host's hyperhive)."""
        self.lifecycle = lifecycle
        self.registry = lifecycle.registry
        self.supervisor = lifecycle.supervisor
        self.notices = lifecycle.notices
        self.queue = queue
        self.deploys = deploys
        self.meta = deploys.meta
        self.hub = hub
        self.update_inputs = update_inputs
        self.auto_update = auto_update
        self.health_window = health_window
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The nursery approved flake updates run in (in the background), until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _agents(self) -> list[str]:
        """Every live agent, sub-agents by name and the manager last."""
        live = [r for r in self.registry.all() if r.alive]
        return [r.name for r in sorted(live, key=lambda r: (r.role == "manager", r.name))]

    async def inputs(self) -> wire.MetaInputList:
        raw = await self.meta.flake_lock()
        return wire.MetaInputList(
            inputs=meta_inputs(raw, self._agents()), updatable=self.update_inputs is not None
        )

    # ------------------------------------------------------------------ requests

    async def request(self, inputs: Sequence[str], description: str) -> Approval:
        """Queue a `flake_update` approval of `inputs` (all of them when empty)."""
        if self.update_inputs is None:
            raise Conflict(
                "flake updates need the nixos backend: bwrap and nspawn containers run the"
                " host's hyperhive and build from no flake (upgrade the host's package instead)"
            )
        listed = {i.name for i in (await self.inputs()).inputs}
        wanted = list(dict.fromkeys(inputs))
        unknown = [i for i in wanted if i not in listed]
        if unknown:
            known = ", ".join(sorted(listed)) or "none yet"
            raise BadParams(f"no input {unknown[0]!r} in the meta flake (it has: {known})")
        return await self.queue.request_flake_update(wanted, description)

    # ------------------------------------------------------------------ start-up

    async def at_start(self, adopted: Sequence[str], rolled_back: Sequence[str]) -> None:
        """After an upgrade: the stale agents (every one built before it on nixos, the adopted
        ones on bwrap/nspawn: a fresh start runs the daemon's hyperhive) are rolled out; and
        agents that may run a config (or lock) a recovery rolled back are rebuilt."""
        every = not self.supervisor.start_runs_current
        stale = [
            name
            for name in self._agents()
            if (rec := self.registry.find(name)) is not None
            and self.registry.stale(rec)
            and (every or rec.recipient in adopted)
        ]
        if stale:
            await self.rollout(stale)
        for name in rolled_back:
            rec = self.registry.find(name)
            if rec is not None and rec.alive and (every or rec.recipient in adopted):
                await self.lifecycle.rebuild_container(rec)

    async def rollout(self, stale: Sequence[str]) -> None:
        """Rebuild agents that run an older hyperhive, one at a time (see the module doc)."""
        revision = self.registry.revision
        if self.update_inputs is not None and not await self._bump_hyperhive():
            return
        if not self.auto_update:
            for name in stale:
                rec = self.registry.find(name)
                if rec is not None and rec.alive:
                    await self.notices.tell(
                        events.NeedsUpdate(
                            agent=name,
                            note=f"runs hyperhive {rec.built_rev}, the daemon {revision};"
                            " auto-update is off: `update` rebuilds it",
                        )
                    )
            return
        before = {n: r.built_rev for n in stale if (r := self.registry.find(n)) is not None}

        async def announce(rec: AgentRecord) -> None:
            await self.notices.tell(
                events.NeedsUpdate(
                    agent=rec.name,
                    note=f"runs hyperhive {rec.built_rev}, the daemon {revision}: rebuilding",
                )
            )

        done, failed = await self.one_at_a_time(stale, announce=announce)
        if failed is None:
            if done:
                log.info("upgraded %s to hyperhive %s", ", ".join(done), revision)
                await self.notices.tell_operator(
                    f"The hive was upgraded to hyperhive {revision}: {', '.join(done)}"
                    " rebuilt, one at a time, each healthy."
                )
            return
        name, reason = failed
        rec = self.registry.get(name)
        if self.supervisor.can_roll_back:
            ok, note = await self.supervisor.roll_back(rec, before.get(name))
            back = "it was rolled back to its previous build"
            if not ok:
                back = f"rolling back failed: {note}"
        else:
            back = (
                f"the {self.supervisor.backend.name} backend keeps no older hyperhive to go back"
                " to: it runs the new one"
            )
        left = [n for n in stale if n not in done and n != name]
        await self.notices.tell_operator(
            f"The upgrade to hyperhive {revision} stopped at {name}: {reason}; {back}."
            + (f" Not upgraded: {', '.join(left)}." if left else "")
            + (f" Upgraded: {', '.join(done)}." if done else "")
        )

    async def _bump_hyperhive(self) -> bool:
        """nixos: the meta flake's hyperhive input to the daemon's flake, committed."""
        assert self.update_inputs is not None
        async with self.deploys.lock:
            old = meta_inputs(await self.meta.flake_lock(), [])
            try:
                await self.update_inputs([HYPERHIVE_INPUT])
            except HiveError as exc:
                await self.meta.abort()
                log.error("updating the meta flake's hyperhive input failed: %s", exc.message)
                await self.notices.tell_operator(
                    f"The upgrade could not update the meta flake's hyperhive input:"
                    f" {exc.message}. No agent was rebuilt; they run their old hyperhive."
                )
                return False
            new = meta_inputs(await self.meta.flake_lock(), [])
            changes = [c for c in _changes(old, new) if c.startswith(HYPERHIVE_INPUT)]
            # flake.nix too: it was written again with the daemon's hyperhive flake.
            message = "update " + (", ".join(changes) or HYPERHIVE_INPUT)
            await self.meta.finalize(message, also=("flake.nix", "agents.json"))
        return True

    # ------------------------------------------------------------------ one at a time

    async def one_at_a_time(
        self,
        names: Sequence[str],
        announce: Callable[[AgentRecord], Awaitable[None]] | None = None,
        *,
        locked: bool = False,
    ) -> tuple[list[str], tuple[str, str] | None]:
        """Rebuild each agent and wait for its health before the next; returns the ones done
        and, if one failed, its name and why (the roll-out stops there). `locked`: the caller
        holds the deploy lock."""
        done: list[str] = []
        for name in names:
            rec = self.registry.find(name)
            if rec is None or not rec.alive:
                continue
            if announce is not None:
                await announce(rec)
            ok, note = await self.lifecycle.rebuild_container(rec)
            reason = await self.unhealthy(rec) if ok else f"its rebuild failed: {note}"
            if reason is not None:
                log.warning("%s: unhealthy after its rebuild: %s", name, reason)
                return done, (name, reason)
            await self._record_rebuild(name, locked)
            done.append(name)
        return done, None

    async def _record_rebuild(self, name: str, locked: bool) -> None:
        if locked:
            await self.meta.finalize(f"rebuild {name}")
        else:
            await self.deploys.record_rebuild(name)

    async def unhealthy(self, rec: AgentRecord) -> str | None:
        """Why a freshly rebuilt agent is unhealthy: its container exited `CRASH_LOOP` times,
        or its harness did not report within the health window. None once it has (and for an
        agent that is not meant to run)."""
        if rec.desired != "running" or self.health_window <= 0:
            return None
        exits = rec.restarts

        def verdict() -> tuple[bool, str | None]:
            if not rec.alive:
                return True, None
            if rec.restarts - exits >= CRASH_LOOP:
                return True, (
                    f"its container exited {rec.restarts - exits} times:"
                    f" {rec.last_error or 'no error'}"
                )
            if rec.state == "running" and rec.turn_state is not None:
                return True, None
            return False, None

        events = self.hub.stream((wire.AgentChanged, wire.AgentRemoved))
        decided, reason = await watch_agent(events, rec, verdict, self.health_window)
        return reason if decided else f"its harness did not report within {self.health_window:g}s"

    # ------------------------------------------------------------------ flake updates

    def start(self, row: Approval) -> None:
        """An approved flake update, in the background (it rebuilds agents one at a time)."""
        if self._nursery is None:
            raise Conflict("flake updates are not being served")
        self._nursery.start_soon(self._apply_logged, row)

    async def _apply_logged(self, row: Approval) -> None:
        try:
            await self.apply(row)
        except Exception as exc:  # the approval must resolve, whatever broke
            note = exc.message if isinstance(exc, HiveError) else f"{type(exc).__name__}: {exc}"
            log.error("flake update #%d failed: %s", row.id, note, exc_info=exc)
            with trio.CancelScope(shield=True):
                try:
                    await self._end(row, "failed", note)
                except HiveError as again:
                    log.error("approval #%d could not be resolved: %s", row.id, again.message)

    async def apply(self, row: Approval) -> None:
        assert self.update_inputs is not None
        inputs = row.commit_ref.split()
        async with self.deploys.lock:
            old_head = await self.meta.head() or ""
            old = meta_inputs(await self.meta.flake_lock(), [])
            await self.queue.set(row, "building", old_sha=old_head)
            try:
                await self.update_inputs(inputs)
            except HiveError as exc:
                await self.meta.abort()
                await self._end(row, "failed", f"nix flake update failed: {exc.message}")
                return
            new = meta_inputs(await self.meta.flake_lock(), [])
            changes = _changes(old, new)
            if not changes:
                await self.meta.abort()
                await self._end(row, "deployed", "already up to date: nothing was rebuilt")
                return
            message = "update " + ", ".join(changes)
            await self.meta.finalize(message)
            # The whole roll-out under the deploy lock: no deploy interleaves with it, so a
            # rollback restores exactly the lock it replaced.
            changed = [c.split(" ", 1)[0] for c in changes]
            names = reached_by(changed, self._agents())
            done, failed = await self.one_at_a_time(names, locked=True)
            if failed is None:
                rebuilt = ", ".join(done) or "none"
                await self._end(row, "deployed", f"{message}; rebuilt: {rebuilt}")
                return
            name, reason = failed
            await self._roll_back_lock(row, old_head, f"{name} was unhealthy", [*done, name])
            await self._end(row, "rolled_back", f"rolled back: {name} {reason}")
        await self.notices.tell_operator(
            f"Flake update #{row.id} ({message}) was rolled back: {name} {reason}."
            + (f" Rebuilt again on the old lock: {', '.join([*done, name])}." if done else "")
        )

    async def _roll_back_lock(
        self, row: Approval, old_head: str, why: str, rebuild: Sequence[str]
    ) -> None:
        """The meta flake.lock back to `old_head`'s, committed; `rebuild` rebuilt on it (the
        caller holds the deploy lock)."""
        await self.meta.restore_lock(old_head, f"rollback flake update #{row.id}: {why}")
        for name in rebuild:
            rec = self.registry.find(name)
            if rec is not None and rec.alive:
                ok, note = await self.lifecycle.rebuild_container(rec)
                if ok:
                    await self.meta.finalize(f"rebuild {name}")
                else:
                    log.error("%s: rebuild on the old lock failed: %s", name, note)

    async def _end(self, row: Approval, status: wire.ApprovalStatus, note: str) -> None:
        await self.queue.set(row, status, note)
        await self.queue.resolved(row, "")

    async def recover(self, row: Approval) -> list[str]:
        """A flake update a killed daemon left `building`: its lock goes back (the agents it
        reached are returned, to be rebuilt on the old lock) and it failed."""
        names: list[str] = []
        if row.old_sha and await self.meta.head() not in (None, row.old_sha):
            new = meta_inputs(await self.meta.flake_lock(), [])
            old = meta_inputs(await self.meta.flake_lock(row.old_sha), [])
            changed = [c.split(" ", 1)[0] for c in _changes(old, new)]
            why = f"rollback flake update #{row.id}: interrupted"
            await self.meta.restore_lock(row.old_sha, why)
            names = reached_by(changed, self._agents())
        else:
            await self.meta.abort()
        await self._end(row, "failed", INTERRUPTED)
        return names
