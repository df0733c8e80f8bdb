"""Server-sent events: framing, heartbeats, and the never-timing-out streaming response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from quart import Response

HEARTBEAT_SECONDS = 15.0
"""A comment frame this often keeps proxies and the browser from declaring the stream dead."""
HEARTBEAT = b": ping\n\n"
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


def data_frame(payload: bytes) -> bytes:
    """One unnamed event (so `EventSource.onmessage` fires); `payload` is one JSON line."""
    return b"data: " + payload.rstrip(b"\r\n").replace(b"\n", b"\ndata: ") + b"\n\n"


async def with_heartbeats(
    receive: Callable[[], Awaitable[bytes | None]],
    close: Callable[[], Awaitable[None]],
    *,
    interval: float = HEARTBEAT_SECONDS,
) -> AsyncIterator[bytes]:
    """SSE frames of each payload `receive` returns until it returns None; then `close()`.

    The timeout scope never spans a `yield`, so the generator is safe to suspend under trio.
    `receive` must be cancel-safe (a memory channel, a LineStream): a heartbeat interrupts it.
    """
    try:
        yield b": connected\n\n"
        while True:
            payload: bytes | None = None
            with trio.move_on_after(interval) as scope:
                payload = await receive()
            if scope.cancelled_caught:
                yield HEARTBEAT
                continue
            if payload is None:
                return
            yield data_frame(payload)
    finally:
        with trio.CancelScope(shield=True):
            await close()


def sse_response(frames: AsyncIterator[bytes]) -> Response:
    response = Response(frames, status=200, headers=HEADERS)
    response.timeout = None
    return response
