"""Hostile input, generated: the decoders only ever answer with a request or a HiveError, and a
live daemon answers every hostile line with exactly one reply line without hurting anyone else.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from hyperhive.protocol import wire
from hyperhive.protocol.client import open_client
from hyperhive.protocol.codec import (
    AGENT_DECODER,
    HOST_DECODER,
    MAX_LINE,
    LineStream,
    RequestDecoder,
)
from hyperhive.protocol.errors import ERROR_CODES, HiveError
from hyperhive.protocol.names import is_valid_name
from tests.hive import Hive, hive_config, open_hive, short_tmpdir

REQUEST_TYPES: tuple[type[msgspec.Struct], ...] = (
    *wire.HostRequests.__args__,
    *wire.AgentRequests.__args__,
)
COMMANDS = sorted(wire.HOST_COMMANDS | wire.AGENT_COMMANDS)
FIELDS = sorted({f.encode_name for t in REQUEST_TYPES for f in msgspec.structs.fields(t)})
INT64 = st.integers()
"""Any integer: ids beyond int64 are refused at the edge (test_out_of_range_ids_...)."""
MAX_NESTING = 5000
"""Nesting fed inside objects: past ~1000 levels it is a parse error (test_deep_nesting_...)."""


def _check_decode(decoder: RequestDecoder[object], base: type, line: bytes) -> None:
    try:
        request = decoder.decode(line)
    except HiveError as err:
        assert err.code in ERROR_CODES and err.code != "internal", err
        assert isinstance(err.message, str) and err.message.strip()
    else:
        assert isinstance(request, base)


def json_values(ints: st.SearchStrategy[int]) -> st.SearchStrategy[object]:
    scalars = (
        st.none()
        | st.booleans()
        | ints
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), inner, max_size=4)
        ),
        max_leaves=12,
    )


def request_dicts(ints: st.SearchStrategy[int]) -> st.SearchStrategy[dict[str, object]]:
    """Objects with a real or random `cmd` and real field names holding values of any type."""
    values = json_values(ints)
    fields = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=5)
    cmds = st.sampled_from(COMMANDS) | st.text(max_size=12)
    return st.tuples(cmds, fields).map(lambda pair: {**pair[1], "cmd": pair[0]})


def wrong_types(ints: st.SearchStrategy[int]) -> st.SearchStrategy[dict[str, object]]:
    """A real command with each of its own fields present or not, holding anything."""

    def for_type(t: type[msgspec.Struct]) -> st.SearchStrategy[dict[str, object]]:
        tag = t.__struct_config__.tag
        optional = {f.encode_name: json_values(ints) for f in msgspec.structs.fields(t)}
        return st.fixed_dictionaries({"cmd": st.just(tag)}, optional=optional)

    return st.sampled_from(REQUEST_TYPES).flatmap(for_type)


def dump(value: object, ascii_only: bool) -> bytes:
    # allow_nan writes NaN/Infinity, which are not JSON; surrogatepass keeps lone surrogates as
    # the invalid UTF-8 a careless client would send.
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- the decoders

HOSTILE_EXAMPLES = [
    b"\xef\xbb\xbf" + b'{"cmd": "list"}',
    b'{"cmd": "send", "to": "\\ud800", "body": "x"}',
    b'{"cmd": "recv", "wait_seconds": 1e999}',
    b'{"cmd": "recent", "limit": 1e999}',
    b'{"cmd": "ack", "id": 99999999999999999999999, "attempt": -1}',
    b'{"cmd": "list"}\xe2\x80\xa8',
    b'{"cmd": "list", "cmd": "nope"}',
    b'{"cmd": null}',
    b"[" * 100_000 + b"]" * 100_000,
]


@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x00")
@example(b"\xff\xfe")
@settings(max_examples=300, deadline=None)
def test_decoders_answer_arbitrary_bytes_with_a_request_or_a_hive_error(line: bytes) -> None:
    _check_decode(HOST_DECODER, wire.HostRequest, line)
    _check_decode(AGENT_DECODER, wire.AgentRequest, line)


@pytest.mark.parametrize("line", HOSTILE_EXAMPLES, ids=range(len(HOSTILE_EXAMPLES)))
def test_decoders_answer_hostile_examples_with_a_request_or_a_hive_error(line: bytes) -> None:
    _check_decode(HOST_DECODER, wire.HostRequest, line)
    _check_decode(AGENT_DECODER, wire.AgentRequest, line)


@given(
    json_values(st.integers()) | request_dicts(st.integers()) | wrong_types(st.integers()),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_decoders_answer_arbitrary_json_with_a_request_or_a_hive_error(
    value: object, ascii_only: bool
) -> None:
    line = dump(value, ascii_only)
    _check_decode(HOST_DECODER, wire.HostRequest, line)
    _check_decode(AGENT_DECODER, wire.AgentRequest, line)


def test_deep_nesting_is_a_parse_error() -> None:
    nested = b"[" * 5000 + b"]" * 5000
    with pytest.raises(HiveError) as err:
        HOST_DECODER.decode(b'{"cmd": "list", "x": ' + nested + b"}")
    assert err.value.code in ("parse_error", "invalid_request")


# ----------------------------------------------------------------------------- a live daemon

AGENT = "fz"

TOKENS = [
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"-0",
    b"0.0",
    b"NaN",
    b"Infinity",
    b"01",
    b"9223372036854775807",
    b"-9223372036854775808",
    b'"\\u0000"',
    b'"a\\u0000b"',
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\xed\xa0\x80"',
    '"\u2028\u2029"'.encode(),
    b'"\\u2028"',
    b'"\xef\xbb\xbfx"',
    b'"\\r\\n"',
    b'"\xff"',
    '"{}"'.format("\U0001f41d" * 70_000).encode(),
    b"[]",
    b"{}",
    b"null",
    b"true",
    b'"operator"',
    b'"*"',
    b'"hm1nd"',
]


def _token_line(cmd: str, field: str, token: bytes) -> bytes:
    return b'{"cmd": "%s", "%s": %s}' % (cmd.encode(), field.encode(), token)


def _nested(depth: int, inside: str | None, kind: str) -> bytes:
    """Arrays or objects nested `depth` deep, alone or as a field of a request."""
    body = (
        b"[" * depth + b"]" * depth if kind == "array" else b'{"a":' * depth + b"1" + b"}" * depth
    )
    return body if inside is None else b'{"cmd": "%s", "x": %s}' % (inside.encode(), body)


def _sized(size: int) -> bytes:
    """A well-formed `list` request of exactly `size` bytes (padding is an unknown field)."""
    head, tail = b'{"cmd": "list", "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _body(size: int, cmd: str) -> bytes:
    return b'{"cmd": "%s", "to": "operator", "body": "%s"}' % (cmd.encode(), b"y" * size)


def _no_newline(line: bytes) -> bytes:
    return line.replace(b"\n", b"")


def _garnish(line: bytes, how: str) -> bytes:
    match how:
        case "bom":
            return b"\xef\xbb\xbf" + line
        case "ls":
            return line + "\u2028".encode()
        case "garbage":
            return line + b" }"
        case "crlf":
            return line + b"\r"
    return line


HOSTILE_LINE: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=2048).map(_no_newline),
    st.builds(
        dump,
        json_values(INT64) | request_dicts(INT64) | wrong_types(INT64),
        st.booleans(),
    ).map(_no_newline),
    st.builds(
        _token_line, st.sampled_from(COMMANDS), st.sampled_from(FIELDS), st.sampled_from(TOKENS)
    ).map(_no_newline),
    st.builds(
        _nested,
        st.integers(1, MAX_NESTING),
        st.sampled_from(COMMANDS),
        st.sampled_from(["array", "object"]),
    ),
    st.builds(_nested, st.integers(1, MAX_NESTING), st.none(), st.just("object")),
    st.builds(_nested, st.integers(1, 100_000), st.none(), st.just("array")),
    st.builds(_sized, st.integers(1000, 900_000) | st.integers(MAX_LINE - 4, MAX_LINE + 4)),
    st.builds(_body, st.integers(200_000, 300_000), st.sampled_from(["send", "wake"])),
).flatmap(
    lambda line: st.sampled_from(["", "", "", "bom", "ls", "garbage", "crlf"]).map(
        lambda how: _garnish(line, how)
    )
)


def _harmless(line: bytes) -> bool:
    """Leave out the few valid requests whose effects are legitimately slow or far-reaching:
    creating or stopping agents (containers), and `recv` parking for up to 180 s. Everything
    else that decodes is fair game, including `subscribe` (handled by the replay)."""
    for decoder in (HOST_DECODER, AGENT_DECODER):
        try:
            request = decoder.decode(line)
        except HiveError:
            continue
        match request:
            case (
                wire.Spawn(name=name)
                | wire.Start(name=name)
                | wire.Restart(name=name)
                | wire.Kill(name=name)
                | wire.Destroy(name=name)
            ) if is_valid_name(name):
                return False
            case wire.Recv(wait_seconds=wait) if wait is not None and wait > 0:
                return False
    return True


REPLY_LIMIT = 64 * MAX_LINE
"""`flow` after a few 250 KB messages legitimately answers with more than a request may hold."""


class _Replayer:
    """One connection to one socket, reopened whenever the daemon (rightly) closes it."""

    def __init__(self, sock: str, decoder: RequestDecoder[object]) -> None:
        self.sock = sock
        self.decoder = decoder
        self.lines: LineStream | None = None
        self.seen: set[str] = set()

    async def _connection(self) -> LineStream:
        if self.lines is None:
            self.lines = LineStream(await trio.open_unix_socket(self.sock), max_line=REPLY_LIMIT)
        return self.lines

    async def _reopen(self) -> None:
        if self.lines is not None:
            await self.lines.aclose()
        self.lines = None

    async def replay(self, line: bytes) -> None:
        lines = await self._connection()
        try:
            await lines.send_line(line + b"\n")
        except trio.BrokenResourceError:
            # An over-long line: the daemon hung up before taking all of it.
            assert len(line) > MAX_LINE, f"daemon hung up on {line[:80]!r}"
        try:
            raw = await lines.receive_line()
        except trio.BrokenResourceError:
            raw = None
        assert raw is not None, f"no reply to {line[:80]!r}"
        reply = msgspec.json.decode(raw)
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), raw[:200]
        self.seen.add(str(reply.get("code", "ok")))
        if reply["ok"]:
            if _is_subscribe(self.decoder, line):
                assert reply == {"ok": True, "subscribed": True}
                await self._reopen()
            return
        code, error = reply.get("code"), reply.get("error")
        assert code in ERROR_CODES and code != "internal", (line[:80], reply)
        assert isinstance(error, str) and error.strip(), reply
        if code in ("line_too_long", "busy"):
            assert code == "busy" or len(line) > MAX_LINE
            with trio.move_on_after(5):
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await lines.receive_line() is None
            await self._reopen()
        else:
            assert len(line) <= MAX_LINE, "an over-long line must be refused"

    async def aclose(self) -> None:
        if self.lines is not None:
            await self.lines.aclose()


def _is_subscribe(decoder: RequestDecoder[object], line: bytes) -> bool:
    try:
        return isinstance(decoder.decode(line), wire.Subscribe)
    except HiveError:
        return False


async def _well_behaved(hive: Hive) -> None:
    """A client on the side of the abuse still gets correct answers."""
    listed = await hive.call(wire.ListAgents())
    assert [a.name for a in listed.agents] == [AGENT]
    async with open_client(hive.agent_sock(AGENT)) as client:
        status = await client.call(wire.Status())
        assert status.name == AGENT


async def _replay_against_a_daemon(lines: list[bytes]) -> set[str]:
    """Replay `lines` on host.sock, then on an agent socket; returns the reply codes seen."""
    seen: set[str] = set()
    root = short_tmpdir()
    try:
        with trio.fail_after(60):
            async with open_hive(hive_config(root)) as hive:
                await hive.call(wire.Spawn(name=AGENT))
                await hive.call(wire.Kill(name=AGENT))
                # Side connections that stay open through the abuse (first line sent at once,
                # so they are past the first-line timeout).
                async with (
                    open_client(hive.sock) as host_side,
                    open_client(hive.agent_sock(AGENT)) as agent_side,
                ):
                    await host_side.call(wire.ListAgents())
                    await agent_side.call(wire.Status())
                    for sock, decoder in (
                        (hive.sock, HOST_DECODER),
                        (hive.agent_sock(AGENT), AGENT_DECODER),
                    ):
                        replayer = _Replayer(sock, decoder)
                        try:
                            for line in lines:
                                await replayer.replay(line)
                        finally:
                            await replayer.aclose()
                        seen |= replayer.seen
                        await _well_behaved(hive)
                    listed = await host_side.call(wire.ListAgents())
                    assert [a.name for a in listed.agents] == [AGENT]
                    status = await agent_side.call(wire.Status())
                    assert status.name == AGENT
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return seen


# A sync test running one trio.run (and one fresh daemon) per example: Hypothesis drives the
# examples and shrinks a failure to a minimal list of lines, and each example starts from a
# clean daemon, so a failure reproduces on its own. A daemon start costs ~0.1 s.
@given(st.lists(HOSTILE_LINE.filter(_harmless), max_size=40))
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_hostile_lines_get_one_reply_each_and_hurt_nobody(lines: list[bytes]) -> None:
    for code in sorted(trio.run(_replay_against_a_daemon, lines)):
        event(f"reply {code}")


async def test_out_of_range_ids_are_refused_at_the_edge(hive_root: Path) -> None:
    """An agent acks an id no int64 holds while others send: it gets `invalid_request`, and the
    others' sends, committed in the same group-commit batches, must not fail with it."""
    failures: list[bytes] = []
    codes: list[str] = []
    async with open_hive(hive_config(hive_root)) as hive:
        await hive.call(wire.Spawn(name=AGENT))
        await hive.call(wire.Kill(name=AGENT))

        async def hostile() -> None:
            async with open_client(hive.agent_sock(AGENT)) as client:
                for _ in range(30):
                    raw = await client.raw(
                        b'{"cmd": "ack", "id": 99999999999999999999, "attempt": 1}'
                    )
                    codes.append(msgspec.json.decode(raw)["code"])

        async def sender() -> None:
            async with open_client(hive.sock) as client:
                for _ in range(30):
                    raw = await client.raw(b'{"cmd": "send", "to": "operator", "body": "hi"}')
                    if b'"ok":true' not in raw:
                        failures.append(raw)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hostile)
            for _ in range(4):
                nursery.start_soon(sender)
    assert failures == [], f"{len(failures)} innocent sends failed: {failures[0]!r}"
    assert set(codes) == {"invalid_request"}
