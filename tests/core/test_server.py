"""The socket server's connection handling, driven in memory: no socket, virtual time."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.core.server import (
    EventStream,
    Peer,
    PeerCheck,
    SocketLimits,
    SocketServer,
    require_uid,
)
from hyperhive.protocol import wire
from hyperhive.protocol.codec import LineStream, RequestDecoder, encode_line
from hyperhive.protocol.errors import NotFound

PEER = Peer(pid=4242, uid=1000, gid=1000)


class Req(msgspec.Struct, frozen=True, tag_field="cmd"):
    pass


class Echo(Req, frozen=True, tag="echo"):
    text: str


class Missing(Req, frozen=True, tag="missing"):
    """The handler raises a domain error."""


class Full(Req, frozen=True, tag="full"):
    """The handler hits a full disk."""


class Invalid(Req, frozen=True, tag="invalid"):
    """The handler fails to validate something with msgspec."""


class Denied(Req, frozen=True, tag="denied"):
    """The handler gets an OSError that is not about a full disk: unexpected."""


class Crash(Req, frozen=True, tag="crash"):
    """The handler has a bug."""


class Watch(Req, frozen=True, tag="watch"):
    """The handler turns the connection into an event stream."""


Requests = Echo | Missing | Full | Invalid | Denied | Crash | Watch
DECODER: RequestDecoder[Req] = RequestDecoder(
    Requests, frozenset({"echo", "missing", "full", "invalid", "denied", "crash", "watch"}), "test"
)


class Echoed(wire.Reply, frozen=True):
    text: str


@dataclass
class Recorder:
    """A handler that records who asked what; `watch` streams what is put on `events`."""

    seen: list[tuple[Req, Peer]] = field(default_factory=list)
    events: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]] = field(
        default_factory=lambda: trio.open_memory_channel[bytes](16)
    )
    stream_closed: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: Req, peer: Peer) -> wire.Reply | EventStream:
        self.seen.append((request, peer))
        match request:
            case Echo(text=text):
                return Echoed(text=text)
            case Missing():
                raise NotFound("no such thing")
            case Full():
                raise OSError(errno.ENOSPC, "No space left on device")
            case Invalid():
                raise msgspec.ValidationError("Expected `str`, got `int` - at `$.text`")
            case Denied():
                raise PermissionError(errno.EACCES, "Permission denied")
            case Crash():
                raise RuntimeError("a bug in the handler")
            case Watch():
                return EventStream(Echoed(text="watching"), self._lines())
        raise AssertionError(request)

    async def _lines(self) -> AsyncIterator[bytes]:
        try:
            async for data in self.events[1]:
                yield data
        finally:
            self.stream_closed.set()


def make_server(
    handler: Recorder,
    limits: SocketLimits | None = None,
    *,
    peer_check: PeerCheck | None = None,
) -> SocketServer[Req]:
    """A server that is never bound: only `handle_connection` is used."""
    return SocketServer(
        "/nonexistent/test.sock",
        DECODER,
        handler,
        limits=limits,
        peer_check=peer_check,
        name="test",
    )


class Client:
    """The client's end of one in-memory connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.lines = LineStream(stream)

    async def send_raw(self, data: bytes) -> None:
        await self.lines.send_line(data)

    async def reply(self) -> dict[str, object] | None:
        """The next reply, or None when the server closed the connection."""
        line = await self.lines.receive_line()
        if line is None:
            return None
        decoded = msgspec.json.decode(line)
        assert isinstance(decoded, dict)
        return decoded

    async def call(self, request: Req) -> dict[str, object]:
        await self.send_raw(encode_line(request))
        reply = await self.reply()
        assert reply is not None, "the server closed the connection"
        return reply

    async def assert_closed(self) -> None:
        assert await self.reply() is None


@asynccontextmanager
async def connect(server: SocketServer[Req], peer: Peer = PEER) -> AsyncIterator[Client]:
    """One connection served by `handle_connection`; on exit the client hangs up and the server
    must have finished with the connection (within a minute of virtual time)."""
    client_side, server_side = trio.testing.memory_stream_pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_side, peer)
            client = Client(client_side)
            yield client
            await client.lines.aclose()


