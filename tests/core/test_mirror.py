"""The forge mirror with real git: the applied and meta repos change as deploys change them
(core/approvals.py's steps), the meta repo's hook queues pushes, and they land in local bare
repos (the fake forge makes one for each repo it creates) — `main` and every tag. Pushes go one
at a time and coalesce, a failing one never touches a deploy and goes again with the next, and
`core`'s token is never in a command line, a remote or a repo's config."""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from hyperhive.core.forge import Forge
from hyperhive.core.gitops import GitOps
from hyperhive.core.meta import MetaRepo, Pin, deploy_message, spawn_message
from hyperhive.core.mirror import ForgeMirror
from hyperhive.core.runner import Runner
from tests.core.fake_forge import FakeForgeHost, FakeGitHttp

HIVE = "lab"
ALL_STAGES = ("proposal", "approved", "building", "deployed", "failed", "denied")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@h", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def refs(repo: Path) -> dict[str, str]:
    """Branches and tags (what the mirror carries) → the object each names."""
    text = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags")
    return dict(line.split(" ", 1) for line in text.splitlines())


@dataclass
class Repos:
    """A hive's config repos and its mirror, without a daemon."""

    root: Path
    host: FakeForgeHost
    gitops: GitOps
    meta: MetaRepo
    mirror: ForgeMirror

    def bare(self, repo: str) -> Path:
        return self.root / "forge" / HIVE / f"{repo}.git"

    async def spawn(self, name: str) -> None:
        """What a spawn does to the repos (core/deploys.py): seeded, pinned at deployed/0."""
        await self.gitops.seed(name)
        sha = git(self.gitops.applied(name), "rev-parse", "main")
        await self.meta.record(spawn_message(name, "deployed/0", sha), name, Pin(sha, "deployed/0"))

    async def propose(self, name: str, n: int, stages: tuple[str, ...], note: str = "") -> str:
        """A commit of the manager's, pinned into the applied repo and tagged through `stages`."""
        proposed = self.gitops.proposed(name)
        (proposed / "agent.toml").write_text(f'model = "model-{n}"\n')
        git(proposed, "commit", "-q", "-am", f"change {n}")
        sha = git(proposed, "rev-parse", "HEAD")
        await self.gitops.pin(name, sha)
        for stage in stages:
            annotated = stage in ("failed", "denied", "deployed")
            await self.gitops.tag(name, f"{stage}/{n}", sha, note if annotated else None)
        return sha

    async def deploy(self, name: str, n: int) -> None:
        """An approved deploy (core/approvals.py): tagged, `main` moved, the pin committed."""
        sha = await self.propose(name, n, ("proposal", "approved", "building"))
        await self.gitops.move_main(name, sha)
        await self.gitops.tag(name, f"deployed/{n}", sha, "deployed")
        await self.meta.prepare(name, sha, f"deployed/{n}")
        await self.meta.finalize(deploy_message(name, f"deployed/{n}", sha))


@asynccontextmanager
async def open_repos(
    tmp_path: Path,
    host: FakeForgeHost | None = None,
    remote: Callable[[str], str] | None = None,
    url: str = "http://localhost:3000",
    to_forge: bool = False,
) -> AsyncIterator[Repos]:
    """The repos, with the mirror serving; on the way out it is let finish its pushes. It
    pushes to `remote`, by default the bare repos the fake forge makes (`to_forge`: to `url`)."""
    host = host or FakeForgeHost()
    host.bare_root = tmp_path / "forge"
    state = tmp_path / "state"
    runner = Runner(executor=host)
    gitops = GitOps(runner, state)
    forge = Forge(runner, state, lambda n: state / "agents" / n, url=url, hive=HIVE)
    if remote is None and not to_forge:
        remote = lambda repo: f"file://{tmp_path}/forge/{HIVE}/{repo}.git"  # noqa: E731
    mirror = ForgeMirror(forge, gitops, remote=remote)
    meta = MetaRepo(gitops, state, None, on_pins=mirror.on_pins)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.serve)
        await meta.ensure()
        yield Repos(tmp_path, host, gitops, meta, mirror)
        with trio.fail_after(60):
            await mirror.wait_idle()
        nursery.cancel_scope.cancel()


async def test_a_deploy_mirrors_main_every_tag_and_the_meta_repo(tmp_path: Path) -> None:
    async with open_repos(tmp_path) as hive:
        await hive.spawn("alice")
        await hive.propose("alice", 1, ("proposal", "denied"), "not now")
        await hive.propose("alice", 2, ("proposal", "approved", "building", "failed"), "boom")
        await hive.deploy("alice", 3)
    applied = hive.gitops.applied("alice")
    mirrored = refs(hive.bare("alice"))
    assert mirrored == refs(applied)
    assert {ref.split("/")[2] for ref in mirrored if ref.startswith("refs/tags/")} == {*ALL_STAGES}
    assert mirrored["refs/heads/main"] == git(applied, "rev-parse", "deployed/3^{commit}")
    assert git(hive.bare("alice"), "cat-file", "-p", "failed/2").endswith("boom")
    assert refs(hive.bare("meta")) == refs(tmp_path / "state" / "meta")
    assert git(hive.bare("meta"), "log", "-1", "--format=%s", "main").startswith(
        "deploy alice deployed/3"
    )
    assert set(hive.host.repos) == {f"{HIVE}/alice", f"{HIVE}/meta"}
    assert all(body["private"] is True for body in hive.host.repos.values())


