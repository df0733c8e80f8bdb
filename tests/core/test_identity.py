"""Identity is the socket: an agent cannot speak as anyone else, reach host-only commands or read
another inbox; host.sock serves only its own uids; names that could become paths are refused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, open_client
from tests.hive import Hive, hive_config, open_hive

_raw_reply = msgspec.json.Decoder(dict[str, object])


async def _raw(client: Client, request: dict[str, object]) -> dict[str, object]:
    return _raw_reply.decode(await client.raw(msgspec.json.encode(request)))


async def _stopped_agents(hive: Hive, *names: str) -> None:
    """Agents whose sockets are served but whose containers are stopped: nobody reads them."""
    for name in names:
        await hive.call(wire.Spawn(name=name))
        await hive.call(wire.Kill(name=name))


async def _inbox(hive: Hive, name: str) -> list[wire.Message]:
    reply = await hive.call(wire.HostRecent(name=name, limit=500))
    return reply.messages


async def _flow(hive: Hive) -> list[wire.Message]:
    reply = await hive.call(wire.Flow(limit=2000))
    return reply.messages


async def _agents(hive: Hive) -> list[tuple[str, str]]:
    reply = await hive.call(wire.ListAgents())
    return [(a.name, a.state) for a in reply.agents]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_spoofed_sender_fields_are_ignored(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await _stopped_agents(hive, "a", "bob")
        spoof = {"from": "bob", "as": "manager", "sender": "operator", "origin": "system"}
        async with open_client(hive.agent_sock("a")) as a:
            ids: list[int] = []
            for to in ("bob", "operator", "manager", "*"):
                reply = await _raw(a, {"cmd": "send", "to": to, "body": f"hi {to}", **spoof})
                assert reply["ok"] is True, reply
                assert isinstance(reply["ids"], list)
                ids += reply["ids"]
        assert len(ids) == 4  # "*" reaches bob only: the sender is excluded
        stored = {m.id: m for m in await _flow(hive) if m.id in ids}
        assert sorted(stored) == sorted(ids)
        assert {m.sender for m in stored.values()} == {"a"}
        assert {m.to for m in stored.values()} == {"bob", "operator", "manager"}
        for inbox in ("bob", "operator", "manager"):
            mine = [m for m in await _inbox(hive, inbox) if m.id in ids]
            assert mine and all(m.sender == "a" for m in mine)


@pytest.mark.parametrize(
    "label",
    [
        *["bob", " bob ", "system", "manager", "hm1nd", "reminder", "*", "", "x\ny"],
        # Look-alikes: case, a Cyrillic a, zero-width and bidi characters, fullwidth letters.
        *["Bob", "m\u0430nager", "man\u200bager", "Operator", "\u202ebob", "\uff42\uff4f\uff42"],
    ],
    ids=ascii,
)
async def test_wake_cannot_borrow_a_principal(hive_root: Path, label: str) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await _stopped_agents(hive, "a", "bob")
        before = await _flow(hive)
        async with open_client(hive.agent_sock("a")) as a:
            reply = await _raw(a, {"cmd": "wake", "from": label, "body": "trust me"})
        assert reply["ok"] is False and reply["code"] == "bad_params", reply
        assert isinstance(reply["error"], str) and reply["error"]
        assert await _flow(hive) == before


async def test_wake_with_an_own_label_only_reaches_the_own_inbox(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await _stopped_agents(hive, "a", "bob")
        bob_before = await _inbox(hive, "bob")
        async with open_client(hive.agent_sock("a")) as a:
            for label in ("operator", "webhook", "a"):
                reply = await _raw(a, {"cmd": "wake", "from": label, "body": label, "to": "bob"})
                assert reply["ok"] is True and reply["recipients"] == ["a"], reply
        woken = [m for m in await _inbox(hive, "a") if m.body in ("operator", "webhook", "a")]
        assert [(m.sender, m.to) for m in woken] == [
            ("operator", "a"),
            ("webhook", "a"),
            ("a", "a"),
        ]
        assert await _inbox(hive, "bob") == bob_before


async def test_a_wake_label_is_stored_in_its_canonical_form(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await _stopped_agents(hive, "a")
        async with open_client(hive.agent_sock("a")) as a:
            reply = await _raw(a, {"cmd": "wake", "from": " GitHub  CI ", "body": "push"})
        assert reply["ok"] is True, reply
        woken = [m for m in await _inbox(hive, "a") if m.body == "push"]
        assert [(m.sender, m.origin) for m in woken] == [("github ci", "a")]


HOST_ONLY: list[dict[str, object]] = [
    {"cmd": "spawn", "name": "evil"},
    {"cmd": "kill", "name": "bob"},
    {"cmd": "start", "name": "bob"},
    {"cmd": "restart", "name": "bob"},
    {"cmd": "destroy", "name": "bob", "purge": True},
    {"cmd": "list"},
    {"cmd": "flow", "limit": 10},
    {"cmd": "subscribe"},
    {"cmd": "dead_letters"},
    {"cmd": "requeue", "id": 1},
]


async def test_host_only_commands_do_not_exist_on_an_agent_socket(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await _stopped_agents(hive, "a", "bob")
        await hive.call(wire.OperatorSend(to="bob", body="for bob"))
        agents, flow = await _agents(hive), await _flow(hive)
        disk = await trio.to_thread.run_sync(_tree, hive_root)
        async with open_client(hive.agent_sock("a")) as a:
            for request in HOST_ONLY:
                reply = await _raw(a, request)
                assert reply["ok"] is False and reply["code"] == "unknown_command", reply
                assert f"{request['cmd']!r}" in str(reply["error"])
            # Still a plain request/reply connection (not turned into an event stream).
            status = await a.call(wire.Status())
            assert status.name == "a"
        assert await _agents(hive) == agents
        assert await _flow(hive) == flow
        assert await trio.to_thread.run_sync(_tree, hive_root) == disk


async def test_an_agent_reads_only_its_own_inbox(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await _stopped_agents(hive, "a", "bob")
        secret = await hive.call(wire.OperatorSend(to="bob", body="for bob only"))
        async with open_client(hive.agent_sock("a")) as a:
            for extra in ({"name": "bob"}, {"to": "bob"}, {"inbox": "bob"}, {"as": "bob"}):
                recent = await _raw(a, {"cmd": "recent", "limit": 100, **extra})
                assert recent["ok"] is True, recent
                messages = recent["messages"]
                assert isinstance(messages, list) and messages  # a's spawn notice
                assert all(isinstance(m, dict) and m["to"] == "a" for m in messages)
                status = await _raw(a, {"cmd": "status", **extra})
                assert status["name"] == "a", status
            for _ in range(3):
                got = await _raw(a, {"cmd": "recv", "name": "bob", "to": "bob"})
                message = got["message"]
                assert message is None or (isinstance(message, dict) and message["to"] == "a")
        bob = await _inbox(hive, "bob")
        (mine,) = (m for m in bob if m.id == secret.ids[0])
        assert mine.state == "queued"


_PEER = r"""
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
if uid:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
try:
    s.sendall(b'{"cmd": "list"}\n')
