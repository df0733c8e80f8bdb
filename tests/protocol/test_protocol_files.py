"""protocol/ stays in step with the code: the schema is regenerated, the sessions replayed live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from hyperhive.protocol.client import open_client
from hyperhive.protocol.schema import render
from tests.conftest import needs_bwrap
from tests.hive import hive_config, open_hive

ROOT = Path(__file__).resolve().parents[2] / "protocol"
SESSIONS = {
    p.stem: [msgspec.json.decode(line) for line in p.read_text("utf-8").splitlines() if line]
    for p in sorted((ROOT / "examples").glob("*.jsonl"))
}


def test_schema_is_current() -> None:
    committed = (ROOT / "schema.json").read_text("utf-8")
    assert committed == render(), (
        "protocol/schema.json is stale: run `python -m hyperhive.protocol.schema"
        " --write protocol/schema.json`"
    )


def matches(expected: Any, actual: Any) -> bool:
    """`expected` is a subset of `actual`; the string "*" matches any value."""
    if expected == "*":
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


@needs_bwrap
@pytest.mark.parametrize("session", sorted(SESSIONS))
async def test_example_session_replays_against_a_live_daemon(session: str, hive_root: Path) -> None:
    steps = SESSIONS[session]
    assert steps
    # A session that speaks on the manager's socket needs the manager (its container is
    # stopped by the session's first step).
    manager = any(step["socket"] == "agent:hm1nd" for step in steps)
    async with open_hive(hive_config(hive_root, start_manager=manager)) as hive:
        for n, step in enumerate(steps, 1):
            target = step["socket"]
            path = hive.sock if target == "host" else hive.agent_sock(target.split(":", 1)[1])
            line = step["raw"].encode() if "raw" in step else msgspec.json.encode(step["request"])
            async with open_client(path) as client:
                reply = msgspec.json.decode(await client.raw(line))
            assert matches(step["reply"], reply), f"{session} step {n}: got {reply}"
