"""The JSON-line unix socket server that every hyperhive socket runs: framing, limits, errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sqlite3
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Generic, NoReturn, Protocol, TypeVar

import msgspec
import trio

from hyperhive.core.storage import storage_full
from hyperhive.protocol import wire
from hyperhive.protocol.codec import MAX_LINE, LineStream, RequestDecoder, encode_line, error_line
from hyperhive.protocol.errors import Busy, Forbidden, HiveError, Internal, LineTooLong

log = logging.getLogger(__name__)

T = TypeVar("T", contravariant=True)
Req = TypeVar("Req")


@dataclass(frozen=True)
class SocketLimits:
    """What one client may cost a socket."""

    max_line: int = MAX_LINE
    max_connections: int = 256
    first_line_timeout: float = 10.0
    """Seconds a new connection has to deliver its first complete line."""
    line_timeout: float = 10.0
    """Seconds a started line has to be completed (slowloris defence)."""
    send_timeout: float = 10.0
    """Seconds a reply may take to drain into a client that does not read."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    """Supplementary groups, as the kernel recorded them at connect (SO_PEERGROUPS)."""


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux's value (asm-generic); Python's socket module does not export it."""
_GID = struct.calcsize("I")


def peer_credentials(stream: trio.SocketStream) -> Peer:
    sock = stream.socket
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    size = 64 * _GID
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 65536 * _GID:
                size *= 16  # the kernel allows NGROUPS_MAX (65536) groups
                continue
            return ()  # a kernel without SO_PEERGROUPS (before 4.13): primary group only
        return tuple(gid for (gid,) in struct.iter_unpack("I", raw))


class EventStream:
    """Returned by a handler to turn the connection into a one-way stream of lines."""

    def __init__(self, first: wire.Reply, lines: AsyncIterator[bytes]) -> None:
        self.first = first
        self.lines = lines


Here = Callable[[object, Peer], Awaitable["wire.Reply | EventStream"]]
"""A request handled on this host (host.sock's handler)."""


class Router(Protocol):
    """Swarm mode: sends a request to the host that owns what it names (hyperhive.swarm)."""

    async def route(self, request: object, here: Here) -> wire.Reply | EventStream | None: ...


class PeerRouter(Protocol):
    """Swarm mode: an agent's answer to a question that lives on another host goes there."""

    async def answer(
        self, qid: int, answer: str, answerer: str, as_peer: str
    ) -> wire.QuestionReply | None: ...


class Swarm(Router, PeerRouter, Protocol):
    """What the daemon's sockets ask of the swarm (hyperhive.swarm.forward.Forwarder)."""


class Handler(Protocol[T]):
    async def handle(self, request: T, peer: Peer) -> wire.Reply | EventStream: ...


PeerCheck = Callable[[Peer], None]


