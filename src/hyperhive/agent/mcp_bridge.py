"""The hyperhive MCP server without a Python start per turn.

claude starts its stdio MCP servers anew for every `claude --print` run: with the `mcp`
package that is ~0.8 s of CPU before the first tool call, on every turn. Instead the harness
serves MCP itself, for as long as it runs, on a unix socket in its runtime directory
(`mcp-bridge.sock`, 0600), and the command claude starts is a stdlib-only bridge (this file's
`BRIDGE`, run with `python -I -S`: ~15 ms) that copies stdin to that socket and the socket to
stdout. When the socket cannot be reached (a harness that is not serving it yet) the bridge
becomes the full stdio server (`hive-ag3nt mcp`), so a turn never loses its tools.

The socket admits nothing new: whoever can reach it runs as the agent already, and could
speak to the agent socket it forwards to just the same (identity is that socket).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)

BRIDGE_SOCKET = "mcp-bridge.sock"
BRIDGE_SCRIPT = "mcp-bridge.py"

BRIDGE = r"""# Written by the hyperhive harness: claude's stdio MCP server for hyperhive, a bridge
# to the harness's own MCP server (see hyperhive/agent/mcp_bridge.py). Stdlib only.
import os
import selectors
import socket
import sys

path, fallback = sys.argv[1], sys.argv[2:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(path)
except OSError:
    sock.close()
    os.execv(fallback[0], fallback)
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ, "stdin")
sel.register(sock, selectors.EVENT_READ, "socket")
while True:
    for key, _ in sel.select():
        if key.data == "stdin":
            data = os.read(0, 65536)
            if not data:
                sel.unregister(0)
                sock.shutdown(socket.SHUT_WR)
                continue
            sock.sendall(data)
        else:
            data = sock.recv(65536)
            if not data:
                sys.exit(0)
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
"""


def bridge_command(python: str, runtime_dir: Path, role: str) -> tuple[str, list[str]]:
    """The command and arguments claude starts for the hyperhive MCP server."""
    fallback = [python, "-m", "hyperhive.agent", "mcp", "--role", role]
    script, sock = str(runtime_dir / BRIDGE_SCRIPT), str(runtime_dir / BRIDGE_SOCKET)
    return python, ["-I", "-S", script, sock, *fallback]


def write_bridge(runtime_dir: Path) -> None:
    """The bridge script next to claude's MCP config (blocking)."""
    path = runtime_dir / BRIDGE_SCRIPT
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(BRIDGE, "utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _listen(path: Path) -> socket.socket:
    """Bind the bridge socket, replacing a stale one (never anything but a socket)."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_bridge(
    runtime_dir: Path,
    serve_session: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept the bridges' connections, one MCP session each (`serve_session(stream)`, which
    imports the `mcp` package when the first one comes)."""
    path = runtime_dir / BRIDGE_SOCKET
    sock = await trio.to_thread.run_sync(_listen, path)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        task_status.started()
        await trio.serve_listeners(serve_session, [listener])
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(OSError):
            path.unlink()
