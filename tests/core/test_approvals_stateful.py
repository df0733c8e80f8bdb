"""The approvals state machine against a simple model (issue 5), with restarts and crashes.

Hypothesis drives a real daemon, real git and real sqlite through proposals (valid and broken),
rewrites of the proposed repo's history, approvals, denials, spawn requests, clean restarts and
crashes in the middle of an approve; after every step git and sqlite are checked against the
model, not only the daemon's replies.

Containers stay out of it: hm1nd is killed and alice is stopped (desired `stopped`), so the
rebuild of an approved deploy only re-reads the applied agent.toml (the bwrap backend builds
nothing) and starts nothing. Only an approved spawn of bob starts a container, killed at once.

Crashes are in-process: the daemon runs with `crash_raises`, so the crash point raises
`SimulatedCrash`, which ends the daemon's run right there, and the next daemon starts from the
same state dir. For approvals that is as faithful as `kill -9`, because nothing of an approval's
progress lives in memory: each transition is in sqlite before and after its git steps, the tags
and `main` in the applied repo, the staged pin in the meta repo's working tree, and recovery
reads only those. What the unwinding runs (sockets and the sqlite connection closed, tasks
cancelled) touches none of them. The real `kill -9` cases are in test_approvals.py.

Hypothesis's state-machine runner is synchronous: it runs in a worker thread, and each rule and
invariant calls into the test's trio run with `trio.from_thread.run`; the daemon lives in the
test's nursery between steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from hyperhive.app import DaemonInfo, run
from hyperhive.core import events
from hyperhive.core.config import DaemonConfig
from hyperhive.core.faults import SimulatedCrash
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import Conflict, ConnectionLost, NotFound
from tests.conftest import needs_bwrap
from tests.core.test_approvals import approval_is, git
from tests.hive import hive_config, open_hive, short_tmpdir, subscription, wait_for_all

pytestmark = needs_bwrap

R = TypeVar("R", bound=wire.Reply)

ALICE, BOB = "alice", "bob"
LOST = (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a client may see when the daemon dies under its request."""

EXPLORE = bool(os.environ.get("HIVE_EXPLORE"))
"""HIVE_EXPLORE=1: new random runs, more of them. Otherwise the same examples on every run, so
that CI stays deterministic; explore locally and keep what it finds as fixes plus examples."""

