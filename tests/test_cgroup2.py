"""The cgroup v2 code of the bed (migrd/adapters/cgroup.py) and of the load source (migrd/adapters/load.py) against
a real v2 hierarchy, also on a machine that runs cgroup v1.

A fresh Debian 12 machine is v2 only; a hybrid one (v1 hierarchies plus the unified one) still
has the single v2 hierarchy, so each test mounts it at a temporary directory and runs the v2
paths there. Controllers bound to a v1 hierarchy are not available on v2 at the same time: on a
hybrid machine the v2 groups have no cpu.max and no memory.current (the tests check what the
kernel then says), but group creation, cgroup.procs, cpu.stat usage, the pressure files, killing
and removal are the real v2 code paths."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrbed import bed
from migrd.adapters import cgroup
from migrd.errors import CommandError, MigrdError
from migrd.adapters.load import make_source
from migrd.adapters.procfs import parse_meminfo, parse_pid_stat

#: Busy for at most 30 s, whatever happens to the test.
BUSY = "import time\nt = time.time()\nwhile time.time() - t < 30: pass"


@pytest.fixture
def v2(tmp_path: Path) -> Iterator[cgroup.Layout]:
    """The v2 hierarchy mounted at a temp dir, as a layout below this process's v2 cgroup;
    unmounted afterwards (the groups a test made must be gone by then)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount cgroup2")
    mp = tmp_path / "cgroup2"
    mp.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(mp)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount cgroup2 here: {r.stderr.strip()}")
    try:
        yield cgroup.detect_v2(mp)
    finally:
        subprocess.run(["umount", str(mp)], check=True)


HYBRID_MOUNTINFO = (
    "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    "90 25 0:38 /outer /tmp/cg2 rw - cgroup2 none rw\n"
)
HYBRID_PROC_CGROUP = "4:memory:/sess\n1:cpu:/\n0::/outer/me\n"


def test_v2_layout_at_a_mount_point_on_a_hybrid_machine() -> None:
    """layout_from picks v1 where v1 has the controllers; v2_layout_at still gives the v2
    hierarchy at the asked mount point, below this process's v2 cgroup (mount root honoured)."""
    assert cgroup.layout_from(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP).version == 1
    layout = cgroup.v2_layout_at(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, Path("/tmp/cg2"))
    assert layout == cgroup.Layout(2, (cgroup.Hierarchy((), Path("/tmp/cg2"), Path("/tmp/cg2/me")),))
    assert cgroup.v2_layout_at(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, Path(
        "/sys/fs/cgroup/unified")).hierarchies[0].own == Path("/sys/fs/cgroup/unified/outer/me")
    for not_v2 in (Path("/sys/fs/cgroup/cpu"), Path("/tmp")):
        with pytest.raises(MigrdError, match="not a cgroup2 mount"):
            cgroup.v2_layout_at(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, not_v2)


def _available(layout: cgroup.Layout) -> set[str]:
    own = layout.hierarchies[0].own
    return set((own / "cgroup.controllers").read_text().split())


def _start_in(group: cgroup.Group) -> subprocess.Popen:
    """A busy process inside `group` from its first instruction, the way the bed starts one."""
    dirs = [str(d) for d in group.dirs]
    return subprocess.Popen([sys.executable, "-m", "migrbed.hostexec", *dirs, "--",
                             sys.executable, "-c", BUSY])


def _wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _cpu_s(pid: int) -> float:
    return parse_pid_stat(Path(f"/proc/{pid}/stat").read_text()).cpu_ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.root
def test_v2_layout_is_below_own_v2_cgroup(v2: cgroup.Layout) -> None:
    """detect_v2 places groups below this process's v2 cgroup in the mounted hierarchy."""
    (h,) = v2.hierarchies
    own = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
               if ln.startswith("0::"))
    assert v2.version == 2 and h.own == h.mountpoint / own.lstrip("/")
    assert (h.own / "cgroup.procs").exists()
    with pytest.raises(MigrdError, match="not a cgroup2 mount"):
        cgroup.detect_v2(h.mountpoint / "nowhere")


