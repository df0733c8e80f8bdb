"""An agent's own network namespace: egress by policy, its UI and allowed host ports forwarded.

On bwrap and nspawn an agent gets a private network namespace by default (agent.toml
`[network] mode`, SPEC §4.1b), so it can neither bind nor reach the host's loopback. The daemon
then wires, for the container's lifetime:
- the UI (started by the supervisor, which reports a held port): the daemon listens on the
  host's `bind:port` and connects each browser connection to `127.0.0.1:port` inside the
  namespace (a socket made in the namespace by a worker thread that entered it with setns(2));
- `open` and `anthropic`: outside access through slirp4netns, with the host's loopback cut off
  (`--disable-host-loopback`);
- allowed host loopback services (the forge, a local model endpoint): a listener inside the
  namespace on `127.0.0.1:port` whose connections the daemon relays to the host's `127.0.0.1:port`;
- `anthropic`: an nftables output policy in the namespace (loopback, DNS, the allowed hosts).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SLIRP = "slirp4netns"
ANTHROPIC_HOSTS = ("api.anthropic.com:443",)
"""What `anthropic` mode allows besides the agent's own allow list and the model endpoint."""
FIND_POLL = 0.02
FIND_ATTEMPTS = 500
RELAY_CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(pid: int, fn: Callable[[], T]) -> T:
    """Run fn in the network namespace of `pid` (in the calling thread only; it returns to its
    own namespace before this returns). Blocking: call it through trio.to_thread."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return fn()
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def _net_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _find_inside(pid: int) -> int | None:
    """A descendant of `pid` in another network namespace than ours (the container's)."""
    own = _net_inode("self")
    queue = [pid]
    for _ in range(64):
        if not queue:
            return None
        current = queue.pop(0)
        inode = _net_inode(current)
        if inode is not None and inode != own:
            return current
        try:
            with open(f"/proc/{current}/task/{current}/children", encoding="ascii") as fh:
                queue += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return None


SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1


def _lo_up(pid: int) -> bool:
    def probe() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH14x", b"lo", 0)
            flags: int = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            return bool(flags & IFF_UP)

    return in_netns(pid, probe)


async def wait_set_up(pid: int) -> None:
    """Wait until the container manager has set up the namespace's loopback (bwrap and nspawn
    do it with rtnetlink themselves; a second rtnetlink user meanwhile, slirp4netns, makes
    bwrap fail with "loopback: Failed RTM_NEWADDR")."""
    for _ in range(FIND_ATTEMPTS):
        if await trio.to_thread.run_sync(_lo_up, pid):
            return
        await trio.sleep(FIND_POLL)
    raise OSError(errno.ETIMEDOUT, f"the loopback of container {pid} never came up")


async def find_namespace_pid(pid: int) -> int:
    """Wait for the container started as `pid` to have entered its own network namespace."""
    for _ in range(FIND_ATTEMPTS):
        found = await trio.to_thread.run_sync(_find_inside, pid)
        if found is not None:
            return found
        await trio.sleep(FIND_POLL)
    raise OSError(errno.ESRCH, f"container {pid} has no network namespace of its own")


async def _relay(a: trio.SocketStream, b: trio.SocketStream) -> None:
    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await src.receive_some(RELAY_CHUNK):
                await dst.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await dst.send_eof()

    async with a, b, trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b)
        nursery.start_soon(pump, b, a)


