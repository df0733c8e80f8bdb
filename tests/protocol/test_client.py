"""The typed client: each request's declared reply, error replies, and replies of the wrong type."""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, decode_reply, reply_type
from hyperhive.protocol.codec import (
    AGENT_DECODER,
    HOST_DECODER,
    MANAGER_DECODER,
    LineStream,
    encode_line,
    error_line,
)
from hyperhive.protocol.errors import NotFound, UnexpectedReply


def test_every_request_declares_its_reply() -> None:
    requests = {*wire.HostRequests.__args__, *wire.ManagerRequests.__args__}
    assert set(wire.REPLY_FOR) == requests
    assert wire.REPLY_FOR[wire.Spawn] is wire.AgentReply
    assert wire.REPLY_FOR[wire.Destroy] is wire.Done
    assert wire.REPLY_FOR[wire.Recv] is wire.Received
    assert reply_type(wire.Subscribe()) is wire.Subscribed


def test_the_type_parameter_is_not_on_the_wire() -> None:
    assert msgspec.json.encode(wire.Spawn(name="bo")) == b'{"cmd":"spawn","name":"bo"}'
    assert HOST_DECODER.decode(b'{"cmd":"spawn","name":"bo"}') == wire.Spawn(name="bo")
    assert AGENT_DECODER.decode(b'{"cmd":"status"}') == wire.Status()
    assert MANAGER_DECODER.decode(b'{"cmd":"kill","name":"bo"}') == wire.KillAgent(name="bo")


def test_an_error_reply_is_one_struct_each_way() -> None:
    line = error_line(NotFound("no agent bo"))
    assert line == b'{"ok":false,"code":"not_found","error":"no agent bo"}\n'
    assert msgspec.json.decode(line, type=wire.ErrorReply) == wire.ErrorReply(
        code="not_found", error="no agent bo"
    )
    with pytest.raises(NotFound, match="no agent bo"):
        decode_reply(line, wire.AgentReply)


def test_a_reply_of_another_type_is_unexpected() -> None:
    with pytest.raises(UnexpectedReply, match="AgentReply"):
        decode_reply(b'{"ok":true,"ids":[1],"recipients":["bo"]}', wire.AgentReply)
    with pytest.raises(UnexpectedReply):
        decode_reply(b"[]", wire.Done)
    with pytest.raises(UnexpectedReply):
        decode_reply(b'{"ok":false}', wire.Done)


async def _answer(stream: trio.abc.Stream, reply: bytes) -> bytes:
    lines = LineStream(stream)
    request = await lines.receive_line()
    assert request is not None
    await lines.send_line(reply)
    return request


async def test_call_returns_the_declared_reply() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    client = Client(client_side)
    info = wire.AgentInfo(
        name="bo", role="agent", container="h-bo", state="running", backend="fake", port=1
    )
    answer = msgspec.json.encode(wire.AgentReply(agent=info)) + b"\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, server_side, answer)
        reply = await client.call(wire.Spawn(name="bo"))
    assert reply == wire.AgentReply(agent=info)


async def test_call_raises_the_error_reply() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    client = Client(client_side)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, server_side, error_line(NotFound("no agent bo")))
        with pytest.raises(NotFound, match="no agent bo"):
            await client.call(wire.Kill(name="bo"))


def test_an_error_reply_is_raised_even_where_it_would_fit_the_reply_type() -> None:
    """`Done` has no fields of its own: an error line decodes as one with `ok: false`."""
    with pytest.raises(NotFound, match="no agent bo"):
        decode_reply(error_line(NotFound("no agent bo")), wire.Done)


async def test_concurrent_calls_on_one_connection_take_turns() -> None:
    """Two tasks calling at once on one client: each gets its own reply, as the server answers
    one line after another (the second waits for the first exchange to end)."""
    client_side, server_side = trio.testing.memory_stream_pair()
    client = Client(client_side)
    got: dict[str, object] = {}

    async def serve_two() -> None:
        lines = LineStream(server_side)
        for _ in range(2):
            line = await lines.receive_line()
            assert line is not None
            name = msgspec.json.decode(line)["name"]
            await lines.send_line(
                encode_line(wire.StatusReply(name=name, role="agent", unread=0, in_flight=0))
            )

    async def call(name: str) -> None:
        got[name] = await client.raw(msgspec.json.encode({"cmd": "status", "name": name}))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_two)
            nursery.start_soon(call, "a")
            nursery.start_soon(call, "b")
    for name in ("a", "b"):
        reply = got[name]
        assert isinstance(reply, bytes)
        assert msgspec.json.decode(reply)["name"] == name
