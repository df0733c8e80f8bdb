"""The meta repo (`<state>/meta`): the hive's deploy history, one commit per successful deploy.

It is a flake with one input per agent (`agent-<name>`, the agent's applied repo) and one
`nixosConfigurations.<name>` per agent; `agents.lock.json` pins the commit each agent runs, and
the git log is the deploy log:

    spawn alice deployed/0 1a2b3c4d5e6f
    deploy alice deployed/7 9f8e7d6c5b4a
    destroy alice

A deploy is two-phase: `prepare` stages the new pin in the working tree (and the nixos backend's
`nix flake lock` stages `flake.lock` beside it), `finalize` commits exactly those lock files,
`abort` restores them from HEAD. Nothing else in the tree is touched by either, so an agent
created meanwhile (which rewrites `flake.nix`) is never swept into a deploy commit or undone by a
rollback. On the nixos backend the backend writes `flake.nix`/`agents.json` itself; on the others
this module renders the same flake so the record reads the same everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from hyperhive.core.containers.nixgen import MetaAgent, meta_flake_nix
from hyperhive.core.gitops import GitOps

LOCK_FILE = "agents.lock.json"
AGENTS_FILE = "agents.json"
FLAKE_LOCK = "flake.lock"
LOCK_FILES = (LOCK_FILE, FLAKE_LOCK)


class Pin(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The applied commit an agent runs and the tag that deployed it."""

    rev: str
    tag: str


Lock = dict[str, Pin]

_lock_decoder = msgspec.json.Decoder(Lock)


def _read_lock(path: Path) -> Lock:
    try:
        return _lock_decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return {}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


def _lock_text(lock: Lock) -> str:
    ordered = {name: lock[name] for name in sorted(lock)}
    return msgspec.json.format(msgspec.json.encode(ordered), indent=2).decode() + "\n"


FlakeRenderer = Callable[[list[MetaAgent]], str]


