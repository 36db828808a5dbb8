"""Agents on a real 3-host bed (cgroup load, real sshd, real CRIU) in the modes test_agent_e2e
does not cover, and with the etcd registry:

* fill: every host in fill mode (nobody pushes on its own); host1 busy, host2/host3 idle ask it
  for work over SSH (`migrctl peer offer`), and host1 moves a workload to the asker;
* consolidate: host2 lightly loaded in consolidate mode packs its workload onto a busier host;
* `--registry etcd`: an etcd member in the bed's bridge namespace; host1 offloads through it
  (with a reservation), its metrics endpoint is scraped for real after the move, a SIGKILLed
  agent's host drops out of host1's view within the lease TTL, and etcd killed and restarted
  leaves the agents running, saying so, and then back on the registry.

host1 is limited to 1.5 CPUs, so two spinning workloads make it overloaded at once (run queue
3 with its agent) without taking both of the machine's cores, and its agent and sshd still get
a share (at one CPU, `migrctl peer offer` and the migration itself crawled). Waits are bounds, not timed asserts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from migrd.agent import admin
from migrd.adapters import cgroup
from migrbed import bed as bed_mod
from migrd import config as config_mod
from migrd.model import PolicyConfig, Watermarks
from migrbed.programs import BUSY, COUNTER, MARK, read_counts
from workloads import copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 3
BED_CPU_QUOTAS = {"host1": 1.5}
PY = sys.executable
TTL = 3
METRICS_PORT = 9750

#: A bed host's agent counts itself (it is in the host's cgroup and runnable while it samples):
#: an idle host shows a run queue and load of ~1, i.e. 0.5 per CPU on host2/host3 and 0.67 on
#: host1 (1.5 CPUs), so "lightly loaded" is drawn above that. Consolidate: a loss ratio of 0.5
#: lets it move a young process; the ceiling is out of the way (a host's load average still
#: carries the previous test's workloads for a minute), so what is tested is that it packs
#: onto a busier host at all.
POLICY = PolicyConfig(
    load=Watermarks(high=2.0, low=1.2), util=Watermarks(high=0.9, low=0.3),
    run_queue=Watermarks(high=1.5, low=1.2), hold_s=2.0, host_cooldown_s=4.0,
    process_cooldown_s=120.0, min_age_s=2.0, min_gain=0.5, min_gain_ratio=0.05,
    consolidate_ceiling=1.5, consolidate_max_loss_ratio=0.5)

#: About 60 % of one CPU: spins 60 ms, sleeps 40 ms, until the absolute time argv[2]
#: (argv[1] only names it, for the cleanup).
DUTY = f"""
import sys, time  # {MARK}
deadline = float(sys.argv[2])
while time.time() < deadline:
    t = time.time()
    while time.time() - t < 0.06:
        pass
    time.sleep(0.04)
