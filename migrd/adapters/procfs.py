"""Small readers of /proc that both sides of a migration use, without psutil: the target's
`migrctl peer` steps run several times per migration and should not pay for importing it.
(procinfo's full inspection of a process, which only the source needs, uses psutil.)"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from migrd.errors import InputError
from migrd.model import FileIdentity

#: /proc/PID/stat's state letters, as ps(1) and psutil name them.
STATES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "tracing-stop",
          "Z": "zombie", "X": "dead", "I": "idle", "P": "parked", "W": "waking", "K": "wake-kill"}
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def parse_meminfo(text: str) -> tuple[int, int]:
    """/proc/meminfo -> (MemTotal, MemAvailable) in bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "MemFree"):
            num, *unit = rest.split()
            values[key] = int(num) * (1024 if unit == ["kB"] else 1)
    # MemAvailable exists since Linux 3.14; MemFree is the conservative stand-in.
    return values["MemTotal"], values.get("MemAvailable", values.get("MemFree", 0))


@dataclass(frozen=True)
class PidStat:
    """The fields of /proc/PID/stat that migrd uses."""

    comm: str
    state: str
    ppid: int
    #: utime + stime in clock ticks.
    cpu_ticks: int
    #: Start time in clock ticks after boot.
    start_ticks: int


def parse_pid_stat(text: str) -> PidStat:
    """/proc/PID/stat. comm may contain spaces and ')' so split at the LAST ')'."""
    head, _, tail = text.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15, starttime field 22.
    return PidStat(
        comm=comm,
        state=fields[0],
        ppid=int(fields[1]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        start_ticks=int(fields[19]),
    )


@functools.cache
def boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime")


def parse_pid(text: str | int) -> int:
    try:
        pid = int(str(text).strip())
    except ValueError:
        raise InputError(f"{text!r} is not a PID (expected a positive number)") from None
    if pid <= 0:
        raise InputError(f"{pid} is not a PID (expected a positive number)")
    return pid


def mem_available() -> int:
    """Bytes the kernel estimates a new workload can take without swapping (MemAvailable)."""
    return parse_meminfo(Path("/proc/meminfo").read_text())[1]


def pid_stat(pid: int) -> PidStat | None:
    """pid's /proc/PID/stat; None when pid is gone."""
    try:
        return parse_pid_stat(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def start_time(pid: int) -> float | None:
    """When pid started, in epoch seconds (psutil's create_time); None when it is gone."""
    st = pid_stat(pid)
    return None if st is None else boot_time() + st.start_ticks / os.sysconf("SC_CLK_TCK")


def state(pid: int) -> str | None:
    """pid's state letter (STATES); None when it is gone."""
    st = pid_stat(pid)
    return None if st is None else st.state


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def children(pid: int) -> list[int]:
    """pid's children (of all its threads)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        kid = todo.pop()
        out.append(kid)
        todo += children(kid)
    return out


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets pid has open."""
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def parse_listening(text: str) -> dict[int, int]:
    """/proc/net/tcp or tcp6 text: {socket inode: port} of the listening sockets (pure)."""
    out = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[3] == _LISTEN:
            out[int(f[9])] = int(f[1].rpartition(":")[2], 16)
    return out


def listening_ports(pid: int | None = None) -> set[int]:
    """TCP ports listened on in this network namespace, or only by pid's own sockets."""
    net = Path(f"/proc/{pid}/net") if pid is not None else Path("/proc/net")
    found: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            found |= parse_listening((net / name).read_text())
        except (FileNotFoundError, ProcessLookupError):
            pass
    if pid is None:
        return set(found.values())
    return {port for inode, port in found.items() if inode in socket_inodes(pid)}


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


def holder(pid: int) -> str | None:
    """Describe the process that holds pid, or None when the PID is free."""
    st = pid_stat(pid)
    return None if st is None else f"{st.comm} ({STATES.get(st.state, st.state)}, parent {st.ppid})"


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
