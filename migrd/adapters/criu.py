"""The CRIU adapter: find a working criu, ask it what this kernel allows, and run dump and
restore with one log file per operation. Failures carry CRIU's own error lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import command, procinfo
from migrd.config import Config
from migrd.errors import CriuError, MigrdError

PREFIX_CRIU = Path("/opt/migrd/criu/bin/criu")

#: Features migrd's strategies depend on, with what each one enables.
FEATURES: dict[str, str] = {
    "uffd": "lazy pages: post-copy migration (restore before all memory arrived)",
    "uffd-noncoop": "lazy pages for processes that fork or remap during post-copy",
    "mem_dirty_track": "soft-dirty tracking: pre-copy (iterative pre-dump) migration",
    "tcp_half_closed": "TCP repair of half-closed connections (--tcp-established)",
    "network_lock_nftables": "network lock with nftables (no iptables binary needed)",
    "clone3_set_tid": "restore a process with its original PID",
}

# Lines CRIU prints on every run on hosts where root lacks CAP_SYS_RESOURCE; never the cause.
_HARMLESS = re.compile(r"Can't setup RLIMIT_NOFILE|Can't keep kdat cache")
_ERROR = re.compile(r"^\(?\s*[\d.]*\)?\s*Error \(([^)]*)\):\s*(.*)$")


def error_lines(log_text: str) -> list[str]:
    """CRIU's error lines from a log, without timestamps or known-harmless noise (pure)."""
    out = []
    for raw in log_text.splitlines():
        line = raw.strip()
        m = _ERROR.match(line)
        if m and not _HARMLESS.search(line):
            out.append(f"{m.group(2).strip()} [{m.group(1)}]")
    return out


def parse_version(text: str) -> str:
    m = re.search(r"Version:\s*(\S+)", text)
    if not m:
        raise MigrdError(f"cannot read a version from criu's output: {command.last_line(text)}")
    return m.group(1)


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


#: Root reads the resource limits (prlimit) of a task with other user IDs only with this
#: capability, which root lacks in many containers (and on the machines the bed runs on).
CAP_SYS_RESOURCE = 24


def dump_user(creds: list[tuple[int, ...]], caps: int) -> tuple[int, int] | None:
    """Who CRIU's dump runs as (pure): None for root as usual; (uid, gid) of the tree's one
    service user when root cannot read that user's rlimits (no CAP_SYS_RESOURCE). CRIU then
    runs with the tasks' own user ID, keeping root's other capabilities, and the kernel lets
    a task read the limits of tasks with its IDs. creds: (uid, euid, suid, gid, egid, sgid)
    of every task of the tree."""
    if caps >> CAP_SYS_RESOURCE & 1 or len(set(creds)) != 1:
        return None
    uid, euid, suid, gid, egid, sgid = creds[0]
    if uid == 0 or len({uid, euid, suid}) != 1 or len({gid, egid, sgid}) != 1:
        return None
    return uid, gid


def as_user_prefix(uid: int, gid: int, caps: int, last_cap: int) -> list[str]:
    """argv prefix that runs a program as uid/gid with the capabilities in caps kept (as
    ambient capabilities, which survive exec for a non-root user)."""
    spec = ",".join(["+all", *(f"-cap_{n}" for n in range(last_cap + 1) if not caps >> n & 1)])
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            f"--inh-caps={spec}", f"--ambient-caps={spec}", "--"]


@dataclass(frozen=True)
class CheckReport:
    path: str
    version: str
    ok: bool
    message: str
    features: dict[str, bool]


@dataclass(frozen=True)
class DumpResult:
    seconds: float
    log: Path


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    seconds: float
    log: Path


