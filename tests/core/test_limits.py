"""What one client may cost the daemon: connection floods, slowloris clients, clients that never
read their replies, subscribers that never read their events. Measured on a daemon process.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.core.daemon import AGENT_MAX_CONNECTIONS
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from hyperhive.protocol.codec import LineStream
from tests.hive import hive_config, open_hive, ui_port_base

LINE_TIMEOUT = 3.0
"""The daemon's --line-timeout here: first line, partial line and reply all get this long."""
FLOOD = 1000
SLOWLORIS = 50
MAX_RSS_GROWTH_KB = 50 * 1024
"""1,000 connections that each kept one 64 KiB read buffer would cost 64 MB: the bound catches
per-connection buffering, while the real cost (a task and a socket each) is a few MB."""

BUSY_FULL = "too many connections"
BUSY_SLOW = "timed out waiting for a complete line"


@dataclass
class DaemonProcess:
    proc: trio.Process
    run_dir: Path

    @property
    def host_sock(self) -> str:
        return str(self.run_dir / "host.sock")

    def agent_sock(self, name: str) -> str:
        return str(self.run_dir / "agents" / name / "mcp.sock")

    async def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the daemon, in KiB."""
        text = await trio.Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}

    async def reset_peak(self) -> None:
        """Start VmHWM afresh from the current RSS (proc(5): writing 5 to clear_refs)."""
        with contextlib.suppress(OSError):
            await trio.Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    async def spawn_stopped(self, name: str) -> None:
        """An agent whose socket is served but whose container is stopped: nobody reads it."""
        await call_once(self.host_sock, wire.Spawn(name=name))
        await call_once(self.host_sock, wire.Kill(name=name))


@asynccontextmanager
async def open_daemon_process(root: Path) -> AsyncIterator[DaemonProcess]:
    run_dir = root / "run"
    log = await trio.to_thread.run_sync(open, root / "daemon.log", "wb")
    command = [
        sys.executable,
        "-m",
        "hyperhive.cli",
        "--run-dir",
        str(run_dir),
        "serve",
        "--state-dir",
        str(root / "state"),
        "--no-manager",
        "--dashboard-port",
        "-1",
        "--ui-port-base",
        str(ui_port_base()),
        "--line-timeout",
        str(LINE_TIMEOUT),
        "--log-level",
        "WARNING",
    ]
    proc = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        banner = LineStream(proc.stdout)
        with trio.fail_after(30):
            while True:
                line = await banner.receive_line()
                assert line is not None, "the daemon exited before it was ready; see daemon.log"
                if line.startswith(b"hive-c0re: host socket"):
                    break
        yield DaemonProcess(proc, run_dir)
        assert proc.returncode is None, "the daemon died"
        logged = await trio.Path(root / "daemon.log").read_text()
        assert "Traceback" not in logged, logged[-3000:]
    finally:
        proc.terminate()
        with trio.move_on_after(15):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


def _ensure_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


async def _connect(path: str) -> trio.SocketStream:
    """A blocking connect in a worker thread: waits in the kernel while the listen backlog is
    full, as socat or any blocking client would. (A non-blocking AF_UNIX connect fails with
    EAGAIN then, which trio takes for "in progress" and hands back an unconnected socket.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await trio.to_thread.run_sync(sock.connect, path)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _read_to_end(stream: trio.SocketStream) -> bytes:
    data = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def _busy(data: bytes) -> str:
    """The `error` of the single busy line the daemon sends before hanging up."""
    lines = data.splitlines()
    assert len(lines) == 1, data[:300]
    reply = msgspec.json.decode(lines[0])
    assert reply["ok"] is False and reply["code"] == "busy", reply
    return str(reply["error"])


def _kind(error: str) -> str:
    return next((kind for kind in (BUSY_FULL, BUSY_SLOW) if kind in error), error)


@dataclass
class Outcome:
    error: str
    held: float
    """Seconds from connecting (slowloris: from the first byte) to the daemon's answer."""
    warm: bool = False


async def _idle_client(path: str, outcomes: list[Outcome], refused: trio.Semaphore) -> None:
    stream = await _connect(path)
    async with stream:
        start = trio.current_time()
        outcome = Outcome(_busy(await _read_to_end(stream)), trio.current_time() - start)
        outcomes.append(outcome)
        if BUSY_FULL in outcome.error:
            refused.release()


async def _slowloris(
    path: str, outcomes: list[Outcome], trickled: list[int], *, warm: bool
) -> None:
    """Half a request line, then one byte per quarter of the line timeout, never finishing.
    A `warm` one first completes a request, so only the partial-line timer can cut it off."""
    stream = await _connect(path)
    async with stream, trio.open_nursery() as nursery:
        if warm:
            await stream.send_all(b'{"cmd": "list"}\n')
            reply = await LineStream(stream).receive_line()
            assert reply is not None and reply.startswith(b'{"agents":')
        start = trio.current_time()
        await stream.send_all(b'{"cmd": "list", "pad": "')

        sent = 0

        async def trickle() -> None:
            nonlocal sent
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await trio.sleep(LINE_TIMEOUT / 4)
                    await stream.send_all(b"x")
                    sent += 1

        nursery.start_soon(trickle)
        data = await _read_to_end(stream)
        outcomes.append(Outcome(_busy(data), trio.current_time() - start, warm))
        trickled.append(sent)
        nursery.cancel_scope.cancel()


async def _served(daemon: DaemonProcess, *names: str) -> None:
    """host.sock lists the agents and each agent socket answers `status` for its own agent."""
    with trio.fail_after(5):
        listed = await call_once(daemon.host_sock, wire.ListAgents())
        assert sorted(a.name for a in listed.agents) == sorted(names)
        for name in names:
            status = await call_once(daemon.agent_sock(name), wire.Status())
            assert status.name == name


async def test_flood_and_slowloris_cost_little_and_others_are_served(hive_root: Path) -> None:
    _ensure_fd_limit(FLOOD + SLOWLORIS + 256)
    async with open_daemon_process(hive_root) as daemon:
        await daemon.spawn_stopped("flood")
        await daemon.spawn_stopped("calm")
        await _served(daemon, "flood", "calm")
        before = await daemon.memory_kb()
        await daemon.reset_peak()

        idle: list[Outcome] = []
        slow: list[Outcome] = []
        trickled: list[int] = []
        refused = trio.Semaphore(0)
        with trio.fail_after(LINE_TIMEOUT + 20):
            async with trio.open_nursery() as nursery:
                for _ in range(FLOOD):
                    nursery.start_soon(_idle_client, daemon.agent_sock("flood"), idle, refused)
                for i in range(SLOWLORIS):
                    nursery.start_soon(
                        partial(_slowloris, daemon.host_sock, slow, trickled, warm=i % 2 == 0)
                    )
                # Once every connection past the cap has been refused, the cap's worth of
                # idle clients is held and the flood is at its height.
                for _ in range(FLOOD - AGENT_MAX_CONNECTIONS):
                    await refused.acquire()

                extra = await _connect(daemon.agent_sock("flood"))
                async with extra:
                    assert BUSY_FULL in _busy(await _read_to_end(extra))
                listed = await call_once(daemon.host_sock, wire.ListAgents())
                assert len(listed.agents) == 2
                calm = await call_once(daemon.agent_sock("calm"), wire.Status())
                assert calm.name == "calm"
                during = await daemon.memory_kb()
                assert daemon.proc.returncode is None

        after = await daemon.memory_kb()
        counts = Counter(_kind(o.error) for o in idle)
        assert counts == {
            BUSY_FULL: FLOOD - AGENT_MAX_CONNECTIONS,
            BUSY_SLOW: AGENT_MAX_CONNECTIONS,
        }
        held = [o.held for o in idle if BUSY_SLOW in o.error]
        print(f"\nidle clients held {min(held):.2f}-{max(held):.2f} s")
        # Measured from the client's side of connect, which can complete a little after the
        # daemon accepted: hence the allowance.
        assert all(LINE_TIMEOUT - 0.5 <= h < LINE_TIMEOUT + 5 for h in held), held

        assert len(slow) == SLOWLORIS
        assert all(BUSY_SLOW in o.error for o in slow)
        # Cut off after the line timeout counted from the line's first byte, trickling or not
        # (a cold one meets the first-line timeout, counted from accept: see above).
        assert all(LINE_TIMEOUT <= o.held < LINE_TIMEOUT + 5 for o in slow if o.warm), slow
        assert all(LINE_TIMEOUT - 0.5 <= o.held < LINE_TIMEOUT + 5 for o in slow), slow
        assert len(trickled) == SLOWLORIS and min(trickled) >= 2

        # The flooded socket serves again once its idle clients are gone.
        await _served(daemon, "flood", "calm")
        growth = after["VmHWM"] - before["VmRSS"]
        print(
            f"\ndaemon RSS: before {before['VmRSS']} KiB, during {during['VmRSS']} KiB,"
            f" after {after['VmRSS']} KiB, peak {after['VmHWM']} KiB (growth {growth} KiB)"
        )
        assert growth < MAX_RSS_GROWTH_KB


REPLY_BODY = 8 * 1024
PIPELINED = 100_000


async def test_a_client_that_never_reads_is_cut_off(hive_root: Path) -> None:
    """100,000 pipelined `recent` requests, each answered with ~250 KB, none of it read: the
    daemon answers until the socket buffers are full, then waits at most the send timeout and
    hangs up. Unbounded buffering would need ~25 GB."""
    async with open_daemon_process(hive_root) as daemon:
        await daemon.spawn_stopped("pipe")
        await daemon.spawn_stopped("calm")
        for i in range(29):
            await call_once(
                daemon.host_sock, wire.OperatorSend(to="pipe", body=f"{i:03}" + "z" * REPLY_BODY)
            )
        await _served(daemon, "pipe", "calm")
        async with open_client(daemon.agent_sock("pipe")) as client:
            assert len(await client.raw(b'{"cmd": "recent"}')) > 29 * REPLY_BODY
        before = await daemon.memory_kb()
        await daemon.reset_peak()

        stream = await _connect(daemon.agent_sock("pipe"))
        async with stream:
            start = trio.current_time()
            stalled_for = 0.0

            async def while_stalled() -> None:
                # Everything here is blocked, the pipelining client included: the daemon has
                # stopped reading from it. Others must be served meanwhile.
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                await _served(daemon, "pipe", "calm")

            with trio.fail_after(LINE_TIMEOUT + 20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(while_stalled)
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.send_all(b'{"cmd": "recent"}\n' * PIPELINED)
                    stalled_for = trio.current_time() - start

        after = await daemon.memory_kb()
        # The send timeout, plus at most 1 s trying to tell it `busy`.
        assert LINE_TIMEOUT <= stalled_for < LINE_TIMEOUT + 3
        await _served(daemon, "pipe", "calm")
        growth = after["VmHWM"] - before["VmRSS"]
        print(
            f"\ndaemon RSS: before {before['VmRSS']} KiB, after {after['VmRSS']} KiB,"
            f" peak {after['VmHWM']} KiB (growth {growth} KiB)"
        )
        assert growth < MAX_RSS_GROWTH_KB


SENDS = 2000
SENDERS = 20
_event: msgspec.json.Decoder[wire.HiveEvent] = msgspec.json.Decoder(wire.HiveEvents)


async def _subscribe(sock: str) -> LineStream:
    """A subscription whose acknowledgement has been read, and nothing else yet."""
    lines = LineStream(await trio.open_unix_socket(sock))
    await lines.send_line(b'{"cmd": "subscribe"}\n')
    ack = await lines.receive_line()
    assert ack is not None and msgspec.json.decode(ack) == {"ok": True, "subscribed": True}
    return lines


async def test_a_subscriber_that_never_reads_is_dropped_without_slowing_sends(
    hive_root: Path,
) -> None:
    # A long send timeout, so what drops the stalled subscriber is the hub's slow-consumer
    # policy (1,024 events behind), not the socket's send timeout.
    async with open_hive(hive_config(hive_root, line_timeout=60.0)) as hive:
        stalled, healthy = await _subscribe(hive.sock), await _subscribe(hive.sock)
        async with stalled.stream, healthy.stream:
            seen: list[wire.HiveEvent] = []

            async def read_healthy(task_status: trio.TaskStatus[None]) -> None:
                task_status.started()
                sent = 0
                while sent < SENDS:
                    line = await healthy.receive_line()
                    assert line is not None, "the healthy subscriber was disconnected"
                    seen.append(_event.decode(line))
                    sent += isinstance(seen[-1], wire.MessageSent)

            async def send_many() -> None:
                async with open_client(hive.sock) as client:
                    for i in range(SENDS // SENDERS):
                        await client.call(wire.OperatorSend(to="operator", body=f"{i} " * 50))

            # More events than the hub buffers plus what the socket holds, all while the
            # stalled subscriber reads nothing: if the broker waited on it, this would hang.
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(read_healthy)
                    for _ in range(SENDERS):
                        nursery.start_soon(send_many)
            assert not any(isinstance(e, wire.Dropped) for e in seen)
            assert [e.seq for e in seen] == sorted(e.seq for e in seen)

            events: list[dict[str, object]] = []
            with trio.fail_after(30):
                while (line := await stalled.receive_line()) is not None:
                    events.append(msgspec.json.decode(line))
        # What it had buffered, then `dropped`, then the daemon hung up.
        assert events[-1]["event"] == "dropped", events[-1]
        assert 0 < sum(e["event"] == "message_sent" for e in events) < SENDS
        flow = await hive.call(wire.Flow(limit=SENDS))
        assert len(flow.messages) == SENDS
