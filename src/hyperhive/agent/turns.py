"""What the harness tells the daemon about its turns: each finished turn's record (tokens, cost,
time, outcome) and what it is doing now (SPEC §6.2).

A record goes to the outbox in `/state/hyperhive-events.sqlite` first and leaves it only once the
daemon answered that it has it: a record survives a harness restart, a daemon restart and a lost
connection, and the daemon stores each once (by its id). The reporter has its own connection to
the agent's socket, so the turn loop never waits for it.
"""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
import trio

from hyperhive.agent.bus import History, LiveBus
from hyperhive.agent.claude import Spent, TurnResult
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, open_client
from hyperhive.protocol.errors import HiveError

log = logging.getLogger(__name__)

BATCH = 100
RECONNECT_MAX = 10.0
PRUNE_EVERY = 600.0
"""Seconds between two prunings of the event history (it also runs at start)."""

_record_decoder = msgspec.json.Decoder(wire.TurnRecord)


def outcome_of(result: TurnResult) -> wire.TurnOutcome:
    if result.cancelled:
        return "cancelled"
    if result.abandoned:
        return "abandoned"
    if result.transient or result.auth_failed:
        return "transient"  # not the agent's doing: rate limited, overloaded, logged out
    return "ok" if result.ok else "error"


def make_record(
    *,
    started_at: float,
    model: str,
    spent: Spent,
    outcome: wire.TurnOutcome,
    message_id: int | None,
) -> wire.TurnRecord:
    return wire.TurnRecord(
        id=f"{int(started_at * 1000)}-{uuid.uuid4().hex[:12]}",
        started_at=started_at,
        ended_at=max(time.time(), started_at),
        model=model[:128],
        input_tokens=spent.input_tokens,
        output_tokens=spent.output_tokens,
        cache_read_tokens=spent.cache_read_tokens,
        cache_write_tokens=spent.cache_write_tokens,
        cost_usd=min(max(spent.cost_usd, 0.0), 1e6),
        outcome=outcome,
        message_id=message_id,
    )


class TurnReporter:
    def __init__(
        self,
        socket: str,
        bus: LiveBus,
        history: History,
        *,
        keep_days: int = 21,
        keep_events: int = 200_000,
    ) -> None:
        self.socket = socket
        self.bus = bus
        self.history = history
        self.keep_days = keep_days
        self.keep_events = keep_events
        self._dirty = trio.Event()
        self._last_prune = -PRUNE_EVERY

    async def record(self, turn: wire.TurnRecord) -> None:
        """Keep the record until the daemon has it; the reporter sends it soon."""
        await self.history.put_turn(turn.id, msgspec.json.encode(turn))
        self._dirty.set()
        await self.prune()

    async def prune(self) -> None:
        """The event history's bounds (agent.toml `[history]`), at most every 10 minutes."""
        now = trio.current_time()
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        gone = await self.history.prune(keep_days=self.keep_days, keep_events=self.keep_events)
        if gone:
            log.info("pruned %d events from the history", gone)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report the state and the outbox whenever either changes; reconnect when the daemon
        goes away (a restarted daemon learns the state and the unsent turns again)."""
        await self.prune()
        task_status.started()
        delay = 0.5
        while True:
            try:
                async with open_client(self.socket) as client:
                    delay = 0.5
                    sent_state: tuple[str, float] | None = None
                    while True:
                        self._dirty = trio.Event()
                        changed = self.bus.state_changed
                        state = (self.bus.state, self.bus.state_since)
                        if state != sent_state:
                            await client.call(wire.ReportState(state=state[0], since=state[1]))
                            sent_state = state
                        await self._flush(client)
                        if self.bus.state_changed is changed and not self._dirty.is_set():
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(_set_when, changed, nursery.cancel_scope)
                                nursery.start_soon(_set_when, self._dirty, nursery.cancel_scope)
            except HiveError as exc:
                log.warning("turn reports: %s; again in %.1fs", exc.message, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _flush(self, client: Client) -> None:
        while True:
            pending = await self.history.pending_turns(BATCH)
            if not pending:
                return
            turns, bad = [], []
            for tid, raw in pending:
                try:
                    turns.append(_record_decoder.decode(raw))
                except msgspec.DecodeError as exc:
                    log.error("dropping unreadable turn record %s: %s", tid, exc)
                    bad.append(tid)
            await self.history.drop_turns(bad)
            if not turns:
                continue
            stored = await client.call(wire.ReportTurns(turns=turns))
            await self.history.drop_turns(stored.ids)
            if len(stored.ids) < len(turns):
                raise HiveError("the daemon did not store every reported turn")


async def _set_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
