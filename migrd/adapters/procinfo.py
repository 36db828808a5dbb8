"""Look at a live process (psutil and /proc): the adapter behind the manifest's process
description and behind "may this PID be checkpointed at all". The source side's; what the
target side needs of /proc is in procfs, which does without psutil."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil

from migrd.errors import InputError, NotPermitted
from migrd.adapters.procfs import file_identity, ns_chain, session_outside
from migrd.model import Connection, Listener, OpenFile, ProcessInfo


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
    out: list[tuple[int, ...]] = []
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


def mounts_apart(pid: int) -> bool:
    """This process runs in a mount namespace of its own while `pid` shares the host's (PID
    1's): a service sandbox, e.g. a systemd setting that hides paths. CRIU run from here would
    dump the host's whole mount tree with the process and rebuild it on the target. False when
    PID 1's namespace cannot be read (a container's init of another user namespace)."""
    try:
        mine, theirs = os.readlink("/proc/self/ns/mnt"), os.readlink(f"/proc/{pid}/ns/mnt")
    except FileNotFoundError:
        raise InputError(f"no process with PID {pid}") from None
    try:
        host = os.readlink("/proc/1/ns/mnt")
    except PermissionError:
        return False
    return mine != theirs and theirs == host


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
