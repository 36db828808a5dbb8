"""Control groups for bed hosts (and anything else that must confine or measure a set of
processes): cgroup v1 (one hierarchy per controller, or co-mounted ones) and v2 (unified).

A group is created BELOW the caller's own cgroup in every hierarchy, never at a hierarchy's
root: that is the delegation rule both cgroup versions expect, and it keeps whatever limits or
accounting the caller already runs under (a supervisor, a session manager) in force for the
processes we start.

Starting a process inside a group from its first instruction is migrbed.hostexec's job.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import mounts
from migrd.errors import CommandError, InputError, MigrdError, NotPermitted

#: What a bed host needs: CPU quota and usage, memory and task counts to look at.
CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
#: CFS period written with every v1/v2 quota (the kernel default).
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and where the caller sits in it."""

    controllers: tuple[str, ...]  # empty for v2 (its controllers are per group)
    mountpoint: Path
    own: Path  # the caller's cgroup directory in this hierarchy


@dataclass(frozen=True)
class Layout:
    version: int  # 1 or 2
    hierarchies: tuple[Hierarchy, ...]


@dataclass(frozen=True)
class Group:
    """A cgroup: one directory per hierarchy on v1, a single directory on v2."""

    version: int
    dirs: tuple[Path, ...]

    def to_json(self) -> dict:
        return {"version": self.version, "dirs": [str(d) for d in self.dirs]}

    @classmethod
    def from_json(cls, data: dict) -> Group:
        return cls(int(data["version"]), tuple(Path(d) for d in data["dirs"]))

    def child(self, name: str) -> Group:
        return Group(self.version, tuple(d / name for d in self.dirs))


# ---- pure core -------------------------------------------------------------------------------

def cgroup_mounts(text: str) -> list[mounts.Mount]:
    """The cgroup (v1 and v2) mounts in /proc/self/mountinfo text."""
    return [m for m in mounts.parse(text) if m.fstype in ("cgroup", "cgroup2")]