class Criu:
    """One criu binary (or wrapper). Every call takes an argv list and a log path."""

    def __init__(self, path: str | os.PathLike[str], network_lock: str = "nftables") -> None:
        self.path = str(path)
        self.network_lock = network_lock

    def _run(self, args: list[str], timeout: float | None = 600, pass_fds: tuple[int, ...] = (),
             prefix: tuple[str, ...] = ()):
        return command.run([*prefix, self.path, *args], check=False, timeout=timeout, pass_fds=pass_fds)

    def version(self) -> str:
        return parse_version(self._run(["--version"], 30).stdout.decode(errors="replace"))

    def check(self) -> tuple[bool, str]:
        cp = self._run(["check"], 60)
        text = (cp.stdout + cp.stderr).decode(errors="replace")
        return cp.returncode == 0, command.last_line(text)

    def has_feature(self, name: str) -> bool:
        return self._run(["check", "--feature", name], 60).returncode == 0

    def report(self) -> CheckReport:
        ok, msg = self.check()
        return CheckReport(self.path, self.version(), ok, msg,
                           {f: self.has_feature(f) for f in FEATURES})

    def _fail(self, action: str, log: Path, stderr: bytes) -> CriuError:
        try:
            lines = error_lines(log.read_text(errors="replace"))
        except OSError:
            lines = []
        if not lines:
            lines = [command.last_line(stderr)]
        return CriuError(action, lines, log)

    def dump(self, pid: int, images: Path, log: Path, *, leave_running: bool = False,
             leave_stopped: bool = False, tcp_established: bool = False, shell_job: bool = False,
             page_server_fd: int | None = None,
             extra: list[str] | None = None, pass_fds: tuple[int, ...] = (),
             as_user: tuple[int, int] | None = None) -> DumpResult:
        """pass_fds: descriptors CRIU inherits, e.g. a lock that must stay held while CRIU
        runs even if its caller dies. page_server_fd: a connected socket to a page server;
        the memory pages go there instead of into images. as_user: (uid, gid) to run CRIU as
        (see dump_user); its files are then that user's until restrict_files."""
        args = ["dump", "-t", str(pid), "-D", str(images), "-o", str(log), "-v4",
                "--network-lock", self.network_lock]
        prefix: tuple[str, ...] = ()
        if as_user is not None:
            caps = procinfo.capabilities(Path("/proc/self/status").read_text())
            last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
            prefix = tuple(as_user_prefix(*as_user, caps, last_cap))
            # CRIU insists on this flag for any non-root user; with root's capabilities kept
            # it dumps as root would.
            args.append("--unprivileged")
        args += ["--leave-running"] if leave_running else []
        args += ["--leave-stopped"] if leave_stopped else []
        if page_server_fd is not None:
            args += ["--page-server", "--ps-socket", str(page_server_fd)]
            pass_fds = (*pass_fds, page_server_fd)
        args += ["--tcp-established"] if tcp_established else []
        args += ["--shell-job"] if shell_job else []
        t0 = time.monotonic()
        cp = self._run(args + (extra or []), pass_fds=pass_fds, prefix=prefix)
        if cp.returncode != 0:
            raise self._fail("dump", log, cp.stderr)
        return DumpResult(time.monotonic() - t0, log)

    def restore(self, images: Path, log: Path, *, tcp_established: bool = False,
                shell_job: bool = False, leave_stopped: bool = False,
                extra: list[str] | None = None) -> RestoreResult:
        """leave_stopped: every restored task waits in SIGSTOP until someone sends SIGCONT,
        so a migration can verify a copy before it runs a single instruction."""
        pidfile = log.with_suffix(".pid")
        # --manage-cgroups ignore: the restored task joins the cgroup of whoever runs criu (on a
        # bed host, that host's cgroup), instead of the source host's cgroup paths.
        args = ["restore", "-D", str(images), "-o", str(log), "-v4", "-d",
                "--pidfile", str(pidfile), "--network-lock", self.network_lock,
                "--manage-cgroups=ignore"]
        args += ["--tcp-established"] if tcp_established else []
        args += ["--shell-job"] if shell_job else []
        args += ["--leave-stopped"] if leave_stopped else []
        t0 = time.monotonic()
        cp = self._run(args + (extra or []))
        if cp.returncode != 0:
            raise self._fail("restore", log, cp.stderr)
        seconds = time.monotonic() - t0
        try:
            pid = int(pidfile.read_text().strip())
        finally:
            pidfile.unlink(missing_ok=True)
        return RestoreResult(pid, seconds, log)

    def page_server(self, images: Path, log: Path, sock_fd: int) -> subprocess.Popen[bytes]:
        """Start a page server that writes one dump's pages into images, speaking over the
        connected socket sock_fd; it ends when the dump closes its side. Check it with
        page_server_done."""
        return command.spawn([self.path, "page-server", "--ps-socket", str(sock_fd), "-D", str(images),
                           "-o", str(log), "-v4"], pass_fds=(sock_fd,), stderr=subprocess.PIPE)

    def page_server_done(self, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
        try:
            _, err = server.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise CriuError("page-server", [f"still running {timeout:g} s after the dump ended"], log) from None
        if server.returncode != 0:
            raise self._fail("page-server", log, err)

    def cpuinfo_dump(self, images: Path, log: Path) -> None:
        cp = self._run(["cpuinfo", "dump", "-D", str(images), "-o", str(log)], 60)
        if cp.returncode != 0:
            raise self._fail("cpuinfo dump", log, cp.stderr)

    def cpuinfo_check(self, images: Path, log: Path) -> None:
        cp = self._run(["cpuinfo", "check", "-D", str(images), "-o", str(log)], 60)
        if cp.returncode != 0:
            raise self._fail("cpuinfo check", log, cp.stderr)


def _works(path: str) -> bool:
    try:
        return Criu(path).check()[0]
    except MigrdError:
        return False


def find_criu(cfg: Config) -> Criu:
    """$MIGRD_CRIU, then config criu.path, then a `criu` on PATH that passes `criu check`,
    then the private prefix install. The first two are taken as given (explicit choice)."""
    lock = cfg.criu.network_lock
    explicit = os.environ.get("MIGRD_CRIU") or (str(cfg.criu.path) if cfg.criu.path else None)
    if explicit:
        if not (os.access(explicit, os.X_OK) or shutil.which(explicit)):
            raise MigrdError(f"criu {explicit!r} (from MIGRD_CRIU or criu.path) is not executable")
        return Criu(explicit, lock)
    system = shutil.which("criu")
    if system and _works(system):
        return Criu(system, lock)
    if PREFIX_CRIU.exists():
        return Criu(PREFIX_CRIU, lock)
    raise MigrdError("no working CRIU found: run `make setup` (installs CRIU >= 4.2) "
                     "or set MIGRD_CRIU / criu.path")
