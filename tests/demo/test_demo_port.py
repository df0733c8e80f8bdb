"""`--demo`: the scripted model comes back on the port it had, so containers that outlived a
killed daemon (their ANTHROPIC_BASE_URL is the old one) keep working; a port now taken by a
stranger is given up for a new one."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.conftest import needs_bwrap
from tests.hive import hive_config, open_hive

from hyperhive.app import DEMO_PORT_FILE

pytestmark = needs_bwrap


async def test_the_scripted_model_keeps_its_port_across_restarts(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive:
        first = hive.info.model_url
    assert first is not None
    port = urlsplit(first).port
    assert (cfg.state_dir / DEMO_PORT_FILE).read_text() == f"{port}\n"
    async with open_hive(cfg) as hive:
        assert hive.info.model_url == first

    stranger = socket.socket()
    stranger.bind(("127.0.0.1", port or 0))
    stranger.listen(1)
    with stranger:
        async with open_hive(cfg) as hive:
            moved = hive.info.model_url
        assert moved is not None and moved != first
        assert (cfg.state_dir / DEMO_PORT_FILE).read_text() == f"{urlsplit(moved).port}\n"


@pytest.mark.parametrize("junk", ["", "not a port", "99999", "-1"])
async def test_a_port_file_that_says_nothing_useful_gets_a_new_port(
    hive_root: Path, junk: str
) -> None:
    cfg = hive_config(hive_root, demo=True)
    cfg.state_dir.mkdir(parents=True)
    (cfg.state_dir / DEMO_PORT_FILE).write_text(junk)
    async with open_hive(cfg) as hive:
        assert hive.info.model_url is not None
    assert (cfg.state_dir / DEMO_PORT_FILE).read_text().strip().isdigit()
