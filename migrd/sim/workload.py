"""The simulated cluster and its jobs, drawn from one seed; and what a migration costs.

Hosts are heterogeneous: 1-8 CPUs, per-CPU speed 0.5-2, 4-32 GB of memory, a 1 or 10 Gb/s
link. Jobs arrive as a Poisson stream spread unevenly over hosts (each host's share of the
arrivals is its processing power times a log-normal factor, so some hosts are offered far more
than they can do). A job's CPU demand is heavy-tailed: bounded Pareto with alpha = 1 between
1 s and 2 h of reference CPU, so Pr{life > T | age a} ~ a/T (Harchol-Balter and Downey 1997),
the rule migrd's cost model uses for expected remaining life. Memory sizes are heavy-tailed and
independent of lifetime: bounded Pareto, alpha 1, 8 MB to 4 GB.

The offered load L is the mean demand rate over the total processing power:
arrival rate = L x sum(power) / E[demand].
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

MB = 1_000_000
GB = 1000 * MB

#: Bounded Pareto alpha = 1 over [LIFE_MIN, LIFE_MAX] reference CPU-seconds.
LIFE_MIN, LIFE_MAX = 1.0, 7200.0
RSS_MIN, RSS_MAX = 8 * MB, 4 * GB
#: Sigma of the log-normal factor that makes arrivals uneven across hosts.
UNEVEN_SIGMA = 0.6


@dataclass(frozen=True)
class SimHost:
    name: str
    cpus: int
    speed: float
    mem_total: int
    #: Its network link, bytes/s (a path runs at the slower end's rate).
    nic: float
    #: Round-trip time to anyone, seconds.
    rtt_s: float

    @property
    def power(self) -> float:
        return self.cpus * self.speed


class Job(NamedTuple):
    """A NamedTuple, not a frozen dataclass: an hour of 1000 hosts draws 1.3 million."""

    id: int
    arrival: float
    #: The host it is submitted to (index).
    home: int
    #: Reference CPU-seconds of work (1 s on a speed-1 CPU = 1).
    work: float
    rss: int


@dataclass(frozen=True)
class Strategy:
    """What one migration costs, calibrated on the bed (README, "1 GiB process moved"): the
    process is frozen for fixed_s + the dump, the copy and the restore of its memory."""

    fixed_s: float
    dump_bps: float
    #: The transport's own ceiling (SSH, zstd), whatever the link.
    wire_bps: float
    restore_bps: float
    #: The dump and the copy overlap (pages streamed to the target's page server).
    overlapped: bool

    def downtime(self, rss: int, link_bps: float, rtt_s: float) -> float:
        dump, copy = rss / self.dump_bps, rss / min(self.wire_bps, link_bps)
        moving = max(dump, copy) if self.overlapped else dump + copy
        return self.fixed_s + rtt_s + moving + rss / self.restore_bps


#: Measured for a 1 GiB process (1.07 GB) on the bed: streamed, checkpoint with page copy
#: 3.6-4.7 s and restore 2.9-3.3 s; staged, dump + sha256 1.2-2.4 s, zstd transfer 3.3-3.9 s,
#: restore 2.3-2.9 s; a 10 MiB process's downtime 0.83-0.88 s is the fixed part.
STRATEGIES = {
    "streamed": Strategy(fixed_s=0.85, dump_bps=260 * MB, wire_bps=260 * MB, restore_bps=350 * MB,
                         overlapped=True),
    "staged": Strategy(fixed_s=0.85, dump_bps=600 * MB, wire_bps=300 * MB, restore_bps=420 * MB,
                       overlapped=False),
}


def bounded_pareto(rng: random.Random, lo: float, hi: float) -> float:
    """alpha = 1 on [lo, hi], by inverting its CDF."""
    u = rng.random()
    return lo * hi / (hi - u * (hi - lo))


def mean_bounded_pareto(lo: float, hi: float) -> float:
    return lo * hi / (hi - lo) * math.log(hi / lo)


def hosts(n: int, rng: random.Random) -> list[SimHost]:
    return [SimHost(name=f"h{i:04d}", cpus=rng.choice((1, 2, 2, 4, 4, 8)),
                    speed=rng.choice((0.5, 0.75, 1.0, 1.0, 1.5, 2.0)),
                    mem_total=rng.choice((4, 8, 16, 32)) * GB,
                    nic=rng.choice((125 * MB, 1250 * MB)), rtt_s=rng.uniform(2e-4, 1e-3))
            for i in range(n)]


def jobs(cluster: list[SimHost], load: float, duration: float, rng: random.Random) -> list[Job]:
    """The arrivals over `duration` seconds, in time order."""
    weights = [h.power * rng.lognormvariate(0.0, UNEVEN_SIGMA) for h in cluster]
    total_power = sum(h.power for h in cluster)
    rate = load * total_power / mean_bounded_pareto(LIFE_MIN, LIFE_MAX)
    cum, acc = [], 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    out: list[Job] = []
    # An hour of 1000 hosts draws 1.3 million jobs before the simulation starts: the loop is
    # written out (bounded_pareto inlined with its constants, tuple.__new__ instead of the
    # NamedTuple's Python-level __new__), the same draws in the same order, the same arithmetic.
    draw, expo, bisect_left, new, append = rng.random, rng.expovariate, bisect.bisect_left, tuple.__new__, out.append
    last = len(cluster) - 1
    life_num, life_hi, life_span = LIFE_MIN * LIFE_MAX, LIFE_MAX, LIFE_MAX - LIFE_MIN
    rss_num, rss_hi, rss_span = RSS_MIN * RSS_MAX, RSS_MAX, RSS_MAX - RSS_MIN
    t = expo(rate)
    while t < duration:
        home = min(bisect_left(cum, draw() * acc), last)
        life = life_num / (life_hi - draw() * life_span)
        append(new(Job, (len(out), t, home, life, int(rss_num / (rss_hi - draw() * rss_span)))))
        t += expo(rate)
    return out

