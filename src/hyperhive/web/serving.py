"""Serving a web app with hypercorn's trio worker inside the caller's nursery."""

from __future__ import annotations

import logging
from functools import partial
from typing import NoReturn
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

MAX_WEBSOCKET_MESSAGE = 2 * 1024 * 1024
"""Larger than any protocol line (1 MiB), small enough that a frame cannot hog memory."""


def bind_address(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    return f"{host}:{port}"


def hypercorn_config(bind: str, port: int, *, name: str) -> Config:
    config = Config()
    config.bind = [bind_address(bind, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger(f"hyperhive.web.{name}")
    config.include_server_header = False
    config.websocket_max_message_size = MAX_WEBSOCKET_MESSAGE
    config.graceful_timeout = 1.0
    return config


async def serve_app(
    app: QuartTrio,
    *,
    bind: str,
    port: int,
    name: str,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `app` until cancelled; `task_status.started(port)` reports the bound port."""
    config = hypercorn_config(bind, port, name=name)
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(partial(serve, app, config))
        bound = urlsplit(urls[0]).port
        if bound is None:
            raise RuntimeError(f"hypercorn reported no port for {urls[0]!r}")
        task_status.started(bound)
    raise RuntimeError(f"the {name} web server stopped unexpectedly")
