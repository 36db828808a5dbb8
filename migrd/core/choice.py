"""`--strategy auto`: which strategy suits this move (pure: no I/O).

Each strategy the host can run gets an estimate of its freeze (the workload's downtime) and of
the whole move's time, from the memory to move, the rate the workload rewrites it, the link and
the rates CRIU dumps and restores at. The choice: among the strategies whose freeze meets the
downtime target, the one that finishes first; when none meets it, the one with the shortest
freeze. Post-copy's freeze is short whatever the memory, but until its last page arrived the
copy depends on the source, so it is taken only when nothing else meets the target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from migrd.core import precopy


@dataclass(frozen=True)
class Rates:
    """Bytes per second of the local work a move does, and the fixed cost of a restore."""

    dump: float = 400e6
    restore: float = 800e6
    #: Reading and comparing the running workload's memory (pre-copy's rounds).
    scan: float = 500e6
    #: Seconds every CRIU dump plus restore costs whatever the size.
    overhead: float = 0.15


@dataclass(frozen=True)
class Situation:
    memory: int
    dirty_rate: float
    bandwidth: float
    rtt: float
    downtime_target: float


@dataclass(frozen=True)
class Estimate:
    strategy: str
    freeze: float
    total: float
    #: How the figures were reached, one line.
    note: str

    def line(self) -> str:
        return f"{self.strategy}: freeze {self.freeze:.2f} s, total {self.total:.2f} s ({self.note})"


def precopy_fixed(memory: int, rates: Rates) -> float:
    """The part of pre-copy's freeze the rounds cannot shrink: the dump, comparing the dump with
    what was sent, and the restore."""
    return rates.overhead + memory / rates.dump + memory / rates.scan + memory / rates.restore


def estimate(name: str, s: Situation, rates: Rates, limits: precopy.Limits) -> Estimate:
    copy = s.memory / s.bandwidth
    dump = s.memory / rates.dump
    restore = s.memory / rates.restore
    if name == "stop-copy":
        freeze = rates.overhead + dump + copy + restore + s.rtt
        return Estimate(name, freeze, freeze, "dump, then copy, then restore, all frozen")
    if name == "stream-copy":
        freeze = rates.overhead + max(dump, copy) + restore + s.rtt
        return Estimate(name, freeze, freeze, "the copy overlaps the dump, all frozen")
    if name == "postcopy":
        freeze = rates.overhead + 2 * s.rtt
        return Estimate(name, freeze, freeze + copy, "frozen only for the small images; memory follows")
    if name in ("precopy", "hybrid"):
        fixed = precopy_fixed(s.memory, rates) + s.rtt
        sim = precopy.simulate(s.memory, s.dirty_rate, s.bandwidth, limits, fixed, rates.scan)
        d = sim.decision
        return Estimate(name, d.predicted_freeze, sim.running_seconds + d.predicted_freeze,
                        f"{len(sim.rounds)} rounds, then {d.reason}")
    raise ValueError(f"no estimate for strategy {name!r}")


def choose(candidates: Iterable[str], s: Situation, rates: Rates = Rates(),
           limits: precopy.Limits | None = None) -> tuple[str, tuple[Estimate, ...]]:
    """The strategy to run and the estimate of every candidate (in the candidates' order)."""
    limits = limits or precopy.Limits(downtime_target=s.downtime_target)
    estimates = tuple(estimate(n, s, rates, limits) for n in candidates)
    if not estimates:
        raise ValueError("no strategy to choose from")
    meets = [e for e in estimates if e.freeze <= s.downtime_target and e.strategy != "postcopy"]
    if meets:
        return min(meets, key=lambda e: e.total).strategy, estimates
    meets = [e for e in estimates if e.freeze <= s.downtime_target]
    if meets:
        return min(meets, key=lambda e: e.total).strategy, estimates
    return min(estimates, key=lambda e: (e.freeze, e.total)).strategy, estimates
