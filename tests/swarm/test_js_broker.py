"""The JetStream broker against a real 3-node cluster: the delivery contract of SPEC §5."""

from __future__ import annotations

from pathlib import Path

import trio

from hyperhive.swarm.cluster import Cluster
from tests.hive import resolve_direct
from tests.swarm.conftest import open_js_broker


async def test_a_message_sent_on_one_host_is_leased_and_acked_on_another(
    cluster: Cluster, swarm_root: Path
) -> None:
    async with (
        open_js_broker(swarm_root / "h1", cluster.urls, "h1", resolve_direct) as (_, h1),
        open_js_broker(swarm_root / "h2", cluster.urls, "h2", resolve_direct) as (_, h2),
    ):
        [sent] = await h1.send("alice", "bob", "hello", origin="alice")
        got = await h2.recv("bob", 5, lease=True)
        assert got is not None
        assert (got.id, got.body, got.attempt, got.state) == (sent.id, "hello", 1, "leased")
        assert await h2.ack("bob", got.id, 1)
        assert await h2.recv("bob", 0, lease=True) is None
        with trio.fail_after(5):
            assert await h2.counts("bob") == (0, 0)