def parse_proc_cgroup(text: str) -> dict[frozenset[str], str]:
    """/proc/PID/cgroup as {controller set: path}; the v2 entry has the empty set."""
    out: dict[frozenset[str], str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[frozenset(c for c in parts[1].split(",") if c)] = parts[2]
    return out


def _below(mountpoint: Path, mount_root: str, path: str) -> Path:
    # A hierarchy mounted from a sub-directory (containers) shows paths relative to its root.
    rel = path[len(mount_root):] if mount_root != "/" and path.startswith(mount_root) else path
    return mountpoint / rel.lstrip("/")


def layout_from(mountinfo: str, proc_cgroup: str, wanted: Iterable[str] = CONTROLLERS) -> Layout:
    """Decide v1 or v2 from the mounts: v1 whenever a v1 hierarchy carries a wanted controller
    (hybrid systems keep their controllers there), else v2 if a cgroup2 mount exists."""
    wanted = set(wanted)
    found = cgroup_mounts(mountinfo)
    paths = parse_proc_cgroup(proc_cgroup)
    v1: list[Hierarchy] = []
    for fstype, mountpoint, root, opts in found:
        ctrls = opts & wanted
        if fstype != "cgroup" or not ctrls:
            continue
        key = next((k for k in paths if k and k <= opts and ctrls <= k), None)
        if key is None or any(h.mountpoint == mountpoint for h in v1):
            continue
        v1.append(Hierarchy(tuple(sorted(key & wanted)), mountpoint,
                            _below(mountpoint, root, paths[key])))
    if v1:
        return Layout(1, tuple(sorted(v1, key=lambda h: h.controllers)))
    for fstype, mountpoint, root, _ in found:
        if fstype == "cgroup2" and frozenset() in paths:
            return Layout(2, (Hierarchy((), mountpoint, _below(mountpoint, root, paths[frozenset()])),))
    raise MigrdError("no cgroup hierarchy with cpu, cpuacct, memory or pids is mounted")


def v2_layout_at(mountinfo: str, proc_cgroup: str, mountpoint: Path) -> Layout:
    """The unified (v2) hierarchy mounted at `mountpoint`, even where `layout_from` would pick
    v1: a hybrid machine whose controllers sit on v1 still has the one v2 hierarchy, and a
    cgroup2 mount of it is how its v2 code is run there (tests)."""
    paths = parse_proc_cgroup(proc_cgroup)
    for fstype, mp, root, _ in cgroup_mounts(mountinfo):
        if fstype == "cgroup2" and mp == mountpoint and frozenset() in paths:
            return Layout(2, (Hierarchy((), mp, _below(mp, root, paths[frozenset()])),))
    raise MigrdError(f"{mountpoint} is not a cgroup2 mount (or this process has no v2 cgroup)")


def group_for(layout: Layout, rel: str) -> Group:
    """The group at rel (e.g. 'migrd-bed-x/host1') below the caller's cgroup."""
    parts = Path(rel).parts
    if not parts or any(p in ("", ".", "..") or "/" in p for p in parts) or Path(rel).is_absolute():
        raise InputError(f"bad cgroup name {rel!r}")
    return Group(layout.version, tuple(h.own / rel for h in layout.hierarchies))


def v1_quota(fraction: float | None, period_us: int = CPU_PERIOD_US) -> int:
    """cpu.cfs_quota_us for a share of one CPU (None: unlimited, -1)."""
    return -1 if fraction is None else max(1000, round(fraction * period_us))


def v2_cpu_max(fraction: float | None, period_us: int = CPU_PERIOD_US) -> str:
    return f"{'max' if fraction is None else v1_quota(fraction, period_us)} {period_us}"


def parse_quota(v1_quota_us: int, v1_period_us: int) -> float | None:
    return None if v1_quota_us < 0 else v1_quota_us / v1_period_us


# ---- adapters --------------------------------------------------------------------------------

def detect() -> Layout:
    return layout_from(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())


def detect_v2(mountpoint: Path) -> Layout:
    return v2_layout_at(Path("/proc/self/mountinfo").read_text(),
                        Path("/proc/self/cgroup").read_text(), mountpoint)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise CommandError(f"cannot write {value!r} to {path}: {e.strerror}") from None


def create(group: Group) -> None:
    """Create the group's directories (parents too). On v2, enable the controllers it needs
    in every ancestor from the caller's cgroup down."""
    for d in group.dirs:
        if group.version == 2:
            _enable_v2(d)
        d.mkdir(parents=True, exist_ok=True)


def _enable_v2(d: Path) -> None:
    chain = [p for p in reversed(d.parents) if (p / "cgroup.controllers").exists() or not p.exists()]
    for parent in chain:
        parent.mkdir(exist_ok=True)
        available = set((parent / "cgroup.controllers").read_text().split())
        wanted = " ".join(f"+{c}" for c in ("cpu", "memory", "pids") if c in available)
        if not wanted:
            continue
        try:
            (parent / "cgroup.subtree_control").write_text(wanted)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise NotPermitted(
                    f"cgroup v2: cannot enable controllers below {parent}: it holds processes "
                    "(run from a delegated cgroup whose processes live in a leaf)") from None
            raise CommandError(f"cannot write {wanted!r} to {parent}/cgroup.subtree_control: {e.strerror}") from None


def join(group: Group, pid: int = 0) -> None:
    """Move pid (0: the calling process) into the group in every hierarchy."""
    for d in group.dirs:
        _write(d / "cgroup.procs", str(pid or os.getpid()))


def pids(group: Group) -> list[int]:
    found: set[int] = set()
    for d in group.dirs:
        try:
            found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except FileNotFoundError:
            pass
    return sorted(found)


def exists(group: Group) -> bool:
    return any(d.is_dir() for d in group.dirs)


def _cpu_dir(group: Group) -> Path:
    if group.version == 2:
        return group.dirs[0]
    for d in group.dirs:
        if (d / "cpu.cfs_quota_us").exists():
            return d
    raise MigrdError(f"no cpu controller in cgroup {group.dirs[0].name}")


def set_cpu_quota(group: Group, fraction: float | None) -> None:
    """Limit the group to fraction of one CPU (2.0 = two CPUs); None removes the limit."""
    d = _cpu_dir(group)
    if group.version == 2:
        _write(d / "cpu.max", v2_cpu_max(fraction))
    else:
        _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(d / "cpu.cfs_quota_us", str(v1_quota(fraction)))


def cpu_quota(group: Group) -> float | None:
    d = _cpu_dir(group)
    if group.version == 2:
        quota, period = (d / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    return parse_quota(int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text()))


def cpu_usage_ns(group: Group) -> int:
    """CPU time used by the group's processes so far, in nanoseconds."""
    if group.version == 2:
        for line in (group.dirs[0] / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        raise MigrdError(f"{group.dirs[0]}/cpu.stat has no usage_usec")
    for d in group.dirs:
        if (d / "cpuacct.usage").exists():
            return int((d / "cpuacct.usage").read_text())
    raise MigrdError(f"no cpuacct controller in cgroup {group.dirs[0].name}")


def kill_all(group: Group, timeout: float = 10.0) -> None:
    """SIGKILL every process in the group until it is empty (a process may fork meanwhile).
    Only for groups we made: everything in them was started inside them."""
    deadline = time.monotonic() + timeout
    while left := pids(group):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap_children()
        if time.monotonic() >= deadline:
            raise MigrdError(f"processes {left} are still in cgroup {group.dirs[0]} after SIGKILL")
        time.sleep(0.05)


def _reap_children() -> None:
    # Our own killed children stay zombies (and keep a v1 group busy) until waited for.
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def remove(group: Group, timeout: float = 15.0) -> None:
    """Kill what is left in the group, then remove its directories (missing ones are fine).
    Exited processes can keep a group busy for a moment until their parent reaps them."""
    kill_all(group, timeout)
    deadline = time.monotonic() + timeout
    for d in group.dirs:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise CommandError(f"cannot remove cgroup {d}: {e.strerror}") from None
                _reap_children()
                time.sleep(0.1)



def of_process(pid: int) -> Group:
    """The cgroup `pid` is in, in every hierarchy with the controllers a bed host needs."""
    layout = layout_from(Path("/proc/self/mountinfo").read_text(), Path(f"/proc/{pid}/cgroup").read_text())
    return Group(layout.version, tuple(h.own for h in layout.hierarchies))


def memory_bytes(group: Group) -> int:
    """Memory the group is charged for now (v2 memory.current, v1 memory.usage_in_bytes)."""
    for d in group.dirs:
        for name in ("memory.current", "memory.usage_in_bytes"):
            if (d / name).exists():
                return int((d / name).read_text())
    raise MigrdError(f"no memory controller in cgroup {group.dirs[0].name}")
