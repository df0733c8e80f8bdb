"""Turn records from the harness's reporter to the daemon, over a real agent socket: stored once,
re-sent after the daemon was away, aggregated for `list` and `stats`; the state reported."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import trio

from hyperhive.agent.bus import LiveBus, Note, open_history
from hyperhive.agent.claude import Spent
from hyperhive.agent.turns import TurnReporter, make_record
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from tests.hive import hive_config, open_hive, subscription, wait_for_event


def _turn(cost: float, *, ago: float = 0.0, mid: int | None = 1) -> wire.TurnRecord:
    spent = Spent(input_tokens=100, output_tokens=20, cache_read_tokens=5, cost_usd=cost)
    record = make_record(
        started_at=time.time() - ago - 2, model="haiku", spent=spent, outcome="ok", message_id=mid
    )
    return msgspec.structs.replace(record, ended_at=time.time() - ago)


async def test_reports_are_stored_once_and_aggregated(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        sock = hive.agent_sock("alice")
        old, new = _turn(0.5, ago=8 * 86_400), _turn(0.25)
        stored = await call_once(sock, wire.ReportTurns(turns=[old, new]))
        assert stored.ids == [old.id, new.id]
        # Sent again (a harness that never saw the reply): stored once.
        assert (await call_once(sock, wire.ReportTurns(turns=[new]))).ids == [new.id]

        [stats] = (await hive.call(wire.Stats(name="alice"))).agents
        assert stats.total.turns == 2 and stats.week.turns == 1
        assert abs(stats.total.cost_usd - 0.75) < 1e-9
        assert stats.total.input_tokens == 200 and stats.total.output_tokens == 40
        assert stats.last_turn is not None and stats.last_turn.id == new.id
        [info] = (await hive.call(wire.ListAgents())).agents
        assert abs(info.cost_today - 0.25) < 1e-9
        assert info.last_turn_at == new.ended_at

        await call_once(sock, wire.ReportState(state="compacting", since=time.time()))
        [info] = (await hive.call(wire.ListAgents())).agents
        assert info.turn_state == "compacting" and info.turn_since is not None

        # Another agent cannot report for alice; bad records are refused with the reason.
        try:
            await call_once(
                sock, wire.ReportTurns(turns=[wire.TurnRecord(id="x y", started_at=1, ended_at=1)])
            )
        except Exception as exc:
            assert "id" in str(exc)
        else:
            raise AssertionError("a bad turn id was accepted")
        everyone = (await hive.call(wire.Stats())).agents
        assert [a.name for a in everyone] == ["alice"]


async def test_the_outbox_survives_until_the_daemon_has_it(hive_root: Path) -> None:
    """Turns recorded while the daemon is away are sent when it is back; the state too."""
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        sock = hive.agent_sock("alice")
    # The daemon is gone. The harness (its bus, history and reporter) records two turns.
    async with open_history(str(hive_root / "events.sqlite")) as history:
        bus = LiveBus(history=history)
        await bus.start()
        reporter = TurnReporter(sock, bus, history)
        turns = [_turn(0.1), _turn(0.2, mid=None)]
        for turn in turns:
            await reporter.record(turn)
        assert len(await history.pending_turns(10)) == 2
        await bus.set_state("thinking")
        async with open_hive(cfg) as hive, trio.open_nursery() as nursery:
            async with subscription(hive.sock) as events:
                await nursery.start(reporter.serve)

                def reported(event: wire.HiveEvent) -> bool:
                    return (
                        isinstance(event, wire.AgentChanged)
                        and event.agent.name == "alice"
                        and event.agent.turn_state == "thinking"
                        and event.agent.last_turn_at is not None
                    )

                await wait_for_event(events, reported)
            [stats] = (await hive.call(wire.Stats(name="alice"))).agents
            assert stats.total.turns == 2
            assert await history.pending_turns(10) == []
            nursery.cancel_scope.cancel()


async def test_history_is_pruned_by_age_and_count(tmp_path: Path) -> None:
    async with open_history(str(tmp_path / "events.sqlite")) as history:
        bus = LiveBus(history=history)
        await bus.start()
        for i in range(30):
            await bus.emit(Note(text=f"event {i}"))
        assert len(await history.tail(100)) == 30
        assert await history.prune(keep_days=21, keep_events=10) == 20
        assert len(await history.tail(100)) == 10
        assert await history.prune(keep_days=0, keep_events=10) == 10
