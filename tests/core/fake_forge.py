"""A NixOS host with a hive-forge, as the daemon's Runner sees it: `nixos-container list|run`,
`systemctl -M`, `journalctl -M`; inside the container `forgejo admin` (users and tokens) and
curl against Forgejo's REST API (orgs, teams, members, repos), answered the way Forgejo answers.
Every other command (git) really runs, so mirror pushes reach the bare repos that a repo's
creation makes under `bare_root`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hyperhive.core.runner import Completed, Runner

PREFIX = (
    "nixos-container",
    "run",
    "hive-forge",
    "--",
    "runuser",
    "-u",
    "forgejo",
    "--",
    "forgejo",
    "--work-path",
    "/var/lib/forgejo",
)
CURL = ("nixos-container", "run", "hive-forge", "--", "curl")
API = "http://localhost:3000/api/v1"

_execute = Runner().executor


@dataclass
class Call:
    argv: tuple[str, ...]
    stdin: bytes | None
    env: Mapping[str, str] | None


@dataclass
class FakeForgeHost:
    present: bool = True
    users: dict[str, bool] = field(default_factory=dict)
    """Forgejo users and whether each is a site admin."""
    tokens: list[tuple[str, str, str]] = field(default_factory=list)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    """Every command's argv, in order."""
    log: list[Call] = field(default_factory=list)
    """Every command with its standard input and environment."""
    fail_tokens_for: set[str] = field(default_factory=set)
    active: str = "active"
    journal: list[str] = field(default_factory=list)
    api_down: bool = False
    """curl cannot connect (Forgejo not up)."""
    orgs: dict[str, dict[str, object]] = field(default_factory=dict)
    teams: dict[int, dict[str, object]] = field(default_factory=dict)
    """Team id → its creation body plus `org`."""
    members: dict[int, set[str]] = field(default_factory=dict)
    repos: dict[str, dict[str, object]] = field(default_factory=dict)
    """`org/name` → its creation body."""
    bare_root: Path | None = None
    """Where a created repo becomes a bare git repo, `<org>/<name>.git` (None: none)."""
    pushed: list[str] = field(default_factory=list)
    """The repo (directory name) of every `git push`, in order."""
    push_gate: trio.Event | None = None
    """While set to an unset event, every `git push` waits for it (`at_gate` is set then)."""
    at_gate: trio.Event = field(default_factory=trio.Event)

    async def __call__(
        self,
        argv: Sequence[str],
        stdin: bytes | None,
        cwd: Path | None,
        env: Mapping[str, str] | None,
    ) -> Completed:
        argv = tuple(argv)
        self.calls.append(argv)
        self.log.append(Call(argv, stdin, env))
        if argv == ("nixos-container", "list"):
            return Completed(argv, 0, "hm1nd\nh-alice\nhive-forge\n" if self.present else "", "")
        if argv[:3] == ("systemctl", "-M", "hive-forge"):
            return Completed(argv, 0 if self.active == "active" else 3, self.active + "\n", "")
        if argv[:3] == ("journalctl", "-M", "hive-forge"):
            return Completed(argv, 0, "".join(line + "\n" for line in self.journal), "")
        if argv[: len(CURL)] == CURL:
            return await self.curl(argv, list(argv[len(CURL) :]), stdin)
        if argv[:1] == ("nixos-container",):
            assert argv[: len(PREFIX)] == PREFIX, argv
            return self.forgejo(argv, list(argv[len(PREFIX) :]))
        if argv[0] == "git" and "push" in argv:
            self.pushed.append(Path(argv[argv.index("-C") + 1]).name)
            if self.push_gate is not None:
                self.at_gate.set()
                await self.push_gate.wait()
        return await _execute(argv, stdin, cwd, env)

    # ------------------------------------------------------------------ forgejo admin

    def forgejo(self, argv: tuple[str, ...], args: list[str]) -> Completed:
        def opt(name: str) -> str:
            return args[args.index(name) + 1]

        if args[:3] == ["admin", "user", "create"]:
            name = opt("--username")
            if name in self.users or name in self.orgs:  # an org is a user to Forgejo
                return Completed(
                    argv, 1, "", f"Command error: user already exists [name: {name}]\n"
                )
            self.users[name] = "--admin" in args
            return Completed(argv, 0, f"New user '{name}' has been successfully created!\n", "")
        if args[:3] == ["admin", "user", "generate-access-token"]:
            name = opt("--username")
            if name not in self.users or name in self.fail_tokens_for:
                return Completed(argv, 1, "", "Command error: user does not exist\n")
            token = f"{len(self.tokens):040x}"
            self.tokens.append((name, opt("--scopes"), token))
            return Completed(argv, 0, token + "\n", "")
        raise AssertionError(f"unexpected forgejo command {args}")

    # ------------------------------------------------------------------ the REST API

    def token_of(self, name: str) -> str | None:
        return next((t for n, _, t in reversed(self.tokens) if n == name), None)

    async def curl(self, argv: tuple[str, ...], args: list[str], stdin: bytes | None) -> Completed:
        def opt(name: str) -> str | None:
            return args[args.index(name) + 1] if name in args else None

        assert "/api/v1/" in args[-1], args
        assert opt("--write-out") == "\\n%{http_code}"
        if self.api_down:
            return Completed(argv, 7, "", "curl: (7) Failed to connect to localhost port 3000\n")
        # The token comes on stdin, as a header (`--header @-`), and only there.
        headers = (stdin or b"").decode().splitlines()
        assert args[args.index("@-") - 1 : args.index("@-") + 1] == ["--header", "@-"]
        core = self.token_of("core")
        if core is None or headers != [f"Authorization: token {core}"] or not self.users["core"]:
            return self._reply(argv, 401, {"message": "token is required"})
        method = opt("--request")
        data = opt("--data-raw")
        body = json.loads(data) if data is not None else None
        path = args[-1].split("/api/v1/", 1)[1].split("?")[0].strip("/").split("/")
        status, answer = await self.route(str(method), path, body)
        return self._reply(argv, status, answer)

    def _reply(self, argv: tuple[str, ...], status: int, answer: object) -> Completed:
        text = "" if answer is None else json.dumps(answer)
        return Completed(argv, 0, f"{text}\n{status}", "")

    async def route(self, method: str, path: list[str], body: object) -> tuple[int, object]:
        match method, path:
            case "POST", ["orgs"]:
                assert isinstance(body, dict)
                name = body["username"]
                if name in self.users or name in self.orgs:
                    return 422, {"message": f"user already exists [name: {name}]"}
                self.orgs[name] = body
                return 201, {"id": len(self.orgs), "username": name}
            case "GET", ["orgs", org]:
                return (200, self.orgs[org]) if org in self.orgs else (404, {"message": "nf"})
            case "POST", ["orgs", org, "teams"]:
                assert isinstance(body, dict) and org in self.orgs
                if any(t["org"] == org and t["name"] == body["name"] for t in self.teams.values()):
                    return 422, {"message": f"team already exists [org_id: 1, name: {org}]"}
                team = len(self.teams) + 10
                self.teams[team] = {**body, "org": org}
                self.members[team] = set()
                return 201, {"id": team, "name": body["name"], "permission": body["permission"]}
            case "GET", ["orgs", org, "teams"]:
                listed = [
                    {"id": i, "name": t["name"], "permission": t["permission"]}
                    for i, t in self.teams.items()
                    if t["org"] == org
                ]
                return 200, listed
            case "PUT", ["teams", team, "members", user]:
                if user not in self.users or int(team) not in self.members:
                    return 404, {"message": "not found"}
                self.members[int(team)].add(user)
                return 204, None
            case "POST", ["orgs", org, "repos"]:
                assert isinstance(body, dict) and org in self.orgs
                key = f"{org}/{body['name']}"
                if key in self.repos:
                    return 409, {"message": "The repository with the same name already exists."}
                self.repos[key] = body
                if self.bare_root is not None:
                    bare = self.bare_root / org / f"{body['name']}.git"
                    await trio.run_process(["git", "init", "--quiet", "--bare", str(bare)])
                return 201, {"name": body["name"], "private": body["private"]}
        raise AssertionError(f"unexpected API call {method} {path}")


@dataclass
class FakeGitHttp:
    """An HTTP server standing in for the forge's git endpoint: it notes the head of every
    request (what git sent, its headers included) and refuses each with a 404."""

    heads: list[str] = field(default_factory=list)
    _arrived: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a free loopback port (started with it) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._answer, listeners)
            task_status.started(port)

    async def _answer(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        self.heads.append(head.decode())
        self._arrived.unpark_all()
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async def wait_for(self, request_line: str) -> str:
        """The head of the first request whose line starts so (the caller owns the timeout)."""
        while True:
            for head in self.heads:
                if head.startswith(request_line):
                    return head
            await self._arrived.park()