class SocketServer(Generic[Req]):
    """Serves one unix socket path with one decoder and one handler."""

    def __init__(
        self,
        path: str,
        decoder: RequestDecoder[Req],
        handler: Handler[Req],
        *,
        limits: SocketLimits | None = None,
        mode: int = 0o600,
        group: int | None = None,
        peer_check: PeerCheck | None = None,
        name: str = "socket",
    ) -> None:
        self.path = path
        self.decoder = decoder
        self.handler = handler
        self.limits = limits or SocketLimits()
        self.mode = mode
        self.group = group
        """The socket file's group (its owner is the daemon's uid), if not the daemon's."""
        self.peer_check = peer_check
        self.name = name
        self.connections = 0

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        listener = await open_unix_listener(self.path, mode=self.mode, group=self.group)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._accepted, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        raise AssertionError("unreachable")

    async def _accepted(self, stream: trio.SocketStream) -> None:
        # The kernel's credentials are read after the busy check, as part of the connection:
        # a failure to read them is answered like any other unexpected error.
        await self._connection(stream, partial(peer_credentials, stream))

    async def handle_connection(self, stream: trio.abc.Stream, peer: Peer) -> None:
        """Serve one connected client, known as `peer`, until it hangs up or is refused.

        This is everything the server does with a connection after accepting it, so tests can
        drive it over `trio.testing.memory_stream_pair()` without a socket. Never raises
        (except Cancelled); `stream` is closed on return.
        """
        await self._connection(stream, lambda: peer)

    async def _connection(self, stream: trio.abc.Stream, get_peer: Callable[[], Peer]) -> None:
        lines = LineStream(
            stream, max_line=self.limits.max_line, send_timeout=self.limits.send_timeout
        )
        self.connections += 1
        try:
            if self.connections > self.limits.max_connections:
                raise Busy(f"too many connections on the {self.name} socket; try again later")
            peer = get_peer()
            if self.peer_check is not None:
                self.peer_check(peer)
            await self._serve_lines(lines, peer)
        except HiveError as err:
            await self._try_send(lines, error_line(err))
        except trio.TooSlowError:
            await self._try_send(
                lines, error_line(Busy("timed out waiting for a complete line; closing"))
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("%s: connection failed", self.name)
            await self._try_send(lines, error_line(Internal("internal error; see daemon log")))
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await lines.aclose()

    async def _try_send(self, lines: LineStream, data: bytes) -> None:
        with trio.move_on_after(1):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await lines.send_line(data)

    async def _serve_lines(self, lines: LineStream, peer: Peer) -> None:
        first = True
        while True:
            if first:
                with trio.fail_after(self.limits.first_line_timeout):
                    line = await lines.receive_line(partial_timeout=self.limits.line_timeout)
            else:
                line = await lines.receive_line(partial_timeout=self.limits.line_timeout)
            if line is None:
                return
            first = False
            try:
                request = self.decoder.decode(line)
                result = await self.handler.handle(request, peer)
            except LineTooLong:
                raise
            except (HiveError, msgspec.ValidationError, OSError, sqlite3.Error) as err:
                herr = _reply_error(err)
                if herr is None:
                    raise
                await lines.send_line(error_line(herr))
                continue
            if isinstance(result, EventStream):
                await lines.send_line(encode_line(result.first))
                await self._stream(lines, result.lines)
                return
            await lines.send_line(encode_line(result))

    async def _stream(self, lines: LineStream, source: AsyncIterator[bytes]) -> None:
        """Pump a stream to the client until either side ends; reading detects a hang-up."""

        async def watch_hangup(cancel: trio.CancelScope) -> None:
            # Whatever the client does now (hang up, reset, send junk) ends the stream.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, HiveError):
                while await lines.receive_line() is not None:
                    pass
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_hangup, nursery.cancel_scope)
            try:
                async for data in source:
                    await lines.send_line(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away mid-stream
            finally:
                aclose: Callable[[], Awaitable[None]] | None = getattr(source, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            nursery.cancel_scope.cancel()


def _reply_error(err: Exception) -> HiveError | None:
    """The error a failed request is answered with; None ends the connection (unexpected).

    A full disk is `storage_full` whichever layer noticed it (sqlite, a file write, git).
    """
    full = storage_full(err)
    if full is not None:
        return full
    if isinstance(err, HiveError):
        return err
    if isinstance(err, msgspec.ValidationError):
        return Internal(str(err))
    return None


async def open_unix_listener(
    path: str, *, mode: int = 0o600, group: int | None = None
) -> trio.SocketListener:
    """Bind a listening unix socket at `path` (replacing a stale one) with file `mode`, and
    `group` as the file's group when given; the caller closes it and unlinks the path."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await trio.to_thread.run_sync(_unlink_stale, path)
        await sock.bind(path)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(4096)  # the kernel caps it at net.core.somaxconn
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _unlink_stale(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def require_uid(allowed: set[int], group: int | None = None) -> PeerCheck:
    """host.sock's check: only root and the daemon's own uid (plus any configured) may speak,
    and members of the admin `group` (primary or supplementary) when there is one."""

    def check(peer: Peer) -> None:
        if peer.uid in allowed:
            return
        if group is not None and (peer.gid == group or group in peer.groups):
            return
        raise Forbidden(f"uid {peer.uid} may not use this socket")

    return check
