"""Migrations between separate kernels: the Vagrant bed's VMs (`make test-vagrant`).

Runs only when asked (MIGRD_VAGRANT=1, which `make test-vagrant` sets after `make vagrant-up`):
the VMs take minutes to boot under software emulation. Every command reaches a VM through
plain OpenSSH with the config `vagrant ssh-config` prints (one Vagrant call, not one per step).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from migrbed.programs import BUSY, COUNTER

ROOT = Path(__file__).resolve().parent.parent
VMS = [f"host{i}" for i in range(1, int(os.environ.get("MIGRD_VMS", "2")) + 1)]

pytestmark = [
    pytest.mark.vagrant,
    pytest.mark.skipif(os.environ.get("MIGRD_VAGRANT") != "1",
                       reason="needs the booted Vagrant VMs: make test-vagrant"),
]


class Vms:
    def __init__(self, ssh_config: Path):
        self.ssh_config = ssh_config

    def run(self, vm: str, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", vm, "--",
               "sudo", *map(shlex.quote, argv)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{vm}: {' '.join(argv[:3])} ... exit {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def migrctl(self, vm: str, command: str, *argv: str, timeout: float = 300) -> dict | list:
        return json.loads(self.run(vm, "migrctl", command, "--json", *argv, timeout=timeout).stdout)

    def counts(self, vm: str, path: str) -> list[int]:
        r = self.run(vm, "cat", path, check=False)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


@pytest.fixture(scope="module")
def vms(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("vagrant") / "ssh_config"
    # Where `make box` put the box and Vagrant its state (readable by QEMU, unlike /root).
    env = {**os.environ, "VAGRANT_HOME": os.environ.get("VAGRANT_HOME", "/var/lib/migrd-vagrant/home")}
    r = subprocess.run(["vagrant", "ssh-config", *VMS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    cfg.write_text(r.stdout)
    v = Vms(cfg)
    # The agents would move workloads on their own; these tests move them by hand.
    for vm in VMS:
        v.run(vm, "migrctl", "pause")
    yield v
    for vm in VMS:
        for w in v.migrctl(vm, "ps"):
            if w.get("alive"):
                v.run(vm, "kill", "-9", str(w["pid"]), check=False)
        v.run(vm, "migrctl", "resume", check=False)


def wait_counts(vms: Vms, vm: str, path: str, at_least: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        got = vms.counts(vm, path)
        if len(got) >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(1)


def test_migrd_is_an_active_systemd_service_on_every_vm(vms):
    for vm in VMS:
        r = vms.run(vm, "systemctl", "is-active", "migrd", check=False)
        assert r.stdout.strip() == "active", f"{vm}: migrd is {r.stdout.strip()!r}"
        status = vms.run(vm, "systemctl", "show", "migrd", "-p", "Type", "-p", "WatchdogUSec").stdout
        assert "Type=notify" in status and "WatchdogUSec=1min" in status, status
        # In the host's mount namespace: CRIU run from another one dumps the workloads' whole
        # mount tree (and failed on the guests' configfs).
        main = vms.run(vm, "systemctl", "show", "migrd", "-p", "MainPID", "--value").stdout.strip()
        spaces = {p: vms.run(vm, "readlink", f"/proc/{p}/ns/mnt").stdout.strip() for p in (main, "1")}
        assert spaces[main] == spaces["1"], f"{vm}: migrd's mount namespace is its own: {spaces}"


def test_each_vm_has_its_own_kernel_with_soft_dirty(vms):
    boots = {vm: vms.run(vm, "cat", "/proc/sys/kernel/random/boot_id").stdout.strip() for vm in VMS}
    assert len(set(boots.values())) == len(VMS)
    for vm in VMS:
        r = vms.run(vm, "/opt/migrd/criu/bin/criu", "check", "--feature", "mem_dirty_track", check=False)
        assert r.returncode == 0, f"{vm}: {r.stdout}{r.stderr}"


def move_there_and_back(vms: Vms, program: str, tag: str, strategy: str, *args: str,
                        config: str | None = None, with_files: bool = False) -> list[dict]:
    """Run `program OUT *args` on the first VM (it appends a number per step to OUT), move it
    to the second and back with `strategy` (config: a migrd config file for the moves), and
    check that it went on each time with nothing lost or repeated; returns the moves' JSON.
    with_files: OUT is held open and moves with the process (--with-files), so the last VM's
    OUT holds every value."""
    first, second = VMS[0], VMS[1]
    out = f"/var/tmp/migrd-{tag}-{int(time.time())}"
    info = vms.migrctl(first, "run", "--name", tag, "--", "python3", "-c", program, out, *args)
    pid = info["pid"]
    assert len(wait_counts(vms, first, out, 5)) >= 5, "the workload did not start"
    env = ("env", f"MIGRD_CONFIG={config}") if config else ()
    moves = []
    for here, there in ((first, second), (second, first)):
        t0 = time.monotonic()
        r = vms.run(here, *env, "migrctl", "migrate", "--json", str(pid), "--to", there, "--strategy", strategy,
                    *(["--with-files"] if with_files else []), timeout=600)
        res = json.loads(r.stdout)
        moves.append({**res, "wall": round(time.monotonic() - t0, 1), "from": here})
        assert res["target"] == there, res
        pid = res["target_pid"]
        before = len(vms.counts(there, out))
        assert len(wait_counts(vms, there, out, before + 5)) >= before + 5, f"no progress on {there} after the move"
        left = [w for w in vms.migrctl(here, "ps") if w.get("alive") and out in w["command"]]
        assert not left, f"a copy is left on {here}: {left}"
    # Each VM has the values written while the process ran there (with_files: the last one has
    # them all); together: 1..N, each once.
    both = vms.counts(first, out) + ([] if with_files else vms.counts(second, out))
    assert sorted(both) == list(range(1, len(both) + 1)), f"lost or repeated values: {sorted(both)[-40:]}"
    vms.run(first, "kill", "-9", str(pid))  # the next test's agents must not see it
    print(f"\n{tag}: moves (from, to, wall s, downtime s, rounds): "
          f"{[(m['from'], m['target'], m['wall'], m.get('downtime'), m.get('rounds')) for m in moves]}")
    return moves


@pytest.mark.parametrize("strategy", ["stop-copy", "postcopy"])
def test_counter_moves_vm1_vm2_vm1_state_intact(vms, strategy):
    move_there_and_back(vms, COUNTER, f"count-{strategy}", strategy)


#: Rewrites argv[3] KiB of its argv[2] MiB of random memory every 20 ms, the same bytes into a
#: shadow copy, and appends a step number to argv[1] (held open: each VM has a filesystem of
#: its own, so the file moves with the process) while the two agree (never if memory was lost
#: or mixed up by a move: then the step numbers stop, or a value repeats).
REWRITER = """
import os, sys, time
path, size, stripe = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3]) << 10
buf = bytearray(os.urandom(size)); shadow = bytearray(buf)
out = open(path, "a", buffering=1)
rnd, at, deadline = 0, 0, time.time() + 1800
while time.time() < deadline and buf == shadow:
    rnd += 1
    chunk = os.urandom(stripe)
    buf[at:at + stripe] = chunk; shadow[at:at + stripe] = chunk
    at = (at + stripe) % size
    out.write(str(rnd) + "\\n")
    time.sleep(0.02)
