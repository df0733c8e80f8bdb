"""The seccomp filter bubblewrap loads for an agent: nspawn's kind of deny list, as BPF.

systemd-nspawn installs its own filter; bwrap installs none unless given one (`--seccomp FD`).
The program is compiled once per daemon by libseccomp (through pyseccomp) and handed to each
bwrap on a pipe-like file descriptor.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

DENIED = (
    # the kernel keyring (not namespaced: other agents' and the host's keys)
    "keyctl",
    "add_key",
    "request_key",
    # kernel modules and kexec
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "kexec_load",
    "kexec_file_load",
    # the mount family: a container's mounts are set up before the payload runs
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "chroot",
    # classic container escapes and kernel attack surface
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    "quotactl",
    "quotactl_fd",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "nfsservctl",
    "uselib",
    "personality",
    # ptrace: an agent's tools may not inspect the harness (which holds the UI token)
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # new namespaces (no user namespaces inside an agent: their root is kernel attack surface)
    "unshare",
    "setns",
)
"""Refused with EPERM. `clone3` answers ENOSYS (so libc falls back to clone, whose namespace
flags are filtered); `clone` with CLONE_NEWUSER or any other namespace flag is refused."""

CLONE_NEW_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)


@functools.cache
def program() -> bytes:
    """The compiled BPF program for this host's native architecture."""
    import pyseccomp as sc

    filt = sc.SyscallFilter(sc.ALLOW)
    for name in DENIED:
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            continue  # a syscall this architecture does not have
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # One rule per flag: MASKED_EQ(flag, flag) matches a clone that sets that flag.
    for bit in range(32):
        flag = 1 << bit
        if CLONE_NEW_FLAGS & flag:
            filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    with tempfile.TemporaryFile() as fh:
        filt.export_bpf(fh)
        fh.seek(0)
        return fh.read()


def open_program_fd() -> int:
    """A read fd positioned at the start of the program (inheritable: bwrap reads it)."""
    data = program()
    read_fd, write_fd = os.pipe()
    try:
        if len(data) > 65536:
            raise ValueError("seccomp program larger than a pipe buffer")
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    os.set_inheritable(read_fd, True)
    return read_fd
