"""The hive's organisation on the forge: one private Forgejo org per hive that holds the config
mirrors, and its read-only team `agents` that every agent's user joins.

`forgejo admin` creates users and tokens but no organisations, teams or repositories, so these go
through Forgejo's REST API as the site admin `core`, with curl inside the forge container:

    nixos-container run hive-forge -- curl --silent --show-error --max-time 30 --header @- \\
        --header 'Accept: application/json' --request POST \\
        --header 'Content-Type: application/json' --data-raw '{"username":"myhost",…}' \\
        --write-out '\\n%{http_code}' http://localhost:3000/api/v1/orgs

`core`'s token goes in on curl's standard input (`--header @-`), never on a command line that
every user of the host can read. Everything is idempotent: "already exists" (409, 422) counts as
success, except that an org name Forgejo refuses because a *user* holds it is reported as such.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from hyperhive.core.runner import Runner
from hyperhive.protocol.errors import HiveError

log = logging.getLogger(__name__)

T = TypeVar("T")

TEAM = "agents"
TEAM_UNITS = ("repo.code", "repo.issues", "repo.pulls", "repo.releases", "repo.wiki")
"""What the team may read of every org repo (`read`: nobody in it can push)."""
API_TIMEOUT = 30

MAX_ORG_NAME = 40
_ORG_NAME = re.compile(r"[A-Za-z0-9]+(?:[-._][A-Za-z0-9]+)*")
_RESERVED = frozenset(
    {
        # Forgejo's reserved user and org names (models/user), and the hive's own admin user.
        "admin",
        "api",
        "assets",
        "attachments",
        "avatar",
        "avatars",
        "captcha",
        "commit",
        "core",
        "debug",
        "devtest",
        "error",
        "explore",
        "favicon.ico",
        "forgejo-actions",
        "ghost",
        "gitea-actions",
        "issues",
        "login",
        "manifest.json",
        "metrics",
        "milestones",
        "new",
        "notifications",
        "org",
        "pulls",
        "raw",
        "repo",
        "repo-avatars",
        "robots.txt",
        "search",
        "serviceworker.js",
        "ssh_info",
        "swagger.v1.json",
        "user",
        "v2",
    }
)
_RESERVED_SUFFIXES = (".keys", ".gpg", ".rss", ".atom", ".png")


def check_hive_name(name: str) -> str:
    """`name` if Forgejo takes it as an organisation's name, else ValueError saying why."""
    if len(name) > MAX_ORG_NAME or not _ORG_NAME.fullmatch(name):
        raise ValueError(
            f"hive name {name[:60]!r} is not a Forgejo organisation name: 1-{MAX_ORG_NAME}"
            " letters and digits, single '-', '_' or '.' between them"
        )
    if name.lower() in _RESERVED or name.lower().endswith(_RESERVED_SUFFIXES):
        raise ValueError(f"hive name {name!r} is reserved by Forgejo or the hive")
    return name


class _Message(msgspec.Struct):
    message: str = ""


class _Team(msgspec.Struct):
    id: int
    name: str


@dataclass(frozen=True)
class ApiReply:
    status: int
    body: str

    @property
    def message(self) -> str:
        """Forgejo's error message (or the start of the body)."""
        try:
            said = msgspec.json.decode(self.body, type=_Message).message
        except msgspec.DecodeError:
            said = ""
        return (said or self.body.strip())[:300]


