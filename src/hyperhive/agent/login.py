"""An agent's Claude login: whether it has credentials, and `claude auth login` driven over pipes
from its web UI.

The login is interactive OAuth, so only the operator can complete it (there is no MCP tool for
it): the agent UI starts `claude auth login` inside the container, shows the sign-in URL it
prints, and writes the code the operator pastes to its stdin. claude stores the credentials in
the agent's `/root/.claude` (its own, bind-mounted, kept across restarts and destroy); the
harness's login poll then sees them and starts taking turns.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import msgspec
import trio

from hyperhive.protocol.errors import BadParams, Conflict
from hyperhive.protocol.procgroup import stop_process_group

LOGIN_ARGS = ("auth", "login")
MAX_OUTPUT = 32 * 1024
"""Characters of the command's output kept for the UI (the tail)."""
MAX_CODE = 1024
_URL = re.compile(r"https://[^\s\"'<>]+")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")

Credentials = Literal["ok", "needs_login"]


class LoginState(msgspec.Struct, frozen=True, kw_only=True):
    """What the agent UI shows of the login in progress (or the last one)."""

    running: bool = False
    url: str | None = None
    """The first https URL the command printed: where the operator signs in."""
    output: str = ""
    finished: bool = False
    exit_note: str = ""
    code_sent: bool = False


def check_code(code: str) -> str:
    code = code.strip()
    if not code or len(code) > MAX_CODE or not code.isprintable() or any(c.isspace() for c in code):
        raise BadParams(f"the code must be 1-{MAX_CODE} printable characters without spaces")
    return code


class LoginSession:
    """At most one `claude auth login` at a time, run in `nursery` (the harness's)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None = None,
    ) -> None:
        self._nursery = nursery
        self._argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self._state = LoginState()
        self._output = ""
        self._stdin: trio.abc.SendStream | None = None
        self._scope: trio.CancelScope | None = None
        self.changed = trio.Event()
        """Set (and replaced) whenever the state changes: wait on it instead of polling."""

    @property
    def state(self) -> LoginState:
        return self._state

    def _update(self, **fields: object) -> None:
        self._state = msgspec.structs.replace(self._state, **fields)
        self.changed.set()
        self.changed = trio.Event()

    async def start(self) -> LoginState:
        if self._state.running:
            raise Conflict("a login is already running: paste its code, or cancel it")
        self._output = ""
        self._update(
            running=True, url=None, output="", finished=False, exit_note="", code_sent=False
        )
        try:
            await self._nursery.start(self._run)
        except OSError as exc:
            self._update(running=False, finished=True, exit_note=f"cannot start claude: {exc}")
        return self._state

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        proc = await trio.lowlevel.open_process(
            self._argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        note = ""
        with trio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            try:
                async for chunk in proc.stdout:
                    self._append(chunk.decode("utf-8", "replace"))
                await proc.wait()
                note = f"claude auth login exited ({proc.returncode})"
            finally:
                with trio.CancelScope(shield=True):
                    await stop_process_group(proc, ())
                    await proc.stdin.aclose()
                    await proc.stdout.aclose()
                    self._stdin = None
                    self._scope = None
        if scope.cancelled_caught:
            note = "cancelled"
        self._update(running=False, finished=True, exit_note=note)

    def _append(self, text: str) -> None:
        self._output = (self._output + _ANSI.sub("", text))[-MAX_OUTPUT:]
        url = self._state.url
        if url is None:
            found = _URL.search(self._output)
            url = found.group(0) if found else None
        self._update(output=self._output, url=url)

    async def submit(self, code: str) -> LoginState:
        code = check_code(code)
        if not self._state.running or self._stdin is None:
            raise Conflict("no login is running: start one first")
        try:
            await self._stdin.send_all(code.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise Conflict("the login command is no longer reading its input") from None
        self._update(code_sent=True)
        return self._state

    def cancel(self) -> bool:
        if self._scope is None:
            return False
        self._scope.cancel()
        return True


class ClaudeLogin:
    """The one owner of the agent's Claude login: whether it has credentials (`check`, which the
    turn loop polls before each turn) and the web login the operator drives from the page
    (`session`). The page and the turn loop ask it; nothing else holds a copy."""

    def __init__(
        self, has_credentials: Callable[[], bool], session: LoginSession | None = None
    ) -> None:
        self._has_credentials = has_credentials
        self._session = session
        self._state: Credentials = "ok"

    @property
    def state(self) -> Credentials:
        """What the last `check` found (`"ok"` until one finds no credentials)."""
        return self._state

    @property
    def session(self) -> LoginSession | None:
        """`claude auth login` for the page, when this harness offers one."""
        return self._session

    async def check(self) -> bool:
        """Look for credentials now (a file stat, off the event loop); True when there are."""
        found = await trio.to_thread.run_sync(self._has_credentials)
        self._state = "ok" if found else "needs_login"
        return found
