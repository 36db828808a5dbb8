"""The CRIU adapter: find a working criu, ask it what this kernel allows, and run dump and
restore with one log file per operation. Failures carry CRIU's own error lines."""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import command, mounts, private, procfs
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
# "(00.09) Error (file:line): ...", or with the restored task's PID before "Error".
_ERROR = re.compile(r"^\(?\s*[\d.]*\)?\s*(?:\d+:\s*)?Error \(([^)]*)\):\s*(.*)$")


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


#: The smallest fs.pipe-max-size with which CRIU's lazy-pages page server works: it asks for a
#: 4 MiB tee pipe, ignores the kernel's refusal, then fails with a misleading errno.
LAZY_PIPE_SIZE = 4 << 20
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


def lazy_unready_reason(features: dict[str, bool], pipe_max_size: int) -> str | None:
    """Why post-copy (lazy pages) cannot run on a host with these facts; None if it can (pure)."""
    reasons = []
    if not features.get("uffd-noncoop"):
        reasons.append("criu check --feature uffd-noncoop fails (no userfaultfd for lazy pages)")
    if pipe_max_size < LAZY_PIPE_SIZE:
        reasons.append(f"fs.pipe-max-size is {pipe_max_size}, CRIU's lazy pages need at least "
                       f"{LAZY_PIPE_SIZE} (run `make setup`, or sysctl -w fs.pipe-max-size={LAZY_PIPE_SIZE})")
    return "; ".join(reasons) or None


#: Where CRIU (as root) keeps what it probed of the kernel, if that directory is a tmpfs.
KDAT_DIR = Path("/run")


def probe_cache_unready_reason(fstype: str | None) -> str | None:
    """Why CRIU cannot keep its kernel probe cache on a host whose /run has this filesystem
    type; None if it can (pure)."""
    if fstype == "tmpfs":
        return None
    return (f"{KDAT_DIR} is {fstype or 'not mounted'}, not a tmpfs: CRIU keeps its kernel probe cache "
            f"({KDAT_DIR}/criu.kdat) only on a tmpfs, so every dump and restore probes the kernel "
            f"again, a restore inside the downtime (systemd hosts mount /run as a tmpfs)")


def probe_cache_unready() -> str | None:
    run = mounts.holding(mounts.parse(Path("/proc/self/mountinfo").read_text()), KDAT_DIR)
    return probe_cache_unready_reason(run.fstype if run else None)


def pipe_max_size() -> int:
    return int(PIPE_MAX_SIZE.read_text())


_UFFD_TOTAL = re.compile(r"(\d+)-\d+: UFFD transferred pages: \((\d+)/(\d+)\)")
_PF = re.compile(r"(\d+)-\d+: #PF at 0x([0-9a-f]+)")
_COPY = re.compile(r"(\d+)-\d+: uffd_copy: 0x([0-9a-f]+)/(\d+)")


@dataclass(frozen=True)
class LazyStats:
    """What a `criu lazy-pages` daemon moved, read from its log (-v4)."""

    #: Pages the daemon copied into the restored tasks (all tasks).
    copied_pages: int
    #: Pages the image said would be handled by userfaultfd (all tasks).
    total_pages: int
    #: Of copied_pages, those fetched because the restored process touched them.
    on_demand_pages: int
    #: Page faults the daemon saw (some are served by a page already on its way, or a zero page).
    faults: int



def lazy_stats(log_text: str, page_size: int = 4096) -> LazyStats:
    """Parse a lazy-pages daemon's log (pure). A copy that starts at an address the task
    faulted on, one page long, answered that fault; every other copy was pushed ahead."""
    copied = total = on_demand = faults = 0
    waiting: set[tuple[str, str]] = set()
    for line in log_text.splitlines():
        if m := _PF.search(line):
            faults += 1
            waiting.add((m.group(1), m.group(2)))
        elif m := _COPY.search(line):
            key = (m.group(1), m.group(2))
            if key in waiting and int(m.group(3)) == page_size:
                on_demand += 1
            waiting.discard(key)
        elif m := _UFFD_TOTAL.search(line):
            copied += int(m.group(2))
            total += int(m.group(3))
    return LazyStats(copied, total, on_demand, faults)


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
    #: Why post-copy cannot run here (None: it can).
    postcopy_unready: str | None = None
    #: Why CRIU probes the kernel on every run here (None: it keeps a cache).
    probe_cache_unready: str | None = None


