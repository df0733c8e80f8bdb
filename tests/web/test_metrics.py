"""GET /metrics on the dashboard: the hive's Prometheus metrics, behind the login token, parsed
with prometheus-client's own parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.remote import remote_endpoint
from tests.hive import hive_config, open_hive


def _get(url: str, token: str | None) -> tuple[int, str, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


async def test_metrics_are_scraped_and_parse(hive_root: Path) -> None:
    cfg = hive_config(hive_root, dashboard_port=0, start_manager=True)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        for i in range(3):
            await hive.call(wire.OperatorSend(to="alice", body=f"hello {i}"))
        await call_once(hive.agent_sock("hm1nd"), wire.RequestSpawn(name="bob"))
        assert hive.info.login_url is not None
        ws_url, token = remote_endpoint(hive.info.login_url)
        url = ws_url.replace("ws://", "http://").removesuffix("/ws") + "/metrics"

        status, _, body = await trio.to_thread.run_sync(_get, url, None)
        assert status == 401 and "unauthorized" in body
        status, content_type, text = await trio.to_thread.run_sync(_get, url, token)
    assert status == 200 and content_type == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        raise AssertionError(f"no {name} {labels}")

    assert value("hive_agents", state="stopped") == 2
    assert value("hive_agents_attention", attention="stopped") == 2
    assert value("hive_agent_unread", agent="alice") >= 3  # and the spawn kick
    assert value("hive_agent_oldest_unread_seconds", agent="alice") > 0
    assert value("hive_messages", state="queued") >= 3
    assert value("hive_approvals_pending") == 1
    # The broker's group commit: how long a batch took, and how big it was.
    commits = families["hive_broker_commit_seconds"]
    count = [s.value for s in commits.samples if s.name == "hive_broker_commit_seconds_count"]
    assert count and count[0] > 0
    assert "hive_broker_batch_operations" in families
