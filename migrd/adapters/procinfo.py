"""Look at a live process (psutil and /proc): the adapter behind the manifest's process
description and behind "may this PID be checkpointed at all"."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from migrd.errors import InputError, NotPermitted
from migrd.model import Connection, FileIdentity, Listener, OpenFile, ProcessInfo


def parse_pid(text: str | int) -> int:
    try:
        pid = int(str(text).strip())
    except ValueError:
        raise InputError(f"{text!r} is not a PID (expected a positive number)") from None
    if pid <= 0:
        raise InputError(f"{pid} is not a PID (expected a positive number)")
    return pid


def ns_chain(status_text: str, field: str = "NSpid") -> list[int]:
    """An NSpid/NSpgid/NSsid line of /proc/PID/status: the ID as seen from each nested PID
    namespace, outermost first; 0 where the namespace cannot see that process."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return [int(x) for x in line.split()[1:]]
    return []


def session_outside(status_text: str) -> bool:
    """True when the process's session leader is invisible from the process's own PID
    namespace, e.g. the kernel's session 0 that PID 1 and everything it starts without setsid
    belong to. CRIU cannot dump such a process, not even with --shell-job."""
    return ns_chain(status_text, "NSsid")[-1:] == [0]


#: Mounting a /proc needs this capability.
CAP_SYS_ADMIN = 21


def proc_unreachable(status_text: str) -> bool:
    """True for the init of its own PID namespace that may not mount a /proc (a service user
    without CAP_SYS_ADMIN): CRIU's parasite needs, inside the task, a /proc of the task's own
    PID namespace and mounts one when the task sees its parent's; CRIU refuses "can't dump
    unprivileged task whose /proc doesn't belong to it"."""
    return ns_chain(status_text)[-1:] == [1] and not capabilities(status_text) >> CAP_SYS_ADMIN & 1


def capabilities(status_text: str) -> int:
    """The effective capability mask in a /proc/PID/status text."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _listening(p: psutil.Process) -> tuple[Listener, ...]:
    out = []
    for c in p.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr:
            family = "inet6" if c.family == socket.AF_INET6 else "inet"
            out.append(Listener(family, c.laddr.ip, c.laddr.port))
    return tuple(sorted(set(out), key=lambda s: (s.port, s.family, s.address)))


def _established(p: psutil.Process) -> tuple[Connection, ...]:
    out = {Connection(c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port)
           for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED and c.raddr}
    return tuple(sorted(out, key=lambda c: (c.local_port, c.remote_address, c.remote_port)))


def _devices(tree: list[psutil.Process]) -> tuple[str, ...]:
    """Device nodes the tree has open: psutil's open_files lists regular files only."""
    found: set[str] = set()
    for member in tree:
        try:
            fds = os.scandir(f"/proc/{member.pid}/fd")
        except OSError:
            continue
        with fds:
            for e in fds:
                try:
                    target = os.readlink(e.path)
                except OSError:
                    continue
                if target.startswith("/dev/"):
                    found.add(target)
    return tuple(sorted(found))


#: Bytes digested at each end of a file for its identity: enough to tell two files apart that
#: merely share a filesystem ID and inode number (disks cloned from one image), cheap to read.
_IDENTITY_BYTES = 4096


def file_identity(path: str, upto: int | None = None) -> FileIdentity | None:
    """path's identity over its first `upto` bytes (default: its current size); None when it
    cannot be read. A file shorter than `upto` gets an empty digest: it matches nothing."""
    try:
        # Non-blocking: the same path may name a FIFO or a device on the other host.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            fsid = os.fstatvfs(f.fileno()).f_fsid
            size = st.st_size if upto is None else upto
            if st.st_size < size:
                return FileIdentity(fsid, st.st_ino, size, "")
            h = hashlib.sha256(f.read(min(size, _IDENTITY_BYTES)))
            f.seek(max(0, size - _IDENTITY_BYTES))
            h.update(f.read(min(size, _IDENTITY_BYTES)))
    except OSError:
        return None
    return FileIdentity(fsid, st.st_ino, size, h.hexdigest())