async def test_the_token_is_in_no_command_line_remote_or_config(tmp_path: Path) -> None:
    async with open_repos(tmp_path) as hive:
        await hive.spawn("alice")
        await hive.deploy("alice", 1)
    core = hive.host.token_of("core")
    assert core is not None
    basic = base64.b64encode(f"core:{core}".encode()).decode()
    assert not any(core in word or basic in word for c in hive.host.log for word in c.argv)
    pushes = [c for c in hive.host.log if c.argv[0] == "git" and "push" in c.argv]
    assert pushes
    for call in pushes:
        assert call.env is not None
        assert call.env["GIT_CONFIG_KEY_0"] == "http.http://localhost:3000/.extraHeader"
        assert call.env["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {basic}"
        assert call.env["GIT_TERMINAL_PROMPT"] == "0"
    for repo in (hive.gitops.applied("alice"), tmp_path / "state" / "meta"):
        assert git(repo, "remote") == ""
        config = (repo / ".git" / "config").read_text()
        assert core not in config and basic not in config and "extraheader" not in config.lower()


async def test_git_sends_the_token_to_the_forge_as_a_header(tmp_path: Path) -> None:
    """Over real HTTP: git, given only the environment, asks the forge's URL for the org's repo
    with `core`'s token in an Authorization header."""
    forge = FakeGitHttp()
    async with trio.open_nursery() as server:
        port = await server.start(forge.serve)
        url = f"http://127.0.0.1:{port}"
        async with open_repos(tmp_path, url=url, to_forge=True) as hive:
            await hive.spawn("alice")
        server.cancel_scope.cancel()
    core = hive.host.token_of("core")
    basic = base64.b64encode(f"core:{core}".encode()).decode()
    for repo in ("meta", "alice"):
        line = f"GET /{HIVE}/{repo}.git/info/refs?service=git-receive-pack "
        with trio.fail_after(10):
            head = await forge.wait_for(line)
        assert f"\r\nAuthorization: Basic {basic}\r\n" in head
    assert hive.mirror.failed == {"alice", "meta"}  # the server said 404


async def test_pushes_go_one_at_a_time_and_coalesce(tmp_path: Path) -> None:
    gate = trio.Event()
    host = FakeForgeHost(push_gate=gate)
    async with open_repos(tmp_path, host) as hive:
        with trio.fail_after(30):
            await host.at_gate.wait()  # the start-up push of the meta repo, held
        assert host.pushed == ["meta"]
        # Deploys go on while it is held, each queueing alice and meta again.
        with trio.fail_after(30):
            await hive.spawn("alice")
            await hive.deploy("alice", 1)
            await hive.deploy("alice", 2)
        assert host.pushed == ["meta"]
        gate.set()
    # Six requests while the first push ran: alice once, meta once more.
    assert host.pushed == ["meta", "alice", "meta"]
    assert refs(hive.bare("alice")) == refs(hive.gitops.applied("alice"))


async def test_a_failing_push_never_fails_a_deploy_and_goes_again_with_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reachable = False

    def remote(repo: str) -> str:
        where = "forge" if reachable else "nowhere"
        return f"file://{tmp_path}/{where}/{HIVE}/{repo}.git"

    async with open_repos(tmp_path, remote=remote) as hive:
        await hive.spawn("alice")
        await hive.deploy("alice", 1)
        with trio.fail_after(60):
            await hive.mirror.wait_idle()
        assert hive.mirror.failed == {"alice", "meta"}
        assert "forge mirror: pushing alice failed" in caplog.text
        assert (await hive.meta.pins())["alice"].tag == "deployed/1"  # the deploy stands
        reachable = True
        await hive.spawn("bob")  # alice's pin did not move: it goes because it failed
    assert hive.mirror.failed == set()
    for name in ("alice", "bob"):
        assert refs(hive.bare(name)) == refs(hive.gitops.applied(name))
    assert refs(hive.bare("meta")) == refs(tmp_path / "state" / "meta")


async def test_a_purged_agent_leaves_its_mirror_as_it_was(tmp_path: Path) -> None:
    async with open_repos(tmp_path) as hive:
        await hive.spawn("alice")
        with trio.fail_after(60):
            await hive.mirror.wait_idle()
        pushed = len(hive.host.pushed)
        await trio.to_thread.run_sync(shutil.rmtree, hive.gitops.applied("alice"))
        await hive.meta.record("destroy alice", "alice", None)
    assert hive.host.pushed[pushed:] == ["meta"]
    assert hive.mirror.failed == set()
    assert "refs/heads/main" in refs(hive.bare("alice"))


async def test_without_a_forge_nothing_is_pushed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_repos(tmp_path, FakeForgeHost(present=False)) as hive:
        await hive.spawn("alice")
    assert hive.host.pushed == []
    assert hive.mirror.failed == {"alice", "meta"}
    assert "no hive-forge container: alice is not mirrored" in caplog.text


async def test_a_failed_push_goes_again_by_itself_when_no_deploy_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reachable = False

    def remote(repo: str) -> str:
        return f"file://{tmp_path}/{'forge' if reachable else 'nowhere'}/{HIVE}/{repo}.git"

    async with open_repos(tmp_path, remote=remote) as hive:
        hive.mirror.retry_initial = hive.mirror._retry_in = 0.05
        await hive.spawn("alice")
        with trio.fail_after(60):
            await hive.mirror.wait_idle()
        assert hive.mirror.failed == {"alice", "meta"}
        reachable = True  # the forge is back; nothing is deployed meanwhile
        with trio.fail_after(60):
            await hive.mirror.wait_clean()
    assert "forge mirror: trying alice, meta again" in caplog.text
    assert refs(hive.bare("alice")) == refs(hive.gitops.applied("alice"))