"""


def configure(bed, modes: dict[str, str], **daemon) -> None:
    """Rewrite every host's config: the test policy, 1 s rounds, the host's mode, and `daemon`."""
    for h in bed.hosts:
        path = h.dir / "etc" / "migrd.yaml"
        cfg = config_mod.parse(path.read_text())
        cfg = dataclasses.replace(cfg, policy=POLICY, daemon=dataclasses.replace(
            cfg.daemon, interval=1.0, peer_stale_after=10.0, probe_bytes=1 << 20, mode=modes[h.name], **daemon))
        path.write_text(config_mod.dump(cfg))


@pytest.fixture
def bed_etcd(bed) -> Iterator[Callable[[], str]]:
    """Start the bed's etcd on demand; it is stopped after the test, after the agents (a test
    asks for this fixture before `agents`)."""
    try:
        yield lambda: bed_mod.start_registry(bed)
    finally:
        bed_mod.stop_registry(bed)


@pytest.fixture
def agents(bed) -> Iterator[Callable[[], dict[str, int]]]:
    """Start the agents with whatever configure() wrote; stop them (and what they moved) after."""
    started: dict[str, int] = {}

    def start() -> dict[str, int]:
        started.update(bed_mod.start_agents(bed))
        return started

    try:
        yield start
    finally:
        for h in bed.hosts:
            bed_mod.stop_agent(h)


def host_of(bed, pid: int) -> str | None:
    return next((h.name for h in bed.hosts if pid in cgroup.pids(h.cgroup)), None)


def placed(bed, out: Path) -> list[str | None]:
    return [host_of(bed, pid) for pid in copies(str(out))]


def decisions(h) -> list[dict]:
    path = h.dir / "state" / "decisions.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def ask(h, op: str) -> dict | list:
    return admin.request(bed_mod.agent_socket(h), op, timeout=10)


def start_busy(run_in, host: str, outs: list[Path], deadline: float) -> None:
    for out in outs:
        run_in(host, PY, "-m", "migrd.cli", "run", "--name", out.name, "--", PY, "-c", BUSY,
               str(out), str(deadline))


@pytest.mark.parametrize("registry", ["ssh", "etcd"])
def test_fill_an_idle_host_asks_and_gets_work(bed, run_in, bed_etcd, agents, tmp_path: Path, registry: str):
    """With etcd the idle host finds busy host1 there and asks it over an SSH connection opened
    for the offer; with ssh, over the connection it reads host1's load on."""
    if registry == "etcd":
        bed_etcd()
    configure(bed, {"host1": "fill", "host2": "fill", "host3": "fill"}, registry=registry)
    outs = [tmp_path / f"fill-{i}" for i in range(2)]
    try:
        start_busy(run_in, "host1", outs, time.time() + 150)
        agents()
        t0 = time.monotonic()
        wait_for(lambda: any(placed(bed, o) in (["host2"], ["host3"]) for o in outs), timeout=100,
                 what="an idle host to ask host1 for work and get a workload")
        print(f"\nfill ({registry}): a workload left host1 after {time.monotonic() - t0:.1f} s; "
              f"placement {[placed(bed, o) for o in outs]}")
        h1 = bed.host("host1")
        # The record is written when the migration returns, a little after the copy runs there.
        moved = wait_for(lambda: [r for r in decisions(h1) if r.get("migration", {}).get("outcome") == "ok"],
                         timeout=60, what="host1's record of the move")
        # Every move host1 made was a fill decision for a host that asked.
        asked = {h.name for h in bed.hosts[1:] for r in decisions(h) if r.get("asked") == "host1" and r["ok"]}
        for r in moved:
            assert r["mode"] == "fill" and r["target"] in asked, r
        for out in outs:
            assert len(copies(str(out))) == 1
            got = read_counts(out)
            assert got == list(range(1, len(got) + 1)), f"{out.name} went backwards"
        assert ask(h1, "status")["registry"]["registry"] == registry
    finally:
        end_copies(*map(str, outs))


def test_consolidate_packs_onto_a_busier_host(bed, run_in, agents, tmp_path: Path):
    """host2 (two CPUs, a light counter) packs it onto a busier host: host3 (two CPUs, 60 % of
    one busy) or host1 (1.5 CPUs, idling at 0.67 per CPU from its agent alone)."""
    configure(bed, {"host1": "offload", "host2": "consolidate", "host3": "offload"}, registry="ssh")
    light, duty = tmp_path / "light", tmp_path / "duty"
    deadline = time.time() + 150
    try:
        run_in("host2", PY, "-m", "migrd.cli", "run", "--name", "light", "--", PY, "-c", COUNTER, str(light))
        run_in("host3", "sh", "-c", 'setsid "$0" -c "$1" "$2" "$3" </dev/null >/dev/null 2>&1 &',
               PY, DUTY, str(duty), str(deadline))
        agents()
        t0 = time.monotonic()
        wait_for(lambda: placed(bed, light) in (["host1"], ["host3"]), timeout=100,
                 what="host2 to pack its workload onto a busier host")
        print(f"\nconsolidate: host2's workload on {placed(bed, light)} after {time.monotonic() - t0:.1f} s")
        rec = wait_for(lambda: next((r for r in decisions(bed.host("host2"))
                                     if r.get("migration", {}).get("outcome") == "ok"), None),
                       timeout=60, what="host2's record of the move")
        assert rec["mode"] == "consolidate" and rec["level"] == "low" and [rec["target"]] == placed(bed, light)
        before = len(read_counts(light))
        wait_for(lambda: len(read_counts(light)) > before + 5, what="the counter to go on there")
        got = read_counts(light)
        assert got == list(range(1, len(got) + 1))
    finally:
        end_copies(str(light), str(duty))