async def test_a_request_is_answered_with_the_peer_handed_to_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Recorder()
    server = make_server(handler)
    async with connect(server) as client:
        assert await client.call(Echo("one")) == {"ok": True, "text": "one"}
        assert await client.call(Echo("two")) == {"ok": True, "text": "two"}
        assert server.connections == 1
    assert handler.seen == [(Echo("one"), PEER), (Echo("two"), PEER)]
    assert server.connections == 0


async def test_malformed_json_gets_a_clear_error_and_the_connection_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Recorder()
    async with connect(make_server(handler)) as client:
        await client.send_raw(b'{"cmd": "echo", \n')
        reply = await client.reply()
        assert reply is not None
        assert reply["ok"] is False
        assert reply["code"] == "parse_error"
        assert str(reply["error"]).startswith("malformed JSON")
        await client.send_raw(b'{"cmd": "launch"}\n')
        reply = await client.reply()
        assert reply is not None
        assert reply["code"] == "unknown_command"
        assert "unknown command 'launch' on the test socket" in str(reply["error"])
        assert await client.call(Echo("still here")) == {"ok": True, "text": "still here"}
    assert handler.seen == [(Echo("still here"), PEER)]


async def test_an_over_long_line_is_refused_and_the_connection_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Recorder()
    async with connect(make_server(handler, SocketLimits(max_line=64))) as client:
        assert await client.call(Echo("x" * 40)) == {"ok": True, "text": "x" * 40}
        # No newline yet: refused as soon as the limit is passed, not when the line ends.
        await client.send_raw(b'{"cmd": "echo", "text": "' + b"y" * 64)
        assert await client.reply() == {
            "ok": False,
            "code": "line_too_long",
            "error": "line exceeds the 64-byte limit",
        }
        await client.assert_closed()
    assert len(handler.seen) == 1


async def test_a_client_trickling_a_line_is_timed_out_on_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = SocketLimits(first_line_timeout=100.0, line_timeout=7.0)
    async with connect(make_server(Recorder(), limits)) as client:
        start = trio.current_time()
        await client.send_raw(b'{"cmd": "ec')
        assert await client.reply() == {
            "ok": False,
            "code": "busy",
            "error": "timed out waiting for a complete line; closing",
        }
        assert trio.current_time() - start == pytest.approx(7.0)
        await client.assert_closed()


async def test_a_silent_client_is_timed_out_after_the_first_line_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = SocketLimits(first_line_timeout=3.0, line_timeout=50.0)
    async with connect(make_server(Recorder(), limits)) as client:
        start = trio.current_time()
        reply = await client.reply()
        assert reply is not None
        assert reply["code"] == "busy"
        assert trio.current_time() - start == pytest.approx(3.0)
        await client.assert_closed()


async def test_after_the_first_line_an_idle_client_may_stay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = SocketLimits(first_line_timeout=3.0, line_timeout=3.0)
    async with connect(make_server(Recorder(), limits)) as client:
        assert await client.call(Echo("hello")) == {"ok": True, "text": "hello"}
        await trio.sleep(30)  # idle between lines is not a partial line
        assert await client.call(Echo("later")) == {"ok": True, "text": "later"}


async def test_a_client_that_does_not_read_is_dropped_after_the_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = make_server(Recorder(), SocketLimits(send_timeout=5.0))
    to_server, from_client = trio.testing.memory_stream_one_way_pair()
    # The reply direction never drains, like a client whose receive buffer is full.
    to_client = trio.testing.MemorySendStream(send_all_hook=trio.sleep_forever)
    await to_server.send_all(encode_line(Echo("unread")))
    start = trio.current_time()
    with trio.fail_after(60):
        await server.handle_connection(trio.StapledStream(to_client, from_client), PEER)
    # The reply timed out after 5 s; the goodbye got one more second, then the stream closed.
    assert trio.current_time() - start == pytest.approx(6.0)
    assert server.connections == 0
    with pytest.raises(trio.ClosedResourceError):
        await to_client.send_all(b"x")


