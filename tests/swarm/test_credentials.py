"""Whoever reaches a NATS server of the hive could act as its operator (forwarded requests on
`hive.host.*.admin`), so the cluster demands credentials, which only the hosts' daemons hold."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from hyperhive.protocol.errors import BadParams
from hyperhive.swarm.cluster import Cluster
from hyperhive.swarm.hive import check_credentials


def _raw_nats(port: int, connect: Mapping[str, object]) -> bytes:
    """Speak NATS by hand, as anything that reached the port would: CONNECT, then try to act
    as the operator on a host's admin subject; what the server said."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        info = sock.recv(65536)
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["auth_required"] is True
        sock.sendall(
            b"CONNECT " + json.dumps({"verbose": True, **connect}).encode() + b"\r\n"
            b'PUB hive.host.h1.admin 17\r\n{"cmd":"destroy"}\r\nPING\r\n'
        )
        said = b""
        while b"\r\n" not in said or not (b"PONG" in said or b"-ERR" in said):
            chunk = sock.recv(65536)
            if not chunk:
                break
            said += chunk
        return said


async def test_the_cluster_refuses_a_client_without_the_token(cluster: Cluster) -> None:
    port = cluster.nodes[0].port
    refused = await trio.to_thread.run_sync(_raw_nats, port, {})
    assert b"-ERR 'Authorization Violation'" in refused
    wrong = await trio.to_thread.run_sync(_raw_nats, port, {"auth_token": "guess"})
    assert b"-ERR 'Authorization Violation'" in wrong
    assert cluster.credentials is not None
    token = cluster.credentials.read_text().strip()
    let_in = await trio.to_thread.run_sync(_raw_nats, port, {"auth_token": token})
    assert let_in.startswith(b"+OK") and b"PONG" in let_in


def test_the_daemon_refuses_credentials_others_can_read(tmp_path: Path) -> None:
    creds = tmp_path / "nats.token"
    creds.write_text("s3cret\n")
    creds.chmod(0o640)
    with pytest.raises(BadParams, match="readable by it alone"):
        check_credentials(creds)
    creds.chmod(0o600)
    check_credentials(creds)
    link = tmp_path / "link"
    link.symlink_to(creds)
    with pytest.raises(BadParams, match="not a regular file"):
        check_credentials(link)
    with pytest.raises(BadParams, match="No such file"):
        check_credentials(tmp_path / "missing")
    assert os.stat(creds).st_mode & 0o777 == 0o600
