"""A full disk under the hive's state: every write says `storage_full`, nothing is half-made, and
the daemon carries on once there is space again. Measured on a real 2 MiB tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import open_client
from tests.conftest import needs_bwrap
from tests.hive import Hive, hive_config, open_hive

_raw_reply = msgspec.json.Decoder(dict[str, object])
BODY = 64 * 1024
"""Bodies big enough that no slack left in sqlite's files can take them."""


@pytest.fixture
def small_disk(hive_root: Path) -> Iterator[Path]:
    """The daemon's state dir on its own 2 MiB tmpfs (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount(8)")
    state = hive_root / "state"
    state.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", str(state)], check=True)


def _fill(path: Path) -> int:
    """Write `path` until the filesystem has no byte left; returns its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _grep_meta(meta: Path) -> list[str]:
    """Files of the meta repo's working tree that mention bob."""
    return [
        str(p)
        for p in meta.rglob("*")
        if ".git" not in p.parts and p.is_file() and b"bob" in p.read_bytes()
    ]


async def _send(hive: Hive, to: str, body: str) -> dict[str, object]:
    async with open_client(hive.sock) as client:
        line = msgspec.json.encode({"cmd": "send", "to": to, "body": body})
        return _raw_reply.decode(await client.raw(line))


async def _bodies(hive: Hive, inbox: str) -> list[str]:
    reply = await hive.call(wire.HostRecent(name=inbox, limit=100))
    return [m.body for m in reply.messages]


def _is_full(reply: dict[str, object]) -> bool:
    error = reply.get("error")
    return (
        reply.get("ok") is False
        and reply.get("code") == "storage_full"
        and isinstance(error, str)
        and "disk is full" in error
    )


async def test_sends_on_a_full_disk_say_so_and_resume_without_loss_or_doubles(
    small_disk: Path, hive_root: Path
) -> None:
    filler = small_disk / "filler"
    async with open_hive(hive_config(hive_root)) as hive:
        before = "before " + "b" * BODY
        assert (await _send(hive, "manager", before))["ok"] is True

        assert await trio.to_thread.run_sync(_fill, filler) > 0
        failed = [f"while full {i} " + "f" * BODY for i in range(3)]
        for body in failed:
            reply = await _send(hive, "manager", body)
            assert _is_full(reply), reply
        # Reads still work, and the daemon still answers what needs no space.
        assert await _bodies(hive, "manager") == [before]
        listed = await hive.call(wire.ListAgents())
        assert listed.agents == []

        await trio.to_thread.run_sync(filler.unlink)
        for body in failed:
            reply = await _send(hive, "manager", body)
            assert reply["ok"] is True, reply
        # Every message that was acknowledged is there, once; none that was refused slipped in.
        assert await _bodies(hive, "manager") == [before, *failed]


@needs_bwrap
async def test_a_spawn_on_a_full_disk_leaves_nothing_behind(
    small_disk: Path, hive_root: Path
) -> None:
    filler = small_disk / "filler"
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await trio.to_thread.run_sync(_fill, filler)
        async with open_client(hive.sock) as client:
            reply = _raw_reply.decode(await client.raw(b'{"cmd": "spawn", "name": "bob"}'))
        assert _is_full(reply), reply
        listed = await hive.call(wire.ListAgents())
        assert [a.name for a in listed.agents] == []
        # No directory, repo or file of bob's anywhere (state, sockets), nor in the meta repo.
        left = [p for root in (small_disk, cfg.run_dir) for p in root.rglob("*bob*")]
        assert left == []
        meta = await trio.to_thread.run_sync(_grep_meta, small_disk / "meta")
        assert meta == []

        await trio.to_thread.run_sync(filler.unlink)
        spawned = await hive.call(wire.Spawn(name="bob"))
        assert spawned.agent.name == "bob"
        await hive.call(wire.Kill(name="bob"))


@needs_bwrap
async def test_every_write_on_a_full_disk_says_so_and_works_again_after(
    small_disk: Path, hive_root: Path
) -> None:
    filler = small_disk / "filler"
    async with open_hive(hive_config(hive_root)) as hive:
        # An agent whose socket is served but whose container is stopped: nobody reads it.
        await hive.call(wire.Spawn(name="a"))
        await hive.call(wire.Kill(name="a"))
        await hive.call(wire.OperatorSend(to="a", body="for recv"))  # a recv takes it
        host: list[dict[str, object]] = [{"cmd": "request_spawn", "name": "b"}]
        agent: list[dict[str, object]] = [
            {"cmd": "remind", "message": "short", "delay_seconds": 3600},
            {"cmd": "remind", "message": "long " + "l" * BODY, "delay_seconds": 3600},
            {"cmd": "ask", "question": "well?"},
            {"cmd": "wake", "from": "webhook", "body": "w" * BODY},
            {"cmd": "send", "to": "operator", "body": "o" * BODY},
            {"cmd": "recv", "lease": True},
        ]

        async def each(sock: str, requests: list[dict[str, object]]) -> list[dict[str, object]]:
            async with open_client(sock) as client:
                return [
                    _raw_reply.decode(await client.raw(msgspec.json.encode(r))) for r in requests
                ]

        await trio.to_thread.run_sync(_fill, filler)
        refused = [*await each(hive.sock, host), *await each(hive.agent_sock("a"), agent)]
        assert all(_is_full(r) for r in refused), refused
        pending = await hive.call(wire.Pending())
        assert pending.approvals == []

        await trio.to_thread.run_sync(filler.unlink)
        done = [*await each(hive.sock, host), *await each(hive.agent_sock("a"), agent)]
        assert all(r["ok"] is True for r in done), done
        pending = await hive.call(wire.Pending())
        assert [(p.kind, p.agent) for p in pending.approvals] == [("spawn", "b")]
