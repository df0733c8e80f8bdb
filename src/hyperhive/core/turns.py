"""Turn records: what each agent's turns took (tokens, cost, time), as its harness reports them.

The harness keeps a finished turn until the daemon has stored it (`report_turns` answers with the
ids it has), so a record survives a harness or daemon restart and is stored once. Aggregates are
per agent: its last turn, today (since midnight UTC), the last 7 days and all time (SPEC §6.2).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from hyperhive.core.agents import AgentRecord, Registry, day_start
from hyperhive.core.store import Store
from hyperhive.protocol import wire

DAY = 86_400.0
_COLUMNS = (
    "id, message_id, started_at, ended_at, model, input, output, cache_read, cache_write,"
    " cost_usd, outcome"
)
_SUMS = (
    "COUNT(*), COALESCE(SUM(input), 0), COALESCE(SUM(output), 0), COALESCE(SUM(cache_read), 0),"
    " COALESCE(SUM(cache_write), 0), COALESCE(SUM(cost_usd), 0.0)"
)


def _store(conn: sqlite3.Connection, agent: str, turns: Sequence[wire.TurnRecord]) -> list[int]:
    """Insert what is new; the indexes (in `turns`) of the records that were."""
    new = []
    for i, t in enumerate(turns):
        cur = conn.execute(
            f"INSERT INTO turns (agent, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (agent, id) DO NOTHING",
            (
                agent,
                t.id,
                t.message_id,
                t.started_at,
                t.ended_at,
                t.model,
                t.input_tokens,
                t.output_tokens,
                t.cache_read_tokens,
                t.cache_write_tokens,
                t.cost_usd,
                t.outcome,
            ),
        )
        if cur.rowcount == 1:
            new.append(i)
    return new


def _record(row: tuple[object, ...]) -> wire.TurnRecord:
    tid, mid, start, end, model, inp, out, cread, cwrite, cost, outcome = row
    return wire.TurnRecord(
        id=str(tid),
        message_id=mid,  # type: ignore[arg-type]
        started_at=float(start),  # type: ignore[arg-type]
        ended_at=float(end),  # type: ignore[arg-type]
        model=str(model),
        input_tokens=int(inp),  # type: ignore[call-overload]
        output_tokens=int(out),  # type: ignore[call-overload]
        cache_read_tokens=int(cread),  # type: ignore[call-overload]
        cache_write_tokens=int(cwrite),  # type: ignore[call-overload]
        cost_usd=float(cost),  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
    )


def _usage(row: tuple[int, int, int, int, int, float]) -> wire.Usage:
    turns, inp, out, cread, cwrite, cost = row
    return wire.Usage(
        turns=turns,
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cread,
        cache_write_tokens=cwrite,
        cost_usd=cost,
    )


def _stats(conn: sqlite3.Connection, agent: str, now: float) -> wire.AgentStats:
    today = day_start(now)
    sums = [
        _usage(
            conn.execute(
                f"SELECT {_SUMS} FROM turns WHERE agent = ? AND ended_at >= ?", (agent, since)
            ).fetchone()
        )
        for since in (today, now - 7 * DAY, 0.0)
    ]
    last = conn.execute(
        f"SELECT {_COLUMNS} FROM turns WHERE agent = ? ORDER BY ended_at DESC, id DESC LIMIT 1",
        (agent,),
    ).fetchone()
    return wire.AgentStats(
        name=agent,
        last_turn=None if last is None else _record(last),
        today=sums[0],
        week=sums[1],
        total=sums[2],
    )


def _agents(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT DISTINCT agent FROM turns ORDER BY agent")]


def _summary(conn: sqlite3.Connection, now: float) -> dict[str, tuple[float | None, float]]:
    """Per agent: (its last turn's end, today's cost), in one pass, for `list`."""
    today = day_start(now)
    rows = conn.execute(
        "SELECT agent, MAX(ended_at), COALESCE(SUM(CASE WHEN ended_at >= ? THEN cost_usd END),"
        " 0.0) FROM turns GROUP BY agent",
        (today,),
    )
    return {agent: (last, cost) for agent, last, cost in rows}


class Turns:
    def __init__(self, store: Store, registry: Registry) -> None:
        self._store = store
        self._registry = registry

    async def load(self) -> None:
        """At start-up: each agent's last turn and today's cost, for `list`."""
        summary = await self._store.run(_summary, time.time())
        today = day_start(time.time())
        for rec in self._registry.all():
            last, cost = summary.get(rec.name, (None, 0.0))
            self._registry.note_quietly(rec, last_turn_at=last, cost_today=cost, cost_day=today)

    async def record(self, rec: AgentRecord, turns: Sequence[wire.TurnRecord]) -> list[str]:
        """Store an agent's reported turns (a repeat is a no-op); the ids the daemon now has."""
        if not turns:
            return []
        new = [turns[i] for i in await self._store.run(_store, rec.name, turns)]
        if new:
            today = day_start(time.time())
            cost = rec.cost_today if rec.cost_day == today else 0.0
            cost += sum(t.cost_usd for t in new if t.ended_at >= today)
            last = max(t.ended_at for t in new)
            if rec.last_turn_at is not None:
                last = max(last, rec.last_turn_at)
            failures = rec.turn_failures
            for t in sorted(new, key=lambda t: t.ended_at):
                if t.outcome == "error":
                    failures += 1
                elif t.outcome in ("ok", "compacted"):
                    failures = 0
            self._registry.note(
                rec, last_turn_at=last, cost_today=cost, cost_day=today, turn_failures=failures
            )
        return [t.id for t in turns]

    async def stats(self, agent: str) -> wire.AgentStats:
        return await self._store.run(_stats, agent, time.time())

    async def agents(self) -> list[str]:
        """Every agent the daemon has turn records of (destroyed and purged ones included)."""
        return await self._store.run(_agents)
