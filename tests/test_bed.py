"""The embedded bed: pure parts without root, then real namespaces, cgroups and sshds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrbed import bed as bed_mod
from migrd.adapters import cgroup
from migrd import config
from migrd.errors import InputError, NotPermitted

BED_HOSTS = 3
BED_CPU_QUOTAS = {"host2": 0.5}

V1_MOUNTINFO = """\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs rw,mode=755
32 31 0:28 / /sys/fs/cgroup/cpu,cpuacct rw shared:10 - cgroup cgroup rw,cpu,cpuacct
33 31 0:29 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory
34 31 0:30 /outer /sys/fs/cgroup/pids rw shared:12 - cgroup cgroup rw,pids
35 31 0:31 / /sys/fs/cgroup/freezer rw shared:13 - cgroup cgroup rw,freezer
36 31 0:32 / /sys/fs/cgroup/unified rw shared:14 - cgroup2 cgroup2 rw
"""
V1_PROC_CGROUP = """\
5:freezer:/
4:pids:/outer/me
3:memory:/sess/abc
2:cpu,cpuacct:/
0::/
"""
V2_MOUNTINFO = "30 25 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V2_PROC_CGROUP = "0::/user.slice/me\n"
V1 = cgroup.layout_from(V1_MOUNTINFO, V1_PROC_CGROUP)


def migrctl(*args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([sys.executable, "-m", "migrd.cli", *args], capture_output=True, text=True,
                        env={**os.environ, "MIGRD_BED_ROOT": str(root)}, timeout=120)
    if check and cp.returncode != 0:
        raise AssertionError(f"migrctl {' '.join(args)} exited {cp.returncode}: {cp.stderr}")
    return cp


# ---- without root ----------------------------------------------------------------------------

def test_cgroup_v1_layout_nests_below_own_cgroup_per_hierarchy():
    assert V1.version == 1
    assert [h.controllers for h in V1.hierarchies] == [("cpu", "cpuacct"), ("memory",), ("pids",)]
    g = cgroup.group_for(V1, "migrd-bed-x/host1")
    assert g.dirs == (
        Path("/sys/fs/cgroup/cpu,cpuacct/migrd-bed-x/host1"),
        Path("/sys/fs/cgroup/memory/sess/abc/migrd-bed-x/host1"),
        Path("/sys/fs/cgroup/pids/me/migrd-bed-x/host1"),  # mounted from /outer
    )
    assert cgroup.Group.from_json(g.to_json()) == g


def test_cgroup_v2_layout():
    layout = cgroup.layout_from(V2_MOUNTINFO, V2_PROC_CGROUP)
    assert layout.version == 2
    assert cgroup.group_for(layout, "migrd-bed-x").child("host2").dirs == (
        Path("/sys/fs/cgroup/user.slice/me/migrd-bed-x/host2"),)


@pytest.mark.parametrize("rel", ["", "/abs", "../up", "a/../b"])
def test_cgroup_bad_names_refused(rel):
    with pytest.raises(InputError):
        cgroup.group_for(V1, rel)


def test_cpu_quota_values():
    assert cgroup.v1_quota(0.5) == 50_000 and cgroup.v1_quota(None) == -1
    assert cgroup.v2_cpu_max(1.5) == "150000 100000" and cgroup.v2_cpu_max(None) == "max 100000"
    assert cgroup.parse_quota(25_000, 100_000) == 0.25 and cgroup.parse_quota(-1, 100_000) is None


def test_names():
    names = {bed_mod.new_name() for _ in range(50)}
    assert len(names) > 40 and all(n.startswith("t") and len(n) == 5 for n in names)
    for bad in ["", "Bed", "-x", "a b", "x" * 25, "a/b"]:
        with pytest.raises(InputError):
            bed_mod.validate_name(bad)


def test_quota_specs():
    assert bed_mod.parse_quotas(["host2=0.5", "host1=2"]) == {"host2": 0.5, "host1": 2.0}
    for bad in ["host2", "host2=", "=0.5", "host2=x", "host2=0", "host2=-1"]:
        with pytest.raises(InputError):
            bed_mod.parse_quotas([bad])


def test_link_rate_specs_and_the_shaper_they_give():
    assert bed_mod.parse_link_rates(["host2=200", "host1=0.5"]) == {"host2": 200.0, "host1": 0.5}
    for bad in ["host2", "host2=", "=200", "host2=fast", "host2=0", "host2=-5", "host2=1e9"]:
        with pytest.raises(InputError, match="link rate"):
            bed_mod.parse_link_rates([bad])
    slow, fast = bed_mod.tbf_argv("ns", "eth0", 8), bed_mod.tbf_argv("ns", "vh1", 8000)
    assert slow[:7] == ["tc", "-n", "ns", "qdisc", "replace", "dev", "eth0"]
    assert slow[slow.index("rate") + 1] == "8000000bit"
    # At least one 64 KiB GSO packet, and 10 ms of traffic once that is more.
    assert slow[slow.index("burst") + 1] == str(64 * 1024)
    assert fast[fast.index("burst") + 1] == str(8_000_000_000 // 8 // 100)
    st = bed_mod.plan("lr", 2, Path("/r"), V1, link_mbits={"host2": 200})
    assert [h.link_mbit for h in st.hosts] == [None, 200]
    with pytest.raises(InputError, match="link rate for unknown host 'host3'"):
        bed_mod.plan("lr", 2, Path("/r"), V1, link_mbits={"host3": 200})


def test_plan_names_everything_after_the_bed():
    st = bed_mod.plan("ab12", 3, Path("/r"), V1, {"host3": 0.25})
    assert st.bridge_netns == "migrd-ab12-br"
    assert [(h.name, h.address, h.netns) for h in st.hosts] == [
        ("host1", "198.18.0.1", "migrd-ab12-host1"),
        ("host2", "198.18.0.2", "migrd-ab12-host2"),
        ("host3", "198.18.0.3", "migrd-ab12-host3"),
    ]
    h3 = st.host("host3")
    assert h3.cpu_quota == 0.25 and st.host("host1").cpu_quota is None
    assert h3.dir == Path("/r/ab12/host3") and h3.run_dir == Path("/run/migrd/bed/ab12/host3")
    assert h3.cgroup.dirs[1] == Path("/sys/fs/cgroup/memory/sess/abc/migrd-bed-ab12/host3")
    assert st.state_file == Path("/r/ab12/state.json")
    with pytest.raises(InputError, match="host4"):
        bed_mod.plan("ab12", 3, Path("/r"), V1, {"host4": 1})
    with pytest.raises(InputError):
        bed_mod.plan("ab12", 0, Path("/r"), V1)
    with pytest.raises(InputError, match="no host"):
        st.host("host9")


def test_state_file_round_trip():
    st = bed_mod.plan("rt", 2, Path("/r"), V1, {"host1": 0.5}, config_out=Path("/tmp/c.yaml"),
                      link_mbits={"host2": 100})
    st = bed_mod.with_host(st, "host2", holder=bed_mod.ProcRef(10, 1234, "b1"), sshd=bed_mod.ProcRef(11, 1240, "b1"))
    st = dataclasses.replace(st, ready=True)
    again = bed_mod.state_from_json(json.loads(json.dumps(bed_mod.state_to_json(st))))
    assert again == st
    assert again.host("host2").mount_ns == Path("/proc/10/ns/mnt")
    assert again.host("host1").mount_ns is None


def test_enter_argv_enters_namespaces_then_joins_cgroup():
    st = bed_mod.plan("ea", 2, Path("/r"), V1)
    with pytest.raises(Exception, match="no mount namespace"):
        bed_mod.enter_argv(st, "host1")
    st = bed_mod.with_host(st, "host1", holder=bed_mod.ProcRef(42, 7, "b"))
    dirs = [str(d) for d in st.host("host1").cgroup.dirs]
    assert bed_mod.enter_argv(st, "host1", python="/py") == [
        "nsenter", "--net=/run/netns/migrd-ea-host1", "--mount=/proc/42/ns/mnt", "--",
        "/py", "-m", "migrbed.hostexec", *dirs, "--",
    ]
    h2 = [str(d) for d in st.host("host2").cgroup.dirs]
    assert bed_mod.holder_argv(st.host("host2"), python="/py") == [
        "nsenter", "--net=/run/netns/migrd-ea-host2", "--", "/py", "-m", "migrbed.hostexec", *h2, "--",
        "unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"]


def test_host_config_is_an_ordinary_config():
    st = bed_mod.plan("hc", 2, Path("/r"), V1)
    keys = {"host1": "ssh-ed25519 AAAA1", "host2": "ssh-ed25519 AAAA2"}
    cfg = config.parse(config.dump(bed_mod.host_config(st, keys, "host2")))
    assert cfg.host == "host2" and cfg.state_dir == Path("/var/lib/migrd")
    assert cfg.ssh.client_key == Path("/etc/migrd/id_ed25519")
    assert [(h.name, h.address, h.port, h.user, h.host_keys) for h in cfg.hosts] == [
        ("host1", "198.18.0.1", 22, "root", ("198.18.0.1 ssh-ed25519 AAAA1",)),
        ("host2", "198.18.0.2", 22, "root", ("198.18.0.2 ssh-ed25519 AAAA2",)),
    ]
    cluster = config.parse(config.dump(bed_mod.host_config(st, keys, None)))
    assert cluster.host is None and cluster.ssh.client_key == Path("/r/hc/id_ed25519")


def test_listening_parses_proc_net_tcp():
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        # 198.18.0.2:22 listening, printed as a little-endian integer on x86
        f"   0: {int.from_bytes(bytes([198, 18, 0, 2]), sys.byteorder):08X}:0016 00000000:0000 0A 0 0\n"
        f"   1: {int.from_bytes(bytes([198, 18, 0, 3]), sys.byteorder):08X}:0016 0300120A:9C40 01 0 0\n"
    )
    assert bed_mod.listening(text, "198.18.0.2", 22)
    assert not bed_mod.listening(text, "198.18.0.3", 22)  # established, not listening
    assert not bed_mod.listening(text, "198.18.0.2", 2222)


def test_stop_spares_a_recycled_pid():
    p = subprocess.Popen(["sleep", "60"])
    try:
        ref = bed_mod.proc_ref(p.pid)
        stranger = bed_mod.ProcRef(p.pid, ref.start + 1, ref.boot)  # same PID, other start time
        before_reboot = dataclasses.replace(ref, boot="another-boot")
        assert bed_mod.alive(ref) and not bed_mod.alive(stranger) and not bed_mod.alive(before_reboot)
        bed_mod.stop(stranger)
        bed_mod.stop(before_reboot)
        assert p.poll() is None
        bed_mod.stop(ref)
        assert not bed_mod.alive(ref)
    finally:
        p.kill()
        p.wait()


# ---- a live bed (module fixture, 3 hosts, host2 limited to half a CPU) ----------------------

@pytest.mark.root
def test_status_lists_hosts(bed):
    hosts = bed_mod.status(bed)
    assert [h.name for h in hosts] == ["host1", "host2", "host3"]
    for h in hosts:
        assert h.netns_exists and h.holder_alive and h.sshd_alive
        assert h.processes >= 2  # holder and sshd, both inside the host cgroup
        assert all(f"migrd-bed-{bed.name}/{h.name}" in d for d in h.cgroup)
    assert [h.cpu_quota for h in hosts] == [None, 0.5, None]


@pytest.mark.root
def test_each_host_has_its_address_cgroup_and_no_way_out(bed, run_in):
    for h in bed.hosts:
        addr = run_in(h.name, "ip", "-4", "addr", "show", "eth0").stdout.decode()
        assert f"inet {h.address}/24" in addr
        cg = run_in(h.name, "cat", "/proc/self/cgroup").stdout.decode()
        assert f"/migrd-bed-{bed.name}/{h.name}\n" in cg
        routes = run_in(h.name, "ip", "-4", "route").stdout.decode().splitlines()
        assert routes and all(r.startswith("198.18.0.0/24 dev eth0") for r in routes)
        # A route lookup only: no packet leaves.
        out = run_in(h.name, "ip", "route", "get", "192.0.2.1", check=False)
        assert out.returncode != 0 and b"unreachable" in out.stderr
    br = subprocess.run(["ip", "-n", bed.bridge_netns, "-4", "addr"], capture_output=True, text=True, check=True)
    assert "inet " not in br.stdout.replace("inet 127.0.0.1", "")
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert bed.name not in root_links  # no veth end of ours in the root namespace


@pytest.mark.root
def test_every_host_reaches_every_sshd_with_strict_host_keys(bed, run_in):
    for h in bed.hosts:
        cfg = config.parse(run_in(h.name, "cat", "/etc/migrd/migrd.yaml").stdout.decode())
        assert cfg.host == h.name and cfg.state_dir == Path("/var/lib/migrd")
        # Written through the backing dir, read by ssh at the host's own /etc/migrd.
        (h.dir / "etc" / "known_hosts").write_text("".join(k + "\n" for e in cfg.hosts for k in e.host_keys))
        for peer in cfg.hosts:
            out = run_in(h.name, "ssh", "-i", str(cfg.ssh.client_key), "-o", "BatchMode=yes",
                         "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/etc/migrd/known_hosts",
                         "-o", "ConnectTimeout=20", "-p", str(peer.port), f"{peer.user}@{peer.address}",
                         "grep", "^host:", "/etc/migrd/migrd.yaml", timeout=60)
            assert out.stdout.decode().strip() == f"host: {peer.name}"


@pytest.mark.root
def test_host_directories_are_private(bed, run_in):
    run_in("host1", "touch", "/srv/migrd/probe", "/var/lib/migrd/probe")
    for path in ("/srv/migrd/probe", "/var/lib/migrd/probe"):
        assert run_in("host1", "test", "-e", path, check=False).returncode == 0
        assert run_in("host2", "test", "-e", path, check=False).returncode == 1
    assert (bed.host("host1").dir / "srv" / "probe").exists()
    assert not Path("/srv/migrd/probe").exists()  # nor in the root namespace


@pytest.mark.root
def test_second_up_is_refused_and_harmless(bed, tmp_path):
    with pytest.raises(NotPermitted, match="migrctl bed down"):
        bed_mod.up(bed.name, hosts=2, root=bed.root)
    with pytest.raises(NotPermitted, match="in use on this machine"):
        bed_mod.up(bed.name, hosts=2, root=tmp_path)  # same name, another root
    assert not (tmp_path / bed.name).exists()
    cp = migrctl("bed", "up", "--name", bed.name, root=bed.root, check=False)
    assert cp.returncode == NotPermitted.exit_code and "migrctl bed down" in cp.stderr
    assert all(h.sshd_alive for h in bed_mod.status(bed_mod.load_state(bed.name, bed.root)))


@pytest.mark.root
def test_cli_exec_passes_status_and_detaches_into_the_cgroup(bed):
    assert migrctl("bed", "exec", "--name", bed.name, "host3", "--", "sh", "-c", "exit 7",
                   root=bed.root, check=False).returncode == 7
    out = migrctl("bed", "exec", "--name", bed.name, "host3", "--", "hostname", "-I", root=bed.root)
    assert out.stdout.split() == ["198.18.0.3"]
    pid = int(migrctl("bed", "exec", "--name", bed.name, "host3", "--detach", "--", "sleep", "300",
                      root=bed.root).stdout)
    assert pid in cgroup.pids(bed.host("host3").cgroup)  # `bed down` will kill it
    status = json.loads(migrctl("bed", "status", "--name", bed.name, "--json", root=bed.root).stdout)
    assert [h["address"] for h in status["hosts"]] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]


@pytest.mark.root
def test_criu_moves_a_process_from_host1_to_host3(bed, run_in):
    """What migration will do, minus SSH: CRIU runs inside each host, so neither namespace
    ends up in the image, and the restored process lands in the target's namespaces and
    cgroup. Its /dev/null stdio was opened inside host1 (migrbed.hostexec), or dump would fail."""
    from migrd.adapters.criu import find_criu

    criu = find_criu(config.Config()).path
    p = bed_mod.spawn_in(bed, "host1", ["sleep", "300"])
    src, dst = bed.host("host1"), bed.host("host3")
    (src.dir / "srv" / "img").mkdir()
    run_in("host1", criu, "dump", "-t", str(p.pid), "-D", "/srv/migrd/img", "-o", "dump.log", "--shell-job")
    assert p.wait(timeout=10) == -signal.SIGKILL  # CRIU ends the dumped original; PID free again
    shutil.copytree(src.dir / "srv" / "img", dst.dir / "srv" / "img")
    run_in("host3", criu, "restore", "-D", "/srv/migrd/img", "-o", "restore.log", "--shell-job", "-d")
    assert p.pid in cgroup.pids(dst.cgroup)
    assert os.readlink(f"/proc/{p.pid}/ns/mnt") == os.readlink(f"{dst.mount_ns}")
    assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink(f"{src.mount_ns}".replace("mnt", "net"))
    assert os.readlink(f"/proc/{p.pid}/ns/net") == os.readlink(f"{dst.mount_ns}".replace("mnt", "net"))


# ---- whole life cycles (each test makes its own bed) ----------------------------------------

def _recorded_pids(state: bed_mod.BedState) -> list[bed_mod.ProcRef]:
    return [r for h in state.hosts for r in (h.holder, h.sshd) if r]


def _assert_gone(state: bed_mod.BedState, refs: list[bed_mod.ProcRef]) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"migrd-{state.name}-" not in netns
    assert not any(bed_mod.alive(r) for r in refs)
    assert not any(d.exists() for d in state.cgroup.dirs)
    assert not state.dir.exists() and not state.run_dir.exists()
    assert f"migrd-{state.name}-" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


@pytest.mark.root
def test_down_removes_everything_and_can_repeat(tmp_path):
    name = bed_mod.new_name()
    try:
        state = bed_mod.up(name, hosts=2, root=tmp_path, cpu_quotas={"host1": 0.3})
        leftover = bed_mod.spawn_in(state, "host2", ["sleep", "300"])  # never stopped by hand
        refs = [*_recorded_pids(state), bed_mod.proc_ref(leftover.pid)]
        assert len(refs) == 5 and all(bed_mod.alive(r) for r in refs)
        assert bed_mod.down(name, tmp_path) is True
        leftover.wait(timeout=10)
        _assert_gone(state, refs)
        assert bed_mod.down(name, tmp_path) is False
        assert "nothing to do" in migrctl("bed", "down", "--name", name, root=tmp_path).stdout
    finally:
        bed_mod.down(name, tmp_path)


@pytest.mark.root
def test_down_cleans_up_after_up_was_killed(tmp_path):
    name = bed_mod.new_name()
    state_file = tmp_path / name / "state.json"
    cli = subprocess.Popen([sys.executable, "-m", "migrd.cli", "bed", "up", "--name", name, "--hosts", "3"],
                           env={**os.environ, "MIGRD_BED_ROOT": str(tmp_path)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cli.poll() is None:
            try:  # kill it as soon as some namespace holder runs: mid-way through `up`
                if any(h["holder"] for h in json.loads(state_file.read_text())["hosts"]):
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        state = bed_mod.load_state(name, tmp_path)
        refs = _recorded_pids(state)
        assert refs
        assert "removed" in migrctl("bed", "down", "--name", name, root=tmp_path).stdout
        _assert_gone(state, refs)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        bed_mod.down(name, tmp_path)


#: Sends N bytes to 198.18.0.2:5001 (retrying until the sink listens) and prints the seconds it
#: took, the sink's acknowledgement of the last byte included.
_SEND = """
import socket, sys, time
n = int(sys.argv[1]); block = bytes(65536)
for _ in range(200):
    try:
        s = socket.create_connection(("198.18.0.2", 5001), timeout=30)
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
t = time.monotonic()
for _ in range(n // len(block)):
    s.sendall(block)
s.shutdown(socket.SHUT_WR); s.recv(1)
print(time.monotonic() - t)
"""
_SINK = """
import socket
l = socket.create_server(("198.18.0.2", 5001)); l.settimeout(30)
c, _ = l.accept()
while c.recv(1 << 16):
    pass
c.sendall(b"k")
"""


@pytest.mark.root
def test_link_rate_holds_a_host_to_its_rate(tmp_path):
    name = bed_mod.new_name()
    try:
        migrctl("bed", "up", "--name", name, "--hosts", "2", "--link-rate", "host1=40", root=tmp_path)
        state = bed_mod.load_state(name, tmp_path)
        status = json.loads(migrctl("bed", "status", "--name", name, "--json", root=tmp_path).stdout)
        assert [h["link_mbit"] for h in status["hosts"]] == [40, None]
        for netns, dev in ((state.host("host1").netns, "eth0"), (state.bridge_netns, "vh1")):
            shown = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", dev], capture_output=True,
                                   text=True, check=True).stdout
            assert "tbf" in shown and "rate 40Mbit" in shown, shown

        def seconds_to_send(n: int) -> float:
            sink = bed_mod.spawn_in(state, "host2", [sys.executable, "-c", _SINK])
            try:
                out = bed_mod.exec_in(state, "host1", [sys.executable, "-c", _SEND, str(n)], timeout=60)
                return float(out.stdout)
            finally:
                if sink.poll() is None:
                    sink.kill()
                sink.wait(timeout=10)

        # 4 MiB at 40 Mbit/s is 0.84 s of wire time; unshaped veth moves it in a few ms.
        took = seconds_to_send(4 << 20)
        assert 0.7 < took < 5, took
        migrctl("bed", "down", "--name", name, root=tmp_path)
        _assert_gone(state, _recorded_pids(state))
    finally:
        bed_mod.down(name, tmp_path)


@pytest.mark.root
def test_cli_up_writes_config_file(tmp_path):
    name = bed_mod.new_name()
    out = tmp_path / "cluster.yaml"
    try:
        migrctl("bed", "up", "--name", name, "--hosts", "2", "--cpu-quota", "host2=0.25", "--config", str(out),
                root=tmp_path)
        cluster = config.load(out)
        assert cluster.host is None and [h.address for h in cluster.hosts] == ["198.18.0.1", "198.18.0.2"]
        assert cluster.ssh.client_key == tmp_path / name / "id_ed25519"
        state = bed_mod.load_state(name, tmp_path)
        assert cgroup.cpu_quota(state.host("host2").cgroup) == 0.25
        migrctl("bed", "down", "--name", name, root=tmp_path)
        _assert_gone(state, _recorded_pids(state))
        assert out.exists()  # the operator's copy stays
    finally:
        bed_mod.down(name, tmp_path)