def _decode(reply: ApiReply, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(reply.body, type=kind)
    except msgspec.DecodeError as exc:
        raise HiveError(
            f"the forge answered {reply.status} with {reply.body[:200]!r}: {exc}"
        ) from None


class ForgeApi:
    """Forgejo's REST API, as `core`, by curl inside the forge container."""

    def __init__(
        self,
        runner: Runner,
        container: str,
        url: str,
        token: Callable[[], Awaitable[str | None]],
    ) -> None:
        self.runner = runner
        self.container = container
        self.url = url.rstrip("/")
        self.token = token

    def argv(self, method: str, path: str, payload: str | None) -> list[str]:
        body = [] if payload is None else ["--header", "Content-Type: application/json"]
        body += [] if payload is None else ["--data-raw", payload]
        return [
            "nixos-container",
            "run",
            self.container,
            "--",
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            str(API_TIMEOUT),
            "--header",
            "@-",
            "--header",
            "Accept: application/json",
            "--request",
            method,
            *body,
            "--write-out",
            "\\n%{http_code}",
            f"{self.url}/api/v1{path}",
        ]

    async def call(self, method: str, path: str, body: object = None) -> ApiReply:
        token = await self.token()
        if token is None:
            raise HiveError("the forge has no token for core yet")
        payload = None if body is None else msgspec.json.encode(body).decode()
        done = await self.runner.run(
            self.argv(method, path, payload),
            stdin=f"Authorization: token {token}\n".encode(),
            check=False,
        )
        text, _, code = done.stdout.rpartition("\n")
        if done.returncode != 0 or not code.strip().isdigit():
            raise HiveError(
                f"{method} {path}: curl failed ({done.returncode}): {done.stderr.strip()[-300:]}"
            )
        return ApiReply(int(code), text)


class HiveOrg:
    """The hive's org, its team and its repos on the forge; what exists is remembered for the
    daemon's run (`forget` after a push failed, in case the forge lost them)."""

    def __init__(self, api: ForgeApi, name: str) -> None:
        self.api = api
        self.name = check_hive_name(name)
        self._team: int | None = None
        self._repos: set[str] = set()

    @property
    def ready(self) -> bool:
        """The org and its team are known to exist."""
        return self._team is not None

    def forget(self) -> None:
        self._team = None
        self._repos.clear()

    async def ensure(self) -> int:
        """The org (private) and its read-only team; returns the team's id."""
        if self._team is None:
            await self._ensure_org()
            self._team = await self._ensure_team()
        return self._team

    async def _ensure_org(self) -> None:
        reply = await self.api.call(
            "POST",
            "/orgs",
            {
                "username": self.name,
                "full_name": f"hive {self.name}",
                "description": "The hive's config mirrors (read-only): each agent's applied"
                " config repo and the meta repo, pushed by hive-c0re after every deploy.",
                "visibility": "private",
                "repo_admin_change_team_access": False,
            },
        )
        if reply.status == 201:
            log.info("forge: created the organisation %s", self.name)
            return
        if reply.status in (409, 422):
            # 422 is also Forgejo's answer when a *user* has the name: only an org will do.
            if (await self.api.call("GET", f"/orgs/{self.name}")).status == 200:
                return
            raise HiveError(
                f"the organisation {self.name!r} cannot be created ({reply.message}); is it a"
                " user's name? Choose another hive name (services.hive-c0re.hiveName)"
            )
        raise HiveError(f"creating the organisation {self.name!r}: {reply.status} {reply.message}")

    async def _ensure_team(self) -> int:
        reply = await self.api.call(
            "POST",
            f"/orgs/{self.name}/teams",
            {
                "name": TEAM,
                "description": "Every agent of the hive: reads the config mirrors, pushes nothing",
                "permission": "read",
                "includes_all_repositories": True,
                "can_create_org_repo": False,
                "units": list(TEAM_UNITS),
                "units_map": dict.fromkeys(TEAM_UNITS, "read"),
            },
        )
        if reply.status == 201:
            return _decode(reply, _Team).id
        if reply.status not in (409, 422):
            raise HiveError(f"creating the team {TEAM!r}: {reply.status} {reply.message}")
        listed = await self.api.call("GET", f"/orgs/{self.name}/teams?limit=50")
        if listed.status == 200:
            for team in _decode(listed, list[_Team]):
                if team.name == TEAM:
                    return team.id
        raise HiveError(f"the team {TEAM!r} of {self.name!r} exists but was not found")

    async def join(self, user: str) -> None:
        """`user` (an agent, or the manager) reads every repo of the org."""
        team = await self.ensure()
        reply = await self.api.call("PUT", f"/teams/{team}/members/{user}")
        if reply.status not in (200, 204):
            raise HiveError(f"adding {user} to {TEAM!r}: {reply.status} {reply.message}")

    async def ensure_repo(self, repo: str, description: str) -> None:
        """A private, empty repo of the org named `repo`."""
        if repo in self._repos:
            return
        await self.ensure()
        reply = await self.api.call(
            "POST",
            f"/orgs/{self.name}/repos",
            {
                "name": repo,
                "description": description,
                "private": True,
                "auto_init": False,
                "default_branch": "main",
            },
        )
        if reply.status not in (201, 409, 422):
            raise HiveError(f"creating {self.name}/{repo}: {reply.status} {reply.message}")
        self._repos.add(repo)
