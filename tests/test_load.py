"""The load monitor: parsers on sample file texts (cgroup v1 and v2), the raw->snapshot maths,
one real sample of this machine, and (root) one real v1 cgroup of our own."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrd.adapters import untrusted
from migrd.errors import InputError
from migrd.adapters.procfs import parse_meminfo, parse_pid_stat
from migrd.adapters.load import CgroupRaw, CpuTimes, ProcessMonitor, ProcessRaw, SystemRaw, cgroup_load, decay_loadavg, make_source, parse_cfs_quota, parse_cpu_max, parse_cpu_stat_usage, parse_int, parse_loadavg, parse_memory_limit, parse_net_dev, parse_pid_io, parse_pids, parse_pressure, parse_proc_stat, process_load, system_load
from migrd.model import HostLoad, Pressure, ProcessLoad

PROC_STAT = """\
cpu  4614 0 2026 250034 422 0 27 17 0 0
cpu0 1278 0 726 126583 29 0 5 7 0 0
cpu1 3336 0 1299 123451 393 0 21 10 0 0
intr 123 0 0
ctxt 98765
btime 1795830000
processes 5089
procs_running 3
procs_blocked 0
"""

MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        24115340 kB
MemAvailable:   24347708 kB
Buffers:            1234 kB
"""

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    6391      87    0    0    0     0          0         0     6391      87    0    0    0     0       0          0
  eth0: 84118202    2353    0    0    0     0          0         0   196754    1709    0    0    0     0       0          0
 veth1:1000 5 0 0 0 0 0 0 2000 5 0 0 0 0 0 0
