"""Load monitor: what a host and its processes are doing right now.

Two kinds of snapshot, both frozen and JSON-serialisable so agents can exchange them:

* `HostLoad`: one host (a real machine, or a bed host = one cgroup on a shared kernel).
* `ProcessLoad`: one process on it.

Layout (functional core, imperative shell):

* `parse_*` functions turn the text of one /proc or cgroup file into numbers. Pure, unit-tested
  on sample text.
* `*Raw` dataclasses hold the counters read at one instant; `system_load`, `cgroup_load` and
  `process_load` turn two of them (previous, current) into a snapshot with rates. Pure.
* `SystemSource`, `CgroupSource` and `ProcessMonitor` are the thin adapters that read files
  (and psutil for per-process details) and remember the previous counters.

A source is chosen with `make_source("system" | "cgroup", ...)`; both have `.sample()`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from migrd.adapters.procfs import parse_meminfo, parse_pid_stat
from migrd.errors import InputError
from migrd.model import Pressure, HostLoad, ProcessLoad

PROC = Path("/proc")
#: Kernel load averages are 1, 5 and 15 minute exponential averages.
LOADAVG_WINDOWS_S = (60.0, 300.0, 900.0)
#: cgroup v1 reports "no memory limit" as a huge page-aligned number.
V1_UNLIMITED = 1 << 60


# --------------------------------------------------------------------------- snapshots


# --------------------------------------------------------------------------- parsers (pure)


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """/proc/loadavg: '0.31 0.13 0.04 1/84 5089'."""
    a, b, c = text.split()[:3]
    return float(a), float(b), float(c)


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate CPU time counters from /proc/stat, in clock ticks."""

    busy: int
    total: int


def parse_proc_stat(text: str) -> tuple[CpuTimes, int]:
    """/proc/stat -> (aggregate CPU times, procs_running).

    The "cpu" line is user nice system idle iowait irq softirq steal [guest guest_nice]; guest
    time is already counted in user/nice, so it is left out of the total. idle + iowait is idle.
    """
    times: CpuTimes | None = None
    running: int | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "cpu":
            vals = [int(x) for x in parts[1:9]]
            total = sum(vals)
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            times = CpuTimes(busy=total - idle, total=total)
        elif parts[0] == "procs_running":
            running = int(parts[1])
    if times is None or running is None:
        raise InputError("/proc/stat has no 'cpu' or 'procs_running' line")
    return times, running


def parse_pressure(text: str) -> Pressure:
    """/proc/pressure/* or a v2 cgroup's *.pressure: 'some avg10=1.09 avg60=... total=...'."""
    some: float | None = None
    full: float | None = None
    for line in text.splitlines():
        kind, *pairs = line.split()
        avg10 = float(dict(p.split("=", 1) for p in pairs)["avg10"])
        if kind == "some":
            some = avg10
        elif kind == "full":
            full = avg10
    if some is None:
        raise InputError("pressure file has no 'some' line")
    return Pressure(some_avg10=some, full_avg10=full)


def parse_net_dev(text: str) -> int:
    """/proc/net/dev -> bytes received + sent over all interfaces except loopback."""
    total = 0
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == "lo" or not rest:
            continue
        cols = rest.split()
        total += int(cols[0]) + int(cols[8])
    return total


def parse_pid_io(text: str) -> tuple[int, int]:
    """/proc/PID/io -> (read_bytes, write_bytes): bytes that reached storage."""
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return int(values["read_bytes"]), int(values["write_bytes"])


def parse_int(text: str) -> int:
    """Single-number files: cpuacct.usage, memory.usage_in_bytes, memory.current, ..."""
    return int(text.strip())


def parse_cpu_stat_usage(text: str) -> int:
    """cgroup v2 cpu.stat -> usage in nanoseconds (the file gives usage_usec)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000
    raise InputError("cpu.stat has no usage_usec line")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max 'QUOTA PERIOD' -> CPUs of quota, None for 'max' (no limit)."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max":
        return None
    return int(quota) / int(period or "100000")


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us -> CPUs of quota, None for -1."""
    quota = int(quota_text.strip())
    if quota < 0:
        return None
    return quota / int(period_text.strip())


