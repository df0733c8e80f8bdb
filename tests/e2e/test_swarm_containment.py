"""The swarm's new surface, tried from inside a real container: an agent in `open` network mode
goes for the NATS servers of its hive (listening on every address of the machine, as a real
host's do) to act as the operator on `hive.host.*.admin`, and for the hosts' NATS credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperhive.core.containers import netns
from hyperhive.protocol import wire
from hyperhive.swarm.cluster import open_cluster, token_file
from tests.conftest import needs_bwrap, needs_claude
from tests.e2e.test_containment import bash_turn
from tests.swarm.conftest import open_hosts

pytestmark = [needs_bwrap, needs_claude, pytest.mark.container]

NATS_PROBE = r"""
import json, socket, sys
port, secret = int(sys.argv[1]), sys.argv[2]
r = {}
for addr in sys.argv[3:]:
    try:
        s = socket.create_connection((addr, port), timeout=3)
    except OSError as exc:
        r[addr] = "unreachable: " + str(exc)
        continue
    s.settimeout(3)
    said = b""
    try:
        said = s.recv(65536)
        s.sendall(b'CONNECT {"verbose":true}\r\nPUB hive.host.h1.admin 34\r\n'
                  b'{"cmd":"destroy","name":"probe"}\r\nPING\r\n')
        while b"PONG" not in said and b"-ERR" not in said:
            chunk = s.recv(65536)
            if not chunk:
                break
            said += chunk
    except OSError as exc:
        said += ("  (" + str(exc) + ")").encode()
    r[addr] = said.decode(errors="replace")
try:
    r["secret"] = open(secret).read()
except OSError as exc:
    r["secret"] = type(exc).__name__
json.dump(r, open("/state/nats.json", "w"))
"""


async def test_an_agent_cannot_reach_or_use_nats(hive_root: Path) -> None:
    token = token_file(hive_root / "nats" / "token")
    async with (
        open_cluster(hive_root / "nats", 1, credentials=token, listen="0.0.0.0") as nats,
        open_hosts(hive_root, nats, ("h1",)) as hosts,
    ):
        h1 = hosts["h1"]
        applied = h1.cfg.state_dir / "applied" / "probe"
        applied.mkdir(parents=True)
        (applied / "agent.toml").write_text('[network]\nmode = "open"\n')
        await h1.call(wire.Spawn(name="probe", host="h1"))
        targets = ["127.0.0.1", "10.0.2.2", *await netns.host_addresses()]
        state = h1.cfg.agent_root("probe") / "state"
        (state / "nats.py").write_text(NATS_PROBE)
        port = nats.nodes[0].port
        await bash_turn(
            h1,
            "probe",
            f"python3 /state/nats.py {port} {token} {' '.join(targets)} > /state/nats.out 2>&1",
        )
        seen = json.loads((state / "nats.json").read_text())
        [probe] = [a for a in (await h1.call(wire.ListAgents())).agents if a.name == "probe"]
    assert probe.state == "running" and probe.network == "open", probe
    assert seen.pop("secret") in ("FileNotFoundError", "PermissionError")
    assert set(seen) == set(targets), "every address was tried"
    for addr, said in seen.items():
        # Not even the way to the server; and were it there, no way in without the token.
        assert said.startswith("unreachable") or (
            "Authorization Violation" in said and "PONG" not in said
        ), (addr, said)
