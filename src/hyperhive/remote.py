"""The operator CLI from another machine: host.sock's protocol over the dashboard's `/ws` bridge.

`hive-c0re --url https://HOST:7000 …` (or `$HIVE_URL`) with the dashboard's login token from
`--token-file` or `$HIVE_TOKEN` (or the `#token=` of the login URL `hive-c0re url` prints) opens
one websocket to `/ws` with the token as a bearer header (never in the URL, so never in a
proxy's log), sends the request with a `ref` and returns the reply with that `ref`. The bridge
forwards the requests the dashboard makes (SPEC §7); any other is answered `unknown_command`
without reaching the daemon.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    open_websocket_url,
)

from hyperhive.protocol import wire
from hyperhive.protocol.client import R, decode_reply, reply_type
from hyperhive.protocol.errors import BadParams, ConnectionLost, HiveError, error_from_wire

REF = 1
TIMEOUT = 60.0
"""Seconds a remote request may take, connection included (an approval's build can take long)."""

_ref = msgspec.json.Decoder(dict[str, object])


@dataclass(frozen=True)
class Remote:
    """Where the dashboard's /ws is, and the login token to show it."""

    ws_url: str
    token: str = field(repr=False)

    @classmethod
    def from_sources(
        cls, url: str, *, token_file: str | None = None, env_token: str | None = None
    ) -> Remote:
        """The token from `token_file`, else `$HIVE_TOKEN`, else the URL's `#token=` (the login
        URL `hive-c0re url` prints): never needed in argv."""
        ws_url, in_url = remote_endpoint(url)
        token = None
        if token_file:
            try:
                token = Path(token_file).read_text("utf-8").strip()
            except OSError as exc:
                raise BadParams(f"--token-file {token_file}: {exc.strerror or exc}") from None
        token = token or env_token or in_url
        if not token:
            raise BadParams(
                "no token for --url: give --token-file, set $HIVE_TOKEN, or use the login URL"
                " `hive-c0re url` prints on the hive's host"
            )
        return cls(ws_url, token)


def remote_endpoint(url: str) -> tuple[str, str | None]:
    """(the websocket URL of `/ws`, the token in the URL if any) from a dashboard URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadParams(f"--url {url[:80]!r}: give the dashboard's http(s) address")
    token = next(
        iter(parse_qs(parts.fragment).get("token", []) + parse_qs(parts.query).get("token", [])),
        None,
    )
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}/ws", token


async def call_remote(remote: Remote | str, request: wire.Request[R]) -> R:
    """One request over the dashboard's `/ws` bridge; its reply, typed as for `Client.call`."""
    if isinstance(remote, str):
        remote = Remote.from_sources(remote)
    ws_url, token = remote.ws_url, remote.token
    frame = msgspec.to_builtins(request)
    frame["ref"] = REF
    context = ssl.create_default_context() if ws_url.startswith("wss:") else None
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    try:
        with trio.fail_after(TIMEOUT):
            async with open_websocket_url(ws_url, context, extra_headers=headers) as ws:
                await ws.send_message(msgspec.json.encode(frame).decode())
                while True:
                    message = await ws.get_message()
                    line = message.encode() if isinstance(message, str) else message
                    if _ref.decode(line).get("ref") == REF:
                        return decode_reply(line, reply_type(request))
    except ConnectionRejected as exc:
        raise _rejected(exc) from None
    except (HandshakeError, ConnectionClosed, OSError) as exc:
        raise ConnectionLost(f"cannot reach the dashboard at {ws_url}: {exc}") from None
    except trio.TooSlowError:
        raise ConnectionLost(f"no reply from {ws_url} within {TIMEOUT:g}s") from None


def _rejected(exc: ConnectionRejected) -> HiveError:
    """The dashboard's refusal (its JSON error body: not logged in, host not served...)."""
    try:
        body = msgspec.json.decode(exc.body or b"", type=wire.ErrorReply)
    except msgspec.DecodeError:
        return ConnectionLost(f"the dashboard refused the websocket (HTTP {exc.status_code})")
    return error_from_wire(body.code, f"{body.error} (HTTP {exc.status_code})")
