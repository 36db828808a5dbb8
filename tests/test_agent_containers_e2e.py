"""The agent moves a container as one candidate (issue 12): real agents on two bed hosts, real
runc, real CRIU, real sshd.

host1 is overloaded by four CPU-bound processes that are not opted in, and runs two runc
containers: one opted in (the io.migrd.migratable annotation), spinning on the CPU in a bounded
loop, and one that is not opted in, counting slowly. The agent must move the opted-in container,
as a container (its runtime's checkpoint with its rootfs changes, not its init as a process), to
the idle host2, where it carries on from its count; the other container stays on host1.

In the bed a container's cgroup is its runtime's (/migrd-HOST-NAME), outside its bed host's
cgroup: the host's own load comes from the plain processes, the container's CPU from its cgroup.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest

from migrbed import bed as bed_mod
from migrbed.programs import BUSY
from migrd import config as config_mod
from migrd.model import PolicyConfig, Watermarks
from workloads import container_counts, container_inits, end_copies, marker, wait_for

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed (make setup)"),
              pytest.mark.skipif(not Path("/var/cache/migrd/images/busybox/rootfs").is_dir(),
                                 reason="no busybox image (make setup)")]
BED_HOSTS = 2
PY = sys.executable
LOADERS = 4
#: The spinning container appends its iteration count every STRIDE iterations.
STRIDE = 5000

POLICY = PolicyConfig(
    load=Watermarks(high=2.0, low=0.5), util=Watermarks(high=0.9, low=0.3),
    run_queue=Watermarks(high=1.5, low=0.5), hold_s=2.0, host_cooldown_s=4.0,
    process_cooldown_s=120.0, min_age_s=2.0, min_gain=0.5, min_gain_ratio=0.05)


def migrctl(run_in, host: str, *args: str, check: bool = True):
    r = run_in(host, PY, "-m", "migrd.cli", *args, check=False, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"migrctl {' '.join(args)} on {host} exited {r.returncode}: {r.stderr.decode()}")
    return r


def ps(run_in, host: str) -> list[dict]:
    return json.loads(migrctl(run_in, host, "ps", "--json").stdout)


def running_on(run_in, bed, name: str) -> list[str]:
    return [h.name for h in bed.hosts
            if any(r["name"] == name and r.get("kind") == "container" and r["alive"] for r in ps(run_in, h.name))]


RUNTIMES = ["runc", pytest.param("podman", marks=pytest.mark.skipif(
    shutil.which("podman") is None or not Path("/var/cache/migrd/images/busybox/podman.tar").is_file(),
    reason="podman or its image not installed (make setup)"))]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_agent_moves_an_opted_in_container_and_leaves_the_other(bed, run_in, tmp_path: Path, runtime: str):
    for h in bed.hosts:
        path = h.dir / "etc" / "migrd.yaml"
        cfg = config_mod.parse(path.read_text())
        path.write_text(config_mod.dump(dataclasses.replace(cfg, policy=POLICY, daemon=dataclasses.replace(
            cfg.daemon, interval=1.0, peer_stale_after=10.0, probe_bytes=1 << 20))))
    deadline = time.time() + 240
    stamp = int(time.time() * 1000) % 10**8
    spin, kept = f"spin{stamp}", f"kept{stamp}"
    spin_mark, kept_mark = marker(spin), marker(kept)
    outs = [tmp_path / f"load-{i}" for i in range(LOADERS)]
    agents = False
    try:
        # The host's load: plain processes, not opted in, niced so that they only take idle CPU.
        for out in outs:
            run_in("host1", "sh", "-c", 'setsid nice -n 19 "$0" -c "$1" "$2" "$3" </dev/null >/dev/null 2>&1 &',
                   PY, BUSY, str(out), str(deadline))
        # Bounded: the loop ends by itself at the deadline.
        script = (f"end={int(deadline)}; i=0; while :; do i=$((i+1)); if [ $((i % {STRIDE})) -eq 0 ]; then "
                  f"echo $i >> /data/counter; [ $(date +%s) -ge $end ] && exit 0; fi; done # {spin_mark}")
        migrctl(run_in, "host1", "container", "run", "--runtime", runtime, spin, "--", "sh", "-c", script)
        migrctl(run_in, "host1", "container", "run", "--runtime", runtime, "--not-migratable", kept, "--", "sh", "-c",
                f"i=0; while :; do i=$((i+1)); echo $i >> /data/counter; sleep 0.2; done # {kept_mark}")
        wait_for(lambda: len(container_counts(spin_mark)) >= 3 and len(container_counts(kept_mark)) >= 3, timeout=30,
                 what="both containers to count")
        spin_init = container_inits(spin_mark)[0]
        bed_mod.start_agents(bed)
        agents = True
        # `ps` asks the agent, which answers only once its first round is done.
        wait_for(lambda: all(json.loads(migrctl(run_in, h.name, "status", "--json").stdout)["rounds"] > 0
                             for h in bed.hosts), timeout=30, what="every agent's first round")
        t0 = time.monotonic()
        wait_for(lambda: running_on(run_in, bed, spin) == ["host2"], timeout=120,
                 what="the agent to move the opted-in container to host2")
        moved_after = time.monotonic() - t0
        # It carries on there from its count (memory and rootfs change moved): one copy, running.
        before = container_counts(spin_mark)
        wait_for(lambda: len(container_counts(spin_mark)) >= len(before) + 3, timeout=30, what="the container to keep spinning")
        got = container_counts(spin_mark)
        assert got == [0] + [STRIDE * k for k in range(1, len(got))], got[-10:]
        assert len(container_inits(spin_mark)) == 1 and psutil.Process(container_inits(spin_mark)[0]).status() != psutil.STATUS_STOPPED
        # On host2 it is a candidate that has just arrived: in its migration cooldown.
        there = wait_for(lambda: [r for r in ps(run_in, "host2") if r["name"] == spin and "action" in r],
                         timeout=10, what="host2's agent to see the container")
        assert there[0]["opted_in"] and there[0]["last_migrated"] is not None, there

        # The move was the agent's, of the container as a container.
        log = [json.loads(ln) for ln in (bed.host("host1").dir / "state" / "decisions.jsonl").read_text().splitlines()]
        # (The module's bed keeps the log of the other runtime's run.)
        moves = [r for r in log if r.get("migration") and r["pid"] in (spin_init, container_inits(kept_mark)[0])]
        assert [r["migration"]["outcome"] for r in moves] == ["ok"], moves
        (move,) = moves
        assert move["subject"] == {"kind": runtime, "name": spin, "open_files": False, "strategies": ["stop-copy"]}
        assert move["pid"] == spin_init and move["target"] == "host2"
        assert move["action"] in ("migrate", "migrate_with_data") and move["reasons"]
        assert any("overloaded" in r for r in move["reasons"])
        (hist,) = [m for m in json.loads(migrctl(run_in, "host1", "history", "--json").stdout)
                   if m["id"] == move["migration"]["id"]]
        assert hist["outcome"] == "ok"
        assert hist["decision_reasons"] == move["reasons"]
        # No decision anywhere named a container's process as a plain process.
        for h in bed.hosts:
            for r in (h.dir / "state" / "decisions.jsonl").read_text().splitlines():
                d = json.loads(r)
                assert not (d.get("pid") and (d.get("subject") or {}).get("kind") == "process"), d

        # The container that is not opted in stays on host1, counting, a candidate the policy skips.
        time.sleep(5)
        assert running_on(run_in, bed, kept) == ["host1"]
        k = container_counts(kept_mark)
        assert k == list(range(len(k))) and len(container_inits(kept_mark)) == 1
        rows = {r["name"]: r for r in ps(run_in, "host1")}
        assert rows[kept]["opted_in"] is False and rows[kept]["action"] == "stay", rows[kept]
        explained = json.loads(migrctl(run_in, "host1", "explain", "--json").stdout)
        assert explained["decision"]["action"] == "stay"
        alone = json.loads(migrctl(run_in, "host1", "explain", "--container", kept, "--json").stdout)
        assert alone["decision"]["action"] == "stay" and "1 not opted in" in alone["decision"]["reasons"], alone
        # Nor can its init be moved by hand as a plain process.
        r = migrctl(run_in, "host1", "migrate", str(container_inits(kept_mark)[0]), "--to", "host2", check=False)
        assert r.returncode == 4 and f"belongs to the {runtime} container {kept}".encode() in r.stderr, r.stderr
        assert running_on(run_in, bed, kept) == ["host1"]
        print(f"\n{runtime} container moved by the agent after {moved_after:.1f} s; decision: {move['action']} "
              f"{move['subject']} downtime {move['migration']['downtime']:.2f} s; reasons: {move['reasons'][-3:]}")
    finally:
        if agents:
            for h in bed.hosts:
                bed_mod.stop_agent(h)
        end_copies(*map(str, outs))
        for name in (spin, kept):
            for h in bed.hosts:
                migrctl(run_in, h.name, "container", "rm", name, check=False)