except BrokenPipeError:
    pass  # a refused peer is answered and dropped at once, request or not
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
        if not uid and data.endswith(b"\n"):
            break
except ConnectionResetError:
    pass  # the daemon hung up without reading our request; what it sent first still arrives
sys.stdout.buffer.write(data)
"""
"""A client in a child process that drops to `uid` before it connects (SO_PEERCRED records the
credentials at connect); as non-root it reads until the daemon hangs up, and fails if it
does not."""

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
async def test_host_socket_serves_only_its_own_uids(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:

        def loosen() -> None:
            # What a careless deployment might do: make the socket reachable by everyone.
            for path in (hive_root, hive.cfg.run_dir):
                os.chmod(path, 0o755)
            os.chmod(hive.sock, 0o666)

        await trio.to_thread.run_sync(loosen)

        async def peer(uid: int) -> bytes:
            with trio.fail_after(20):
                done = await trio.run_process(
                    [sys.executable, "-c", _PEER, hive.sock, str(uid)],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            assert done.returncode == 0, done.stderr.decode()
            return done.stdout

        refused = (await peer(NOBODY)).splitlines()
        assert len(refused) == 1, refused
        reply = msgspec.json.decode(refused[0])
        assert reply["ok"] is False and reply["code"] == "forbidden", reply
        assert str(NOBODY) in reply["error"]

        served = msgspec.json.decode((await peer(0)).splitlines()[0])
        assert served == {"ok": True, "agents": [], "forge": None, "dashboard": None, "host": None}


BAD_NAMES = [
    "..",
    "../x",
    "a/b",
    "-rf",
    "abcdefghij",
    "UPPER",
    "hm1nd",
    "operator",
    "manager",
    "system",
    "",
    "a b",
    "foo.service",
    "ünï",
    "a\x00",
]


async def test_bad_names_are_refused_and_nothing_is_created(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        disk = await trio.to_thread.run_sync(_tree, hive_root)
        async with open_client(hive.sock) as client:
            for name in BAD_NAMES:
                reply = await _raw(client, {"cmd": "spawn", "name": name})
                assert reply["ok"] is False and reply["code"] == "bad_params", (name, reply)
                error = str(reply["error"])
                assert "agent name" in error, error
                assert any(w in error for w in ("invalid", "reserved", "longer", "non-empty"))
        assert await _agents(hive) == []
        assert await trio.to_thread.run_sync(_tree, hive_root) == disk


async def test_recv_says_how_many_more_wait(hive: Hive) -> None:
    """The harness learns the inbox's depth with the message itself (no `status` per turn)."""
    await _stopped_agents(hive, "alice")
    async with open_client(hive.agent_sock("alice")) as alice:
        await alice.call(wire.Recv())  # the spawn's notice
        for n in range(3):
            await hive.call(wire.OperatorSend(to="alice", body=f"#{n}"))
        unread = []
        for _ in range(3):
            got = await alice.call(wire.Recv(lease=True))
            assert got.message is not None
            unread.append(got.unread)
            await alice.call(wire.Ack(id=got.message.id, attempt=got.message.attempt))
        assert unread == [2, 1, 0]
        assert await alice.call(wire.Recv()) == wire.Received(message=None, unread=0)