async def test_the_peer_check_refuses_before_any_request_is_handled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Recorder()
    server = make_server(handler, peer_check=require_uid({0}))
    async with connect(server) as client:
        await client.send_raw(encode_line(Echo("let me in")))
        assert await client.reply() == {
            "ok": False,
            "code": "forbidden",
            "error": "uid 1000 may not use this socket",
        }
        await client.assert_closed()
    assert handler.seen == []
    root = Peer(pid=1, uid=0, gid=0)
    async with connect(server, root) as client:
        assert await client.call(Echo("root")) == {"ok": True, "text": "root"}
    assert handler.seen == [(Echo("root"), root)]


async def test_connections_over_the_limit_get_a_busy_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = make_server(Recorder(), SocketLimits(max_connections=1))
    async with connect(server) as first:
        assert await first.call(Echo("first")) == {"ok": True, "text": "first"}
        async with connect(server) as second:
            assert await second.reply() == {
                "ok": False,
                "code": "busy",
                "error": "too many connections on the test socket; try again later",
            }
            await second.assert_closed()
        assert server.connections == 1
        assert await first.call(Echo("unaffected")) == {"ok": True, "text": "unaffected"}
    async with connect(server) as third:
        assert await third.call(Echo("third")) == {"ok": True, "text": "third"}


async def test_handler_errors_are_translated_and_the_connection_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connect(make_server(Recorder())) as client:
        assert await client.call(Missing()) == {
            "ok": False,
            "code": "not_found",
            "error": "no such thing",
        }
        full = await client.call(Full())
        assert full["code"] == "storage_full"
        assert "the disk is full (No space left on device)" in str(full["error"])
        invalid = await client.call(Invalid())
        assert invalid["code"] == "internal"
        assert "Expected `str`, got `int`" in str(invalid["error"])
        assert await client.call(Echo("after")) == {"ok": True, "text": "after"}


@pytest.mark.parametrize("request_", [Crash(), Denied()], ids=["bug", "unexpected-oserror"])
async def test_an_unexpected_handler_exception_ends_only_that_connection(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, request_: Req
) -> None:
    server = make_server(Recorder())
    async with connect(server) as bystander:
        assert await bystander.call(Echo("before")) == {"ok": True, "text": "before"}
        with caplog.at_level(logging.ERROR, logger="hyperhive.core.server"):
            async with connect(server) as client:
                assert await client.call(request_) == {
                    "ok": False,
                    "code": "internal",
                    "error": "internal error; see daemon log",
                }
                await client.assert_closed()
        assert [r.getMessage() for r in caplog.records] == ["test: connection failed"]
        assert caplog.records[0].exc_info is not None
        assert await bystander.call(Echo("after")) == {"ok": True, "text": "after"}
    assert server.connections == 0


async def test_an_event_stream_turns_the_connection_into_a_stream_until_the_source_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Recorder()
    send, _ = handler.events
    async with connect(make_server(handler)) as client:
        assert await client.call(Watch()) == {"ok": True, "text": "watching"}
        await send.send(b'{"event": 1}\n')
        await send.send(b'{"event": 2}\n')
        assert await client.reply() == {"event": 1}
        # From now on the server only watches for a hang-up: requests are not answered.
        await client.send_raw(encode_line(Echo("ignored")))
        assert await client.reply() == {"event": 2}
        await send.aclose()
        await client.assert_closed()
    assert handler.stream_closed.is_set()
    assert [type(r) for r, _ in handler.seen] == [Watch]


async def test_a_client_hanging_up_ends_the_event_stream_and_closes_its_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Recorder()
    server = make_server(handler)
    client_side, server_side = trio.testing.memory_stream_pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_side, PEER)
            client = Client(client_side)
            assert await client.call(Watch()) == {"ok": True, "text": "watching"}
            await client.lines.aclose()
            await handler.stream_closed.wait()
    assert server.connections == 0
