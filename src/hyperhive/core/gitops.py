"""The agents' config repos: the proposed repo the manager commits to, the applied repo we deploy.

Every git command goes through the `Runner`, with the daemon's identity and default branch passed
on the command line: nothing depends on the host's global git config.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import trio

from hyperhive.core.containers.nixgen import AGENT_FLAKE_NIX, DEFAULT_AGENT_NIX
from hyperhive.core.runner import Completed, Runner
from hyperhive.protocol.agent_config import AGENT_TOML, DEFAULT_TOML

AGENT_NIX = "agent.nix"
FLAKE_NIX = "flake.nix"

IDENTITY = ("-c", "user.name=hive-c0re", "-c", "user.email=hive-c0re@hyperhive")
BRANCH = "main"
APPLIED_REMOTE = "applied"
CONTAINER_APPLIED = "/applied"
"""Where the manager's container sees the applied repos (the `applied` remote points there)."""


def _initial_content(applied: Path) -> dict[str, str]:
    """The first commit's files: a pre-git applied dir keeps its own, the rest are templates.

    agent.toml holds what every backend reads; agent.nix (the agent's NixOS module) and the
    module-only flake.nix are what the nixos backend builds from. All three are tracked from the
    start, so a `git+file` flake input sees them and the manager can propose changes to any.
    """
    files = {AGENT_TOML: DEFAULT_TOML, AGENT_NIX: DEFAULT_AGENT_NIX, FLAKE_NIX: AGENT_FLAKE_NIX}
    for name in files:
        with contextlib.suppress(FileNotFoundError):
            files[name] = (applied / name).read_text("utf-8")
    return files


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


class GitOps:
    def __init__(self, runner: Runner, state_dir: Path) -> None:
        self.runner = runner
        self.state_dir = state_dir

    def proposed(self, name: str) -> Path:
        return self.state_dir / "agents" / name / "config"

    def applied(self, name: str) -> Path:
        return self.state_dir / "applied" / name

    async def git(self, repo: Path, *args: str, check: bool = True) -> Completed:
        return await self.runner.run(
            [
                "git",
                *IDENTITY,
                "-c",
                f"init.defaultBranch={BRANCH}",
                "-c",
                "core.hooksPath=/dev/null",
                "-C",
                str(repo),
                *args,
            ],
            check=check,
        )

    async def out(self, repo: Path, *args: str) -> str:
        return (await self.git(repo, *args)).stdout.strip()

    async def resolve(self, repo: Path, ref: str) -> str | None:
        """The commit `ref` names in `repo`, or None."""
        done = await self.git(
            repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False
        )
        return done.stdout.strip() if done.returncode == 0 else None

    async def has_ref(self, repo: Path, ref: str) -> bool:
        done = await self.git(repo, "rev-parse", "--verify", "--quiet", ref, check=False)
        return done.returncode == 0

    async def is_repo(self, repo: Path) -> bool:
        return await trio.to_thread.run_sync((repo / ".git").exists)

    # ------------------------------------------------------------------ seeding

    async def seed(self, name: str) -> None:
        """Make both repos exist (idempotent; a pre-git applied dir is turned into a repo in place).

        The proposed repo's first commit is the agent's starting config (agent.toml, agent.nix,
        flake.nix); the applied repo fetches it as `main` and tags it `deployed/0`, so every
        proposal descends from it.
        """
        proposed, applied = self.proposed(name), self.applied(name)
        if not await self.is_repo(applied):
            if not await self.is_repo(proposed):
                await self._init_fresh(
                    proposed, await trio.to_thread.run_sync(_initial_content, applied)
                )
            await self._init_from(applied, proposed)
        if not await self.has_ref(applied, "refs/tags/deployed/0"):
            await self.git(applied, "tag", "deployed/0", BRANCH)
        if not await self.is_repo(proposed):
            await self._init_from(proposed, applied)
        remotes = (await self.out(proposed, "remote")).split()
        url = f"{CONTAINER_APPLIED}/{name}"
        if APPLIED_REMOTE in remotes:
            await self.git(proposed, "remote", "set-url", APPLIED_REMOTE, url)
        else:
            await self.git(proposed, "remote", "add", APPLIED_REMOTE, url)

    async def _init_fresh(self, repo: Path, files: dict[str, str]) -> None:
        for name, text in files.items():
            await trio.to_thread.run_sync(_write, repo / name, text)
        await self.git(repo, "init", "--quiet")
        await self.git(repo, "add", "--", *files)
        await self.git(repo, "commit", "--quiet", "-m", "initial config")

    async def _init_from(self, repo: Path, source: Path) -> None:
        await trio.to_thread.run_sync(lambda: repo.mkdir(parents=True, exist_ok=True))
        await self.git(repo, "init", "--quiet")
        await self.git(
            repo,
            "fetch",
            "--quiet",
            "--no-tags",
            "--update-head-ok",
            str(source),
            f"{BRANCH}:{BRANCH}",
        )
        await self.git(repo, "reset", "--quiet", "--hard", BRANCH)

    # ------------------------------------------------------------------ applied repo steps

    async def pin(self, name: str, sha: str) -> None:
        """Copy one commit's objects from the proposed repo into the applied repo."""
        upload = "git -c uploadpack.allowAnySHA1InWant=true upload-pack"
        await self.git(
            self.applied(name),
            "fetch",
            "--quiet",
            "--no-tags",
            f"--upload-pack={upload}",
            str(self.proposed(name)),
            sha,
        )

    async def tag(self, name: str, tag: str, target: str, message: str | None = None) -> None:
        args = ["tag", "-f"]
        if message is not None:
            # verbatim: a note is kept as written (git would drop `#` lines and blank edges).
            args += ["-a", "--cleanup=verbatim", "-m", message or "(no note)"]
        await self.git(self.applied(name), *args, tag, target)

    async def move_main(self, name: str, sha: str) -> None:
        """Point applied `main` at `sha` and make the working tree match it."""
        repo = self.applied(name)
        await self.git(repo, "update-ref", f"refs/heads/{BRANCH}", sha)
        await self.git(repo, "read-tree", "-u", "--reset", BRANCH)

    async def show(self, name: str, rev: str, path: str) -> str | None:
        done = await self.git(self.applied(name), "show", f"{rev}:{path}", check=False)
        return done.stdout if done.returncode == 0 else None

    async def diff(self, name: str, rev: str, cap: int) -> str:
        done = await self.git(self.applied(name), "diff", f"{BRANCH}..{rev}", check=False)
        text = done.stdout if done.returncode == 0 else f"(no diff: {done.stderr.strip()})"
        if not text:
            return "(proposal matches the deployed tree)"
        if len(text.encode()) > cap:
            return text.encode()[:cap].decode("utf-8", "ignore") + "\n… (diff truncated)\n"
        return text