"""


def with_migrate_settings(vms: Vms, name: str, settings: str) -> str:
    """A config file on the first two VMs: theirs plus a migrate section; returns its path."""
    config = f"/var/tmp/migrd-{name}.yaml"
    for vm in VMS[:2]:
        text = vms.run(vm, "cat", "/etc/migrd/migrd.yaml").stdout
        assert "\nmigrate:" not in text, text  # the Vagrantfile's config has no migrate section
        text = text.rstrip("\n") + f"\nmigrate:\n{settings}"
        vms.run(vm, "sh", "-c", f"umask 077 && cat > {config} <<'EOF'\n{text}EOF")
    return config


@pytest.mark.parametrize("tracking", ["criu", "content"])
def test_precopy_moves_a_memory_rewriter_with_each_way_of_tracking_dirty_pages(vms, tracking):
    """The guests' kernels have soft-dirty: pre-copy's rounds are CRIU's pre-dumps by default
    (dirty_tracking auto), and by content when the config says so; both move a workload that
    rewrites its memory during the move, memory intact."""
    config = with_migrate_settings(vms, "content", "  dirty_tracking: content\n") if tracking == "content" else None
    # Small for an emulated CPU: comparing 64 MiB with its shadow every step took most of it.
    moves = move_there_and_back(vms, REWRITER, f"rewrite-{tracking}", "precopy", "16", "16", config=config,
                                with_files=True)
    for m in moves:
        assert m["strategy"] == "precopy" and m["dirty_tracking"] == tracking, m
        assert m["rounds"] >= 1, m


@pytest.mark.parametrize("point,kind,recovered", [
    ("round2", "die", "rolled back"), ("transfer", "die", "rolled back"), ("checkpoint", "error", None),
])
def test_a_failure_on_the_criu_pre_dump_route_leaves_exactly_one_copy(vms, point, kind, recovered):
    """CRIU's pre-dump route (only these kernels have soft-dirty) failing in its second round,
    after the freeze's dump (the source rolls back from its own chain of pre-dumps), or at the
    freeze: the workload runs on once on the first VM, its count unbroken."""
    first, second = VMS[0], VMS[1]
    config = with_migrate_settings(vms, "criu-route", "  dirty_tracking: criu\n")
    out = f"/var/tmp/migrd-fail-{point}-{int(time.time())}"
    pid = vms.migrctl(first, "run", "--name", f"fail-{point}", "--", "python3", "-c", COUNTER, out)["pid"]
    assert len(wait_counts(vms, first, out, 5)) >= 5, "the workload did not start"
    r = vms.run(first, "env", f"MIGRD_CONFIG={config}", f"MIGRD_FAILPOINTS={point}:{kind}", "migrctl", "migrate",
                "--json", str(pid), "--to", second, "--strategy", "precopy", timeout=600, check=False)
    assert r.returncode != 0, r.stdout
    if kind == "die":
        acts = [a["action"] for a in vms.migrctl(first, "recover")]
        assert len(acts) == 1 and acts[0].startswith(recovered), acts
    else:
        assert f"failpoint {point}:error" in r.stderr, r.stderr

    def alive(vm: str) -> list[int]:
        return [w["pid"] for w in vms.migrctl(vm, "ps") if w.get("alive") and out in w["command"]]

    deadline = time.monotonic() + 120
    while len(alive(first)) != 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert len(alive(first)) == 1 and not alive(second), (alive(first), alive(second))
    before = len(vms.counts(first, out))
    got = wait_counts(vms, first, out, before + 5)
    assert got == list(range(1, len(got) + 1)) and len(got) >= before + 5, f"lost or repeated: {got[-20:]}"
    print(f"\n{point}:{kind}: {acts[0] if kind == 'die' else 'failed cleanly'}, {len(got)} counts, one copy")
    vms.run(first, "kill", "-9", str(alive(first)[0]))


def test_the_agents_spread_cpu_load_between_the_vms(vms):
    """Last: the agents run on their own here (default policy: a host whose load stays above
    1.0 per CPU for hold_s moves a process to a host below 0.5). Two CPU-bound workloads on
    the first VM's one CPU; its agent moves one to the second VM, and each runs exactly once."""
    first, second = VMS[0], VMS[1]
    stamp = int(time.time())
    deadline = time.time() + 900
    outs = [f"/var/tmp/migrd-busy{i}-{stamp}" for i in range(2)]
    for i, out in enumerate(outs):
        vms.migrctl(first, "run", "--name", f"busy{i}", "--", "python3", "-c", BUSY, out, str(deadline))

    def placed() -> dict[str, list[str]]:
        return {vm: [out for out in outs for w in vms.migrctl(vm, "ps") if w.get("alive") and out in w["command"]]
                for vm in (first, second)}

    t0 = time.monotonic()
    for vm in VMS:
        vms.run(vm, "migrctl", "resume")
    try:
        where = placed()
        while not where[second] and time.monotonic() - t0 < 420:
            time.sleep(5)
            where = placed()
    finally:
        for vm in VMS:
            vms.run(vm, "migrctl", "pause", check=False)
    spread_after = round(time.monotonic() - t0, 1)
    # The loop stops as soon as a copy shows there, possibly while its move is still in flight:
    # copies are counted once no agent has one.
    settle = time.monotonic() + 300
    while any(vms.migrctl(vm, "status").get("in_flight") for vm in VMS) and time.monotonic() < settle:
        time.sleep(5)
    where = placed()
    tried = [m for vm in VMS for m in vms.migrctl(vm, "history") if m.get("name") in ("busy0", "busy1")]
    print(f"\nagents: spread after {spread_after} s; placement {where}; moves "
          f"{[(m['id'], m['name'], m['source'], m['target'], m.get('strategy'), m.get('outcome'), m.get('downtime')) for m in tried]}")
    assert where[second], f"nothing moved to {second} in {spread_after} s: {where}"
    assert sorted(where[first] + where[second]) == sorted(outs), f"a workload is missing or runs twice: {where}"
    for out in outs:  # each kept counting across its move
        got = vms.counts(first, out) + vms.counts(second, out)
        assert sorted(got) == list(range(1, len(got) + 1)), f"{out}: lost or repeated values"
