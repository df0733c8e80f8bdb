"""What core and agent share through protocol/: fan-out, sqlite thread, process stop, text."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from hyperhive.protocol.errors import BadParams
from hyperhive.protocol.fanout import FanOut
from hyperhive.protocol.procgroup import stop_process_group
from hyperhive.protocol.sqlite_thread import open_sqlite_thread
from hyperhive.protocol.text import MAX_MODEL, check_model, check_text


async def test_fanout_drops_a_subscriber_that_falls_behind() -> None:
    fan = FanOut[int](2)
    slow, fast = fan.subscribe(), fan.subscribe()
    for i in range(2):
        fan.send_nowait(i)
    assert [fast.receive_nowait(), fast.receive_nowait()] == [0, 1]
    fan.send_nowait(2)  # slow's channel is full: it is dropped, fast is not held up
    assert len(fan) == 1
    assert fast.receive_nowait() == 2
    assert [slow.receive_nowait(), slow.receive_nowait()] == [0, 1]
    with pytest.raises(trio.EndOfChannel):
        slow.receive_nowait()


async def test_fanout_forgets_a_subscriber_that_went_away() -> None:
    fan = FanOut[int](4)
    fan.subscribe().close()
    fan.send_nowait(1)
    assert len(fan) == 0


async def test_fanout_hands_a_filtered_subscriber_only_its_kinds() -> None:
    fan = FanOut[object](4)
    ints, everything = fan.subscribe((int,)), fan.subscribe()
    assert fan.wants(int) and fan.wants(str)
    for item in (1, "a", 2.5, 3):
        fan.send_nowait(item)
    assert [ints.receive_nowait(), ints.receive_nowait()] == [1, 3]
    with pytest.raises(trio.WouldBlock):
        ints.receive_nowait()
    assert [everything.receive_nowait() for _ in range(4)] == [1, "a", 2.5, 3]
    everything.close()
    fan.send_nowait("b")  # the closed one is forgotten on the next send
    assert fan.wants(int) and not fan.wants(str)
    assert not FanOut[object](1).wants(int)  # nobody listens: nothing is worth making


def _make(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    return conn


async def test_sqlite_thread_runs_calls_in_order_and_closes(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    async with open_sqlite_thread(path, _make) as db:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(
                    db.run, lambda conn, x: conn.execute("INSERT INTO t VALUES (?)", (x,)), i
                )
        count = await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])
    assert count == 20
    with pytest.raises(sqlite3.ProgrammingError):
        await db.run(lambda conn: conn.execute("SELECT 1"))


def _insert(conn: sqlite3.Connection, x: int) -> int:
    conn.execute("INSERT INTO t VALUES (?)", (x,))
    return x


async def test_sqlite_thread_run_to_end_is_made_and_awaited_even_when_cancelled(
    tmp_path: Path,
) -> None:
    """`run` in a cancelled scope is not made; `run_to_end` is, its result is returned, and the
    cancellation arrives at the next checkpoint (the broker's commits rely on it)."""
    async with open_sqlite_thread(str(tmp_path / "t.sqlite"), _make) as db:
        got: list[int] = []
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await db.run_to_end(_insert, 1))
            await trio.lowlevel.checkpoint()
            got.append(-1)  # not reached
        assert scope.cancelled_caught and got == [1]
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await db.run(_insert, 2))
        assert scope.cancelled_caught and got == [1]
        rows = await db.run(lambda conn: conn.execute("SELECT x FROM t").fetchall())
    assert rows == [(1,)]


async def _spawn(script: str) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", script],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert await proc.stdout.receive_some(1) == b"r"  # its handlers are installed
    return proc


async def test_the_ladder_stops_at_the_first_signal_that_works() -> None:
    proc = await _spawn("import sys, time; print('r', flush=True); time.sleep(60)")
    with trio.fail_after(10):
        await stop_process_group(proc, [(signal.SIGINT, 5.0), (signal.SIGTERM, 5.0)])
    assert proc.returncode == -signal.SIGINT  # the first rung was enough


async def test_the_ladder_ends_in_sigkill() -> None:
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    proc = await _spawn(ignore + "print('r', flush=True); time.sleep(60)")
    with trio.fail_after(10):
        await stop_process_group(proc, [(signal.SIGTERM, 0.2)])
    assert proc.returncode == -signal.SIGKILL


def test_text_and_model_limits() -> None:
    assert check_text("héllo", "x", 6) == "héllo"
    for bad in ("héllo!", "a\x00", "\udc00"):
        with pytest.raises(BadParams):
            check_text(bad, "x", 6)
    assert check_model(" claude-x ") == "claude-x"
    assert check_model("m" * MAX_MODEL) == "m" * MAX_MODEL
    for bad in ("", "a b", "m" * (MAX_MODEL + 1), "a\x07"):
        with pytest.raises(BadParams):
            check_model(bad)


async def test_sqlite_threads_do_not_take_the_default_thread_limiter(tmp_path: Path) -> None:
    """Each connection's worker thread lives as long as the connection: more of them than the
    default limiter has tokens must leave other blocking calls free to run."""
    tokens = int(trio.to_thread.current_default_thread_limiter().total_tokens)
    with trio.fail_after(10):  # without its own limiter, the 41st connection never opens
        async with AsyncExitStack() as stack:
            dbs = [
                await stack.enter_async_context(open_sqlite_thread(str(tmp_path / f"{i}"), _make))
                for i in range(tokens + 2)
            ]
            assert await trio.to_thread.run_sync(lambda: "free") == "free"
            assert [await db.run(_insert, i) for i, db in enumerate(dbs)] == list(range(len(dbs)))
