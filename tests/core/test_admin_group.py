"""`--admin-group`: members of the group (primary or supplementary) may use host.sock and read
the login URL; nobody else gets further than before. Peers are real processes that drop to
another uid and groups before they connect (SO_PEERCRED and SO_PEERGROUPS record them)."""

from __future__ import annotations

import grp
import os
import stat
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.core.server import Peer, require_uid
from hyperhive.protocol.errors import Forbidden
from tests.hive import Hive, hive_config, open_hive

NOBODY = 65534

_PEER = r"""
import os, socket, sys
path, uid, gid, groups, what = sys.argv[1:]
os.setgroups([int(g) for g in groups.split(",") if g])
os.setresgid(int(gid), int(gid), int(gid))
os.setresuid(int(uid), int(uid), int(uid))
try:
    if what == "read":
        sys.stdout.write(open(path).read())
        sys.exit(0)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
except PermissionError:
    print("EACCES")
    sys.exit(0)
try:
    s.sendall(b'{"cmd": "list"}\n')
except BrokenPipeError:
    pass
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
        if data.endswith(b"\n"):
            break
except ConnectionResetError:
    pass
sys.stdout.buffer.write(data)
"""
"""Drops to uid/gid/groups, then reads a file or asks `list` on a socket; prints EACCES when
the kernel refuses."""


def admin_group() -> grp.struct_group:
    """An existing group that is neither root's nor nobody's (tests must not create groups)."""
    for group in grp.getgrall():
        if group.gr_gid not in (0, NOBODY) and group.gr_gid != os.getgid():
            return group
    pytest.skip("no spare group on this machine")


async def peer(target: Path | str, gid: int, groups: list[int], what: str = "list") -> str:
    argv = [sys.executable, "-c", _PEER, str(target), str(NOBODY), str(gid)]
    with trio.fail_after(20):
        done = await trio.run_process(
            [*argv, ",".join(map(str, groups)), what],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    return str(done.stdout.decode())


def served(reply: str) -> bool:
    decoded = msgspec.json.decode(reply.splitlines()[0])
    if decoded.get("ok") is False:
        assert decoded["code"] == "forbidden", decoded
        return False
    return isinstance(decoded.get("agents"), list)


def mode_and_gid(path: Path | str) -> tuple[int, int]:
    info = os.stat(path)
    return stat.S_IMODE(info.st_mode), info.st_gid


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


@needs_root
async def test_the_admin_group_may_use_host_sock_and_read_the_login_url(hive_root: Path) -> None:
    group = admin_group()
    cfg = hive_config(hive_root, admin_group=group.gr_name, dashboard_port=0)
    async with open_hive(cfg) as hive:
        os.chmod(hive_root, 0o711)  # the test root is mkdtemp's 0700
        assert mode_and_gid(cfg.run_dir) == (0o750, group.gr_gid)
        assert mode_and_gid(hive.sock) == (0o660, group.gr_gid)
        assert mode_and_gid(cfg.dashboard_url_path) == (0o640, group.gr_gid)
        assert mode_and_gid(cfg.dashboard_token_path) == (0o640, group.gr_gid)
        # The login secret lives in the daemon's memory only: there is no file to read.
        assert not (cfg.run_dir / "login.secret").exists()

        member = [group.gr_gid]
        assert served(await peer(hive.sock, NOBODY, member))
        assert (await peer(cfg.dashboard_url_path, NOBODY, member, "read")).strip() == (
            hive.info.login_url
        )
        # Not a member: the run dir and the files keep them out.
        assert (await peer(hive.sock, NOBODY, [])).strip() == "EACCES"
        assert (await peer(cfg.dashboard_url_path, NOBODY, [], "read")).strip() == "EACCES"


@needs_root
async def test_the_peer_check_itself_accepts_members_only(hive_root: Path) -> None:
    """With the file permissions out of the way, the daemon's own check decides: a member by
    its primary group or a supplementary one is served, anyone else is refused."""
    group = admin_group()
    async with open_hive(hive_config(hive_root, admin_group=group.gr_name)) as hive:
        await loosen(hive, hive_root)
        assert served(await peer(hive.sock, group.gr_gid, []))
        assert served(await peer(hive.sock, NOBODY, [NOBODY, group.gr_gid]))
        assert not served(await peer(hive.sock, NOBODY, []))
        assert not served(await peer(hive.sock, NOBODY, [NOBODY]))


@needs_root
async def test_without_an_admin_group_members_of_any_group_are_refused(hive_root: Path) -> None:
    group = admin_group()
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        assert mode_and_gid(cfg.run_dir)[0] == 0o700
        assert mode_and_gid(hive.sock)[0] == 0o600
        await loosen(hive, hive_root)
        assert not served(await peer(hive.sock, group.gr_gid, [group.gr_gid]))


async def loosen(hive: Hive, root: Path) -> None:
    def chmod() -> None:
        for path in (root, hive.cfg.run_dir):
            os.chmod(path, 0o755)
        os.chmod(hive.sock, 0o666)

    await trio.to_thread.run_sync(chmod)


async def test_an_unknown_admin_group_stops_the_daemon(hive_root: Path) -> None:
    argv = [sys.executable, "-m", "hyperhive.cli", "--run-dir", str(hive_root / "run"), "serve"]
    with trio.fail_after(30):
        done = await trio.run_process(
            [*argv, "--state-dir", str(hive_root / "state"), "--admin-group", "no-such-group-hh"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode != 0
    assert b"--admin-group no-such-group-hh: no such group" in done.stderr
    assert not (hive_root / "run" / "host.sock").exists()


def test_require_uid_with_a_group() -> None:
    check = require_uid({0}, group=1234)
    check(Peer(pid=1, uid=0, gid=0))
    check(Peer(pid=1, uid=1000, gid=1234))
    check(Peer(pid=1, uid=1000, gid=100, groups=(100, 1234)))
    with pytest.raises(Forbidden, match="uid 1000"):
        check(Peer(pid=1, uid=1000, gid=100, groups=(100, 4321)))
    with pytest.raises(Forbidden):
        require_uid({0})(Peer(pid=1, uid=1000, gid=1234, groups=(1234,)))
