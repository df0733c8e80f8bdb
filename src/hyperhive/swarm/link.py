"""The daemon's side of the NATS sidecar: a supervised child process, JSON lines on its pipes.

`Link.serve` keeps one sidecar running (restarted if it dies); `call` sends one request and
waits for its answer; `subscribe` opens a push stream (a KV watch, a served subject) that ends
when the sidecar does, so its owner subscribes again. Everything here is trio.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import trio

from hyperhive.protocol.errors import Internal, Unavailable
from hyperhive.swarm import subjects as s

log = logging.getLogger(__name__)

Json = dict[str, Any]


class SwarmError(Unavailable):
    """NATS said no, or could not be reached: what, in its words."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class _Call:
    done: trio.Event = field(default_factory=trio.Event)
    answer: Json | None = None
    error: SwarmError | None = None
    pushes: trio.MemorySendChannel[Json] | None = None
    orphan: Callable[[Json | None], Any] | None = None


class Link:
    def __init__(self, servers: list[str], name: str, credentials: Path | None = None) -> None:
        self.servers = servers
        self.name = name
        self.credentials = credentials
        self._calls: dict[int, _Call] = {}
        self._next = 1
        self._stdin: trio.abc.SendStream | None = None
        self._write = trio.StrictFIFOLock()
        self._up = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.restarts = 0
        self.pid: int | None = None
        """The running sidecar's process id."""

    @property
    def up(self) -> bool:
        return self._stdin is not None

    async def wait_up(self) -> None:
        await self._up.wait()

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run the sidecar (started once it is connected to NATS), again whenever it exits."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            started = False
            while True:
                try:
                    await self._run_once(task_status if not started else None)
                    started = True
                except OSError as exc:
                    log.error("swarm sidecar failed to run: %s", exc)
                self.restarts += 1
                await trio.sleep(0.5)

    async def _run_once(self, task_status: trio.TaskStatus[None] | None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "hyperhive.swarm.sidecar",
            "--servers",
            ",".join(self.servers),
            "--name",
            self.name,
        ]
        if self.credentials is not None:
            cmd += ["--credentials", str(self.credentials)]
        # The daemon's own import path: a Nix-built hive-c0re finds its dependencies through
        # its wrapper script, which the bare interpreter started here would not run.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=env
        )
        assert proc.stdin is not None and proc.stdout is not None
        self.pid = proc.pid
        try:
            buf = b""
            ready = False
            while True:
                chunk = await proc.stdout.receive_some(1 << 16)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if not ready:
                        ready = True
                        self._stdin = proc.stdin
                        self._up.set()
                        log.info("swarm sidecar up: %s", ",".join(self.servers))
                        if task_status is not None:
                            task_status.started()
                        continue
                    self._dispatch(msg)
        finally:
            self._stdin = None
            self._up = trio.Event()
            for rid, call in list(self._calls.items()):
                self._calls.pop(rid, None)
                self._finish(call, None, SwarmError("the NATS sidecar exited", "link"))
            with trio.CancelScope(shield=True):
                # Its stdin closed, the sidecar drains its NATS connection and exits.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await proc.stdin.aclose()
                with trio.move_on_after(3):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if proc.returncode:
                log.warning("swarm sidecar exited (%s)", proc.returncode)

    def _dispatch(self, msg: Json) -> None:
        if "push" in msg:
            call = self._calls.get(int(msg["push"]))
            if call is not None and call.pushes is not None:
                with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    call.pushes.send_nowait(msg)
            return
        call = self._calls.pop(int(msg["id"]), None)
        if call is None:
            return
        if "error" in msg:
            self._finish(call, None, SwarmError(str(msg["error"]), str(msg.get("kind", ""))))
        else:
            self._finish(call, msg.get("ok") or {}, None)

    def _finish(self, call: _Call, answer: Json | None, error: SwarmError | None) -> None:
        call.answer, call.error = answer, error
        if call.pushes is not None:
            call.pushes.close()
        call.done.set()
        if call.orphan is not None:
            call.orphan(answer)

    async def _send(self, op: str, call: _Call, fields: Json) -> int:
        if self._stdin is None:
            raise SwarmError("the swarm link is down (NATS sidecar restarting)", "link")
        rid = self._next
        self._next += 1
        self._calls[rid] = call
        line = json.dumps({"id": rid, "op": op, **fields}, separators=(",", ":")).encode()
        try:
            async with self._write:
                with trio.CancelScope(shield=True):
                    await self._stdin.send_all(line + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError):
            self._calls.pop(rid, None)
            raise SwarmError("the swarm link is down (NATS sidecar restarting)", "link") from None
        return rid

    async def call(
        self, op: str, *, orphan: Callable[[Json | None], Any] | None = None, **fields: Any
    ) -> Json:
        """One request, its answer. Cancelled meanwhile: the sidecar is asked to stop it; with
        `orphan`, it runs to its end instead, and its answer (None: it failed) goes to `orphan`
        (a fetched message must be given back)."""
        call = _Call()
        rid = await self._send(op, call, fields)
        try:
            await call.done.wait()
        except trio.Cancelled:
            if orphan is not None:
                call.orphan = orphan
            elif self._nursery is not None:
                self._nursery.start_soon(self._cancel, rid)
            raise
        if call.error is not None:
            raise call.error
        assert call.answer is not None
        return call.answer

    async def retrying(self, op: str, *, within: float, **fields: Any) -> Json:
        """`call`, retried through a node failing over or the sidecar restarting, for up to
        `within` seconds, then `Unavailable` (idempotent calls only: a publish under its message
        id, an ack, a read)."""
        deadline = trio.current_time() + within
        delay = 0.05
        while True:
            try:
                return await self.call(op, **fields)
            except SwarmError as exc:
                if trio.current_time() + delay > deadline:
                    raise Unavailable(f"NATS JetStream did not take {op}: {exc.message}") from None
                log.info("swarm %s retried: %s", op, exc.message)
                if exc.kind == "link":
                    with trio.move_on_after(delay * 10):
                        await self.wait_up()
                else:
                    await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _cancel(self, rid: int) -> None:
        with suppress(SwarmError):
            await self._send("cancel", _Call(), {"target": rid})

    @asynccontextmanager
    async def subscribe(
        self, op: str, **fields: Any
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Json]]:
        """A push stream (`kv_watch`, `serve`): its channel closes when the sidecar goes."""
        send, recv = trio.open_memory_channel[Json](math.inf)
        call = _Call(pushes=send)
        rid = await self._send(op, call, fields)
        try:
            yield recv
        finally:
            self._calls.pop(rid, None)
            send.close()
            with trio.CancelScope(shield=True):
                await self._cancel(rid)


def internal(exc: SwarmError) -> Internal:
    return Internal(f"swarm: {exc.message}")


__all__ = ["Link", "SwarmError", "s"]
