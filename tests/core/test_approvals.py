"""Approvals with real git and a real daemon: propose, approve, deny, roll back, recover."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import BadParams, ConnectionLost, Forbidden, NotFound, UnknownCommand
from tests.conftest import needs_bwrap
from tests.core.test_agent_config import _harness_env
from tests.hive import (
    Hive,
    daemon_process,
    hive_config,
    open_hive,
    subscription,
    wait_for_all,
    wait_for_event,
)

pytestmark = needs_bwrap


async def git(repo: Path, *args: str) -> str:
    done = await trio.run_process(
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@hyperhive",
            # The test acts as the manager, whose uid owns the proposed repos.
            "-c",
            "safe.directory=*",
            "-C",
            str(repo),
            *args,
        ],
        capture_stdout=True,
        capture_stderr=True,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout.decode().strip()


async def propose(repo: Path, toml: str, message: str = "change") -> str:
    """Commit a new agent.toml in the proposed repo, as the manager would."""
    await trio.to_thread.run_sync((repo / "agent.toml").write_text, toml)
    await git(repo, "commit", "-q", "-am", message)
    return await git(repo, "rev-parse", "HEAD")


def is_running(name: str) -> object:
    def check(e: wire.HiveEvent) -> bool:
        return (
            isinstance(e, wire.AgentChanged) and e.agent.name == name and e.agent.state == "running"
        )

    return check


async def manager_events(hive: Hive) -> list[dict[str, object]]:
    inbox = await hive.call(wire.HostRecent(name="manager", limit=200))
    found = []
    for m in inbox.messages:
        if m.sender == "system" and m.body.startswith("{"):
            found.append(msgspec.json.decode(m.body))
    return found


async def tags(applied: Path) -> set[str]:
    return set((await git(applied, "tag")).split())


async def meta_log(hive: Hive) -> list[str]:
    """The meta repo's commit subjects, newest first: the hive's deploy history."""
    return (await git(hive.cfg.state_dir / "meta", "log", "--format=%s")).splitlines()


async def meta_pin(hive: Hive, name: str) -> dict[str, str] | None:
    """`name`'s pin in the committed agents.lock.json."""
    text = await git(hive.cfg.state_dir / "meta", "show", "HEAD:agents.lock.json")
    pins: dict[str, dict[str, str]] = msgspec.json.decode(text)
    return pins.get(name)


def approval_is(aid: int, status: str) -> object:
    def check(e: wire.HiveEvent) -> bool:
        return (
            isinstance(e, wire.ApprovalChanged)
            and e.approval.id == aid
            and e.approval.status == status
        )

    return check


@asynccontextmanager
async def hive_with_alice(root: Path) -> AsyncIterator[tuple[Hive, Path, Path, int]]:
    """A daemon with hm1nd's socket served (its container killed at once) and alice running."""
    async with open_hive(hive_config(root, start_manager=True)) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        async with subscription(hive.sock) as events:
            await hive.call(wire.Spawn(name="alice"))
            running = await wait_for_event(events, is_running("alice"))  # type: ignore[arg-type]
        assert isinstance(running, wire.AgentChanged) and running.agent.pid is not None
        state = hive.cfg.state_dir
        yield (
            hive,
            state / "proposed" / "alice" / "config",
            state / "applied" / "alice",
            running.agent.pid,
        )


async def request_apply(hive: Hive, sha: str, agent: str = "alice") -> wire.ApprovalQueued:
    return await call_once(
        hive.agent_sock("hm1nd"),
        wire.RequestApplyCommit(agent=agent, commit_ref=sha),
    )