def parse_memory_limit(text: str) -> int | None:
    """v2 memory.max ('max') or v1 memory.limit_in_bytes (huge number) -> bytes or None."""
    value = text.strip()
    if value == "max":
        return None
    limit = int(value)
    return None if limit >= V1_UNLIMITED else limit


def parse_pids(text: str) -> tuple[int, ...]:
    """cgroup.procs / tasks / cgroup.threads: one id per line."""
    return tuple(int(x) for x in text.split())


def decay_loadavg(
    previous: tuple[float, float, float], runnable: float, dt: float
) -> tuple[float, float, float]:
    """The kernel's load average recurrence, for sources the kernel keeps none for."""
    return tuple(  # type: ignore[return-value]
        old * math.exp(-dt / w) + runnable * (1 - math.exp(-dt / w))
        for old, w in zip(previous, LOADAVG_WINDOWS_S)
    )


# --------------------------------------------------------------------------- host: raw -> load


@dataclass(frozen=True)
class SystemRaw:
    """Counters of a whole machine read at one instant."""

    wall: float
    mono: float
    cpus: int
    cpu: CpuTimes
    procs_running: int
    loadavg: tuple[float, float, float]
    mem_total: int
    mem_available: int
    net_bytes: int
    pressure: Mapping[str, Pressure]


def system_load(prev: SystemRaw, cur: SystemRaw, host: str, cpu_speed: float = 1.0) -> HostLoad:
    """A machine's HostLoad from two raw samples (utilization and rates are deltas)."""
    dt = max(cur.mono - prev.mono, 1e-9)
    d_total = cur.cpu.total - prev.cpu.total
    util = (cur.cpu.busy - prev.cpu.busy) / d_total if d_total > 0 else 0.0
    return HostLoad(
        host=host,
        time=cur.wall,
        source="system",
        cpus=cur.cpus,
        cpu_capacity=float(cur.cpus),
        cpu_speed=cpu_speed,
        loadavg=cur.loadavg,
        cpu_util=min(max(util, 0.0), 1.0),
        run_queue=cur.procs_running,
        mem_total=cur.mem_total,
        mem_available=cur.mem_available,
        cpu_pressure=cur.pressure.get("cpu"),
        memory_pressure=cur.pressure.get("memory"),
        io_pressure=cur.pressure.get("io"),
        net_bytes_per_s=max(cur.net_bytes - prev.net_bytes, 0) / dt,
    )


@dataclass(frozen=True)
class CgroupRaw:
    """Counters of one cgroup (a bed host) read at one instant."""

    wall: float
    mono: float
    cpus: int
    #: Total CPU time used by the cgroup, nanoseconds.
    usage_ns: int
    #: CPU quota in CPUs, None when unlimited.
    quota_cpus: float | None
    runnable: int
    mem_usage: int
    #: The cgroup's memory limit, or the machine's memory when unlimited.
    mem_limit: int
    net_bytes: int
    pressure: Mapping[str, Pressure]


def cgroup_load(
    prev: CgroupRaw,
    cur: CgroupRaw,
    host: str,
    prev_loadavg: tuple[float, float, float],
    cpu_speed: float = 1.0,
) -> HostLoad:
    """A bed host's HostLoad from two raw samples of its cgroup and its load average at `prev`
    (the first time: `CgroupSource`'s seed).

    Its processing power is its CPU quota; utilization is CPU time used over the quota's time.
    """
    dt = max(cur.mono - prev.mono, 1e-9)
    capacity = min(float(cur.cpus), cur.quota_cpus) if cur.quota_cpus else float(cur.cpus)
    util = (cur.usage_ns - prev.usage_ns) / 1e9 / (dt * capacity)
    return HostLoad(
        host=host,
        time=cur.wall,
        source="cgroup",
        cpus=cur.cpus,
        cpu_capacity=capacity,
        cpu_speed=cpu_speed,
        loadavg=decay_loadavg(prev_loadavg, cur.runnable, dt),
        cpu_util=min(max(util, 0.0), 1.0),
        run_queue=cur.runnable,
        mem_total=cur.mem_limit,
        mem_available=max(cur.mem_limit - cur.mem_usage, 0),
        cpu_pressure=cur.pressure.get("cpu"),
        memory_pressure=cur.pressure.get("memory"),
        io_pressure=cur.pressure.get("io"),
        net_bytes_per_s=max(cur.net_bytes - prev.net_bytes, 0) / dt,
    )


