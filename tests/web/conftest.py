from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hyperhive.core.tokens import LoginTokens
from hyperhive.protocol import wire
from hyperhive.protocol.names import MANAGER_NAME
from tests.hive import Hive, hive_config, open_hive


@pytest.fixture
async def hive(hive_root: Path) -> AsyncIterator[Hive]:
    """A real daemon with the manager registered but stopped: no claude runs in web tests."""
    async with open_hive(hive_config(hive_root, start_manager=True)) as running:
        await running.call(wire.Kill(name=MANAGER_NAME))
        yield running


@pytest.fixture
def tokens() -> LoginTokens:
    """The login tokens of the web apps a test builds itself (the daemon keeps its own)."""
    return LoginTokens.generate()