@pytest.mark.root
def test_bed_cgroups_on_v2(v2: cgroup.Layout, tmp_path: Path) -> None:
    """The bed's groups on v2: created (with the controllers v2 offers here enabled), a process
    started inside one is listed there and charged there, the CPU quota is set where the cpu
    controller is on v2 (refused readably where it is not), and removal kills and removes."""
    state = bed.plan(f"v2{secrets.token_hex(3)}", 2, tmp_path / "bed", v2)
    groups = [state.cgroup, *(h.cgroup for h in state.hosts)]
    host1 = state.hosts[0].cgroup
    child = None
    try:
        for g in groups:
            cgroup.create(g)
            assert cgroup.exists(g) and g.version == 2 and len(g.dirs) == 1
        if "cpu" in _available(v2):
            cgroup.set_cpu_quota(host1, 0.5)
            assert cgroup.cpu_quota(host1) == 0.5
        else:
            # Hybrid machine: cpu is bound to v1, so v2 groups have no cpu.max.
            with pytest.raises(CommandError, match="cpu.max"):
                cgroup.set_cpu_quota(host1, 0.5)
        child = _start_in(host1)
        _wait_for(lambda: cgroup.pids(host1) == [child.pid])
        rel = host1.dirs[0].relative_to(v2.hierarchies[0].mountpoint)
        assert f"0::/{rel}\n" in Path(f"/proc/{child.pid}/cgroup").read_text()
        assert cgroup.pids(state.hosts[1].cgroup) == []
        # cpu.stat's usage_usec is there without the cpu controller: it counts the child,
        # which ran inside the group since before its exec.
        _wait_for(lambda: cgroup.cpu_usage_ns(host1) > 0)
        used = cgroup.cpu_usage_ns(host1) / 1e9
        assert used <= _cpu_s(child.pid) + 0.05, "the group charged more than its only process"
        cgroup.remove(host1)
        assert child.wait(timeout=30) == -9 and not cgroup.exists(host1)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        for g in reversed(groups):
            cgroup.remove(g)
    assert not any(cgroup.exists(g) for g in groups)


@pytest.mark.root
def test_load_source_on_v2(v2: cgroup.Layout) -> None:
    """The cgroup load source reads a real v2 group: usage from cpu.stat, runnable tasks from
    cgroup.threads, per-group pressure; capacity from cpu.max and memory from memory.current
    where v2 has those controllers, else the machine's CPUs and memory."""
    group = cgroup.group_for(v2, f"migrd-test-load-{secrets.token_hex(4)}")
    child = None
    try:
        cgroup.create(group)
        child = _start_in(group)
        _wait_for(lambda: cgroup.pids(group) == [child.pid])
        src = make_source("cgroup", "bed-x", cgroup_dirs=group.dirs, interval=1.0)
        first = src.sample()
        t0 = cgroup.cpu_usage_ns(group)
        _wait_for(lambda: cgroup.cpu_usage_ns(group) > t0)
        h = src.sample()
        assert h.source == "cgroup" and h.time > first.time
        assert 0.0 < h.cpu_util <= 1.0, h
        assert 0 <= h.run_queue <= 1 and h.loadavg[0] > 0
        d = group.dirs[0]
        assert (h.cpu_pressure is not None) == (d / "cpu.pressure").exists()
        assert h.cpu_capacity == os.cpu_count(), "no quota: the machine's CPUs"
        if (d / "memory.current").exists():
            assert 0 < h.mem_available < h.mem_total
        else:  # memory bound to v1: nothing charged on v2, the limit is the machine's memory
            total, _ = parse_meminfo(Path("/proc/meminfo").read_text())
            assert h.mem_total == total and h.mem_available == total
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        cgroup.remove(group)
