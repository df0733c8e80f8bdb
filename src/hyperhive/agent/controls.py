"""What the agent's page may steer about the harness's turns: the model, a fresh session, a
compaction, cancel."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from hyperhive.agent.compaction import compact_at
from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol.text import check_model

log = logging.getLogger(__name__)


class Controls:
    """The one owner of the turn loop's steerable state (the page's `AgentControls`).

    The page calls `set_model`, `request_new_session`, `request_compact` and `cancel_turn`; the
    turn loop runs each turn inside `with controls.turn() as cancel:` and asks
    `take_new_session()` before it, `take_compact()` between turns.
    """

    def __init__(self, settings: HarnessSettings) -> None:
        self._settings = settings
        self._model = self._read_model() or settings.model
        self._new_session = False
        self._compact = False
        self._compact_asked = trio.Event()
        self._turn_scope: trio.CancelScope | None = None
        self._turns = 0

    def _read_model(self) -> str:
        try:
            return self._settings.model_file.read_text("utf-8").strip()
        except OSError:
            return ""

    @property
    def model(self) -> str:
        """The model the next turn runs with (the operator's choice survives restarts)."""
        return self._model

    def set_model(self, model: str) -> None:
        model = check_model(model)
        self._model = model
        try:
            self._settings.model_file.write_text(model + "\n", "utf-8")
        except OSError as exc:
            log.warning("cannot persist model choice: %s", exc)

    def request_new_session(self) -> None:
        """The next turn starts a fresh claude session instead of continuing the last one."""
        self._new_session = True

    def take_new_session(self) -> bool:
        """Was a fresh session asked for since the last call? (The request is used up.)"""
        asked, self._new_session = self._new_session, False
        return asked

    @property
    def compact_at(self) -> int:
        """The watermark: above this context (tokens) the harness compacts between turns."""
        return compact_at(self._model, self._settings.compact_at_tokens)

    def request_compact(self) -> None:
        """Compact claude's context now if no turn is running, else right after the turn."""
        self._compact = True
        self._compact_asked.set()

    def take_compact(self) -> bool:
        """Was a compaction asked for since the last call? (The request is used up.)"""
        asked, self._compact = self._compact, False
        if self._compact_asked.is_set():
            self._compact_asked = trio.Event()
        return asked

    async def wait_compact_asked(self) -> None:
        """Return once a compaction is asked for (at once if one is pending)."""
        await self._compact_asked.wait()

    @property
    def turns(self) -> int:
        """How many turns ran to the end of their `turn()` block."""
        return self._turns

    @property
    def turn_running(self) -> bool:
        return self._turn_scope is not None

    @contextmanager
    def turn(self) -> Iterator[trio.CancelScope]:
        """One turn: `cancel_turn` cancels the scope given here until the block ends."""
        if self._turn_scope is not None:
            raise RuntimeError("a turn is already running")
        scope = trio.CancelScope()
        self._turn_scope = scope
        try:
            yield scope
        finally:
            self._turn_scope = None
        self._turns += 1

    async def cancel_turn(self) -> bool:
        """Cancel the running turn; False when none is running."""
        if self._turn_scope is None:
            return False
        self._turn_scope.cancel()
        return True
