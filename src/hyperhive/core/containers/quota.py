"""An agent's /state size quota: its own ext4 volume (a sparse image, loop-mounted).

`[limits] state_max` (or `--agent-state-max`) makes the agent's `/state` a filesystem of that
size: the kernel answers ENOSPC when the agent fills it, nothing it writes can fill the host's
disk, and the daemon sees the usage with statvfs. The image sits next to the state dir in the
agent's root (root's, never the agent's); it is made once, grown when the limit grows (never
shrunk: a smaller limit is reported, not applied), and stays mounted across daemon restarts.
A state dir that already holds files is copied into the new volume, the old tree kept aside as
`state.before-quota` until the operator removes it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

from hyperhive.core.containers.cgroups import parse_size
from hyperhive.protocol.errors import BadParams, Internal

IMAGE = "state.img"
KEPT = "state.before-quota"


@dataclass(frozen=True)
class Usage:
    used: int
    size: int


def parse_state_max(text: str) -> int:
    size = parse_size(text, "limits.state_max")
    if size < 16 << 20:
        raise BadParams(f"limits.state_max {text!r} is below the 16M an ext4 volume needs")
    return size


async def _run(*argv: str) -> None:
    done = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise Internal(f"state quota: {' '.join(argv[:2])} failed: {err}")


def _image_size(image: Path) -> int | None:
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return None
    if not os.path.isfile(image) or os.path.islink(image):
        raise Internal(f"state quota: {image} is not a regular file")
    return st.st_size


def _make_image(image: Path, size: int) -> None:
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _grow(image: Path, size: int) -> None:
    fd = os.open(image, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _loop_device(image: Path) -> str | None:
    """The loop device an image is attached to (from sysfs), if it is."""
    real = os.path.realpath(image)
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == real:
            return f"/dev/{entry.name}"
    return None


async def ensure_state_volume(agent_root: Path, size: int, uid: int) -> str | None:
    """Make the agent's /state its own `size`-byte volume (idempotent); returns a note when the
    configured size is smaller than the volume (it is never shrunk), else None."""
    image, state = agent_root / IMAGE, agent_root / "state"
    current = await trio.to_thread.run_sync(_image_size, image)
    mounted = await trio.to_thread.run_sync(os.path.ismount, state)
    if current is None:
        await trio.to_thread.run_sync(_make_image, image, size)
        await _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"root_owner={uid}:{uid}", str(image))
        current = size
        if not mounted:
            await _adopt_existing(agent_root, image)
    elif size > current:
        if mounted:
            await trio.to_thread.run_sync(_grow, image, size)
            device = await trio.to_thread.run_sync(_loop_device, image)
            if device is not None:
                await _run("losetup", "-c", device)
            await _run("resize2fs", str(device or image))
        else:
            await _run("e2fsck", "-f", "-p", str(image))
            await trio.to_thread.run_sync(_grow, image, size)
            await _run("resize2fs", str(image))
        current = size
    if not await trio.to_thread.run_sync(os.path.ismount, state):
        await trio.to_thread.run_sync(lambda: state.mkdir(mode=0o700, exist_ok=True))
        await _run("mount", "-o", "loop,nosuid,nodev", str(image), str(state))
        await trio.to_thread.run_sync(lambda: os.chmod(state, 0o700))
    if size < current:
        return f"state_max {size} is below the volume's {current} bytes: volumes are not shrunk"
    return None


async def _adopt_existing(agent_root: Path, image: Path) -> None:
    """Copy a state dir that holds files into the fresh volume; keep the old tree aside."""
    state = agent_root / "state"
    if not await trio.to_thread.run_sync(lambda: state.is_dir() and any(state.iterdir())):
        return
    staging = agent_root / "state.mnt"
    await trio.to_thread.run_sync(lambda: staging.mkdir(mode=0o700, exist_ok=True))
    await _run("mount", "-o", "loop,nosuid,nodev", str(image), str(staging))
    try:
        await _run("cp", "-a", "--no-dereference", f"{state}/.", str(staging))
    finally:
        await _run("umount", str(staging))
        await trio.to_thread.run_sync(staging.rmdir)
    await trio.to_thread.run_sync(os.rename, state, agent_root / KEPT)


async def release_state_volume(agent_root: Path) -> None:
    """Unmount the agent's volume, if it has one (before its dir is removed)."""
    state = agent_root / "state"
    if await trio.to_thread.run_sync(os.path.ismount, state):
        await _run("umount", str(state))


def usage(agent_root: Path) -> Usage | None:
    """How full the agent's volume is (blocking); None without a volume."""
    state = agent_root / "state"
    if not os.path.ismount(state):
        return None
    st = os.statvfs(state)
    return Usage(used=(st.f_blocks - st.f_bfree) * st.f_frsize, size=st.f_blocks * st.f_frsize)


def quota_tools_available() -> bool:
    return all(shutil.which(t) for t in ("mkfs.ext4", "mount", "losetup", "resize2fs"))
