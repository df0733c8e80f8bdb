#!/usr/bin/env python3
"""Issue 16's spike: how the trio daemon should reach NATS JetStream through nats-py (asyncio).

Two ways, against one local `nats-server -js` with `sync_interval: always` (an fsync per
write, as the swarm will run it), measured with the same work — a durable publish to a
work-queue stream, answered by its PubAck — one at a time (latency) and 64 at once (rate):

- **in-process**: nats-py under trio through trio-asyncio (`aio_as_trio`), in the daemon;
- **sidecar**: nats-py in a small asyncio process; the trio side sends it JSON lines over a
  unix socket (our protocol's framing) and reads the answers;
- and nats-py in plain asyncio, the floor either way is measured against.

    .venv/bin/pip install -e '.[swarm]' && .venv/bin/python scripts/spike_nats.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio  # noqa: TID251 - nats-py is asyncio's; the spike measures exactly that boundary
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

SUBJECT = "inbox.bench"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = root / "nats.conf"
    conf.write_text(
        f"port: {port}\nlisten: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{root / "js"}", sync_interval: always }}\n'
    )
    server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    proc = subprocess.Popen([server, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server did not come up") from None
            time.sleep(0.05)
    return proc, f"nats://127.0.0.1:{port}"


async def make_stream(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    await js.add_stream(
        StreamConfig(
            name="INBOX",
            subjects=["inbox.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await nc.close()


async def asyncio_bench(url: str, n: int) -> tuple[list[float], float]:
    """nats-py in plain asyncio: sequential publish latency, then 64 concurrent publishers."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await js.publish(SUBJECT, b"m", headers={"Nats-Msg-Id": f"a{i}"})
        lat.append(time.perf_counter() - t0)

    async def one(k: int) -> None:
        for i in range(n // 64):
            await js.publish(SUBJECT, b"m", headers={"Nats-Msg-Id": f"c{k}-{i}"})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(64)))
    rate = (n // 64) * 64 / (time.perf_counter() - t0)
    await nc.close()
    return lat, rate


async def trio_asyncio_bench(url: str, n: int) -> tuple[list[float], float]:
    """nats-py inside trio through trio-asyncio, as the daemon would run it in-process."""
    import nats
    import trio_asyncio

    async with trio_asyncio.open_loop():
        nc = await trio_asyncio.aio_as_trio(nats.connect)(url)
        js = nc.jetstream()
        publish = trio_asyncio.aio_as_trio(js.publish)
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            await publish(SUBJECT, b"m", headers={"Nats-Msg-Id": f"t{i}"})
            lat.append(time.perf_counter() - t0)

        async def one(k: int) -> None:
            for i in range(n // 64):
                await publish(SUBJECT, b"m", headers={"Nats-Msg-Id": f"u{k}-{i}"})

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(64):
                nursery.start_soon(one, k)
        rate = (n // 64) * 64 / (time.perf_counter() - t0)
        await trio_asyncio.aio_as_trio(nc.close)()
    return lat, rate


# ---------------------------------------------------------------------- the sidecar


async def sidecar(url: str, path: str) -> None:
    """The asyncio side: one JSON line in (`{"id", "subject", "msg_id"}`), one out (`{"id",
    "seq"}`), requests on a connection answered as their PubAcks come (pipelined)."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer(req: dict[str, str]) -> None:
            ack = await js.publish(req["subject"], b"m", headers={"Nats-Msg-Id": req["msg_id"]})
            writer.write(json.dumps({"id": req["id"], "seq": ack.seq}).encode() + b"\n")

        pending: set[asyncio.Task[None]] = set()
        while line := await reader.readline():
            task = asyncio.ensure_future(answer(json.loads(line)))
            pending.add(task)  # kept until done: asyncio holds only weak references
            task.add_done_callback(pending.discard)

    server = await asyncio.start_unix_server(handle, path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def sidecar_bench(path: str, n: int) -> tuple[list[float], float]:
    """The trio side of the sidecar: our framing over a unix socket, one request at a time per
    connection (latency), then 64 connections (rate)."""
    from hyperhive.protocol.codec import LineStream

    async def client(tag: str, count: int, lat: list[float] | None) -> None:
        lines = LineStream(await trio.open_unix_socket(path))
        for i in range(count):
            t0 = time.perf_counter()
            req = {"id": str(i), "subject": SUBJECT, "msg_id": f"{tag}{i}"}
            await lines.send_line(json.dumps(req).encode() + b"\n")
            got = await lines.receive_line()
            assert got is not None and json.loads(got)["id"] == str(i)
            if lat is not None:
                lat.append(time.perf_counter() - t0)
        await lines.aclose()

    lat: list[float] = []
    await client("s", n, lat)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(64):
            nursery.start_soon(client, f"v{k}-", n // 64, None)
    return lat, (n // 64) * 64 / (time.perf_counter() - t0)


def report(name: str, lat: list[float], rate: float) -> None:
    print(
        f"{name:<38} publish+ack p50 {pct(lat, 0.5) * 1e3:6.3f} ms  p99"
        f" {pct(lat, 0.99) * 1e3:6.3f} ms   64 publishers {rate:8,.0f} msg/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sidecar", nargs=2, metavar=("URL", "PATH"))
    args = parser.parse_args()
    if args.sidecar:
        asyncio.run(sidecar(*args.sidecar))
        return
    root = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))
    server, url = start_server(root)
    try:
        asyncio.run(make_stream(url))
        report("nats-py, plain asyncio (the floor)", *asyncio.run(asyncio_bench(url, args.n)))
        report("in-process: trio + trio-asyncio", *trio.run(trio_asyncio_bench, url, args.n))
        path = str(root / "sidecar.sock")
        side = subprocess.Popen(
            [sys.executable, __file__, "--sidecar", url, path], stdout=subprocess.PIPE
        )
        assert side.stdout is not None and side.stdout.readline().strip() == b"ready"
        report("sidecar: trio -> unix socket -> asyncio", *trio.run(sidecar_bench, path, args.n))
        side.terminate()
        side.wait()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