async def test_spawn_seeds_both_repos(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (_hive, proposed, applied, _pid):
        assert await git(applied, "rev-parse", "main") == await git(proposed, "rev-parse", "HEAD")
        assert await tags(applied) == {"deployed/0"}
        # The whole config is tracked from the start (a git+file flake input sees only that).
        tracked = (await git(applied, "ls-files")).split()
        assert tracked == ["agent.nix", "agent.toml", "flake.nix"]
        assert await git(applied, "status", "--porcelain") == ""
        listed = await _hive.call(wire.ListAgents())
        deployed = {a.name: a.deployed for a in listed.agents}
        main = await git(applied, "rev-parse", "main")
        assert deployed == {"hm1nd": None, "alice": f"deployed/0 {main[:12]}"}
        assert await git(proposed, "remote", "get-url", "applied") == "/applied/alice"
        author = await git(applied, "log", "-1", "--format=%an <%ae>")
        assert author == "hive-c0re <hive-c0re@hyperhive>"


async def test_approve_deploys_the_commit_and_restarts_alice(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        sha = await propose(proposed, 'model = "sonnet"\n')
        queued = await request_apply(hive, sha[:10])
        assert queued.id == 1 and queued.sha == sha
        pending = await hive.call(wire.Pending())
        assert [a.id for a in pending.approvals] == [1]
        assert '+model = "sonnet"' in pending.approvals[0].diff
        async with subscription(hive.sock) as events:
            done = await hive.call(wire.Approve(id=1))
            assert done.approval.status == "deployed"
            running = await wait_for_event(events, is_running("alice"))  # type: ignore[arg-type]
        assert {"proposal/1", "approved/1", "building/1", "deployed/1"} <= await tags(applied)
        assert await git(applied, "rev-parse", "main") == sha
        assert await git(applied, "status", "--porcelain") == ""
        seen = await manager_events(hive)
        resolved = [e for e in seen if e["event"] == "approval_resolved"]
        assert resolved and resolved[-1]["status"] == "deployed"
        assert resolved[-1]["tag"] == "deployed/1" and resolved[-1]["sha"] == sha
        assert any(e["event"] == "rebuilt" and e["agent"] == "alice" for e in seen)
        assert isinstance(running, wire.AgentChanged) and running.agent.pid is not None
        assert _harness_env(running.agent.pid)["HIVE_MODEL"] == "sonnet"
        # The meta repo records the deploy: one commit, alice pinned at the deployed sha.
        log = await meta_log(hive)
        assert log[0] == f"deploy alice deployed/1 {sha[:12]}"
        assert sum(line.startswith("deploy ") for line in log) == 1
        assert await meta_pin(hive, "alice") == {"rev": sha, "tag": "deployed/1"}
        assert await git(hive.cfg.state_dir / "meta", "status", "--porcelain") == ""
        listed = await hive.call(wire.ListAgents())
        (info,) = [a for a in listed.agents if a.name == "alice"]
        assert info.deployed == f"deployed/1 {sha[:12]}"
        # Resolved once: approving again is a conflict, and nothing is pending.
        assert (await hive.call(wire.Pending())).approvals == []


async def test_a_broken_agent_toml_fails_and_rolls_back(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, pid):
        before = await git(applied, "rev-parse", "main")
        sha = await propose(proposed, 'modle = "sonnet"\n')
        queued = await request_apply(hive, sha)
        done = await hive.call(wire.Approve(id=queued.id))
        assert done.approval.status == "failed" and "unknown field `modle`" in done.approval.note
        assert f"failed/{queued.id}" in await tags(applied)
        assert f"deployed/{queued.id}" not in await tags(applied)
        message = await git(applied, "tag", "-l", "--format=%(contents)", f"failed/{queued.id}")
        assert "unknown field `modle`" in message
        # `history` shows the same: each tag, an annotation only where the tag has one.
        notes = {t.tag: t.note for t in (await hive.call(wire.History(name="alice"))).tags}
        assert "unknown field `modle`" in notes[f"failed/{queued.id}"]
        assert notes[f"proposal/{queued.id}"] == ""
        assert await git(applied, "rev-parse", "main") == before
        assert await git(applied, "status", "--porcelain") == ""
        assert "modle" not in (applied / "agent.toml").read_text()
        # A failed deploy leaves no trace in the meta repo: no commit, the old pin, a clean tree.
        assert not any(line.startswith("deploy ") for line in await meta_log(hive))
        assert await meta_pin(hive, "alice") == {"rev": before, "tag": "deployed/0"}
        assert await git(hive.cfg.state_dir / "meta", "status", "--porcelain") == ""
        alice = await hive.call(wire.ListAgents())
        (info,) = [a for a in alice.agents if a.name == "alice"]
        assert info.state == "running" and info.pid == pid
        resolved = [e for e in await manager_events(hive) if e["event"] == "approval_resolved"]
        assert resolved[-1]["status"] == "failed" and resolved[-1]["tag"] == f"failed/{queued.id}"


async def test_deny_tags_the_note(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        before = await git(applied, "rev-parse", "main")
        sha = await propose(proposed, 'model = "opus"\n')
        queued = await request_apply(hive, sha)
        note = "#1 too pricey\n# opus costs 5x"
        done = await hive.call(wire.Deny(id=queued.id, note=note))
        assert done.approval.status == "denied"
        message = await git(applied, "tag", "-l", "--format=%(contents)", f"denied/{queued.id}")
        assert message == note  # kept verbatim: git would drop lines starting with `#`
        assert await git(applied, "rev-parse", f"denied/{queued.id}^{{commit}}") == sha
        assert await git(applied, "rev-parse", "main") == before
        resolved = [e for e in await manager_events(hive) if e["event"] == "approval_resolved"]
        assert resolved[-1]["status"] == "denied" and resolved[-1]["note"] == note
        with pytest.raises(Exception, match="not pending"):
            await hive.call(wire.Approve(id=queued.id))
        # The decided ones, newest first, with the note.
        [decided] = (await hive.call(wire.ApprovalHistory())).approvals
        assert (decided.id, decided.status, decided.note) == (queued.id, "denied", note)
        assert decided.resolved_at is not None


async def test_an_amend_after_the_proposal_changes_nothing(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        sha = await propose(proposed, 'model = "sonnet"\n')
        queued = await request_apply(hive, sha)
        (proposed / "agent.toml").write_text('model = "opus"\n')
        await git(proposed, "commit", "-q", "--amend", "-am", "sneaky")
        amended = await git(proposed, "rev-parse", "HEAD")
        assert amended != sha
        await git(proposed, "reflog", "expire", "--expire=now", "--all")
        await git(proposed, "gc", "-q", "--prune=now")
        done = await hive.call(wire.Approve(id=queued.id))
        assert done.approval.status == "deployed"
        assert await git(applied, "rev-parse", "main") == sha
        assert (applied / "agent.toml").read_text() == 'model = "sonnet"\n'


async def test_bad_refs_and_agents_are_refused(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, _proposed, _applied, _pid):
        for ref in ("main", "zzzz", "HEAD~1", "abc"):
            with pytest.raises(BadParams):
                await request_apply(hive, ref)
        with pytest.raises(NotFound):
            await request_apply(hive, "0123456789abcdef0123456789abcdef01234567")
        with pytest.raises(NotFound):
            await request_apply(hive, "deadbeef", agent="nobody")
        manager = hive.agent_sock("hm1nd")
        for name in ("hm1nd", "manager"):
            with pytest.raises(Forbidden):
                await call_once(manager, wire.KillAgent(name=name))
        # An agent's socket knows none of the manager's commands.
        alice = hive.agent_sock("alice")
        for request in (
            wire.RequestSpawn(name="bob"),
            wire.RequestApplyCommit(agent="alice", commit_ref="deadbeef"),
            wire.KillAgent(name="alice"),
            wire.StartAgent(name="alice"),
            wire.RestartAgent(name="alice"),
        ):
            with pytest.raises(UnknownCommand):
                await call_once(alice, request)
        assert (await hive.call(wire.Pending())).approvals == []


async def test_manager_kill_and_start_an_agent(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, _proposed, _applied, _pid):
        manager = hive.agent_sock("hm1nd")
        killed = await call_once(manager, wire.KillAgent(name="alice"))
        assert killed.agent.state == "stopped"
        async with subscription(hive.sock) as events:
            await call_once(manager, wire.StartAgent(name="alice"))
            await wait_for_event(events, is_running("alice"))  # type: ignore[arg-type]


async def test_request_spawn_then_approve_spawns(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, _proposed, _applied, _pid):
        queued = await call_once(
            hive.agent_sock("hm1nd"),
            wire.RequestSpawn(name="bob", description="reviews alice's work"),
        )
        pending = await hive.call(wire.Pending())
        assert [(a.kind, a.agent, a.description) for a in pending.approvals] == [
            ("spawn", "bob", "reviews alice's work")
        ]
        async with subscription(hive.sock) as events:
            done = await hive.call(wire.Approve(id=queued.id))
            # Approve answers at once; the container is made in the background.
            assert done.approval.status == "spawning"
            listed = await hive.call(wire.ListAgents())
            assert "bob" in [a.name for a in listed.agents]
            await wait_for_all(
                events,
                is_running("bob"),  # type: ignore[arg-type]
                approval_is(queued.id, "deployed"),  # type: ignore[arg-type]
            )
        assert (hive.cfg.state_dir / "applied" / "bob" / ".git").is_dir()
        bob_main = await git(hive.cfg.state_dir / "applied" / "bob", "rev-parse", "main")
        assert f"spawn bob deployed/0 {bob_main[:12]}" in await meta_log(hive)
        seen = await manager_events(hive)
        assert {"event": "spawned", "agent": "bob", "ok": True, "note": "spawned"} in seen
        with pytest.raises(Exception, match="already exists"):
            await hive.call(wire.HostRequestSpawn(name="bob"))


async def test_a_daemon_killed_mid_approve_comes_back_rolled_back(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        before = await git(applied, "rev-parse", "main")
        sha = await propose(proposed, 'model = "sonnet"\n')
        queued = await request_apply(hive, sha)
    async with daemon_process(hive_root, env={"HIVE_CRASH_AT": "mid_approve:1"}) as doomed:
        sock = str(hive_root / "run" / "host.sock")
        with pytest.raises(ConnectionLost):
            await call_once(sock, wire.Approve(id=queued.id))
        with trio.fail_after(10):
            await doomed.wait()
        assert doomed.returncode == 137
    # Killed between moving main and deploying: main points at the proposal, no verdict yet.
    assert await git(applied, "rev-parse", "main") == sha
    assert f"building/{queued.id}" in await tags(applied)
    async with open_hive(hive_config(hive_root)) as hive:
        assert await git(applied, "rev-parse", "main") == before
        assert await git(applied, "status", "--porcelain") == ""
        assert f"deployed/{queued.id}" not in await tags(applied)
        message = await git(applied, "tag", "-l", "--format=%(contents)", f"failed/{queued.id}")
        assert message == "interrupted"
        resolved = [e for e in await manager_events(hive) if e["event"] == "approval_resolved"]
        assert resolved[-1]["status"] == "failed" and resolved[-1]["note"] == "interrupted"
        with pytest.raises(Exception, match="failed, not pending"):
            await hive.call(wire.Approve(id=queued.id))


async def test_revive_through_a_spawn_approval_keeps_the_state(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        sha = await propose(proposed, 'model = "sonnet"\n')
        stale = await request_apply(hive, sha)
        notes = hive.cfg.state_dir / "agents" / "alice" / "state" / "notes.md"
        await trio.to_thread.run_sync(notes.write_text, "remember the milk\n")
        await hive.call(wire.Destroy(name="alice"))
        # Destroying an agent resolves its pending proposals and drops it from the meta repo.
        assert (await hive.call(wire.Pending())).approvals == []
        assert f"failed/{stale.id}" in await tags(applied)
        assert (await meta_log(hive))[0] == "destroy alice"
        assert await meta_pin(hive, "alice") is None
        queued = await call_once(hive.agent_sock("hm1nd"), wire.RequestSpawn(name="alice"))
        async with subscription(hive.sock) as events:
            await hive.call(wire.Approve(id=queued.id))
            await wait_for_event(events, approval_is(queued.id, "deployed"))  # type: ignore[arg-type]
        assert notes.read_text() == "remember the milk\n"
        assert await tags(applied) >= {"deployed/0", f"failed/{stale.id}"}
        main = await git(applied, "rev-parse", "main")
        assert (await meta_log(hive))[0] == f"revive alice deployed/0 {main[:12]}"
        inbox = await hive.call(wire.HostRecent(name="alice", limit=20))
        assert any("Revived from kept state." in m.body for m in inbox.messages)


async def test_a_daemon_killed_before_the_meta_commit_completes_the_deploy(
    hive_root: Path,
) -> None:
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        sha = await propose(proposed, 'model = "sonnet"\n')
        queued = await request_apply(hive, sha)
    async with daemon_process(hive_root, env={"HIVE_CRASH_AT": "before_meta_commit:1"}) as doomed:
        sock = str(hive_root / "run" / "host.sock")
        with pytest.raises(ConnectionLost):
            await call_once(sock, wire.Approve(id=queued.id))
        with trio.fail_after(30):
            await doomed.wait()
        assert doomed.returncode == 137
    # Killed after `deployed/<id>` (the commit point) but before the meta commit.
    assert f"deployed/{queued.id}" in await tags(applied)
    async with open_hive(hive_config(hive_root)) as hive:
        assert await git(applied, "rev-parse", "main") == sha
        assert (await meta_log(hive))[0] == f"deploy alice deployed/{queued.id} {sha[:12]}"
        assert await meta_pin(hive, "alice") == {"rev": sha, "tag": f"deployed/{queued.id}"}
        resolved = [e for e in await manager_events(hive) if e["event"] == "approval_resolved"]
        assert resolved[-1]["status"] == "deployed"


async def test_a_spawn_that_fails_leaves_a_tombstone_and_says_why(hive_root: Path) -> None:
    async with hive_with_alice(hive_root) as (hive, _proposed, _applied, _pid):
        queued = await call_once(hive.agent_sock("hm1nd"), wire.RequestSpawn(name="bob"))
        # Something in bob's way on the host: his /state cannot be made a directory.
        blocker = hive.cfg.state_dir / "agents" / "bob" / "state"
        blocker.parent.mkdir(parents=True)
        blocker.write_text("not a directory")
        async with subscription(hive.sock) as events:
            done = await hive.call(wire.Approve(id=queued.id))
            assert done.approval.status == "spawning"
            failed = await wait_for_event(events, approval_is(queued.id, "failed"))  # type: ignore[arg-type]
        assert isinstance(failed, wire.ApprovalChanged) and "state" in failed.approval.note
        listed = await hive.call(wire.ListAgents())
        (bob,) = [a for a in listed.agents if a.name == "bob"]
        assert bob.state == "destroyed" and bob.last_error == failed.approval.note
        seen = await manager_events(hive)
        assert {"event": "spawned", "agent": "bob", "ok": False, "note": bob.last_error} in seen
        assert not any(line.startswith("spawn bob") for line in await meta_log(hive))
        # Once the obstacle is gone, asking again revives the tombstone.
        blocker.unlink()
        again = await call_once(hive.agent_sock("hm1nd"), wire.RequestSpawn(name="bob"))
        async with subscription(hive.sock) as events:
            await hive.call(wire.Approve(id=again.id))
            await wait_for_all(
                events,
                is_running("bob"),  # type: ignore[arg-type]
                approval_is(again.id, "deployed"),  # type: ignore[arg-type]
            )


async def test_an_unhealthy_deploy_rolls_itself_back(hive_root: Path) -> None:
    """A deploy that builds but makes the harness exit at start (its Python cannot even
    start) crash-loops: within the health window the daemon rolls it back by itself."""
    async with hive_with_alice(hive_root) as (hive, proposed, applied, _pid):
        before = await git(applied, "rev-parse", "main")
        sha = await propose(proposed, '[env]\nPYTHONHOME = "/nonexistent"\n', "break python")
        queued = await request_apply(hive, sha)
        async with subscription(hive.sock) as events:
            done = await hive.call(wire.Approve(id=queued.id))
            assert done.approval.status == "deployed"
            back = await wait_for_event(events, approval_is(queued.id, "rolled_back"))  # type: ignore[arg-type]
            # The rollback's rebuild, then alice up on the old config.
            await wait_for_event(
                events,
                lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "rebuilding",
            )
            running = await wait_for_event(events, is_running("alice"))  # type: ignore[arg-type]
        assert isinstance(back, wire.ApprovalChanged)
        assert back.approval.note.startswith("rolled back: crash-looping after the deploy")
        # The attempt is tagged failed/<id> with the reason; main and the meta repo are back.
        assert {f"deployed/{queued.id}", f"failed/{queued.id}"} <= await tags(applied)
        message = await git(applied, "tag", "-l", "--format=%(contents)", f"failed/{queued.id}")
        assert "crash-looping" in message
        assert await git(applied, "rev-parse", "main") == before
        assert "PYTHONHOME" not in (applied / "agent.toml").read_text()
        assert await meta_pin(hive, "alice") == {"rev": before, "tag": "deployed/0"}
        assert (await meta_log(hive))[0].startswith(f"rollback alice deployed/0 {before[:12]}")
        # alice runs the old config again; the manager and the operator were told.
        assert isinstance(running, wire.AgentChanged) and running.agent.pid is not None
        seen = await manager_events(hive)
        resolved = [e for e in seen if e["event"] == "approval_resolved"]
        assert (resolved[-1]["status"], resolved[-1]["tag"]) == (
            "rolled_back",
            f"failed/{queued.id}",
        )
        after = seen[seen.index(resolved[-1]) :]
        assert any(e["event"] == "rebuilt" and e["ok"] for e in after), after
        inbox = await hive.call(wire.HostRecent(name="operator", limit=20))
        assert any(f"Deploy #{queued.id} of alice" in m.body for m in inbox.messages)