# --------------------------------------------------------------------------- process: raw -> load


@dataclass(frozen=True)
class ProcessRaw:
    """Counters of one process read at one instant."""

    mono: float
    pid: int
    name: str
    cmdline: tuple[str, ...]
    user: str
    cpu_seconds: float
    rss_bytes: int
    age_s: float
    #: (read_bytes, write_bytes) so far, None where not readable.
    io: tuple[int, int] | None
    open_file_bytes: int
    exe_bytes: int
    listen_ports: tuple[int, ...]


def process_load(prev: ProcessRaw | None, cur: ProcessRaw) -> ProcessLoad:
    """A ProcessLoad from two samples; with no previous one, rates are lifetime averages."""
    if prev is not None and prev.pid == cur.pid and cur.mono > prev.mono:
        dt = cur.mono - prev.mono
        cpu = (cur.cpu_seconds - prev.cpu_seconds) / dt
        io_prev = prev.io
    else:
        dt = max(cur.age_s, 1e-9)
        cpu = cur.cpu_seconds / dt
        io_prev = (0, 0)
    rates: tuple[float | None, float | None] = (None, None)
    if cur.io is not None and io_prev is not None:
        rates = ((cur.io[0] - io_prev[0]) / dt, (cur.io[1] - io_prev[1]) / dt)
    return ProcessLoad(
        pid=cur.pid,
        name=cur.name,
        cmdline=cur.cmdline,
        user=cur.user,
        cpu_share=max(cpu, 0.0),
        cpu_seconds=cur.cpu_seconds,
        rss_bytes=cur.rss_bytes,
        age_s=cur.age_s,
        read_bytes_per_s=rates[0],
        write_bytes_per_s=rates[1],
        open_file_bytes=cur.open_file_bytes,
        exe_bytes=cur.exe_bytes,
        listen_ports=cur.listen_ports,
    )


# --------------------------------------------------------------------------- adapters (I/O)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _pressure(paths: Mapping[str, Path]) -> dict[str, Pressure]:
    """Pressure files that exist and are readable (PSI may be compiled out or disabled)."""
    out: dict[str, Pressure] = {}
    for kind, path in paths.items():
        text = _read(path)
        if text:
            out[kind] = parse_pressure(text)
    return out


class LoadSource(Protocol):
    def sample(self) -> HostLoad: ...


def read_system_raw(proc: Path = PROC) -> SystemRaw:
    stat = (proc / "stat").read_text()
    cpu, running = parse_proc_stat(stat)
    total, available = parse_meminfo((proc / "meminfo").read_text())
    return SystemRaw(
        wall=time.time(),
        mono=time.monotonic(),
        cpus=sum(1 for ln in stat.splitlines() if ln.startswith("cpu") and ln[3:4].isdigit()),
        cpu=cpu,
        procs_running=running,
        loadavg=parse_loadavg((proc / "loadavg").read_text()),
        mem_total=total,
        mem_available=available,
        net_bytes=parse_net_dev(_read(proc / "net" / "dev") or ""),
        pressure=_pressure({k: proc / "pressure" / k for k in ("cpu", "memory", "io")}),
    )


