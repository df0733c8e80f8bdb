"""The agents' config repos: the proposed repo the manager commits to, the applied repo we deploy.

Every git command goes through the `Runner`, with the daemon's identity and default branch passed
on the command line: nothing depends on the host's global git config.

A proposed repo is the manager's: it may hold any config, hook, symlink or `.git` file. The daemon
never runs git *in* it (git reads a repo's own config, and some of it runs commands); it only
fetches *from* it, and git's upload-pack is made to serve untrusted repositories. That upload-pack
runs as the manager's uid, so whatever the repo points at, it reads no more than the manager can.
A new proposed repo is built in a private staging dir and moved into place relative to directory
descriptors, never through a path the manager could have swapped for a symlink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import trio

from hyperhive.core.containers import rootfs
from hyperhive.core.containers.nixgen import AGENT_FLAKE_NIX, DEFAULT_AGENT_NIX
from hyperhive.core.runner import Completed, Runner
from hyperhive.protocol.agent_config import AGENT_TOML, DEFAULT_TOML
from hyperhive.protocol.errors import BadParams, Conflict, NotFound

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


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PROPOSED_REFS = "refs/hive/proposed"
"""Where a proposed repo's branches land in the applied repo while a sha is looked up."""


def _place(staged: Path, proposed_dir: Path, name: str, uid: int | None) -> bool:
    """Move the staged repo to `proposed_dir/name/config`, through directory descriptors.
    False if a repo (or anything) is there already: the manager's, kept as it is. Blocking."""
    if uid is not None:
        rootfs.own_tree(staged, uid)
    top = os.open(proposed_dir, _DIR_FLAGS)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=top)
        try:
            agent = os.open(name, _DIR_FLAGS, dir_fd=top)
        except OSError as exc:
            raise Conflict(
                f"{proposed_dir / name} is not a directory (a symlink or file was planted there)"
            ) from exc
        try:
            if uid is not None:
                os.fchown(agent, uid, uid)
            try:
                os.stat("config", dir_fd=agent, follow_symlinks=False)
                return False
            except FileNotFoundError:
                pass
            os.rename(staged, "config", dst_dir_fd=agent)
            return True
        finally:
            os.close(agent)
    finally:
        os.close(top)


_REF = re.compile(
    r"(main|(proposal|approved|building|deployed|failed|denied)/[0-9]{1,12}|[0-9a-f]{7,40})"
)
"""What a config diff may name: the applied repo's main, one of its tags, or a sha (never an
option or a revision expression)."""