class MetaRepo:
    def __init__(
        self,
        gitops: GitOps,
        state_dir: Path,
        render: FlakeRenderer | None,
        on_pins: Callable[[Lock], None] | None = None,
    ) -> None:
        """`render` writes flake.nix from agents.json; None when the backend owns those files.
        `on_pins` hears the committed pins at start-up and after every commit."""
        self.gitops = gitops
        self.dir = state_dir / "meta"
        self.render = render
        self.on_pins = on_pins
        self._lock = trio.Lock()

    # ------------------------------------------------------------------ reading

    async def pins(self, committed: bool = True) -> Lock:
        """Every agent's pin: as committed (HEAD), or as staged in the working tree."""
        if not committed:
            return await trio.to_thread.run_sync(_read_lock, self.dir / LOCK_FILE)
        if not await self.gitops.is_repo(self.dir):
            return {}
        done = await self.gitops.git(self.dir, "show", f"HEAD:{LOCK_FILE}", check=False)
        return _lock_decoder.decode(done.stdout) if done.returncode == 0 else {}

    async def head(self) -> str | None:
        """The meta repo's HEAD commit (None before it exists)."""
        if not await self.gitops.is_repo(self.dir):
            return None
        return await self.gitops.resolve(self.dir, "HEAD")

    async def flake_lock(self, rev: str | None = None) -> bytes:
        """flake.lock as in the working tree, or as committed at `rev` (b"" when absent)."""
        if rev is None:
            path = self.dir / FLAKE_LOCK
            return await trio.to_thread.run_sync(
                lambda: path.read_bytes() if path.exists() else b""
            )
        done = await self.gitops.git(self.dir, "show", f"{rev}:{FLAKE_LOCK}", check=False)
        return done.stdout.encode() if done.returncode == 0 else b""

    async def restore_lock(self, rev: str, message: str) -> None:
        """flake.lock back to what it was at `rev`, committed with `message` (no-op if same)."""
        async with self._lock:
            if await self.gitops.has_ref(self.dir, f"{rev}:{FLAKE_LOCK}"):
                await self.gitops.git(self.dir, "checkout", rev, "--", FLAKE_LOCK)
            await self._commit_locked(message, (FLAKE_LOCK,))

    async def log(self, limit: int = 50) -> list[str]:
        """Commit subjects, newest first."""
        if not await self.gitops.is_repo(self.dir):
            return []
        out = await self.gitops.out(self.dir, "log", f"-{limit}", "--format=%s")
        return out.splitlines()

    # ------------------------------------------------------------------ writing

    async def ensure(self) -> None:
        """Create the repo with an empty lock (idempotent)."""
        async with self._lock:
            await self._ensure_locked()
        await self._announce()

    async def _announce(self) -> None:
        if self.on_pins is not None:
            self.on_pins(await self.pins())

    async def _ensure_locked(self) -> None:
        if await self.gitops.is_repo(self.dir):
            return
        await trio.to_thread.run_sync(lambda: self.dir.mkdir(parents=True, exist_ok=True))
        await self.gitops.git(self.dir, "init", "--quiet")
        if not (self.dir / LOCK_FILE).exists():
            await trio.to_thread.run_sync(_write_atomic, self.dir / LOCK_FILE, _lock_text({}))
        await self._render_locked(None, None)
        await self.gitops.git(self.dir, "add", "-A")
        await self.gitops.git(self.dir, "commit", "--quiet", "--allow-empty", "-m", "meta: init")

    async def prepare(self, name: str, rev: str, tag: str) -> None:
        """Stage `name` pinned at `rev` in the working tree (not committed)."""
        async with self._lock:
            await self._ensure_locked()
            await self._stage(name, Pin(rev=rev, tag=tag))

    async def _stage(self, name: str, pin: Pin | None) -> None:
        def update() -> None:
            path = self.dir / LOCK_FILE
            lock = _read_lock(path)
            if pin is None:
                lock.pop(name, None)
            else:
                lock[name] = pin
            _write_atomic(path, _lock_text(lock))

        await trio.to_thread.run_sync(update)

    async def finalize(self, message: str, also: tuple[str, ...] = ()) -> None:
        """Commit the staged lock files (only those, and `also`) with `message`; no-op when
        unchanged."""
        async with self._lock:
            await self._commit_locked(message, LOCK_FILES + also)

    async def abort(self) -> None:
        """Throw away staged lock changes: the lock files go back to HEAD."""
        async with self._lock:
            if not await self.gitops.is_repo(self.dir):
                return
            tracked = await self._tracked(LOCK_FILES)
            if tracked:
                await self.gitops.git(self.dir, "checkout", "HEAD", "--", *tracked)
            if not (await self.gitops.has_ref(self.dir, f"HEAD:{FLAKE_LOCK}")):
                # A flake.lock created by the failed deploy itself has nothing to go back to.
                await trio.to_thread.run_sync(
                    lambda: (self.dir / FLAKE_LOCK).unlink(missing_ok=True)
                )

    async def record(
        self, message: str, name: str, pin: Pin | None, agent: MetaAgent | None = None
    ) -> None:
        """One-step change and commit: an agent joining (with its pin) or leaving (pin None)."""
        async with self._lock:
            await self._ensure_locked()
            await self._stage(name, pin)
            await self._render_locked(agent if pin is not None else None, name)
            await self._commit_locked(message, None)

    async def _render_locked(self, upsert: MetaAgent | None, name: str | None) -> None:
        if self.render is None:
            return
        render = self.render

        def write() -> None:
            path = self.dir / AGENTS_FILE
            try:
                agents = {
                    a.name: a for a in msgspec.json.decode(path.read_bytes(), type=list[MetaAgent])
                }
            except FileNotFoundError:
                agents = {}
            if upsert is not None:
                agents[upsert.name] = upsert
            elif name is not None:
                agents.pop(name, None)
            ordered = sorted(agents.values(), key=lambda a: a.name)
            _write_atomic(
                path, msgspec.json.format(msgspec.json.encode(ordered), indent=2).decode() + "\n"
            )
            _write_atomic(self.dir / "flake.nix", render(ordered))

        await trio.to_thread.run_sync(write)

    async def _tracked(self, paths: tuple[str, ...]) -> list[str]:
        out = await self.gitops.out(self.dir, "ls-files", "--", *paths)
        return out.splitlines()

    async def _commit_locked(self, message: str, paths: tuple[str, ...] | None) -> None:
        if paths is None:
            await self.gitops.git(self.dir, "add", "-A")
            args: list[str] = []
        else:
            present = [p for p in paths if (self.dir / p).exists()]
            if present:
                await self.gitops.git(self.dir, "add", "--", *present)
            args = ["--", *(await self._tracked(paths))]
        staged = await self.gitops.git(
            self.dir, "diff", "--cached", "--quiet", "HEAD", *args, check=False
        )
        if staged.returncode == 0:
            return
        await self.gitops.git(self.dir, "commit", "--quiet", "-m", message, *args)
        await self._announce()


def deploy_message(name: str, tag: str, sha: str) -> str:
    return f"deploy {name} {tag} {sha[:12]}"


def spawn_message(name: str, tag: str, sha: str) -> str:
    return f"spawn {name} {tag} {sha[:12]}"


def flake_renderer(
    *,
    hyperhive_flake: str,
    system: str,
    dashboard_port: int,
    operator_pronouns: str,
    forge: tuple[str, str] | None = None,
) -> FlakeRenderer:
    def render(agents: list[MetaAgent]) -> str:
        return meta_flake_nix(
            agents,
            hyperhive_flake=hyperhive_flake,
            system=system,
            dashboard_port=dashboard_port,
            operator_pronouns=operator_pronouns,
            forge=forge,
        )

    return render
