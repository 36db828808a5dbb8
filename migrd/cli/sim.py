"""`migrctl sim`: simulate a cluster under each migration policy (migrd.sim)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from migrd.cli.common import emit, json_option

HELP = """Simulate N hosts and a heavy-tailed job stream under every migration policy.

\b
The same seeded cluster and jobs are run once per policy:
  none               no migration
  random             an overloaded host moves a random job to a random peer
  least_loaded       ... to the least loaded peer, no cost model
  mosix              MOSIX's opportunity-cost rule
  migrd              migrd's own agent round (migrd.step), offload mode
  migrd_fill         ... fill mode (idle hosts ask busy ones for work)
  migrd_consolidate  ... consolidate mode (pack work, leave hosts idle)

\b
Hosts: 1-8 CPUs of speed 0.5-2, 4-32 GB, 1 or 10 Gb/s links. Jobs: CPU demand bounded
Pareto (alpha 1, 1 s to 2 h), memory bounded Pareto (8 MB to 4 GB), arriving unevenly over
hosts at the offered LOAD (fraction of the cluster's processing power). A migration freezes
its job for the STRATEGY's downtime, calibrated on the bed (README).

\b
Metrics per policy: mean and p99 slowdown (response time / the job's time alone on the host
it was submitted to, completed jobs), migrations per job, bytes moved, herd events (two or
more moves decided onto one target from the same snapshot of it), ping-pong ("back": moves of
a job back to a host it had been moved away from), the fraction of host-rounds
with no job, and snapshot reads per round (--probe: all peers, a Chord finger set, or
ceil(log2 N) random peers per round).

\b
Example:
  migrctl sim --hosts 1000 --load 0.8 --seed 1 --json
"""


@click.command(help=HELP)
@click.option("--hosts", "n_hosts", type=int, default=100, show_default=True, help="Simulated hosts.")
@click.option("--load", type=float, default=0.8, show_default=True, help="Offered load, 0.5 = 50 %.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the cluster, jobs and choices.")
@click.option("--duration", type=float, default=3600.0, show_default=True,
              help="Simulated seconds of cluster time.")
@click.option("--interval", type=float, default=5.0, show_default=True, help="Seconds between a host's rounds.")
@click.option("--probe", default="fingers", show_default=True,
              help="Which peers a host reads each round: all, fingers, random or random:D "
                   "(the agent's daemon.probe).")
@click.option("--strategy", type=click.Choice(["streamed", "staged"]), default="streamed",
              show_default=True, help="Migration cost model (dump, copy, restore rates).")
@click.option("--host-cooldown", type=float, default=None,
              help="policy.host_cooldown_s for every policy (default: migrd's, 15 s).")
@click.option("--policy", "names", multiple=True,
              help="Run only these policies (repeatable; default: all).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Policies simulated at once, each in its own process (default: the CPUs this "
                   "process may use). The results do not depend on it.")
@click.option("--interpreter", type=click.Choice(["auto", "python", "pypy"]), default="auto",
              show_default=True,
              help="What runs the simulation: pypy (a PyPy child process, the same code a few times "
                   "faster on long runs; `make setup` installs it, $MIGRD_PYPY names another), python "
                   "(this process) or auto (PyPy when installed and the run has at least 50 000 host "
                   "rounds: hosts x duration / interval). The results do not depend on it.")
@json_option
def sim(n_hosts: int, load: float, seed: int, duration: float, interval: float, probe: str,
        strategy: str, host_cooldown: float | None, names: tuple[str, ...], jobs: int | None,
        interpreter: str, as_json: bool) -> None:
    from migrd.errors import InputError
    from migrd.model import PolicyConfig
    from migrd.adapters import pypy
    from migrd.sim import POLICIES, SimConfig

    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise InputError(f"unknown policy {unknown[0]!r}: one of {', '.join(POLICIES)}")
    pc = PolicyConfig() if host_cooldown is None else PolicyConfig(host_cooldown_s=host_cooldown)
    cfg = SimConfig(hosts=n_hosts, load=load, seed=seed, duration=duration, interval=interval,
                    probe=probe, strategy=strategy, policy=pc)
    ran_on, results = pypy.runner(interpreter, cfg).run(cfg, names or POLICIES,
                                                   jobs or len(os.sched_getaffinity(0)))
    out = {"config": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "policy"},
                      "host_cooldown_s": pc.host_cooldown_s, "interpreter": ran_on},
           "policies": {n: {k: v for k, v in dataclasses.asdict(r).items() if k != "policy"}
                        for n, r in results.items()}}
    emit(out, as_json, _table)


def _table(out: dict[str, Any]) -> str:
    c = out["config"]
    lines = [f"{c['hosts']} hosts, load {c['load']:g}, seed {c['seed']}, {c['duration']:g} s, "
             f"probe {c['probe']}, {c['strategy']} migrations, host cooldown {c['host_cooldown_s']:g} s, "
             f"run by {c['interpreter']}",
             f"{'policy':<18} {'mean sd':>8} {'p99 sd':>8} {'mig/job':>8} {'GB moved':>9} "
             f"{'herds':>6} {'back':>5} {'idle':>6} {'reads':>6} {'cpu s':>6}"]
    for name, r in out["policies"].items():
        lines.append(f"{name:<18} {r['mean_slowdown']:8.2f} {r['p99_slowdown']:8.1f} "
                     f"{r['migrations_per_job']:8.4f} {r['bytes_moved'] / 1e9:9.1f} {r['herd_events']:6d} {r['ping_pong']:5d} "
                     f"{r['idle_hosts']:6.1%} {r['peer_reads_per_round']:6.1f} {r['cpu_s']:6.1f}")
    return "\n".join(lines)
