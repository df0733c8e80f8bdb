"""The operator's web login: a secret per daemon start, the UI tokens derived from it, its files."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import trio

SECRET_BYTES = 32
_WILDCARD_BINDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


@dataclass(frozen=True)
class LoginTokens:
    """Each web UI's token is `urlsafe_b64(HMAC-SHA256(secret, scope))`, unpadded.

    The dashboard's scope is `dashboard`, an agent UI's `agent:<name>`. Only the daemon holds
    the secret, in memory: it is drawn again at every start, so a crash logs every browser out
    and a token someone caught while the daemon was away opens nothing. A harness asks for its
    own UI's token over its socket (`ui_token`) and cannot derive anyone else's.
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < SECRET_BYTES:
            raise ValueError(f"the login secret must be at least {SECRET_BYTES} bytes")

    @classmethod
    def generate(cls) -> LoginTokens:
        """The secret of this start; never written anywhere."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    def derive(self, scope: bytes) -> str:
        digest = hmac.new(self.secret, scope, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    @property
    def dashboard(self) -> str:
        return self.derive(b"dashboard")

    def agent(self, name: str) -> str:
        return self.derive(b"agent:" + name.encode("utf-8"))


def login_url(bind: str, port: int, token: str) -> str:
    """The URL that logs a browser in: the token rides in the fragment, which no server sees."""
    host = _WILDCARD_BINDS.get(bind, bind)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/#token={token}"


def write_private(path: Path, text: str, group: int | None = None) -> None:
    """Write `text` to `path` as a 0600 file (0640 in `group`), atomically (a reader sees old
    or new, whole) and durably; a symlink at `path` is replaced, never followed. Blocking."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        if group is not None:
            os.fchown(fh.fileno(), -1, group)
        os.fchmod(fh.fileno(), 0o600 if group is None else 0o640)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_login_files(
    token_path: Path, url_path: Path, token: str, url: str, group: int | None = None
) -> None:
    """Blocking: call it off the event loop. `group` (the admin group) may read them."""
    write_private(token_path, token + "\n", group)
    write_private(url_path, url + "\n", group)


def remove_login_files(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def serve_login_files(
    token_path: Path,
    url_path: Path,
    token: str,
    url: str,
    *,
    group: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Keep the login files for as long as the dashboard runs; a clean stop removes them."""
    await trio.to_thread.run_sync(write_login_files, token_path, url_path, token, url, group)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_login_files, token_path, url_path)
