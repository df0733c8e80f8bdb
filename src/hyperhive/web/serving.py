"""Serving a web app with hypercorn's trio worker inside the caller's nursery, on a port that
is waited for (retried with backoff, its state reported) while something else holds it."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

import trio

from hyperhive.protocol import wire

if TYPE_CHECKING:  # imported where a server starts: binding a port needs neither (see below)
    from hypercorn.config import Config
    from quart_trio import QuartTrio

log = logging.getLogger(__name__)

MAX_WEBSOCKET_MESSAGE = 2 * 1024 * 1024
"""Larger than any protocol line (1 MiB), small enough that a frame cannot hog memory."""

LISTEN_BACKLOG = 100
"""hypercorn's default backlog."""

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
"""The pages and their assets: the dashboard's and the agent page's (which share hive.css,
hive.js and the favicon), served from here by both apps."""


def bind_address(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    return f"{host}:{port}"


def hypercorn_config(bind: str, port: int, *, name: str) -> Config:
    from hypercorn.config import Config

    config = Config()
    config.bind = [bind_address(bind, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger(f"hyperhive.web.{name}")
    config.include_server_header = False
    config.websocket_max_message_size = MAX_WEBSOCKET_MESSAGE
    config.graceful_timeout = 1.0
    return config


def bind_listener(bind: str, port: int) -> socket.socket:
    """A TCP socket bound to bind:port and listening; OSError when the port cannot be had.

    It listens at once: a bound socket that does not listen yet could be joined on its port by
    any other socket that sets SO_REUSEADDR.
    """
    host = bind.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A restarted daemon takes its port back from connections still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_app(
    app: QuartTrio,
    *,
    bind: str,
    port: int,
    name: str,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `app` until cancelled; `task_status.started(port)` reports the bound port.

    With `sock` (see `bind_listener`) it serves on that socket, which stays the caller's to
    close (hypercorn gets a duplicate); without, hypercorn binds bind:port itself.
    """
    from hypercorn.trio import serve

    config = hypercorn_config(bind, port, name=name)
    if sock is not None:
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(partial(serve, app, config))
        bound = urlsplit(urls[0]).port
        if bound is None:
            raise RuntimeError(f"hypercorn reported no port for {urls[0]!r}")
        task_status.started(bound)
    raise RuntimeError(f"the {name} web server stopped unexpectedly")


@dataclass(frozen=True)
class Backoff:
    """Retry delays: `initial` seconds, doubled after each failure, at most `maximum`."""

    initial: float = 1.0
    maximum: float = 60.0

    def after(self, delay: float) -> float:
        return min(delay * 2, self.maximum)


OnState = Callable[[wire.ListenerStatus], None]
"""Told every change of a listener's state (the caller keeps the latest, e.g. for `list`)."""

ServeOn = Callable[..., Awaitable[object]]
"""`serve_on(sock, *, task_status)`: serves on a listening socket, `task_status.started(port)`
once it does (e.g. `partial(serve_app, app, bind=..., port=..., name=...)` with `sock=`)."""


def describe(exc: BaseException) -> str:
    """An error in a line: the one exception inside nursery groups, an OSError's own words."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return f"{type(exc).__name__}: {exc}"


async def serve_with_retry(
    serve_on: ServeOn,
    *,
    bind: str,
    port: int,
    name: str,
    on_state: OnState,
    backoff: Backoff = Backoff(),
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Bind bind:port and serve on it with `serve_on`, for good, whatever holds the port.

    While the port cannot be bound (another process holds it, the address is not configured
    yet) the state is `waiting_for_port`; when the server fails, `failed`. Either way it is
    reported through `on_state` and tried again after a delay that doubles from
    `backoff.initial` up to `backoff.maximum` (reset once it has served that long). The caller
    does not wait for the port: `task_status.started` comes after the first attempt, with the
    bound port when it serves, None when it does not yet.
    """
    where = bind_address(bind, port)
    delay = backoff.initial
    failures = 0
    first_failure: float | None = None
    error: str | None = None
    ready = False
    while True:
        state: wire.ListenerState
        try:
            sock = bind_listener(bind, port)
        except OSError as exc:
            state, error = "waiting_for_port", f"cannot bind {where}: {describe(exc)}"
            log.warning("%s: %s; retrying in %gs", name, error, delay)
        else:
            served_at: float | None = None
            try:
                with sock:
                    async with trio.open_nursery() as nursery:
                        bound: int = await nursery.start(serve_on, sock)
                        served_at = trio.current_time()
                        now = time.time()
                        waited = 0.0 if first_failure is None else now - first_failure
                        on_state(
                            wire.ListenerStatus(
                                port=bound,
                                state="serving",
                                error=error,
                                failed_attempts=failures,
                                since=now,
                                waited=waited,
                            )
                        )
                        if failures:
                            log.warning(
                                "%s: serving on %s after %d failed attempts (%.0fs)",
                                name,
                                bind_address(bind, bound),
                                failures,
                                waited,
                            )
                        if not ready:
                            ready = True
                            task_status.started(bound)
                    raise RuntimeError(f"the {name} server returned")
            except Exception as exc:
                # Whatever stops it, it is served again after the backoff: never the daemon's end.
                state, error = "failed", f"{name} on {where} failed: {describe(exc)}"
                log.error("%s; retrying in %gs", error, delay, exc_info=exc)
            if served_at is not None:
                failures, first_failure = 0, None
                if trio.current_time() - served_at >= backoff.maximum:
                    delay = backoff.initial
        failures += 1
        now = time.time()
        if first_failure is None:
            first_failure = now
        on_state(
            wire.ListenerStatus(
                port=port,
                state=state,
                error=error,
                retry_at=now + delay,
                failed_attempts=failures,
                since=first_failure,
            )
        )
        if not ready:
            ready = True
            task_status.started(None)
        await trio.sleep(delay)
        delay = backoff.after(delay)