class GitOps:
    def __init__(self, runner: Runner, state_dir: Path, *, proposed_uid: int | None = None) -> None:
        self.runner = runner
        self.state_dir = state_dir
        self.proposed_uid = proposed_uid
        """The manager's uid: owner of the proposed repos, and who reads them for the daemon."""

    @property
    def proposed_dir(self) -> Path:
        return self.state_dir / "proposed"

    def proposed(self, name: str) -> Path:
        return self.proposed_dir / name / "config"

    def _upload_pack(self) -> str:
        """The upload-pack that serves a proposed repo: any commit may be asked for (a proposal
        names a sha), and it runs as the manager's uid when there is one. The daemon's state
        dir is root's alone, so root enters the repo and the manager's uid serves it from there
        (git appends the repo's path, which becomes $1)."""
        pack = "git -c uploadpack.allowAnySHA1InWant=true upload-pack"
        if self.proposed_uid is None:
            return pack
        uid = self.proposed_uid
        # HOME elsewhere: the daemon's (root's) git config is none of that uid's business.
        drop = (
            f"setpriv --reuid={uid} --regid={uid} --clear-groups"
            " env HOME=/nonexistent XDG_CONFIG_HOME=/nonexistent"
        )
        return f"sh -c 'cd -P -- \"$1\" && exec {drop} {pack} .' hive-upload-pack"

    def _check_proposed(self, name: str) -> None:
        """The proposed repo's path must be real directories, not symlinks the manager planted
        to make the daemon serve another repo of the host. Blocking."""
        for path in (self.proposed_dir / name, self.proposed(name)):
            if os.path.islink(path) or not os.path.isdir(path):
                raise Conflict(f"{path} is not a directory (a symlink or file was planted there)")

    def applied(self, name: str) -> Path:
        return self.state_dir / "applied" / name

    async def git(
        self, repo: Path, *args: str, check: bool = True, env: Mapping[str, str] | None = None
    ) -> Completed:
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
            env=env,
        )

    async def tag_history(self, name: str) -> list[tuple[str, str, float, str]]:
        """(tag, commit, unix time, annotation) of the agent's applied repo, oldest first (none
        for an agent without one: the manager)."""
        if not await trio.Path(self.applied(name) / ".git").exists():
            return []
        sep = "\x1f"
        text = await self.out(
            self.applied(name),
            "for-each-ref",
            "--sort=creatordate",
            f"--format=%(refname:short){sep}%(*objectname)%(objectname){sep}%(creatordate:unix)"
            f"{sep}%(objecttype){sep}%(contents)\x1e",
            "refs/tags",
        )
        found = []
        for record in text.split("\x1e"):
            parts = record.strip("\n").split(sep)
            if len(parts) == 5 and parts[0]:
                tag, sha, at, kind, note = parts
                # Only an annotated tag has a note of its own (a light one shows its commit's).
                found.append((tag, sha[:40], float(at or 0), note.strip() if kind == "tag" else ""))
        return found

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
        await trio.to_thread.run_sync(self._migrate, name)
        applied = self.applied(name)
        if not await self.is_repo(applied):
            # A new agent's config starts from the templates (or a pre-git applied dir's own
            # files), never from whatever the manager may have put at its proposed path
            # beforehand: committed where it lives, in the daemon-owned applied dir.
            files = await trio.to_thread.run_sync(_initial_content, applied)
            await self._init_fresh(applied, files)
            await self.git(applied, "tag", "deployed/0", BRANCH)
        elif not await self.has_ref(applied, "refs/tags/deployed/0"):
            await self.git(applied, "tag", "deployed/0", BRANCH)
        if not await trio.to_thread.run_sync(self._has_proposed, name):
            staged = await self._stage()
            try:
                await self._init_from(staged, applied)
                url = f"{CONTAINER_APPLIED}/{name}"
                await self.git(staged, "remote", "add", APPLIED_REMOTE, url)
                await trio.to_thread.run_sync(
                    _place, staged, self.proposed_dir, name, self.proposed_uid
                )
            finally:
                await trio.to_thread.run_sync(_rmtree, staged)

    def _has_proposed(self, name: str) -> bool:
        """Whether anything is at the proposed repo's path (the manager's from then on)."""
        self.proposed_dir.mkdir(mode=0o755, exist_ok=True)
        return os.path.lexists(self.proposed(name))

    def _migrate(self, name: str) -> None:
        """A hive from before the proposed/ layout kept the repo in the agent's state root."""
        old = self.state_dir / "agents" / name / "config"
        if (
            os.path.isdir(old)
            and not os.path.islink(old)
            and not os.path.lexists(self.proposed(name))
        ):
            self.proposed_dir.mkdir(mode=0o755, exist_ok=True)
            (self.proposed_dir / name).mkdir(mode=0o755, exist_ok=True)
            os.rename(old, self.proposed(name))
            if self.proposed_uid is not None:
                rootfs.own_tree(self.proposed_dir / name, self.proposed_uid)

    async def _stage(self) -> Path:
        staging = self.state_dir / "staging"
        path = staging / secrets.token_hex(8)

        def make() -> None:
            staging.mkdir(mode=0o700, exist_ok=True)
            path.mkdir(mode=0o755)

        await trio.to_thread.run_sync(make)
        return path

    async def resolve_proposed(self, name: str, ref: str) -> str | None:
        """The full sha of commit `ref` (7-40 hex digits) of the agent's proposed repo, looked
        up by fetching from it into the applied repo (never by running git inside it)."""
        applied = self.applied(name)
        if not await trio.to_thread.run_sync(os.path.lexists, self.proposed(name)):
            return None
        await trio.to_thread.run_sync(self._check_proposed, name)
        source = str(self.proposed(name))
        pack = f"--upload-pack={self._upload_pack()}"
        if len(ref) == 40:
            done = await self.git(
                applied, "fetch", "--quiet", "--no-tags", pack, source, ref, check=False
            )
        else:
            spec = f"+refs/heads/*:{PROPOSED_REFS}/*"
            done = await self.git(
                applied, "fetch", "--quiet", "--no-tags", pack, source, spec, check=False
            )
        if done.returncode != 0:
            log.warning("%s: fetching %s from the proposed repo: %s", name, ref, done.stderr[-500:])
            return None
        sha = await self.resolve(applied, ref)
        if sha is not None and len(ref) < 40:
            # Only a commit that is on one of the proposed repo's branches counts.
            on_branch = await self.git(
                applied,
                "for-each-ref",
                "--contains",
                sha,
                "--format=%(refname)",
                PROPOSED_REFS,
                check=False,
            )
            if not on_branch.stdout.strip():
                sha = None
        return sha

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
        await trio.to_thread.run_sync(self._check_proposed, name)
        await self.git(
            self.applied(name),
            "fetch",
            "--quiet",
            "--no-tags",
            f"--upload-pack={self._upload_pack()}",
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

    async def diff_between(self, name: str, old: str, new: str, cap: int) -> str:
        """`git diff old..new` of the agent's applied repo (refs must be its tags or shas)."""
        for ref in (old, new):
            if not _REF.fullmatch(ref):
                raise BadParams(f"{ref[:60]!r} is not a tag or commit of the applied repo")
        done = await self.git(self.applied(name), "diff", f"{old}..{new}", "--", check=False)
        if done.returncode != 0:
            raise NotFound(f"no diff between {old} and {new}: {done.stderr.strip()[:300]}")
        text = done.stdout or "(no change)"
        if len(text.encode()) > cap:
            return text.encode()[:cap].decode("utf-8", "ignore") + "\n… (diff truncated)\n"
        return text

    async def diff(self, name: str, rev: str, cap: int) -> str:
        done = await self.git(self.applied(name), "diff", f"{BRANCH}..{rev}", check=False)
        text = done.stdout if done.returncode == 0 else f"(no diff: {done.stderr.strip()})"
        if not text:
            return "(proposal matches the deployed tree)"
        if len(text.encode()) > cap:
            return text.encode()[:cap].decode("utf-8", "ignore") + "\n… (diff truncated)\n"
        return text