def _open_files(p: psutil.Process) -> tuple[OpenFile, ...]:
    files = []
    for f in p.open_files():
        try:
            size: int | None = os.stat(f.path).st_size
        except OSError:
            size = None  # deleted or unreachable; CRIU handles deleted files itself
        files.append(OpenFile(f.path, f.fd, f.mode, size,
                              file_identity(f.path, size) if size is not None else None))
    return tuple(sorted(files, key=lambda f: f.fd))


def _tree_ids(p: psutil.Process) -> tuple[int, ...]:
    ids: set[int] = set()
    for member in [p, *p.children(recursive=True)]:
        try:
            ids.add(member.pid)
            ids.update(t.id for t in member.threads())
        except psutil.NoSuchProcess:
            pass
    return tuple(sorted(ids))


def tree_creds(pid: int) -> list[tuple[int, ...]]:
    """(uid, euid, suid, gid, egid, sgid) of pid and every descendant still there."""
    out = []
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in tree:
        try:
            u, g = p.uids(), p.gids()
        except psutil.NoSuchProcess:
            continue
        out.append((u.real, u.effective, u.saved, g.real, g.effective, g.saved))
    return out


def checkable(pid: int) -> psutil.Process:
    """Return the process if migrd may checkpoint it, else raise a readable error."""
    if pid == 1:
        raise NotPermitted("PID 1 is the init process; it cannot be checkpointed")
    if pid == os.getpid() or pid in {a.pid for a in psutil.Process().parents()}:
        raise NotPermitted(f"PID {pid} is migrctl itself or one of its ancestors")
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            raise InputError(f"PID {pid} is a zombie (already exited); nothing to checkpoint")
        if not p.exe() and not p.cmdline():
            raise NotPermitted(f"PID {pid} is a kernel thread; only user processes can be checkpointed")
    except psutil.NoSuchProcess:
        raise InputError(f"no process with PID {pid}") from None
    except psutil.AccessDenied:
        raise NotPermitted(f"not allowed to inspect PID {pid} (run as root)") from None
    return p


def inspect(pid: int) -> ProcessInfo:
    p = checkable(pid)
    try:
        with p.oneshot():
            status = Path(f"/proc/{pid}/status").read_text()
            if session_outside(status):
                raise NotPermitted(
                    f"PID {pid} belongs to a session whose leader is outside its PID namespace "
                    "(session 0: started without setsid by init or by a runner that makes no "
                    "sessions); CRIU cannot checkpoint it. Start it with `setsid` or `migrctl run`")
            return ProcessInfo(
                pid=pid,
                cmdline=tuple(p.cmdline()),
                exe=p.exe(),
                cwd=p.cwd(),
                uid=p.uids().real,
                rss=p.memory_info().rss,
                start_time=p.create_time(),
                open_files=_open_files(p),
                listening=_listening(p),
                session_leader=os.getsid(pid) == pid,
                own_pid_namespace=ns_chain(status)[-1:] == [1],
                tree_ids=_tree_ids(p),
                environ=p.environ(),
                established=_established(p),
                devices=_devices([p, *p.children(recursive=True)]),
            )
    except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError):
        raise InputError(f"process {pid} exited while being inspected") from None


def holder(pid: int) -> str | None:
    """Describe the process that holds pid, or None when the PID is free."""
    try:
        p = psutil.Process(pid)
        return f"{p.name()} ({p.status()}, parent {p.ppid()})"
    except psutil.NoSuchProcess:
        return None


def wait_pids_free(pids: Iterable[int], timeout: float) -> tuple[int, str] | None:
    """Wait until every pid is free; return (pid, holder) for one still taken at the end."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending:
        taken = [(pid, who) for pid in pending if (who := holder(pid)) is not None]
        if not taken or time.monotonic() >= deadline:
            return taken[0] if taken else None
        pending = [pid for pid, _ in taken]
        time.sleep(0.1)
    return None


def cgroup_paths(pid: int) -> list[str]:
    """Its cgroup paths as /proc/PID/cgroup lists them ([] when gone): what
    migrate.allow_cgroups matches."""
    try:
        return [line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    except (OSError, IndexError):
        return []


def user_of(pid: int, uid: int) -> str:
    """Its user's name (what migrate.allow_users lists), the number when it has none."""
    try:
        return psutil.Process(pid).username()
    except (psutil.Error, KeyError):
        return str(uid)