"""


def test_parse_loadavg() -> None:
    assert parse_loadavg("0.31 0.13 0.04 1/84 5089\n") == (0.31, 0.13, 0.04)


def test_parse_proc_stat() -> None:
    times, running = parse_proc_stat(PROC_STAT)
    # idle = idle + iowait; guest columns are not added again.
    assert times == CpuTimes(busy=4614 + 2026 + 27 + 17, total=4614 + 2026 + 250034 + 422 + 27 + 17)
    assert running == 3
    with pytest.raises(InputError):
        parse_proc_stat("intr 1\n")


def test_parse_meminfo() -> None:
    assert parse_meminfo(MEMINFO) == (24684084 * 1024, 24347708 * 1024)
    # Kernels before 3.14 have no MemAvailable: MemFree stands in.
    assert parse_meminfo("MemTotal: 100 kB\nMemFree: 40 kB\n") == (102400, 40960)


def test_parse_pressure_with_and_without_full() -> None:
    text = ("some avg10=1.09 avg60=0.53 avg300=0.21 total=4692856\n"
            "full avg10=0.50 avg60=0.00 avg300=0.00 total=0\n")
    assert parse_pressure(text) == Pressure(1.09, 0.5)
    assert parse_pressure("some avg10=2.00 avg60=0.00 avg300=0.00 total=1\n") == Pressure(2.0, None)


def test_parse_net_dev_skips_loopback() -> None:
    assert parse_net_dev(NET_DEV) == 84118202 + 196754 + 1000 + 2000


def test_parse_pid_stat_with_awkward_comm() -> None:
    text = ("4242 (my (odd) prog) R 1 4242 4242 0 -1 4194304 101 0 0 0 "
            "150 50 0 0 20 0 1 0 128879 3133440 407 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17")
    st = parse_pid_stat(text)
    assert st.comm == "my (odd) prog" and st.state == "R"
    assert st.cpu_ticks == 200 and st.start_ticks == 128879


def test_parse_pid_io() -> None:
    text = ("rchar: 6976\nwchar: 0\nsyscr: 10\nsyscw: 0\nread_bytes: 4096\n"
            "write_bytes: 8192\ncancelled_write_bytes: 0\n")
    assert parse_pid_io(text) == (4096, 8192)


def test_cgroup_v1_files() -> None:
    assert parse_int("71447602668\n") == 71447602668  # cpuacct.usage, ns
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("50000\n", "100000\n") == 0.5
    assert parse_cfs_quota("150000\n", "100000\n") == 1.5
    assert parse_memory_limit("9223372036854771712\n") is None
    assert parse_memory_limit("268435456\n") == 256 << 20
    assert parse_pids("12\n13\n\n") == (12, 13)


def test_cgroup_v2_files() -> None:
    stat = "usage_usec 66763986\nuser_usec 46155474\nsystem_usec 20608512\nnice_usec 0\n"
    assert parse_cpu_stat_usage(stat) == 66763986 * 1000
    with pytest.raises(InputError):
        parse_cpu_stat_usage("nr_periods 0\n")
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("25000 100000\n") == 0.25
    assert parse_memory_limit("max\n") is None
    assert parse_memory_limit("1073741824\n") == 1 << 30


def test_decay_loadavg_follows_the_kernel_recurrence() -> None:
    one, five, fifteen = decay_loadavg((0.0, 0.0, 0.0), 2, 60.0)
    assert one == pytest.approx(2 * (1 - 1 / 2.718281828), rel=1e-6)
    assert one > five > fifteen > 0


def _sys_raw(t: float, busy: int, total: int, net: int) -> SystemRaw:
    return SystemRaw(wall=1000 + t, mono=t, cpus=2, cpu=CpuTimes(busy, total), procs_running=2,
                     loadavg=(1.5, 1.0, 0.5), mem_total=4 << 30, mem_available=1 << 30,
                     net_bytes=net, pressure={"cpu": Pressure(3.0, None)})


def test_system_load_from_two_samples() -> None:
    h = system_load(_sys_raw(0, 100, 1000, 0), _sys_raw(2, 250, 1200, 4_000_000), "h", 1.5)
    assert h.cpu_util == pytest.approx(0.75)
    assert h.net_bytes_per_s == pytest.approx(2_000_000)
    assert h.cpu_capacity == 2.0 and h.power == 3.0
    assert h.load_per_cpu == (0.75, 0.5, 0.25)
    assert h.cpu_pressure == Pressure(3.0, None) and h.io_pressure is None


def _cg_raw(t: float, usage_ns: int, quota: float | None) -> CgroupRaw:
    return CgroupRaw(wall=1000 + t, mono=t, cpus=2, usage_ns=usage_ns, quota_cpus=quota,
                     runnable=1, mem_usage=100 << 20, mem_limit=256 << 20, net_bytes=0,
                     pressure={})


def test_cgroup_load_uses_the_quota_as_capacity() -> None:
    # 0.5 CPU quota; 0.4 CPU-seconds used over 1 s = 80 % of it.
    h = cgroup_load(_cg_raw(0, 0, 0.5), _cg_raw(1, 400_000_000, 0.5), "bed1", (1.0, 1.0, 1.0))
    assert h.source == "cgroup" and h.cpu_capacity == 0.5
    assert h.cpu_util == pytest.approx(0.8)
    assert h.mem_total == 256 << 20 and h.mem_available == 156 << 20
    assert h.loadavg == (1.0, 1.0, 1.0)
    unlimited = cgroup_load(_cg_raw(0, 0, None), _cg_raw(1, 400_000_000, None), "bed1", (0.0,) * 3)
    assert unlimited.cpu_capacity == 2.0 and unlimited.cpu_util == pytest.approx(0.2)


def _proc_raw(t: float, cpu: float, io: tuple[int, int] | None) -> ProcessRaw:
    return ProcessRaw(mono=t, pid=7, name="job", cmdline=("job", "-x"), user="root",
                      cpu_seconds=cpu, rss_bytes=1 << 20, age_s=100 + t, io=io,
                      open_file_bytes=10, exe_bytes=20, listen_ports=(8080,))


def test_process_load_rates() -> None:
    p = process_load(_proc_raw(0, 10.0, (0, 0)), _proc_raw(2, 11.0, (2000, 4000)))
    assert p.cpu_share == pytest.approx(0.5)
    assert (p.read_bytes_per_s, p.write_bytes_per_s) == (1000, 2000)
    first = process_load(None, _proc_raw(0, 10.0, None))
    assert first.cpu_share == pytest.approx(0.1), "lifetime average without a previous sample"
    assert first.read_bytes_per_s is None


def test_snapshots_round_trip_through_json() -> None:
    h = system_load(_sys_raw(0, 100, 1000, 0), _sys_raw(2, 250, 1200, 4000), "h")
    assert untrusted.build(HostLoad, json.loads(json.dumps(h.to_dict())), InputError, "h") == h
    p = process_load(None, _proc_raw(0, 10.0, (1, 2)))
    assert untrusted.build(ProcessLoad, json.loads(json.dumps(p.to_dict())), InputError, "p") == p


def test_make_source_rejects_unknown_kind() -> None:
    with pytest.raises(InputError):
        make_source("magic", "h")


def test_real_system_sample_is_sane() -> None:
    h = make_source("system", "here", interval=0.1).sample()
    assert h.cpus == os.cpu_count() and h.cpu_capacity == h.cpus
    assert 0.0 <= h.cpu_util <= 1.0
    assert h.run_queue >= 1, "the sampler itself is running"
    assert 0 < h.mem_available <= h.mem_total
    assert all(x >= 0 for x in h.loadavg) and h.net_bytes_per_s >= 0
    if Path("/proc/pressure/cpu").exists():
        assert h.cpu_pressure is not None
    json.dumps(h.to_dict())


def test_real_process_sample_is_sane(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 12345)
    with open(data, "rb"):
        (me,) = ProcessMonitor().sample([os.getpid()])
    assert me.pid == os.getpid() and me.rss_bytes > 0 and me.age_s > 0
    assert me.open_file_bytes >= 12345
    assert me.exe_bytes > 0 and me.cpu_seconds > 0
    assert ProcessMonitor().sample([2**22 + 1]) == (), "a missing PID is skipped"


@pytest.mark.root
def test_real_v1_cgroup_source() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a cgroup")
    base = {c: Path("/sys/fs/cgroup") / c for c in ("cpu", "cpuacct", "memory")}
    if not all((p / "tasks").exists() for p in base.values()):
        pytest.skip("no cgroup v1 cpu/cpuacct/memory hierarchies here")
    name = f"migrd-test-load-{secrets.token_hex(4)}"
    dirs = [p / name for p in base.values()]
    child = None
    try:
        for d in dirs:
            d.mkdir()
        (base["cpu"] / name / "cpu.cfs_period_us").write_text("100000")
        (base["cpu"] / name / "cpu.cfs_quota_us").write_text("50000")
        # A bounded busy loop (at most 20 s) inside the group.
        child = subprocess.Popen(
            [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<20: pass"])
        for d in dirs:
            (d / "cgroup.procs").write_text(str(child.pid))
        src = make_source("cgroup", "bed-x", cgroup_dirs=dirs, interval=0.5)
        first = src.sample()
        # One busy task: its load average starts near 1 (a throttled task is runnable too).
        assert 0.6 <= first.loadavg[0] <= 1.0, first
        time.sleep(0.5)
        h = src.sample()
        assert h.cpu_capacity == 0.5
        assert 0.5 <= h.cpu_util <= 1.0, h
        # v1 charges pages to the cgroup they were allocated in: a process that joined a
        # moment ago may have nothing charged here yet.
        assert 0 < h.mem_available <= h.mem_total
        assert h.cpu_pressure is None, "v1 has no per-cgroup pressure"
    finally:
        if child is not None:
            child.kill()
            child.wait()
        for d in dirs:
            if d.exists():
                for _ in range(50):  # the group is removable once the child is reaped
                    try:
                        d.rmdir()
                        break
                    except OSError:
                        time.sleep(0.1)
