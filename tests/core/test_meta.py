"""The meta repo on its own, with real git: two-phase deploys touch only the lock files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec

from hyperhive.core.containers.nixgen import MetaAgent
from hyperhive.core.gitops import GitOps
from hyperhive.core.meta import MetaRepo, Pin, flake_renderer
from hyperhive.core.runner import Runner

SHA_A = "a" * 40
SHA_B = "b" * 40


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def subjects(meta: Path) -> list[str]:
    return git(meta, "log", "--format=%s").splitlines()


def make(tmp_path: Path, *, render: bool = True) -> MetaRepo:
    renderer = (
        flake_renderer(
            hyperhive_flake="git+file:///etc/hyperhive",
            system="x86_64-linux",
            dashboard_port=7000,
            operator_pronouns="she/her",
        )
        if render
        else None
    )
    return MetaRepo(GitOps(Runner(), tmp_path), tmp_path, renderer)


def alice(tmp_path: Path) -> MetaAgent:
    return MetaAgent(
        name="alice",
        container="h-alice",
        role="agent",
        port=8123,
        applied=str(tmp_path / "applied" / "alice"),
    )


async def test_spawn_deploy_destroy_is_the_log(tmp_path: Path) -> None:
    meta = make(tmp_path)
    await meta.ensure()
    await meta.record(
        "spawn alice deployed/0 aaaaaaaaaaaa", "alice", Pin(SHA_A, "deployed/0"), alice(tmp_path)
    )
    flake = (tmp_path / "meta" / "flake.nix").read_text()
    assert '"agent-alice".url = "git+file://' in flake and f"{tmp_path}/applied/alice" in flake
    await meta.prepare("alice", SHA_B, "deployed/3")
    assert (await meta.pins())["alice"] == Pin(SHA_A, "deployed/0")  # staged, not committed
    assert (await meta.pins(committed=False))["alice"] == Pin(SHA_B, "deployed/3")
    await meta.finalize("deploy alice deployed/3 bbbbbbbbbbbb")
    assert (await meta.pins())["alice"] == Pin(SHA_B, "deployed/3")
    await meta.record("destroy alice", "alice", None)
    assert await meta.pins() == {}
    assert "agent-alice" not in (tmp_path / "meta" / "flake.nix").read_text()
    assert subjects(tmp_path / "meta") == [
        "destroy alice",
        "deploy alice deployed/3 bbbbbbbbbbbb",
        "spawn alice deployed/0 aaaaaaaaaaaa",
        "meta: init",
    ]
    assert git(tmp_path / "meta", "status", "--porcelain") == ""


async def test_abort_restores_the_locks_and_nothing_else(tmp_path: Path) -> None:
    meta = make(tmp_path, render=False)  # as on nixos: the backend writes flake.nix
    await meta.ensure()
    await meta.record("spawn alice deployed/0 aaaaaaaaaaaa", "alice", Pin(SHA_A, "deployed/0"))
    root = tmp_path / "meta"
    committed_lock = (root / "agents.lock.json").read_bytes()
    await meta.prepare("alice", SHA_B, "deployed/4")
    (root / "flake.lock").write_text('{"nodes": {}}\n')  # what `nix flake lock` staged
    (root / "flake.nix").write_text("{ }\n")  # another agent's create, meanwhile
    await meta.abort()
    assert (root / "agents.lock.json").read_bytes() == committed_lock
    assert not (root / "flake.lock").exists()  # it did not exist at HEAD
    assert (root / "flake.nix").read_text() == "{ }\n"  # not ours to undo


async def test_finalize_commits_only_the_lock_files(tmp_path: Path) -> None:
    meta = make(tmp_path, render=False)
    await meta.ensure()
    root = tmp_path / "meta"
    await meta.prepare("alice", SHA_A, "deployed/1")
    (root / "flake.lock").write_text('{"nodes": {}}\n')
    (root / "flake.nix").write_text("{ }\n")  # unrelated, uncommitted change
    await meta.finalize("deploy alice deployed/1 aaaaaaaaaaaa")
    changed = git(root, "show", "--name-only", "--format=", "HEAD").split()
    assert sorted(changed) == ["agents.lock.json", "flake.lock"]
    assert git(root, "status", "--porcelain") == "?? flake.nix"


async def test_finalize_without_changes_makes_no_commit(tmp_path: Path) -> None:
    meta = make(tmp_path)
    await meta.ensure()
    await meta.finalize("rebuild alice")
    assert subjects(tmp_path / "meta") == ["meta: init"]
    # A relocked flake.lock (a rebuild on nixos) is a commit of its own.
    (tmp_path / "meta" / "flake.lock").write_text('{"nodes": {"agent-alice": {}}}\n')
    await meta.finalize("rebuild alice")
    assert subjects(tmp_path / "meta")[0] == "rebuild alice"


async def test_the_lock_file_is_sorted_json(tmp_path: Path) -> None:
    meta = make(tmp_path)
    await meta.ensure()
    for name in ("zed", "alice"):
        await meta.prepare(name, SHA_A, "deployed/0")
    await meta.finalize("two")
    text = (tmp_path / "meta" / "agents.lock.json").read_text()
    assert list(msgspec.json.decode(text)) == ["alice", "zed"]
