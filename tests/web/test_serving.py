"""serve_with_retry: a port held by someone else is waited for, with backoff, and reported."""

from __future__ import annotations

import errno
import itertools
import socket
from functools import partial

import trio
import trio.testing

from hyperhive.protocol import wire
from hyperhive.web.serving import Backoff, serve_with_retry


def hold_port() -> socket.socket:
    """A stranger's listening socket on a free loopback port (no SO_REUSEADDR, like most)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder


async def serve_forever(sock: socket.socket, *, task_status: trio.TaskStatus[int]) -> None:
    task_status.started(sock.getsockname()[1])
    await trio.sleep_forever()


async def test_a_held_port_is_retried_with_doubling_delays_until_it_is_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    holder = hold_port()
    port = holder.getsockname()[1]
    seen: list[tuple[float, wire.ListenerStatus]] = []
    serving = trio.Event()

    def on_state(status: wire.ListenerStatus) -> None:
        seen.append((trio.current_time(), status))
        if status.failed_attempts == 8:
            holder.close()  # the stranger goes away after the eighth attempt
        if status.state == "serving":
            serving.set()

    with holder:
        async with trio.open_nursery() as nursery:
            first = await nursery.start(
                partial(
                    serve_with_retry,
                    serve_forever,
                    bind="127.0.0.1",
                    port=port,
                    name="test",
                    on_state=on_state,
                    backoff=Backoff(initial=1.0, maximum=60.0),
                )
            )
            assert first is None  # the caller is not kept waiting for the port
            await serving.wait()
            # It serves on the very port it waited for.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            nursery.cancel_scope.cancel()

    times = [t for t, _ in seen]
    assert [b - a for a, b in itertools.pairwise(times)] == [1, 2, 4, 8, 16, 32, 60, 60]
    waiting = [s for _, s in seen[:-1]]
    assert [s.failed_attempts for s in waiting] == list(range(1, 9))
    for status in waiting:
        assert status.state == "waiting_for_port" and status.port == port
        assert status.error is not None and "Address already in use" in status.error
        assert status.retry_at is not None and status.since == waiting[0].since
    up = seen[-1][1]
    assert (up.state, up.port, up.failed_attempts, up.retry_at) == ("serving", port, 8, None)
    assert up.error == waiting[-1].error  # what it waited for, for the dashboard's banner


async def test_a_server_that_fails_is_reported_and_served_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0
    seen: list[tuple[float, wire.ListenerStatus]] = []
    again = trio.Event()

    async def flaky(sock: socket.socket, *, task_status: trio.TaskStatus[int]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:  # e.g. the login files cannot be written
            raise OSError(errno.ENOSPC, "No space left on device")
        task_status.started(sock.getsockname()[1])
        if attempts == 2:
            raise RuntimeError("stopped while serving")
        await trio.sleep_forever()

    def on_state(status: wire.ListenerStatus) -> None:
        seen.append((trio.current_time(), status))
        if attempts == 3 and status.state == "serving":
            again.set()

    async with trio.open_nursery() as nursery:
        first = await nursery.start(
            partial(
                serve_with_retry, flaky, bind="127.0.0.1", port=0, name="test", on_state=on_state
            )
        )
        assert first is None
        await again.wait()
        nursery.cancel_scope.cancel()

    assert [(t, s.state, s.failed_attempts) for t, s in seen] == [
        (0.0, "failed", 1),
        (1.0, "serving", 1),
        (1.0, "failed", 1),
        (3.0, "serving", 1),
    ]
    assert seen[0][1].error is not None and "No space left on device" in seen[0][1].error
    assert seen[2][1].error is not None and "stopped while serving" in seen[2][1].error