class SystemSource:
    """Load of the whole machine from /proc. The first sample waits `interval` seconds to get
    a utilization delta; later samples measure since the previous call."""

    def __init__(self, host: str, cpu_speed: float = 1.0, interval: float = 0.2,
                 proc: Path = PROC) -> None:
        self.host, self.cpu_speed, self.interval, self.proc = host, cpu_speed, interval, proc
        self._prev: SystemRaw | None = None

    def sample(self) -> HostLoad:
        if self._prev is None:
            self._prev = read_system_raw(self.proc)
            time.sleep(self.interval)
        cur = read_system_raw(self.proc)
        load = system_load(self._prev, cur, self.host, self.cpu_speed)
        self._prev = cur
        return load


def _first(dirs: Sequence[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).exists():
            return d / name
    return None


def _cgroup_pids(dirs: Sequence[Path]) -> set[int]:
    # Threads, not processes: the run queue is made of threads.
    pids: set[int] = set()
    for name in ("cgroup.threads", "tasks", "cgroup.procs"):
        for d in dirs:
            text = _read(d / name)
            if text:
                pids.update(parse_pids(text))
    return pids


def _runnable(pids: Iterable[int], proc: Path) -> int:
    """Tasks in state R. The calling thread is one of them when it reads its own host (a bed
    host's agent does): every host's count is one higher alike, which leaves them comparable.
    Left out, a host that turns busy after its agent started takes tens of seconds more to
    show a demand above its capacity (the policy's demand follows the 1-minute average)."""
    count = 0
    for pid in pids:
        text = _read(proc / str(pid) / "stat")
        if text and parse_pid_stat(text).state == "R":
            count += 1
    return count


def read_cgroup_raw(dirs: Sequence[Path], proc: Path = PROC) -> CgroupRaw:
    """Read one bed host's cgroup. `dirs` are its directories in every hierarchy (v1: one per
    controller, e.g. cpu/X, cpuacct/X, memory/X; v2: the one unified dir); each file is taken
    from the first dir that has it."""
    def text(name: str) -> str | None:
        path = _first(dirs, name)
        return _read(path) if path else None

    if (usage := text("cpuacct.usage")) is not None:
        usage_ns = parse_int(usage)
    elif (stat := text("cpu.stat")) is not None and "usage_usec" in stat:
        usage_ns = parse_cpu_stat_usage(stat)
    else:
        raise InputError(f"no cpuacct.usage or cpu.stat with usage_usec under {list(map(str, dirs))}")
    if (cpu_max := text("cpu.max")) is not None:
        quota = parse_cpu_max(cpu_max)
    elif (q := text("cpu.cfs_quota_us")) is not None and (p := text("cpu.cfs_period_us")):
        quota = parse_cfs_quota(q, p)
    else:
        quota = None
    host_total, _ = parse_meminfo((proc / "meminfo").read_text())
    mem_text = text("memory.current") or text("memory.usage_in_bytes")
    limit_text = text("memory.max") or text("memory.limit_in_bytes")
    limit = parse_memory_limit(limit_text) if limit_text else None
    pids = _cgroup_pids(dirs)
    # A bed host is a network namespace too: any of its tasks shows that namespace's counters.
    net = 0
    for pid in sorted(pids):
        if (dev := _read(proc / str(pid) / "net" / "dev")) is not None:
            net = parse_net_dev(dev)
            break
    pressure_files = {k: path for k in ("cpu", "memory", "io") if (path := _first(dirs, f"{k}.pressure"))}
    return CgroupRaw(
        wall=time.time(),
        mono=time.monotonic(),
        cpus=os.cpu_count() or 1,
        usage_ns=usage_ns,
        quota_cpus=quota,
        runnable=_runnable(pids, proc),
        mem_usage=parse_int(mem_text) if mem_text else 0,
        mem_limit=min(limit, host_total) if limit else host_total,
        net_bytes=net,
        pressure=_pressure(pressure_files),
    )


#: Reads of the runnable count spread over a cgroup source's first interval; their mean starts
#: its load average. One instant's count, a minute's average from then on, made an idle host
#: that caught one short-lived task look a CPU busy for a minute (the demo's agents then sent
#: two moves to one peer and none to the idler one).
SEED_READS = 5


class CgroupSource:
    """Load of one bed host from its cgroup directories (see `read_cgroup_raw`)."""

    def __init__(self, host: str, dirs: Sequence[Path], cpu_speed: float = 1.0,
                 interval: float = 0.2, proc: Path = PROC) -> None:
        if not dirs:
            raise InputError(f"cgroup source for {host}: no cgroup directory given")
        self.host, self.dirs, self.cpu_speed = host, tuple(Path(d) for d in dirs), cpu_speed
        self.interval, self.proc = interval, proc
        self._prev: CgroupRaw | None = None
        self._loadavg: tuple[float, float, float] | None = None

    def sample(self) -> HostLoad:
        if self._prev is None or self._loadavg is None:
            self._prev = read_cgroup_raw(self.dirs, self.proc)
            counts = [self._prev.runnable]
            for _ in range(SEED_READS - 1):
                time.sleep(self.interval / (SEED_READS - 1))
                counts.append(_runnable(_cgroup_pids(self.dirs), self.proc))
            self._loadavg = (sum(counts) / len(counts),) * 3
        cur = read_cgroup_raw(self.dirs, self.proc)
        load = cgroup_load(self._prev, cur, self.host, self._loadavg, self.cpu_speed)
        self._prev, self._loadavg = cur, load.loadavg
        return load


def make_source(kind: str, host: str, *, cgroup_dirs: Sequence[Path] = (),
                cpu_speed: float = 1.0, interval: float = 0.2) -> LoadSource:
    """The pluggable choice: "system" for a real host, "cgroup" for a bed host."""
    if kind == "system":
        return SystemSource(host, cpu_speed, interval)
    if kind == "cgroup":
        return CgroupSource(host, cgroup_dirs, cpu_speed, interval)
    raise InputError(f"unknown load source {kind!r} (expected 'system' or 'cgroup')")


def _open_file_bytes(p: psutil.Process) -> int:
    total = 0
    for f in p.open_files():
        try:
            total += os.stat(f.path).st_size
        except OSError:
            continue  # deleted or on a filesystem we cannot stat: nothing to ship by name
    return total


def _exe_bytes(p: psutil.Process) -> int:
    try:
        return os.stat(p.exe()).st_size
    except (OSError, psutil.Error):
        return 0


def _listen_ports(p: psutil.Process) -> tuple[int, ...]:
    conns = p.net_connections(kind="tcp")
    return tuple(sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}))