@dataclass(frozen=True)
class DumpResult:
    seconds: float
    log: Path


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    seconds: float
    log: Path


#: A binary as it is on disk: (path, device, inode, mtime).
BinaryKey = tuple[str, int, int, int]
_VERSIONS: dict[BinaryKey, str] = {}
#: `criu check --feature` answers, by binary and feature: they depend on the binary and the
#: running kernel, neither of which changes under a running migrd.
_FEATURES: dict[tuple[BinaryKey, str], bool] = {}


class Criu:
    """One criu binary (or wrapper). Every call takes an argv list and a log path."""

    def __init__(self, path: str | os.PathLike[str], network_lock: str = "nftables") -> None:
        self.path = str(path)
        self.network_lock = network_lock

    def config_file(self, *, leave_stopped: bool) -> str:
        """A CRIU configuration file for runtimes that run CRIU themselves (runc and Podman,
        through the annotation org.criu.config): the same network lock as migrd's own dumps
        (its tables are removed after a move), and leave-stopped for a restore that waits for
        the commit."""
        return f"network-lock {self.network_lock}\n" + ("leave-stopped\n" if leave_stopped else "")

    def _run(self, args: list[str], timeout: float | None = 600, pass_fds: tuple[int, ...] = (),
             prefix: tuple[str, ...] = ()):
        return command.run([*prefix, self.path, *args], check=False, timeout=timeout, pass_fds=pass_fds)

    def _key(self) -> BinaryKey:
        st = os.stat(self.path)
        return (self.path, st.st_dev, st.st_ino, st.st_mtime_ns)

    def version(self) -> str:
        """Asked once per binary (as it is on disk): a dump's manifest names the version while
        the workload is frozen, so the migration asks first, before the freeze."""
        key = self._key()
        if key not in _VERSIONS:
            _VERSIONS[key] = parse_version(self._run(["--version"], 30).stdout.decode(errors="replace"))
        return _VERSIONS[key]

    def check(self) -> tuple[bool, str]:
        cp = self._run(["check"], 60)
        text = (cp.stdout + cp.stderr).decode(errors="replace")
        return cp.returncode == 0, command.last_line(text)

    def has_feature(self, name: str) -> bool:
        """Asked once per binary and feature: pre-copy asks when its strategy is chosen and
        again when its rounds start, each a CRIU start before the freeze."""
        key = (self._key(), name)
        if key not in _FEATURES:
            _FEATURES[key] = self._run(["check", "--feature", name], 60).returncode == 0
        return _FEATURES[key]

    def lazy_unready(self) -> str | None:
        """Why post-copy cannot run with this CRIU on this host (None: it can)."""
        return lazy_unready_reason({"uffd-noncoop": self.has_feature("uffd-noncoop")}, pipe_max_size())

    def report(self) -> CheckReport:
        ok, msg = self.check()
        features = {f: self.has_feature(f) for f in FEATURES}
        return CheckReport(self.path, self.version(), ok, msg, features,
                           lazy_unready_reason(features, pipe_max_size()), probe_cache_unready())

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
             page_server_fd: int | None = None, parent: str | None = None, pre: bool = False,
             extra: list[str] | None = None, pass_fds: tuple[int, ...] = (),
             as_user: tuple[int, int] | None = None) -> DumpResult:
        """pass_fds: descriptors CRIU inherits, e.g. a lock that must stay held while CRIU
        runs even if its caller dies. page_server_fd: a connected socket to a page server;
        the memory pages go there instead of into images. as_user: (uid, gid) to run CRIU as
        (see dump_user); its files are then that user's until restrict_files. pre: a
        `criu pre-dump` (the memory only, the task runs on) that starts soft-dirty tracking;
        parent: the images of the pre-dump before, relative to images (CRIU links it as
        `parent`): only the pages written since go into images."""
        args = ["pre-dump" if pre else "dump", "-t", str(pid), "-D", str(images), "-o", str(log), "-v4"]
        args += [] if pre else ["--network-lock", self.network_lock]
        args += ["--track-mem"] if pre or parent else []
        args += ["--prev-images-dir", parent] if parent else []
        prefix: tuple[str, ...] = ()
        if as_user is not None:
            caps = procfs.capabilities(Path("/proc/self/status").read_text())
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
            raise self._fail(args[0], log, cp.stderr)
        return DumpResult(time.monotonic() - t0, log)

    def restore(self, images: Path, log: Path, *, tcp_established: bool = False,
                shell_job: bool = False, leave_stopped: bool = False, lazy_work: Path | None = None,
                extra: list[str] | None = None) -> RestoreResult:
        """leave_stopped: every restored task waits in SIGSTOP until someone sends SIGCONT,
        so a migration can verify a copy before it runs a single instruction. lazy_work: the
        memory not in images comes from a `lazy_pages` daemon listening in this work directory."""
        pidfile = log.with_suffix(".pid")
        # --manage-cgroups ignore: the restored task joins the cgroup of whoever runs criu (on a
        # bed host, that host's cgroup), instead of the source host's cgroup paths.
        args = ["restore", "-D", str(images), "-o", str(log), "-v4", "-d",
                "--pidfile", str(pidfile), "--network-lock", self.network_lock,
                "--manage-cgroups=ignore"]
        args += ["--tcp-established"] if tcp_established else []
        args += ["--shell-job"] if shell_job else []
        args += ["--leave-stopped"] if leave_stopped else []
        args += ["--lazy-pages", "-W", str(lazy_work)] if lazy_work else []
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

    def lazy_dump(self, pid: int, images: Path, log: Path, sock_fd: int, *,
                  tcp_established: bool = False, shell_job: bool = False,
                  pass_fds: tuple[int, ...] = ()) -> LazyDump:
        """Start `criu dump --lazy-pages`: it writes every image except the lazily served
        memory, then serves that memory over the connected socket sock_fd until the target's
        lazy-pages daemon has it all. The dumped tree is left stopped (never resumed or ended
        by CRIU once the images are complete: the caller decides)."""
        signal_dir = private.private_dir(images.parent / (images.name + ".signal"))
        fifo = signal_dir / "images-ready"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        # CRIU runs its action script after the non-lazy images are flushed and before it
        # starts serving pages: the one moment the images can be sent (cr-dump.c).
        script = signal_dir / "action"
        fd = private.open_private(script, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write('#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n'
                    f"printf ready > {shlex.quote(str(fifo))}\n")
        os.chmod(script, stat.S_IRWXU)  # CRIU executes it
        ready = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        args = ["dump", "-t", str(pid), "-D", str(images), "-o", str(log), "-v4",
                "--network-lock", self.network_lock, "--lazy-pages", "--ps-socket", str(sock_fd),
                "--leave-stopped", "--action-script", str(script)]
        args += ["--tcp-established"] if tcp_established else []
        args += ["--shell-job"] if shell_job else []
        try:
            proc = command.spawn([self.path, *args], pass_fds=(*pass_fds, sock_fd), stderr=subprocess.PIPE,
                                 new_session=False)
        except BaseException:
            os.close(ready)
            raise
        return LazyDump(self, proc, log, ready, signal_dir)

    def lazy_pages(self, images: Path, work: Path, log: Path, sock_fd: int, timeout: float) -> LazyDaemon:
        """Start `criu lazy-pages` for images, fetching pages over the connected socket
        sock_fd from a lazy dump; returns once it listens (a unix socket in work) for
        `restore --lazy-pages`."""
        status_r, status_w = os.pipe()
        try:
            proc = command.spawn([self.path, "lazy-pages", "--page-server", "--ps-socket", str(sock_fd),
                                  "--status-fd", str(status_w), "-D", str(images), "-W", str(work),
                                  "-o", str(log), "-v4"],
                                 pass_fds=(sock_fd, status_w), stderr=subprocess.PIPE)
        finally:
            os.close(status_w)
        daemon = LazyDaemon(self, proc, log)
        try:
            ready, _, _ = select.select([status_r], [], [], timeout)
            # One byte when it listens; EOF if it died first.
            if not ready or os.read(status_r, 1) != b"\0":
                raise daemon.failure(f"not ready within {timeout:g} s" if not ready else None)
        except BaseException:
            daemon.kill()
            raise
        finally:
            os.close(status_r)
        return daemon

    def cpuinfo_dump(self, images: Path, log: Path) -> None:
        cp = self._run(["cpuinfo", "dump", "-D", str(images), "-o", str(log)], 60)
        if cp.returncode != 0:
            raise self._fail("cpuinfo dump", log, cp.stderr)

    def cpuinfo_check(self, images: Path, log: Path) -> None:
        cp = self._run(["cpuinfo", "check", "-D", str(images), "-o", str(log)], 60)
        if cp.returncode != 0:
            raise self._fail("cpuinfo check", log, cp.stderr)


class LazyDump:
    """A running `criu dump --lazy-pages` (see Criu.lazy_dump)."""

    def __init__(self, criu: Criu, proc: subprocess.Popen[bytes], log: Path, ready_fd: int,
                 signal_dir: Path) -> None:
        self.criu = criu
        self.proc = proc
        self.log = log
        self._ready_fd = ready_fd
        self._signal_dir = signal_dir

    def _close_fifo(self) -> None:
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1

    def _cleanup_signal(self) -> None:
        """Only once CRIU ended: it runs the action script for later actions too."""
        self._close_fifo()
        shutil.rmtree(self._signal_dir, ignore_errors=True)

    def wait_images(self, timeout: float) -> None:
        """Return once the images (all but the lazy memory) are complete; CRIU's own error if
        the dump failed first (then CRIU has resumed the tree)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([self._ready_fd], [], [], 0.02)
                if ready and os.read(self._ready_fd, 16):
                    return
                if self.proc.poll() is not None:
                    self._cleanup_signal()
                    raise self.criu._fail("dump", self.log, self.proc.stderr.read() if self.proc.stderr else b"")
                if time.monotonic() > deadline:
                    self.kill()
                    raise CriuError("dump", [f"images not complete within {timeout:g} s"], self.log)
        finally:
            self._close_fifo()

    def wait(self, timeout: float) -> None:
        """Wait for the end of page serving; CRIU's error if it failed."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CriuError("dump", [f"still serving pages {timeout:g} s on"], self.log) from None
        finally:
            self._cleanup_signal()
        if self.proc.returncode != 0:
            raise self.criu._fail("dump", self.log, err)

    def served_all(self) -> bool:
        """CRIU's own word that the lazy transfer finished (after wait())."""
        try:
            return "Lazy pages transfer finished successfully" in self.log.read_text(errors="replace")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._cleanup_signal()


class LazyDaemon:
    """A running `criu lazy-pages` (see Criu.lazy_pages)."""

    def __init__(self, criu: Criu, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.criu = criu
        self.proc = proc
        self.log = log

    def failure(self, why: str | None = None) -> CriuError:
        if why is None and self.proc.poll() is not None:
            return self.criu._fail("lazy-pages", self.log, self.proc.stderr.read() if self.proc.stderr else b"")
        return CriuError("lazy-pages", [why or "failed"], self.log)

    def failed(self) -> CriuError | None:
        """Its error if it already ended badly (ended well: every page arrived)."""
        if self.proc.poll() in (None, 0):
            return None
        return self.failure()

    def wait(self, timeout: float) -> LazyStats:
        """Wait until every page is in the restored tasks; what moved, or CRIU's error."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CriuError("lazy-pages", [f"pages still missing {timeout:g} s on"], self.log) from None
        if self.proc.returncode != 0:
            raise self.criu._fail("lazy-pages", self.log, err)
        # Exit 0: every page still mapped arrived (fewer than total_pages when the process
        # unmapped some first).
        return lazy_stats(self.log.read_text(errors="replace"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


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
