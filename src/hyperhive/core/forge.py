"""hive-forge provisioning: a Forgejo user and token per agent, the hive's organisation that
they read, and recognising a broken forge.

The forge is a NixOS container (`services.hive-forge`, nix/modules/hive-forge.nix) running
Forgejo. Every command runs inside it as the `forgejo` user, with the work path given explicitly
(Forgejo otherwise derives it from its binary's directory, the read-only store):

    nixos-container run hive-forge -- runuser -u forgejo -- \
        forgejo --work-path /var/lib/forgejo admin user create …

Provisioning is idempotent and best-effort: an existing user is kept, a token file that exists
is never replaced, and any failure is logged as a warning (the hive runs without a forge).
Agents' tokens land in `<agent>/state/forge-token` (the agent's `/state/forge-token`), the
daemon's own site-admin `core` token in `<state>/forge-core-token`; all files are 0600. With
`core`'s token the hive's organisation (core/forge_org.py) is made, every agent joins its
read-only team, and the config mirrors (core/mirror.py) get their repos.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from hyperhive.core.forge_org import ForgeApi, HiveOrg
from hyperhive.core.runner import Runner
from hyperhive.core.tokens import write_private
from hyperhive.protocol import wire
from hyperhive.protocol.errors import HiveError

log = logging.getLogger(__name__)

FORGE_CONTAINER = "hive-forge"
WORK_PATH = "/var/lib/forgejo"
CORE_USER = "core"
TOKEN_FILE = "forge-token"
CORE_TOKEN_FILE = "forge-core-token"
EMAIL_DOMAIN = "hyperhive.local"
DEFAULT_URL = "http://localhost:3000"

AGENT_SCOPES = (
    "read:user,write:user,write:repository,write:issue,write:organization,write:misc,"
    "read:notification,write:notification"
)
CORE_SCOPES = AGENT_SCOPES + ",read:admin,write:admin"

LOG_LINES = 200

# Forgejo (models/migrations, and the Forgejo-specific migrations) and Gitea before it log this,
# fatally, when the state dir was migrated by a newer release than the binary.
_NEWER_DB = re.compile(
    r"database \(migration version: (?P<db>\d+)\) is for a newer (?:version of )?"
    r"(?:Forgejo|Gitea), you can ?not use the newer database for this old (?:Forgejo|Gitea)"
    r" release \((?P<binary>\d+)\)"
)

NEWER_DB_FIX = (
    "the forge's database was migrated by a newer Forgejo than the one now configured"
    " (e.g. services.hive-forge.package set to pkgs.forgejo-lts after running pkgs.forgejo)."
    " Forgejo refuses to start rather than touch it. Fix: set services.hive-forge.package back to"
    " the newer release line (the default, pkgs.forgejo) and rebuild; going down to LTS needs a"
    " restore from a backup taken before the upgrade."
)


def diagnose_log(lines: Iterable[str]) -> wire.ForgeStatus | None:
    """A known fatal problem in the forge's log, with its fix; None when nothing is recognised."""
    for line in lines:
        found = _NEWER_DB.search(line)
        if found:
            return wire.ForgeStatus(
                state="failed",
                problem=(
                    f"database newer than binary: the database is at migration {found['db']},"
                    f" this Forgejo knows up to {found['binary']}; refusing to start"
                ),
                fix=NEWER_DB_FIX,
            )
    return None


def _write_secret(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, token + "\n")


