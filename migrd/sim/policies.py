"""The baseline rules the simulator compares migrd's policy with. Each sees what an agent sees
(its own jobs, its peers' last published snapshots) and obeys the same cooldowns and minimum age
as migrd's defaults, so they differ from migrd only in whether, what and where to move.

* `random`: an overloaded host (more jobs than CPUs) moves a random eligible job to a random
  probed peer.
* `least_loaded`: an overloaded host moves a random eligible job to the probed peer with the
  lowest load per CPU, if that peer would still be less loaded than this host is; no cost model.
* `mosix`: the opportunity-cost rule of MOSIX (Amir et al., "An opportunity cost approach for job
  assignment in a scalable computing cluster", IEEE TPDS 2000): a host's cost is
  N^(CPU load / power) + N^(memory used / total); a job moves to the peer where its marginal
  cost is lowest if that is below what it costs here, and only once it has run longer than its
  migration would take (MOSIX's amortization rule).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from migrd.core import costmodel
from migrd.model import HostLoad

BASELINES = ("none", "random", "least_loaded", "mosix")


@dataclass(frozen=True)
class Eligible:
    """A job the rules may move: id, age (s), memory (bytes)."""

    id: int
    age_s: float
    rss: int


def random_move(n_jobs: int, cpus: int, eligible: Sequence[Eligible], peers: Sequence[HostLoad],
                rng: random.Random) -> tuple[int, str] | None:
    if n_jobs <= cpus or not eligible or not peers:
        return None
    return rng.choice(eligible).id, rng.choice(peers).host


def least_loaded_move(n_jobs: int, cpus: int, eligible: Sequence[Eligible], peers: Sequence[HostLoad],
                      rng: random.Random) -> tuple[int, str] | None:
    if n_jobs <= cpus or not eligible or not peers:
        return None
    best = min(peers, key=lambda h: (costmodel.demand(h) / h.cpu_capacity, h.host))
    if (costmodel.demand(best) + 1) / best.cpu_capacity >= n_jobs / cpus:
        return None
    return rng.choice(eligible).id, best.host


def _term(log_base: float, u: float) -> float:
    # base^u, capped short of float overflow (a host 100x overloaded is as bad as it gets).
    return math.exp(min(u * log_base, 700.0))


def _cost(log_base: float, cpu_u: float, mem_u: float) -> float:
    return _term(log_base, cpu_u) + _term(log_base, mem_u)


def mosix_move(n_hosts: int, here: HostLoad, n_jobs: int, mem_used: int, eligible: Sequence[Eligible],
               peers: Sequence[HostLoad], migration_s: Callable[[Eligible, HostLoad], float],
               ) -> tuple[int, str] | None:
    """`migration_s(job, peer)`: how long moving that job there would freeze it."""
    log_base = math.log(n_hosts)
    power = here.power
    now = _cost(log_base, n_jobs / power, mem_used / here.mem_total)
    # What does not depend on the job, once per peer: its cost now and its CPU term with one
    # more job (every eligible job meets every peer, each round of every host).
    sites = []
    for p in peers:
        d, used = costmodel.demand(p), p.mem_total - p.mem_available
        sites.append((p, used, _term(log_base, (d + 1) / p.power),
                      _cost(log_base, d / p.power, used / p.mem_total)))
    best: tuple[float, float, int, str] | None = None
    for e in eligible:
        saved = now - _cost(log_base, (n_jobs - 1) / power, (mem_used - e.rss) / here.mem_total)
        for p, used, cpu_term, before in sites:
            if used + e.rss > p.mem_total:
                continue
            added = (cpu_term + _term(log_base, (used + e.rss) / p.mem_total)) - before
            net = saved - added
            if net > 0 and e.age_s >= migration_s(e, p) and (
                    best is None or (net, e.age_s) > (best[0], best[1])):
                best = (net, e.age_s, e.id, p.host)
    return None if best is None else (best[2], best[3])
