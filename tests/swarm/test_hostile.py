"""Hostile input on the swarm's shared parts: whatever a NATS client holding the token (a
compromised host, a confused tool) publishes where the daemons listen is refused with a clear
error or set aside, and the hive goes on."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.swarm.cluster import Cluster
from tests.conftest import needs_bwrap
from tests.hive import subscription, wait_for_event
from tests.swarm.conftest import open_hosts

pytestmark = [needs_bwrap]


class RawNats:
    """NATS spoken by hand over a socket (blocking: use it from a thread)."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self._line()  # INFO
        self.sock.sendall(
            b"CONNECT "
            + json.dumps({"auth_token": token, "headers": True}).encode()
            + b"\r\nSUB _INBOX.raw 1\r\nPING\r\n"
        )
        while self._line() != b"PONG":
            pass

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the server hung up"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        head = f"PUB {subject} {reply} {len(payload)}".replace("  ", " ")
        self.sock.sendall(head.encode() + b"\r\n" + payload + b"\r\n")

    def request(self, subject: str, payload: bytes) -> bytes:
        self.publish(subject, payload, "_INBOX.raw")
        while True:
            line = self._line()
            if line.startswith(b"MSG "):
                size = int(line.split()[-1])
                while len(self.buf) < size + 2:
                    self.buf += self.sock.recv(65536)
                data, self.buf = self.buf[:size], self.buf[size + 2 :]
                return data
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")

    def close(self) -> None:
        self.sock.close()


def _abuse(port: int, token: str) -> dict[str, bytes]:
    raw = RawNats(port, token)
    try:
        said = {
            "admin garbage": raw.request("hive.host.h1.admin", b"\xff\xfenot json"),
            "admin unknown": raw.request("hive.host.h1.admin", b'{"cmd":"format_disk"}'),
            "admin bad field": raw.request("hive.host.h1.admin", b'{"cmd":"kill","name":7}'),
            "peer garbage": raw.request("hive.host.h1.peer", b'{"id":"x"}'),
            # Stored (its PubAck awaited) before the test sends a real message after it.
            "inbox garbage": raw.request("hive.inbox.bob", b"\x00garbage, not a message"),
        }
        raw.publish("hive.events.h9", b"{not an event")
        raw.publish("$KV.hive_agents.mallory", b"not an agent record")
        return said
    finally:
        raw.close()


async def test_garbage_on_the_shared_subjects_is_refused_or_set_aside(
    cluster: Cluster, hive_root: Path
) -> None:
    assert cluster.credentials is not None
    token = cluster.credentials.read_text().strip()
    async with open_hosts(hive_root, cluster, ("h1", "h2"), demo=False) as hosts:
        h1, h2 = hosts["h1"], hosts["h2"]
        await h1.call(wire.Spawn(name="bob", host="h1"))
        await h1.call(wire.Kill(name="bob"))
        bob = h1.agent_sock("bob")
        while (await call_once(bob, wire.Recv())).message is not None:
            pass  # the spawn notice
        async with subscription(h1.sock) as events:
            said = await trio.to_thread.run_sync(_abuse, cluster.nodes[0].port, token)
            # The inbox is not stuck behind what is not a message: the next one comes, and
            # the operator is told what was set aside.
            await h2.call(wire.OperatorSend(to="bob", body="a real one"))
            got = await call_once(bob, wire.Recv(wait_seconds=10))
            assert got.message is not None and got.message.body == "a real one"
            await wait_for_event(
                events,
                lambda e: (
                    isinstance(e, wire.MessageSent)
                    and e.message.to == "operator"
                    and "not a hyperhive message" in e.message.body
                ),
            )
        replies = {k: json.loads(v) for k, v in said.items()}
        assert replies.pop("inbox garbage")["stream"] == "HIVE_INBOX"
        assert {k: r["code"] for k, r in replies.items()} == {
            "admin garbage": "parse_error",
            "admin unknown": "unknown_command",
            "admin bad field": "invalid_request",
            "peer garbage": "bad_params",
        }, replies
        dead = await h2.call(wire.DeadLetters(limit=10))
        assert [m.sender for m in dead.messages] == ["?"]
        # Both hosts still list the hive; the bogus record is nobody.
        for host in (h1, h2):
            names = [a.name for a in (await host.call(wire.ListAgents())).agents]
            assert names == ["bob"], names
