"""The simulator (migrd.sim): its invariants, its determinism, that migrd's policies run through
the agent's own round, and the policies' ordering on a short fixed-seed run. No root."""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import subprocess
import sys
from collections.abc import Sequence

import pytest

from migrd.core import peerset, step
from migrd.sim import SimConfig, engine, probe, run, workload

SMALL = SimConfig(hosts=20, load=0.9, seed=5, duration=300.0)


def _sim(cfg: SimConfig, policy: str) -> engine.Simulation:
    rng = random.Random(cfg.seed)
    cluster = workload.hosts(cfg.hosts, rng)
    return engine.Simulation(cfg, cluster, workload.jobs(cluster, cfg.load, cfg.duration, rng), policy)


def _numbers(r: engine.Result) -> dict:
    return {k: v for k, v in dataclasses.asdict(r).items() if k not in ("wall_s", "cpu_s")}


@pytest.mark.parametrize("policy", engine.POLICIES)
def test_jobs_are_conserved_and_never_on_two_hosts(policy):
    """Every job that arrived is completed, on exactly one host, or in flight (on none)."""
    # Consolidation only acts on lightly loaded hosts.
    sim = _sim(dataclasses.replace(SMALL, load=0.3, duration=600.0) if policy == "migrd_consolidate" else SMALL,
               policy)
    r = sim.run()
    assert r.jobs == len(sim.arrivals) > 1000
    assert r.jobs == r.completed + r.jobs_on_hosts + r.jobs_in_flight
    where = sim.hosts_of_jobs()
    assert all(len(hosts) <= 1 for hosts in where.values())
    assert sum(not hosts for hosts in where.values()) == r.jobs_in_flight
    assert all(s > 0 for s in sim.slowdowns)
    if policy != "none":
        assert r.migrations > 0, "the run is too short or idle to exercise the policy"


@pytest.mark.parametrize("policy", engine.POLICIES)
def test_a_run_leaves_nothing_for_the_cycle_collector(policy):
    """A run turns the cyclic collector off (engine._no_gc). That is free only while the run
    makes no reference cycles: they would pile up, uncollected, for the whole run."""
    sim = _sim(SMALL, policy)
    collected: list[int] = []

    def note(phase: str, info: dict) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    gc.collect()
    gc.callbacks.append(note)
    try:
        sim.run()
        assert gc.isenabled()
        gc.collect()
    finally:
        gc.callbacks.remove(note)
    assert collected and sum(collected) == 0


def test_deterministic_for_a_seed():
    a, b = run(SMALL), run(SMALL, jobs=3)  # b: three policies at a time, in forked processes
    assert list(b) == list(engine.POLICIES)
    assert {n: _numbers(r) for n, r in a.items()} == {n: _numbers(r) for n, r in b.items()}
    other = run(dataclasses.replace(SMALL, seed=6), ("none",))["none"]
    assert _numbers(other) != _numbers(a["none"])


def test_migrd_policies_call_the_agents_round(monkeypatch):
    """Not a copy of the policy: every migrd round in the simulation is settled by the agent's
    own code, `step.idle` or else one migrd.core.step.step."""
    calls, idle = [], []
    real_step, real_idle = step.step, step.idle

    def counting(*args):
        calls.append(args[2].mode)
        return real_step(*args)

    def counting_idle(*args):
        out = real_idle(*args)
        idle.append(out is not None)
        return out

    monkeypatch.setattr(step, "step", counting)
    monkeypatch.setattr(step, "idle", counting_idle)
    r = run(SMALL, ("migrd", "migrd_fill", "none"))
    assert len(idle) == r["migrd"].policy_rounds + r["migrd_fill"].policy_rounds
    assert len(calls) == idle.count(False) > 0 and idle.count(True) > 0
    assert set(calls) == {"offload", "fill"}


class _Untouchable(Sequence):
    """Peers or candidates a round must not look at."""

    def __len__(self) -> int:
        raise AssertionError("an idle round looked at its peers or candidates")

    def __getitem__(self, i):  # type: ignore[override]
        raise AssertionError("an idle round looked at its peers or candidates")


@pytest.mark.parametrize("policy", ["migrd", "migrd_fill", "migrd_consolidate"])
def test_idle_rounds_are_what_step_would_do(monkeypatch, policy):
    """Every round `step.idle` settles, `step.step` given the same state and sample (and the
    peers and candidates the simulator would hand it) leaves the same state, moves nothing and
    asks nobody; the run's results are those of calling `step.step` on every round."""
    plain = run(SMALL, (policy,))[policy]
    real_idle, settled = step.idle, []

    def checked(state, sample, settings):
        out = real_idle(state, sample, settings)
        if out is not None:
            full = step.step(state, step.Inputs(sample, _Untouchable(), _Untouchable()), settings)
            assert (full.state, full.move, full.ask) == (out, False, None)
            settled.append(out)
        return out

    monkeypatch.setattr(step, "idle", checked)
    checked_run = run(SMALL, (policy,))[policy]
    assert settled
    monkeypatch.setattr(step, "idle", lambda *_: None)
    every = run(SMALL, (policy,))[policy]
    assert _numbers(plain) == _numbers(checked_run) == _numbers(every)