#: Lists the load keys in etcd (argv[1]) every 0.1 s, one line per look, until the key argv[2]
#: is gone or 60 s have passed.
LOAD_KEYS = """
import sys, time
from migrd.adapters.registry import EtcdClient
client, end = EtcdClient((sys.argv[1],), 2.0), time.monotonic() + 60
while time.monotonic() < end:
    keys = [meta["key"].decode() for _, meta in client.call(lambda c: c.get_prefix("/migrd/load/"))]
    print(" ".join(keys), flush=True)
    if sys.argv[2] not in keys:
        break
    time.sleep(0.1)
"""


def scrape(run_in, host: str, address: str) -> dict[tuple[str, tuple], float]:
    """GET the agent's /metrics from inside its host (where it listens) and parse it with the
    client library's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = run_in(host, PY, "-c", "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                  f"'http://{address}:{METRICS_PORT}/metrics', timeout=5).read().decode())").stdout.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_etcd_registry_offload_metrics_and_failures(bed, run_in, bed_etcd, agents, tmp_path: Path):
    url = bed_etcd()
    assert url == "http://198.18.0.254:2379"
    for h in bed.hosts:  # metrics on each host's own address
        path = h.dir / "etc" / "migrd.yaml"
        cfg = config_mod.parse(path.read_text())
        assert cfg.daemon.registry == "etcd" and cfg.daemon.etcd.endpoints == (url,)
        cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(
            cfg.daemon, etcd=dataclasses.replace(cfg.daemon.etcd, ttl=TTL),
            metrics=config_mod.MetricsSettings(enabled=True, address=h.address, port=METRICS_PORT)))
        path.write_text(config_mod.dump(cfg))
    configure(bed, {"host1": "offload", "host2": "offload", "host3": "offload"})
    outs = [tmp_path / f"etcd-{i}" for i in range(2)]
    h1, h2, h3 = bed.hosts
    try:
        start_busy(run_in, "host1", outs, time.time() + 200)
        pids = agents()
        t0 = time.monotonic()
        wait_for(lambda: any(placed(bed, o) in (["host2"], ["host3"]) for o in outs), timeout=100,
                 what="host1 to offload a workload through the etcd registry")
        print(f"\netcd: a workload left host1 after {time.monotonic() - t0:.1f} s")
        rec = wait_for(lambda: next((r for r in decisions(h1) if r.get("migration", {}).get("outcome") == "ok"),
                                    None), timeout=60, what="host1's record of the move")
        st = ask(h1, "status")
        assert st["registry"] == {"registry": "etcd", "ok": True, "error": None, "note": None}

        m = scrape(run_in, "host1", h1.address)
        ok = sum(v for (n, lab), v in m.items() if n == "migrd_migrations_total" and ("outcome", "ok") in lab)
        assert ok >= 1 and m[("migrd_migration_downtime_seconds_count", ())] >= 1
        assert m[("migrd_migration_bytes_total", ())] > 0 and m[("migrd_rounds_total", ())] > 3
        assert m[("migrd_decisions_total", (("action", "migrate"),))] >= 1
        assert {("host", h.name) for h in bed.hosts} <= {lab[0] for (n, lab), _ in m.items()
                                                         if n == "migrd_host_load_per_cpu"}
        print(f"metrics on host1: migrations ok {ok:g}, downtime sum "
              f"{m[('migrd_migration_downtime_seconds_sum', ())]:.2f} s, bytes "
              f"{m[('migrd_migration_bytes_total', ())]:g}, move {rec['migration']['id']}")
        for out in outs:
            assert len(copies(str(out))) == 1

        # No more moves from here on (a round that migrates does not look at its peers meanwhile).
        ask(h1, "pause")
        wait_for(lambda: ask(h1, "status")["in_flight"] is None, timeout=120, what="host1's move to end")

        # A dead agent: its key leaves etcd when its lease runs out, and its host host1's view.
        # The keys are watched by one lister in the bridge namespace (where etcd is), outside
        # the hosts' CPU quotas: a Python started per look would measure its own start-up.
        lister = subprocess.Popen(["nsenter", f"--net=/run/netns/{bed.bridge_netns}", "--", PY, "-c",
                                   LOAD_KEYS, url, "/migrd/load/host3"], stdout=subprocess.PIPE, text=True)
        try:
            assert lister.stdout is not None
            first = lister.stdout.readline().split()
            assert sorted(first) == [f"/migrd/load/{h.name}" for h in bed.hosts], first
            os.kill(pids["host3"], signal.SIGKILL)
            killed = time.monotonic()
            last = first
            for line in lister.stdout:  # the lister ends when the key is gone (or after 60 s)
                last = line.split()
            expired = time.monotonic() - killed
            assert "/migrd/load/host3" not in last, "host3's key did not expire within 60 s"
        finally:
            lister.kill()
            lister.wait(10)

        def host3_gone() -> bool:
            row = next(r for r in ask(h1, "hosts") if r["name"] == "host3")
            return row["level"] is None and "lease expired" in (row["error"] or "")

        wait_for(host3_gone, timeout=TTL + 10, what="host3 to drop out of host1's view")
        dropped = time.monotonic() - killed
        print(f"host3's agent SIGKILLed: its etcd key gone after {expired:.2f} s, host3 out of host1's "
              f"view after {dropped:.2f} s (TTL {TTL} s, 1 s rounds)")
        # The TTL runs from the last keep-alive (every TTL/3); etcd looks for expired leases every
        # 0.5 s and revokes them through raft: up to about a second after the TTL, more on a busy
        # machine.
        assert expired <= TTL + 2.0
        assert dropped <= expired + 2.0  # and at most one of host1's rounds more

        # etcd killed: the agents keep running on local decisions and say so; then back.
        os.kill(bed_mod.registry_pid(bed), signal.SIGKILL)  # type: ignore[arg-type]
        wait_for(lambda: not ask(h1, "status")["registry"]["ok"], timeout=15, what="host1 to notice etcd is gone")
        rounds = ask(h1, "status")["rounds"]
        wait_for(lambda: ask(h1, "status")["rounds"] >= rounds + 2, timeout=15, what="host1's rounds to go on")
        st = ask(h1, "status")["registry"]
        assert "local load only" in st["note"] and "198.18.0.254:2379" in st["error"]
        assert next(r for r in ask(h1, "hosts") if r["name"] == "host2")["error"].startswith("registry unreachable")
        bed_mod.start_registry(bed)
        back = time.monotonic()
        wait_for(lambda: ask(h1, "status")["registry"]["ok"]
                 and next(r for r in ask(h1, "hosts") if r["name"] == "host2")["level"] is not None,
                 timeout=20, what="host1 to see host2 through etcd again")
        print(f"etcd restarted: host1 sees host2 again after {time.monotonic() - back:.2f} s")
        assert scrape(run_in, "host1", h1.address)[("migrd_registry_errors_total", ())] >= 1
    finally:
        end_copies(*map(str, outs))
