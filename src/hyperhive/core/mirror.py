"""The forge mirror: after every commit of the meta repo, the applied repos of the agents whose pin
moved, and the meta repo itself, are pushed to the hive's organisation on the forge — in the
background, one push at a time, best-effort.

    git push <forge>/<hive>/<agent>.git '+refs/heads/*:refs/heads/*' '+refs/tags/*:refs/tags/*'

(the applied repo's `main` and every proposal/ approved/ building/ deployed/ failed/ denied/ tag;
the meta repo goes to `<hive>/meta`). Requests coalesce: a repo waiting for its push is queued
once however often it is asked for, and one asked for while its push runs is queued once more
(for what that push may have missed). A push that fails is logged and goes again with the next
request — the next deploy — or after a delay when none comes (1 minute, doubling to 30); nothing
here ever fails or delays a deploy.

`core`'s token reaches git only in the push's environment (`GIT_CONFIG_COUNT`/`KEY`/`VALUE`: an
`http.<forge>/.extraHeader`, for the forge's URL alone), which only the daemon's uid can read:
never in a command line, a remote or a repository's config.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from hyperhive.core.forge import CORE_USER, Forge
from hyperhive.core.gitops import GitOps
from hyperhive.core.meta import Pin

log = logging.getLogger(__name__)

META_REPO = "meta"
"""The meta repo's name in the org (no agent can be called that: protocol/names.py)."""
REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
PUSH_TIMEOUT = 300.0
RETRY_INITIAL = 60.0
RETRY_MAX = 1800.0
"""A failed push goes again after RETRY_INITIAL seconds without a deploy, doubling to RETRY_MAX."""


def push_env(token: str, forge_url: str) -> dict[str, str]:
    """The daemon's environment plus what lets git push to the forge as `core`: a header for
    the forge's URL only, no credential helper (nothing is stored), no prompt, no redirects."""
    basic = base64.b64encode(f"{CORE_USER}:{token}".encode()).decode()
    settings = {
        f"http.{forge_url.rstrip('/')}/.extraHeader": f"Authorization: Basic {basic}",
        "credential.helper": "",
        "http.followRedirects": "false",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_CONFIG_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_CONFIG_COUNT"] = str(len(settings))
    for i, (key, value) in enumerate(settings.items()):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


class ForgeMirror:
    """Owns the push queue; `on_pins` is the meta repo's hook, `serve` the one pusher."""

    def __init__(
        self,
        forge: Forge,
        gitops: GitOps,
        *,
        remote: Callable[[str], str] | None = None,
        push_timeout: float = PUSH_TIMEOUT,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.forge = forge
        self.gitops = gitops
        self.remote = remote or self.forge_remote
        """Where repo `name` is pushed (tests point it at local bare repos)."""
        self.push_timeout = push_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._retry_in = retry_initial
        self.failed: set[str] = set()
        """Repos whose last push failed: queued again with the next request."""
        self._seen: dict[str, Pin] | None = None
        self._queued: dict[str, None] = {}
        self._pushing: str | None = None
        self._wake = trio.Event()
        self._settled = trio.lowlevel.ParkingLot()

    def forge_remote(self, repo: str) -> str:
        return f"{self.forge.url}/{self.forge.org.name}/{repo}.git"

    def path(self, repo: str) -> Path:
        if repo == META_REPO:
            return self.gitops.state_dir / "meta"
        return self.gitops.applied(repo)

    # ------------------------------------------------------------------ requests

    def on_pins(self, pins: Mapping[str, Pin]) -> None:
        """The meta repo committed (or, the first time, started): the meta repo and the agents
        whose pin moved (every agent the first time, to catch up) are queued."""
        if self._seen is None:
            moved = set(pins)
        else:
            moved = {n for n in pins.keys() | self._seen.keys() if pins.get(n) != self._seen.get(n)}
        self._seen = dict(pins)
        self.request(*sorted(moved), META_REPO)

    def request(self, *repos: str) -> None:
        """Queue these repos (and every one whose last push failed); never waits."""
        for repo in (*sorted(self.failed), *repos):
            self._queued[repo] = None
        self.failed.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until nothing is queued or being pushed (the caller owns the timeout)."""
        while self._queued or self._pushing is not None:
            await self._settled.park()

    async def wait_clean(self) -> None:
        """Until every repo asked for is pushed: nothing queued, being pushed or failed (failed
        ones go again by themselves; the caller owns the timeout)."""
        while self._queued or self._pushing is not None or self.failed:
            await self._settled.park()

    # ------------------------------------------------------------------ pushing

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._queued:
                self._settled.unpark_all()
                self._wake = trio.Event()
                if not self.failed:
                    await self._wake.wait()
                    continue
                # Failed pushes go again after a while even when no deploy asks for them.
                with trio.move_on_after(self._retry_in) as waited:
                    await self._wake.wait()
                if waited.cancelled_caught:
                    log.info("forge mirror: trying %s again", ", ".join(sorted(self.failed)))
                    self._retry_in = min(self._retry_in * 2, self.retry_max)
                    self.request()
                continue
            repo = next(iter(self._queued))
            del self._queued[repo]
            self._pushing = repo
            try:
                if await self._push(repo):
                    if not self.failed:
                        self._retry_in = self.retry_initial
                else:
                    self.failed.add(repo)
            finally:
                self._pushing = None

    async def _push(self, repo: str) -> bool:
        path = self.path(repo)
        if not await self.gitops.is_repo(path):
            return True  # purged: nothing left to mirror
        what = "the hive's deploy log" if repo == META_REPO else f"{repo}'s applied config"
        if not await self.forge.prepare_mirror(repo, f"Mirror of {what} (read-only)"):
            return False
        token = await self.forge.core_token()
        if token is None:
            return False
        try:
            with trio.fail_after(self.push_timeout):
                done = await self.gitops.git(
                    path,
                    "push",
                    "--porcelain",
                    "--prune",
                    self.remote(repo),
                    *REFSPECS,
                    check=False,
                    env=push_env(token, self.forge.url),
                )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("forge mirror: pushing %s: %r; again after the next deploy", repo, exc)
            return False
        if done.returncode != 0:
            log.warning(
                "forge mirror: pushing %s failed (%d): %s; again after the next deploy",
                repo,
                done.returncode,
                done.stderr.strip()[-400:],
            )
            self.forge.org.forget()  # the forge may have lost the org or the repo
            return False
        log.debug("forge mirror: pushed %s", repo)
        return True