def test_policies_ordering_fixed_seed():
    """40 hosts at 90 % offered load for 15 simulated minutes (seed 2), migrd's defaults: the
    issue's aims. migrd's offload policy is at least 30 % below no migration and below the
    MOSIX-style rule, with fewer migrations per job than every rule without its cost model."""
    cfg = SimConfig(hosts=40, load=0.9, seed=2, duration=900.0)
    r = run(cfg, ("none", "random", "least_loaded", "mosix", "migrd"))
    sd = {n: x.mean_slowdown for n, x in r.items()}
    assert sd["migrd"] <= 0.7 * sd["none"] and sd["migrd"] < sd["mosix"] and sd["migrd"] < sd["random"], sd
    assert sd["random"] < sd["none"] and sd["least_loaded"] < sd["none"], sd
    mig = {n: x.migrations_per_job for n, x in r.items()}
    assert mig["none"] == 0 and all(mig["migrd"] < mig[n] for n in ("random", "least_loaded", "mosix")), mig
    assert r["migrd"].ping_pong == 0


def test_migration_downtime_calibration():
    """The bed's 1 GiB move (README): ~8 s frozen streamed, a 10 MiB one ~0.9 s."""
    gib = 1 << 30
    fast = 10 * workload.GB
    assert 7.0 < workload.STRATEGIES["streamed"].downtime(gib, fast, 0.0) < 9.0
    assert 7.0 < workload.STRATEGIES["staged"].downtime(gib, fast, 0.0) < 9.0
    assert 0.85 < workload.STRATEGIES["streamed"].downtime(10 << 20, fast, 0.0) < 1.0


def test_heavy_tailed_lifetimes():
    """Bounded Pareto alpha 1: Pr{life > T | life > a} ~ a/T."""
    rng = random.Random(1)
    xs = [workload.bounded_pareto(rng, 1.0, 1e6) for _ in range(200_000)]
    older = [x for x in xs if x > 10]
    assert abs(sum(x > 40 for x in older) / len(older) - 10 / 40) < 0.02
    assert abs(sum(xs) / len(xs) / workload.mean_bounded_pareto(1.0, 1e6) - 1) < 0.15


def test_probe_sets():
    """The agent's peer choice (migrd.peerset), as the simulator uses it."""
    names = [f"h{i:04d}" for i in range(1000)]
    ring = peerset.Ring(names)
    f = [ring.fingers(n) for n in names]
    assert all(n not in s and len(set(s)) == len(s) for n, s in zip(names, f))
    assert 6 <= sum(map(len, f)) / len(f) <= 14  # ~ log2 1000 = 10
    assert peerset.Ring(list(reversed(names))).fingers("h0007") == f[7]  # from the names alone
    p = probe.Prober("random", names, random.Random(1))
    picks = p.peers(7)
    assert len(picks) == peerset.fanout(1000) == 10 and 7 not in picks and all(0 <= j < 1000 for j in picks)
    assert len(set(picks)) == 10 and p.peers(7) != picks  # drawn afresh each round
    assert probe.Prober("fingers", names, random.Random(1)).peers(7) == [names.index(n) for n in f[7]]
    assert len(probe.Prober("random:3", names, random.Random(1)).peers(7)) == 3


def test_probe_setting_parses():
    assert peerset.Probe.parse("all") == peerset.Probe("all")
    assert peerset.Probe.parse("random:4") == peerset.Probe("random", 4) and str(peerset.Probe("random", 4)) == "random:4"
    for bad in ("chord", "random:0", "random:x", "fingers:3", ""):
        with pytest.raises(ValueError):
            peerset.Probe.parse(bad)
    others = ["b", "c", "d"]
    assert peerset.PeerSet(peerset.Probe("all"), "a", others).this_round(random.Random(1)) == others
    assert len(peerset.PeerSet(peerset.Probe("random", 9), "a", others).this_round(random.Random(1))) == 3


def test_cli_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "migrd.cli", "sim", "--hosts", "10", "--duration", "120",
                        "--load", "0.8", "--seed", "3", "--policy", "none", "--policy", "migrd", "--jobs", "2",
                        "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["policies"]) == {"none", "migrd"}
    for k in ("mean_slowdown", "p99_slowdown", "migrations_per_job", "herd_events"):
        assert k in out["policies"]["migrd"]
    bad = subprocess.run([sys.executable, "-m", "migrd.cli", "sim", "--load", "7"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and "--load 7" in bad.stderr