def read_process_raw(pid: int) -> ProcessRaw:
    """One process's counters via psutil. Raises InputError if it does not exist."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            times = p.cpu_times()
            try:
                io_c = p.io_counters()
                io: tuple[int, int] | None = (io_c.read_bytes, io_c.write_bytes)
            except (psutil.AccessDenied, AttributeError):
                io = None
            try:
                files, ports = _open_file_bytes(p), _listen_ports(p)
            except psutil.AccessDenied:
                files, ports = 0, ()
            return ProcessRaw(
                mono=time.monotonic(),
                pid=pid,
                name=p.name(),
                cmdline=tuple(p.cmdline()),
                user=p.username(),
                cpu_seconds=times.user + times.system,
                rss_bytes=p.memory_info().rss,
                age_s=max(time.time() - p.create_time(), 0.0),
                io=io,
                open_file_bytes=files,
                exe_bytes=_exe_bytes(p),
                listen_ports=ports,
            )
    except psutil.NoSuchProcess:
        raise InputError(f"no process with PID {pid}") from None


class ProcessMonitor:
    """Per-process snapshots; remembers each PID's previous counters for rates."""

    def __init__(self) -> None:
        self._prev: dict[int, ProcessRaw] = {}

    def sample(self, pids: Iterable[int]) -> tuple[ProcessLoad, ...]:
        """Snapshots of those PIDs that still exist, in the order given."""
        out: list[ProcessLoad] = []
        seen: dict[int, ProcessRaw] = {}
        for pid in pids:
            try:
                raw = read_process_raw(pid)
            except InputError:
                continue  # exited between listing and reading
            out.append(process_load(self._prev.get(pid), raw))
            seen[pid] = raw
        self._prev = seen
        return tuple(out)