def _read_token(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def _has_token(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


class Forge:
    """Provisioning and health of the hive-forge container; everything a no-op without one."""

    def __init__(
        self,
        runner: Runner,
        state_dir: Path,
        agent_root: Callable[[str], Path],
        *,
        container: str = FORGE_CONTAINER,
        url: str = DEFAULT_URL,
        hive: str = "hive",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        self.state_dir = state_dir
        self.agent_root = agent_root
        self.container = container
        self.url = url.rstrip("/")
        self.clock = clock
        self.org = HiveOrg(ForgeApi(runner, container, self.url, self.core_token), hive)
        self._lock = trio.Lock()
        self.last: wire.ForgeStatus | None = None
        """The latest `status()` (what host `list` reports), None before the first check."""

    def forgejo(self, *args: str) -> list[str]:
        """The argv running `forgejo <args>` inside the forge container as its service user."""
        return [
            "nixos-container",
            "run",
            self.container,
            "--",
            "runuser",
            "-u",
            "forgejo",
            "--",
            "forgejo",
            "--work-path",
            WORK_PATH,
            *args,
        ]

    def token_path(self, name: str) -> Path:
        if name == CORE_USER:
            return self.state_dir / CORE_TOKEN_FILE
        return self.agent_root(name) / "state" / TOKEN_FILE

    async def core_token(self) -> str | None:
        return await trio.to_thread.run_sync(_read_token, self.token_path(CORE_USER))

    async def present(self) -> bool:
        try:
            done = await self.runner.run(["nixos-container", "list"], check=False)
        except OSError as exc:  # no nixos-container on this host at all
            log.debug("forge: %s", exc)
            return False
        return done.returncode == 0 and self.container in done.stdout.split()

    async def serve(
        self,
        names: Callable[[], Iterable[str]],
        *,
        interval: float = 30.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep `last` current (checked before `started`), and provision everyone once."""
        await self._check()
        task_status.started()
        await self.ensure_all(names())
        while True:
            await trio.sleep(interval)
            await self._check()

    async def _check(self) -> None:
        self.last = await self.status()
        if self.last.state == "failed":
            log.warning("forge: %s; %s", self.last.problem, self.last.fix)

    async def ensure_all(self, names: Iterable[str]) -> None:
        """`core` and every agent; a no-op (and silent) when there is no forge container."""
        if not await self.present():
            return
        for name in [CORE_USER, *names]:
            await self.ensure(name)

    async def ensure_user_for(self, name: str) -> None:
        """After a spawn: the agent's user and token (no-op without a forge)."""
        if await self.present():
            await self.ensure(name)

    async def ensure(self, name: str) -> bool:
        """One user and its token, and (with `core`'s) the hive's org with that user in its
        read-only team; True when the user and token exist afterwards. Failures only warn."""
        async with self._lock:
            try:
                await self._ensure_user(name)
                await self._ensure_token(name)
            except HiveError as exc:
                log.warning("forge: could not provision %s: %s", name, exc.message)
                return False
            try:
                if name == CORE_USER:
                    await self.org.ensure()
                else:
                    await self.org.join(name)
            except HiveError as exc:
                log.warning("forge: %s: %s", self.org.name, exc.message)
        return True

    async def prepare_mirror(self, repo: str, description: str) -> bool:
        """The org's repo `repo` exists for a push (`core` and the org made first, if need be);
        False (with a warning) when it cannot be had now."""
        async with self._lock:
            if not await self.present():
                log.warning("forge: no %s container: %s is not mirrored", self.container, repo)
                return False
            try:
                if not self.org.ready:  # `core` first: its token is what the API calls take
                    await self._ensure_user(CORE_USER)
                    await self._ensure_token(CORE_USER)
                await self.org.ensure_repo(repo, description)
            except HiveError as exc:
                log.warning("forge: %s: %s", self.org.name, exc.message)
                return False
        return True

    async def _ensure_user(self, name: str) -> None:
        args = [
            "admin",
            "user",
            "create",
            "--username",
            name,
            "--email",
            f"{name}@{EMAIL_DOMAIN}",
            "--random-password",
            "--must-change-password=false",
        ]
        if name == CORE_USER:
            args.append("--admin")
        done = await self.runner.run(self.forgejo(*args), check=False)
        if done.returncode != 0 and "already exists" not in done.stdout + done.stderr:
            raise HiveError(f"user create failed ({done.returncode}): {done.stderr.strip()[-400:]}")

    async def _ensure_token(self, name: str) -> None:
        path = self.token_path(name)
        if await trio.to_thread.run_sync(_has_token, path):
            return  # kept: a token in use is never rotated behind an agent's back
        done = await self.runner.run(
            self.forgejo(
                "admin",
                "user",
                "generate-access-token",
                "--username",
                name,
                "--token-name",
                f"hive-{int(self.clock())}",
                "--scopes",
                CORE_SCOPES if name == CORE_USER else AGENT_SCOPES,
                "--raw",
            ),
            check=False,
        )
        token = done.stdout.strip()
        if done.returncode != 0 or not re.fullmatch(r"[0-9a-f]{20,128}", token):
            raise HiveError(
                f"generate-access-token failed ({done.returncode}): {done.stderr.strip()[-400:]}"
            )
        await trio.to_thread.run_sync(_write_secret, path, token)

    async def status(self) -> wire.ForgeStatus:
        """`absent`, `running`, or `failed` with the recognised problem and its fix."""
        if not await self.present():
            return wire.ForgeStatus(state="absent")
        active = await self.runner.run(
            ["systemctl", "-M", self.container, "is-active", "forgejo.service"], check=False
        )
        if active.stdout.strip() == "active":
            return wire.ForgeStatus(state="running")
        journal = await self.runner.run(
            [
                "journalctl",
                "-M",
                self.container,
                "-u",
                "forgejo.service",
                "--no-pager",
                "-o",
                "cat",
                f"--lines={LOG_LINES}",
            ],
            check=False,
        )
        known = diagnose_log(reversed(journal.stdout.splitlines()))
        if known is not None:
            return known
        return wire.ForgeStatus(
            state="failed",
            problem=f"forgejo.service is {active.stdout.strip() or 'not running'}",
            fix=f"see `journalctl -M {self.container} -u forgejo.service`",
        )