def _ns_socket(pid: int) -> socket.socket:
    return in_netns(pid, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


async def connect_inside(pid: int, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port inside the namespace of `pid`."""
    raw = await trio.to_thread.run_sync(_ns_socket, pid)
    sock = trio.socket.from_stdlib_socket(raw)
    try:
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _accept_loop(
    listeners: list[trio.SocketListener], handle: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    async with trio.open_nursery() as nursery:
        for listener in listeners:

            async def loop(listener: trio.SocketListener = listener) -> None:
                async with listener:
                    while True:
                        stream = await listener.accept()
                        nursery.start_soon(handle, stream)

            nursery.start_soon(loop)


async def open_ui_listeners(bind: str, port: int) -> list[trio.SocketListener]:
    """The host side of an agent's UI (raises OSError when the port is held)."""
    return await trio.open_tcp_listeners(port, host=bind.strip("[]"))


async def serve_ui_proxy(pid: int, port: int, listeners: list[trio.SocketListener]) -> None:
    """Relay each connection on the host's listeners to 127.0.0.1:port in pid's namespace."""

    async def handle(client: trio.SocketStream) -> None:
        try:
            inner = await connect_inside(pid, port)
        except OSError:
            await client.aclose()  # the harness is not listening (yet): a refused connection
            return
        await _relay(client, inner)

    await _accept_loop(listeners, handle)


def _ns_listener(pid: int, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        return sock

    return in_netns(pid, make)


async def serve_host_port(
    pid: int, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on 127.0.0.1:port inside the namespace; relay to the host's 127.0.0.1:port."""
    raw = await trio.to_thread.run_sync(_ns_listener, pid, port)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))

    async def handle(inner: trio.SocketStream) -> None:
        try:
            outer = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await inner.aclose()
            return
        await _relay(inner, outer)

    task_status.started()
    await _accept_loop([listener], handle)


@dataclass(frozen=True)
class Egress:
    """What one container's network is allowed (from agent.toml `[network]`)."""

    mode: str
    """open, anthropic, none (host: the host's own network, nothing here applies)."""
    host_ports: tuple[int, ...] = ()
    """Host loopback ports reachable inside as 127.0.0.1:port."""
    allow: tuple[tuple[str, int], ...] = ()
    """`anthropic` mode: the outside destinations allowed besides DNS."""


def nft_rules(mode: str, host_ips: list[str], allowed_ips: list[tuple[str, int]]) -> str:
    """The namespace's output policy. Both modes: nothing to the host's own addresses (slirp
    would deliver it to services the host listens with on all interfaces). `anthropic`:
    loopback, replies, DNS to slirp's resolver and the allowed addresses and ports only;
    everything else dropped (and so never leaves the host)."""
    policy = "drop" if mode == "anthropic" else "accept"
    lines = [
        # Replaced whole on every start (an adopted container keeps its namespace).
        "table inet hive",
        "delete table inet hive",
        "table inet hive {",
        " chain output {",
        f"  type filter hook output priority 0; policy {policy};",
        '  oifname "lo" accept',
    ]
    for ip in host_ips:
        family = "ip6" if ":" in ip else "ip"
        lines.append(f"  {family} daddr {ip} drop")
    if mode == "anthropic":
        lines += [
            "  ct state established,related accept",
            "  ip daddr 10.0.2.3 udp dport 53 accept",
            "  ip daddr 10.0.2.3 tcp dport 53 accept",
        ]
        for ip, port in allowed_ips:
            family = "ip6" if ":" in ip else "ip"
            lines.append(f"  {family} daddr {ip} tcp dport {port} accept")
    lines += [" }", "}", ""]
    return "\n".join(lines)


async def host_addresses() -> list[str]:
    """The host's own addresses (every interface's, loopback's aside)."""
    done = await trio.run_process(
        ["ip", "-j", "addr", "show"], capture_stdout=True, capture_stderr=True
    )
    found = []
    for iface in json.loads(done.stdout or b"[]"):
        for addr in iface.get("addr_info", []):
            local = str(addr.get("local", ""))
            if local and iface.get("ifname") != "lo" and not local.startswith("fe80:"):
                found.append(local)
    return found


def _resolve(allow: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for host, port in allow:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("network allow %s:%d: cannot resolve (%s); left out", host, port, exc)
            continue
        for info in infos:
            pair = (str(info[4][0]), port)
            if pair not in found:
                found.append(pair)
    return found


async def apply_rules(pid: int, rules: str) -> None:
    await trio.run_process(
        ["nsenter", "-t", str(pid), "--net", "nft", "-f", "-"],
        stdin=rules.encode(),
        capture_stdout=True,
        capture_stderr=True,
    )


async def serve_network(
    pid: int,
    egress: Egress,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Wire the container's namespace for its lifetime (cancel to undo)."""
    inside = await find_namespace_pid(pid)
    await wait_set_up(inside)
    async with trio.open_nursery() as nursery:
        if egress.mode in ("open", "anthropic"):
            ips = await trio.to_thread.run_sync(_resolve, egress.allow)
            await apply_rules(inside, nft_rules(egress.mode, await host_addresses(), ips))
        if egress.mode in ("open", "anthropic"):
            nursery.start_soon(_run_slirp, inside)
        for port in egress.host_ports:
            await nursery.start(serve_host_port, inside, port)
        task_status.started()


async def _run_slirp(pid: int) -> None:
    """slirp4netns for the namespace of `pid`, hardened (its own sandbox and seccomp).

    It holds the namespace open for as long as it runs, so it must never outlive its wiring:
    its `--exit-fd` is a pipe whose other end only this task holds. Cancelled, or the daemon
    gone (even by SIGKILL), the pipe closes and slirp exits; a daemon that adopts the container
    wires it again.
    """
    exit_read, exit_write = os.pipe()
    try:
        await trio.run_process(
            [
                SLIRP,
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                f"--exit-fd={exit_read}",
                str(pid),
                "tap0",
            ],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            pass_fds=(exit_read,),
        )
    finally:
        os.close(exit_read)
        os.close(exit_write)


def sweep_orphans() -> list[int]:
    """SIGKILL every slirp4netns whose namespace's process is gone (it would hold that
    namespace forever, serving nobody). Blocking; run at daemon start. Returns their pids."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        target = argv[-3] if len(argv) > 3 else b""
        is_slirp = os.path.basename(argv[0]) == SLIRP.encode() and target.isdigit()
        if is_slirp and not os.path.exists(f"/proc/{int(target)}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


def slirp_available() -> bool:
    return shutil.which(SLIRP) is not None