SETTINGS = settings(
    max_examples=60 if EXPLORE else 15,
    stateful_step_count=25,
    deadline=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

Status = Literal["pending", "deployed", "failed", "denied"]
CrashPoint = Literal["mid_approve", "before_meta_commit"]

VALID = st.sampled_from(
    [
        'model = "sonnet"\n',
        'model = "opus"\n',
        "private_network = true\n",
        '[env]\nGREETING = "hi"\n',
        'allowed_recipients = ["hm1nd"]\n',
        "",
    ]
)
BROKEN = st.sampled_from(
    [
        ('modle = "sonnet"\n', "unknown field `modle`"),
        ("model = 42\n", "at `$.model`"),
        ('model = "sonnet\n', "agent.toml: "),
        ('[limits]\nmemory_max = "lots"\n', "at `$.limits.memory_max`"),
        (None, "agent.toml is missing from"),
    ]
)
"""A refused agent.toml (None: the file deleted) and what the failure's note must say."""

NOTES = st.text(st.sampled_from("abcxyz ABC 019.,!?'-#\n"), max_size=30)
"""Deny notes: `#` and newlines included, since tags keep notes verbatim."""


@dataclass
class Expected:
    """The model of one approval."""

    kind: Literal["apply_commit", "spawn"]
    agent: str
    sha: str = ""
    error: str = ""
    """For a proposal whose agent.toml is refused: what the failure note contains."""
    status: Status = "pending"
    note: str | None = ""
    """The exact note, or None where the model does not fix it (a deploy's)."""


@dataclass
class Model:
    initial: str
    """alice's `deployed/0`."""
    approvals: dict[int, Expected] = field(default_factory=dict)
    deployed: tuple[str, str] = ("", "deployed/0")
    """alice's applied `main` and the tag that deployed it."""
    meta: list[str] = field(default_factory=list)
    """Meta commits since the start, oldest first."""
    bob: str | None = None
    """bob's applied `main` once he is spawned."""
    chain: list[str] = field(default_factory=list)
    """The proposed repo's history, oldest first: all it still has (the rest was pruned)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Every commit made in the proposed repo, oldest first -> what refuses it ("": valid)."""

    def ids(self, *statuses: Status, kind: str | None = None) -> list[int]:
        return [
            aid
            for aid, exp in self.approvals.items()
            if (not statuses or exp.status in statuses) and kind in (None, exp.kind)
        ]

    @property
    def next_id(self) -> int:
        return max(self.approvals, default=0) + 1

    def deploy(self, aid: int) -> None:
        """#aid approved (or completed by recovery): deployed, or failed on its agent.toml."""
        exp = self.approvals[aid]
        exp.note = None
        if exp.error:
            exp.status = "failed"
            return
        exp.status = "deployed"
        self.deployed = (exp.sha, f"deployed/{aid}")
        self.meta.append(f"deploy {ALICE} deployed/{aid} {exp.sha[:12]}")

    def expected_tags(self, notes: dict[int, str]) -> dict[str, tuple[str, str | None]]:
        """alice's tags: name -> (commit, annotation or None for a lightweight tag)."""
        tags: dict[str, tuple[str, str | None]] = {"deployed/0": (self.initial, None)}
        for aid, exp in self.approvals.items():
            if exp.kind != "apply_commit":
                continue
            steps = {
                "pending": ["proposal"],
                "deployed": ["proposal", "approved", "building", "deployed"],
                "failed": ["proposal", "approved", "building"],
                "denied": ["proposal"],
            }[exp.status]
            tags.update({f"{step}/{aid}": (exp.sha, None) for step in steps})
            # Compared without trailing whitespace (read_tags strips it too).
            if exp.status == "failed":
                tags[f"failed/{aid}"] = (exp.sha, notes[aid].rstrip())
            elif exp.status == "denied":
                tags[f"denied/{aid}"] = (exp.sha, (notes[aid] or "denied").rstrip())
        return tags


@dataclass(frozen=True)
class Row:
    kind: str
    agent: str
    sha: str
    status: str
    note: str


def read_db(path: Path) -> tuple[dict[int, Row], list[events.ApprovalResolved]]:
    """The approvals table, and every `approval_resolved` event sent to the manager."""
    conn = sqlite3.connect(path)  # WAL: a reader never blocks the daemon's writer
    try:
        rows = {
            aid: Row(*rest)
            for aid, *rest in conn.execute(
                "SELECT id, kind, agent, fetched_sha, status, note FROM approvals"
            )
        }
        bodies = conn.execute(
            "SELECT body FROM messages WHERE sender = 'system' AND body LIKE ? ORDER BY id",
            ('{"event":"approval_resolved"%',),
        ).fetchall()
    finally:
        conn.close()
    resolved = [msgspec.json.decode(body, type=events.ApprovalResolved) for (body,) in bodies]
    return rows, resolved


async def read_tags(repo: Path) -> dict[str, tuple[str, str | None]]:
    fields = "%(refname:strip=2)%00%(objecttype)%00%(objectname)%00%(*objectname)%00%(contents)"
    out = await git(repo, "for-each-ref", "refs/tags", f"--format={fields}%01")
    tags: dict[str, tuple[str, str | None]] = {}
    for record in filter(None, (r.strip("\n") for r in out.split("\x01"))):
        name, kind, target, peeled, contents = record.split("\x00")
        tags[name] = (peeled, contents.rstrip()) if kind == "tag" else (target, None)
    return tags


async def commit(repo: Path, toml: str | None, message: str, *, amend: bool = False) -> str:
    """Commit agent.toml (None: delete it) in the proposed repo, as the manager would."""
    path = repo / "agent.toml"
    if toml is None:
        await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
    else:
        await trio.to_thread.run_sync(path.write_text, toml)
    await git(repo, "add", "-A")
    await git(repo, "commit", "-q", "--allow-empty", *(["--amend"] if amend else []), "-m", message)
    return await git(repo, "rev-parse", "HEAD")


class Daemon:
    """The daemon under test, in the test's trio run, started and stopped between steps."""

    def __init__(self, cfg: DaemonConfig, nursery: trio.Nursery) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.crashed = False
        self.failure: BaseException | None = None
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._done.set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    async def start(self, crash_at: CrashPoint | None = None) -> None:
        assert not self.running
        self._scope, self._done, self.crashed = trio.CancelScope(), trio.Event(), False
        cfg = self.cfg
        if crash_at is not None:
            cfg = replace(cfg, crash_at=f"{crash_at}:1", crash_raises=True)
        await self.nursery.start(self._run, cfg)

    async def _run(self, cfg: DaemonConfig, *, task_status: trio.TaskStatus[DaemonInfo]) -> None:
        try:
            with self._scope:
                await run(cfg, task_status=task_status)
        except* SimulatedCrash:
            self.crashed = True
        except* Exception as group:
            self.failure = group  # raised in the machine's thread by the next step
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._done.wait()

    async def restart(self, crash_at: CrashPoint | None = None) -> None:
        await self.stop()
        await self.start(crash_at)

    async def wait_crashed(self) -> None:
        with trio.fail_after(30):
            await self._done.wait()
        assert self.crashed, "the daemon ended without reaching its crash point"

    def alive(self) -> None:
        if self.failure is not None:
            raise self.failure
        assert self.running, "the daemon is not running"

    async def host(self, request: wire.HostRequest[R]) -> R:
        return await call_once(str(self.cfg.host_socket), request)

    async def manager(self, request: wire.AgentRequest[R]) -> R:
        return await call_once(str(self.cfg.socket_dir("hm1nd") / "mcp.sock"), request)


async def make_template(root: Path) -> Path:
    """A state dir with hm1nd killed and alice spawned and stopped: each example starts from a
    copy (the meta repo's agents.json keeps the template's paths; nothing here builds it)."""
    async with open_hive(hive_config(root, start_manager=True)) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        await hive.call(wire.Spawn(name=ALICE))
        await hive.call(wire.Kill(name=ALICE))
    return root / "state"


def resolved_sent(aid: int) -> Callable[[wire.HiveEvent], bool]:
    def check(e: wire.HiveEvent) -> bool:
        if not (isinstance(e, wire.MessageSent) and e.message.sender == "system"):
            return False
        if not e.message.body.startswith('{"event":"approval_resolved"'):
            return False
        return msgspec.json.decode(e.message.body, type=events.ApprovalResolved).id == aid

    return check


class ApprovalsMachine(RuleBasedStateMachine):
    def __init__(self, template: Path, nursery: trio.Nursery) -> None:
        super().__init__()
        # This runs in the runner's worker thread: blocking file work is fine here.
        self.root = short_tmpdir()
        shutil.copytree(template, self.root / "state", symlinks=True)
        self.daemon = Daemon(hive_config(self.root), nursery)
        state = self.root / "state"
        self.proposed = state / "proposed" / ALICE / "config"
        self.applied = state / "applied" / ALICE
        self.meta_dir = state / "meta"
        self.proposals = 0
        self.model, self.meta_before = trio.from_thread.run(self._begin)

    async def _begin(self) -> tuple[Model, list[str]]:
        initial = await git(self.applied, "rev-parse", "main")
        assert await git(self.proposed, "rev-parse", "HEAD") == initial
        meta_before = (await git(self.meta_dir, "log", "--format=%s")).splitlines()
        await self.daemon.start()
        model = Model(initial, deployed=(initial, "deployed/0"), chain=[initial])
        model.errors[initial] = ""
        return model, meta_before

    def teardown(self) -> None:
        if self.daemon.running:
            trio.from_thread.run(self.daemon.stop)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ proposals

    @rule(toml=VALID, ref_len=st.integers(7, 40), upper=st.booleans())
    def propose_valid(self, toml: str, ref_len: int, upper: bool) -> None:
        trio.from_thread.run(self._propose, toml, "", ref_len, upper)

    @rule(broken=BROKEN, ref_len=st.integers(7, 40))
    def propose_broken(self, broken: tuple[str | None, str], ref_len: int) -> None:
        toml, error = broken
        trio.from_thread.run(self._propose, toml, error, ref_len, False)

    def _content(self, toml: str | None) -> str | None:
        """Every commit differs from the one before, so each proposal is a new sha."""
        self.proposals += 1
        return None if toml is None else f"# proposal {self.proposals}\n{toml}"

    async def _propose(self, toml: str | None, error: str, ref_len: int, upper: bool) -> None:
        sha = await commit(self.proposed, self._content(toml), f"proposal {self.proposals}")
        if error == "agent.toml is missing from":
            error = f"{error} {sha[:12]}"
        self.model.chain.append(sha)
        self.model.errors[sha] = error
        await self._request(sha, sha[:ref_len].upper() if upper else sha[:ref_len])

    async def _request(self, sha: str, ref: str) -> None:
        queued = await self.daemon.manager(wire.RequestApplyCommit(agent=ALICE, commit_ref=ref))
        assert (queued.id, queued.sha) == (self.model.next_id, sha)
        self.model.approvals[queued.id] = Expected(
            "apply_commit", ALICE, sha, self.model.errors[sha]
        )

    @rule(data=st.data(), ref_len=st.integers(7, 40))
    def propose_again(self, data: st.DataObject, ref_len: int) -> None:
        """Any earlier commit (a rollback is one): `not_found` once pruned from the repo."""
        sha = data.draw(st.sampled_from(list(self.model.errors)), label="sha")
        if sha in self.model.chain:
            trio.from_thread.run(self._request, sha, sha[:ref_len])
        else:
            with pytest.raises(NotFound, match="proposed repo"):
                trio.from_thread.run(self._request, sha, sha[:ref_len])

    @rule(toml=VALID, drop=st.booleans())
    def rewrite_proposed_history(self, toml: str, drop: bool) -> None:
        """Amend the last commit, or drop it and commit anew (a force-push); then prune."""
        trio.from_thread.run(self._rewrite, toml, drop)

    async def _rewrite(self, toml: str, drop: bool) -> None:
        repo, chain = self.proposed, self.model.chain
        dropped = drop and len(chain) > 1
        chain.pop()
        if dropped:
            await git(repo, "reset", "-q", "--hard", "HEAD~1")
        sha = await commit(repo, self._content(toml), "rewritten", amend=not dropped)
        await git(repo, "reflog", "expire", "--expire=now", "--all")
        await git(repo, "gc", "-q", "--prune=now")
        chain.append(sha)
        self.model.errors[sha] = ""
        # Nothing else changes: what was proposed stays pinned in the applied repo.

    # ------------------------------------------------------------------ decisions

    @precondition(lambda self: self.model.ids("pending"))
    @rule(data=st.data())
    def approve_pending(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(self.model.ids("pending")), label="id")
        exp = self.model.approvals[aid]
        if exp.kind == "spawn":
            trio.from_thread.run(self._approve_spawn, aid)
        else:
            trio.from_thread.run(self._approve, aid)

    async def _approve(self, aid: int) -> None:
        reply = await self.daemon.host(wire.Approve(id=aid))
        self.model.deploy(aid)
        assert reply.approval.status == self.model.approvals[aid].status, reply.approval

    async def _approve_spawn(self, aid: int) -> None:
        async with subscription(str(self.daemon.cfg.host_socket)) as watch:
            reply = await self.daemon.host(wire.Approve(id=aid))
            assert reply.approval.status == "spawning"
            await wait_for_all(
                watch,
                approval_is(aid, "deployed"),  # type: ignore[arg-type]
                resolved_sent(aid),
            )
        # Its container started; stop it, so that restarts start nothing.
        await self.daemon.host(wire.Kill(name=BOB))
        bob = await git(self.root / "state" / "applied" / BOB, "rev-parse", "main")
        self.model.approvals[aid].status = "deployed"
        self.model.bob = bob
        self.model.meta.append(f"spawn {BOB} deployed/0 {bob[:12]}")

    @precondition(lambda self: self.model.ids("pending"))
    @rule(data=st.data(), note=NOTES)
    def deny_pending(self, data: st.DataObject, note: str) -> None:
        aid = data.draw(st.sampled_from(self.model.ids("pending")), label="id")
        trio.from_thread.run(self._deny, aid, note)

    async def _deny(self, aid: int, note: str) -> None:
        reply = await self.daemon.host(wire.Deny(id=aid, note=note))
        assert reply.approval.status == "denied"
        exp = self.model.approvals[aid]
        exp.status, exp.note = "denied", note.strip()

    @precondition(lambda self: self.model.ids("deployed", "failed", "denied"))
    @rule(data=st.data(), deny=st.booleans())
    def decide_again(self, data: st.DataObject, deny: bool) -> None:
        """A resolved approval is resolved once: a second decision is a conflict."""
        aid = data.draw(st.sampled_from(self.model.ids("deployed", "failed", "denied")))
        status = self.model.approvals[aid].status
        with pytest.raises(Conflict, match=f"is {status}, not pending"):
            trio.from_thread.run(self._decide, aid, deny)

    @rule(deny=st.booleans())
    def decide_unknown(self, deny: bool) -> None:
        with pytest.raises(NotFound):
            trio.from_thread.run(self._decide, self.model.next_id, deny)

    async def _decide(self, aid: int, deny: bool) -> None:
        request: wire.HostRequest[wire.ApprovalReply] = (
            wire.Deny(id=aid) if deny else wire.Approve(id=aid)
        )
        await self.daemon.host(request)

    @rule()
    def request_spawn(self) -> None:
        trio.from_thread.run(self._request_spawn)

    async def _request_spawn(self) -> None:
        request = wire.RequestSpawn(name=BOB, description="a second pair of hands")
        waiting = self.model.ids("pending", kind="spawn")
        if self.model.bob is not None or waiting:
            match = "already exists" if self.model.bob is not None else "already pending"
            with pytest.raises(Conflict, match=match):
                await self.daemon.manager(request)
            return
        queued = await self.daemon.manager(request)
        assert queued.id == self.model.next_id
        self.model.approvals[queued.id] = Expected("spawn", BOB)

    # ------------------------------------------------------------------ restarts and crashes

    @rule()
    def restart(self) -> None:
        trio.from_thread.run(self.daemon.restart)

    @precondition(lambda self: self.model.ids("pending", kind="apply_commit"))
    @rule(data=st.data(), point=st.sampled_from(["mid_approve", "before_meta_commit"]))
    def crash_mid_approve(self, data: st.DataObject, point: CrashPoint) -> None:
        aid = data.draw(st.sampled_from(self.model.ids("pending", kind="apply_commit")))
        trio.from_thread.run(self._crash, aid, point)

    async def _crash(self, aid: int, point: CrashPoint) -> None:
        exp = self.model.approvals[aid]
        await self.daemon.restart(crash_at=point)
        if point == "before_meta_commit" and exp.error:
            # A refused agent.toml fails before the meta commit: the point is never reached.
            await self._approve(aid)
            await self.daemon.restart()
            return
        with contextlib.suppress(*LOST):
            await self.daemon.host(wire.Approve(id=aid))
            raise AssertionError(f"approve #{aid} returned past the crash point {point}")
        await self.daemon.wait_crashed()
        await self._check_half_done(aid, point)
        await self.daemon.start()
        if point == "mid_approve":
            exp.status, exp.note = "failed", "interrupted"
        else:
            self.model.deploy(aid)

    async def _check_half_done(self, aid: int, point: CrashPoint) -> None:
        """Dead at the crash point: `building` in sqlite, main moved, the pin staged only."""
        exp = self.model.approvals[aid]
        rows, _ = await trio.to_thread.run_sync(read_db, self.daemon.cfg.db_path)
        assert rows[aid].status == "building"
        assert await git(self.applied, "rev-parse", "main") == exp.sha
        tags = await read_tags(self.applied)
        assert f"building/{aid}" in tags
        assert (f"deployed/{aid}" in tags) == (point == "before_meta_commit")
        assert await git(self.meta_dir, "status", "--porcelain") == "M agents.lock.json"
        log = (await git(self.meta_dir, "log", "--format=%s")).splitlines()
        assert log == [*reversed(self.model.meta), *self.meta_before]

    # ------------------------------------------------------------------ invariants

    @invariant()
    def matches_the_model(self) -> None:
        self.daemon.alive()
        trio.from_thread.run(self._check)

    async def _check(self) -> None:
        model = self.model
        rows, resolved = await trio.to_thread.run_sync(read_db, self.daemon.cfg.db_path)
        # sqlite: every approval as the model says; nothing half done survives a (re)start.
        assert not [aid for aid, row in rows.items() if row.status in ("building", "spawning")]
        assert rows.keys() == model.approvals.keys()
        for aid, exp in model.approvals.items():
            row = rows[aid]
            assert (row.kind, row.agent, row.sha, row.status) == (
                exp.kind,
                exp.agent,
                exp.sha,
                exp.status,
            ), aid
            if exp.note is not None:
                assert row.note == exp.note, aid
            elif exp.status == "failed":
                assert exp.error in row.note, aid
        # Each resolved once, with its tag, to the manager; pending ones not at all.
        seen = [(r.id, r.status, r.tag) for r in resolved]
        expected = [
            (aid, exp.status, f"{exp.status}/{aid}" if exp.kind == "apply_commit" else "")
            for aid, exp in model.approvals.items()
            if exp.status != "pending"
        ]
        assert sorted(seen) == sorted(expected)
        pending = await self.daemon.host(wire.Pending())
        assert [a.id for a in pending.approvals] == model.ids("pending")
        # alice's applied repo: the tags of every approval, main at the last deploy, clean.
        notes = {aid: row.note for aid, row in rows.items()}
        assert await read_tags(self.applied) == model.expected_tags(notes)
        sha, tag = model.deployed
        assert await git(self.applied, "rev-parse", "main") == sha
        assert await git(self.applied, "status", "--porcelain") == ""
        # The meta repo: exactly the model's deploys, pins at each agent's main, clean.
        log = (await git(self.meta_dir, "log", "--format=%s")).splitlines()
        assert log == [*reversed(model.meta), *self.meta_before]
        lock = await git(self.meta_dir, "show", "HEAD:agents.lock.json")
        pins = msgspec.json.decode(lock, type=dict[str, dict[str, str]])
        want = {ALICE: {"rev": sha, "tag": tag}}
        if model.bob is not None:
            want[BOB] = {"rev": model.bob, "tag": "deployed/0"}
        assert pins == want
        assert await git(self.meta_dir, "status", "--porcelain") == ""
        # No container runs: the deploys above rebuilt a stopped alice.
        agents = await self.daemon.host(wire.ListAgents())
        assert [(a.name, a.pid) for a in agents.agents if a.pid is not None] == []


async def test_approvals_follow_the_model_across_restarts_and_crashes(hive_root: Path) -> None:
    template = await make_template(hive_root)
    async with trio.open_nursery() as nursery:

        class Machine(ApprovalsMachine):
            def __init__(self) -> None:
                super().__init__(template, nursery)

        await trio.to_thread.run_sync(lambda: run_state_machine_as_test(Machine, settings=SETTINGS))
        nursery.cancel_scope.cancel()
