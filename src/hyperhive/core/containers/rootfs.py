"""What an agent's container is made of on bwrap and nspawn: its uid, its /etc, its host paths.

Both backends build the same minimal root: the host's /usr (and the merged-usr links), a
generated /etc, the runtime the harness needs (the venv, Python, hyperhive, the claude CLI,
/nix/store where it exists), read-only; nothing from /var, /srv, /opt, /mnt, /media, /home or
other services. The payload runs as the agent's own unprivileged uid (SPEC §4.1b).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from pathlib import Path

import hyperhive
from hyperhive.core.containers.base import ContainerSpec

UID_BASE = 300000
"""Default first uid of the hive's range: the manager gets UID_BASE, each agent UID_BASE plus
its UI port's offset (100-999), so uids are unique, stable and need no table of their own."""
UID_SPAN = 1000

ETC_COPIED = (
    "ld.so.cache",
    "ld.so.conf",
    "localtime",
    "os-release",
    "protocols",
    "services",
    "host.conf",
    "gai.conf",
    "mime.types",
    "debian_version",
    "shells",
)
"""Small host files (or symlinks) copied into a container's generated /etc when present."""
ETC_BOUND = ("ssl", "ca-certificates", "alternatives", "pki")
"""Host /etc directories bound read-only into it: CA certificates and Debian's alternatives
(/usr/bin/editor and friends point through /etc/alternatives)."""

MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""Top-level names that are links into /usr on a merged-usr host (real dirs elsewhere)."""

HYPERHIVE_ROOT = str(Path(hyperhive.__file__).parent.parent)
"""Where the daemon's hyperhive package was imported from: bound into every container, and
the harness's PYTHONPATH (bwrap/nspawn run the daemon's own hyperhive)."""


def agent_uid(port: int, ui_port_base: int, uid_base: int = UID_BASE) -> int:
    """The agent's uid: derived from its UI port, which the registry keeps unique per agent
    (and within one span of 1000), taken modulo the span so that a daemon restarted with
    another `--ui-port-base` keeps every agent's uid when the bases differ by a multiple of
    1000, and never fails for ports allocated under the old one."""
    return uid_base + (port - ui_port_base) % UID_SPAN


def check_uid_range(uid_base: int) -> None:
    """Refuse a uid range that overlaps a host user's or group's ids: agents would own their
    files and processes. Blocking (reads the host's passwd/group)."""
    import grp
    import pwd

    if not 1000 <= uid_base <= (1 << 31) - UID_SPAN:
        raise ValueError(f"--agent-uid-base {uid_base}: choose a base from 1000 to 2^31-1000")
    span = range(uid_base, uid_base + UID_SPAN)
    users = [u.pw_name for u in pwd.getpwall() if u.pw_uid in span]
    groups = [g.gr_name for g in grp.getgrall() if g.gr_gid in span]
    if users or groups:
        raise ValueError(
            f"--agent-uid-base {uid_base}: uids/gids {span.start}-{span.stop - 1} are the hive's,"
            f" but host users {users} / groups {groups} have ids in that range; pick another base"
        )


def user_name(name: str) -> str:
    """The agent's user in its own /etc/passwd (agent names are valid user names)."""
    return name


def _passwd(user: str, uid: int) -> str:
    return (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{user}:x:{uid}:{uid}:hyperhive agent:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )


def _group(user: str, uid: int) -> str:
    return f"root:x:0:\n{user}:x:{uid}:\nnogroup:x:65534:\n"


def _host_resolv() -> str:
    try:
        return Path("/etc/resolv.conf").read_text("utf-8", "replace")
    except OSError:
        return ""


SLIRP_DNS = "nameserver 10.0.2.3\n"
"""slirp4netns's resolver, which relays to the host's."""


def write_etc(
    directory: Path, *, user: str, uid: int, hostname: str, resolv: str | None = None
) -> None:
    """(Re)generate a container's /etc in `directory` (a daemon-owned dir), with mount points
    for `host_etc_dirs()`. Blocking."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    files = {
        "passwd": _passwd(user, uid),
        "group": _group(user, uid),
        "hostname": hostname + "\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n",
        "resolv.conf": _host_resolv() if resolv is None else resolv,
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    }
    for name, text in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, "utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / name)
    for name in ETC_COPIED:
        src, dest = Path("/etc") / name, directory / name
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        if src.is_symlink():
            dest.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o644)
    for path in host_etc_dirs():
        (directory / Path(path).name).mkdir(exist_ok=True)


def host_etc_dirs() -> list[str]:
    """The host's /etc directories (of ETC_BOUND) a container's /etc gets bound read-only."""
    return [
        f"/etc/{n}"
        for n in ETC_BOUND
        if os.path.isdir(f"/etc/{n}") and not os.path.islink(f"/etc/{n}")
    ]


def generate_etc(spec: ContainerSpec) -> None:
    """The spec's /etc (see write_etc); its resolver is slirp's when slirp carries its traffic."""
    assert spec.etc_dir is not None
    slirp = spec.egress is not None and spec.egress.mode in ("open", "anthropic")
    write_etc(
        spec.etc_dir,
        user=user_name(spec.name),
        uid=os.getuid() if spec.uid is None else spec.uid,
        hostname=spec.container,
        resolv=SLIRP_DNS if slirp else None,
    )


def merged_usr_links() -> list[tuple[str, str]]:
    """(target, path) of the host's top-level links into /usr (/bin -> usr/bin, ...)."""
    links = []
    for name in MERGED_USR:
        path = "/" + name
        if os.path.islink(path):
            links.append((os.readlink(path), path))
    return links


def under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def masked_paths(hidden: tuple[Path, ...], shown: list[str]) -> list[str]:
    """The hidden host paths (the daemon's dirs) that a shown path would reveal: each gets a
    tmpfs over it. The others are not in the container at all (its root is minimal)."""
    candidates = {p for h in hidden for p in (str(h), os.path.realpath(h))}
    return sorted(p for p in candidates if any(under(p, top) for top in shown))


def runtime_paths() -> list[str]:
    """Host paths the harness needs outside /usr: the venv, Python, hyperhive's own source,
    the claude CLI and node, /nix/store when it exists, and real (non-link) /bin, /lib..."""
    candidates = {sys.prefix, sys.base_prefix, HYPERHIVE_ROOT}
    for tool in ("claude", "node"):
        found = shutil.which(tool)
        if found:
            candidates.add(os.path.dirname(found))
            candidates.add(os.path.dirname(os.path.realpath(found)))
    for name in MERGED_USR:
        path = "/" + name
        if os.path.isdir(path) and not os.path.islink(path):
            candidates.add(path)
    if os.path.isdir("/nix/store"):
        candidates.add("/nix/store")
    kept: set[str] = set()
    for path in candidates:
        for p in (path, os.path.realpath(path)):
            if p not in ("/", "") and not under(p, "/usr") and os.path.exists(p):
                kept.add(p)
    # A path inside another one is covered by it.
    return sorted(p for p in kept if not any(p != q and under(p, q) for q in kept))


def own_tree(path: Path, uid: int) -> None:
    """Give the agent's bind dir and everything below it to `uid` (for a hive that ran its
    agents as root before), never following a symlink. Blocking; a no-op once owned."""
    st = os.lstat(path)
    if st.st_uid == uid and st.st_gid == uid:
        return
    os.chown(path, uid, uid, follow_symlinks=False)
    for _root, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, uid, uid, dir_fd=dir_fd, follow_symlinks=False)


class UnsafePath(Exception):
    """A path the daemon was about to hand to a container is not what it must be."""


def check_bind_source(path: Path, *, uid: int | None = None) -> None:
    """A writable bind's source must be a real directory (not a symlink, FIFO or file), owned
    by the daemon or, given `uid`, by the agent. Blocking."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafePath(f"bind source {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"bind source {path} is a symlink (to {os.readlink(path)!r}): refused")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"bind source {path} is not a directory: refused")
    owners = {os.getuid()} if uid is None else {os.getuid(), uid}
    if st.st_uid not in owners:
        raise UnsafePath(f"bind source {path} is owned by uid {st.st_uid}, not {sorted(owners)}")
