"""What each strategy would cost a move, and `--strategy auto`'s pick (pure: no I/O).

Each strategy has a model here (MODELS, by the names migrd/engine/strategies.py uses) that
forecasts its freeze (the workload's downtime), the whole move's time and how long the
workload keeps running at home before the freeze, from the memory to move, the rate the
workload rewrites it, the link and the rates CRIU dumps and restores at. The choice: among the
strategies whose freeze meets the downtime target, the one that finishes first; when none
meets it, the one with the shortest freeze. Post-copy's freeze is short whatever the memory,
but until its last page arrived the copy depends on the source, so it is taken only when
nothing else meets the target.

Two callers: `auto` (migrd/engine/strategies.py) with the link and dirty rate it has just
measured, and the cost model (migrd/core/costmodel.py), which prices a move's downtime as the
strategy this choice would run.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from migrd.core import precopy
from migrd.model import MoveRates


@dataclass(frozen=True)
class MoveFacts:
    """One move as the forecasts see it."""

    #: Bytes of memory to move.
    memory: int
    #: Bytes per second the workload rewrites.
    dirty_rate: float
    #: Bytes per second over the link, and its round trip in seconds.
    bandwidth: float
    rtt: float
    downtime_target: float
    #: Pre-copy's round limit (migrate.precopy_rounds).
    max_rounds: int = precopy.Limits.max_rounds


@dataclass(frozen=True)
class Forecast:
    strategy: str
    freeze: float
    total: float
    #: How the figures were reached, one line.
    note: str
    #: Seconds of `total` the workload still runs at home, before the freeze (pre-copy's rounds).
    running_before: float = 0.0
    #: After the switch the copy still needs the source (post-copy's pages): taken last.
    leans_on_source: bool = False
    #: Bytes of memory it sends (pre-copy resends what was rewritten).
    sent: int = 0

    def line(self) -> str:
        return f"{self.strategy}: freeze {self.freeze:.2f} s, total {self.total:.2f} s ({self.note})"


class StrategyModel(ABC):
    """How one strategy's freeze and time grow with memory, dirty rate and link."""

    name: str

    @abstractmethod
    def forecast(self, m: MoveFacts, rates: MoveRates, limits: precopy.Limits) -> Forecast: ...


class StopCopyModel(StrategyModel):
    name = "stop-copy"

    def forecast(self, m: MoveFacts, rates: MoveRates, limits: precopy.Limits) -> Forecast:
        freeze = (rates.overhead + m.memory / rates.dump + m.memory / m.bandwidth + m.memory / rates.restore
                  + m.rtt)
        return Forecast(self.name, freeze, freeze, "dump, then copy, then restore, all frozen", sent=m.memory)


class StreamCopyModel(StrategyModel):
    name = "stream-copy"

    def forecast(self, m: MoveFacts, rates: MoveRates, limits: precopy.Limits) -> Forecast:
        freeze = rates.overhead + max(m.memory / rates.dump, m.memory / m.bandwidth) + m.memory / rates.restore + m.rtt
        return Forecast(self.name, freeze, freeze, "the copy overlaps the dump, all frozen", sent=m.memory)


class PostCopyModel(StrategyModel):
    name = "postcopy"

    def forecast(self, m: MoveFacts, rates: MoveRates, limits: precopy.Limits) -> Forecast:
        freeze = rates.overhead + 2 * m.rtt
        return Forecast(self.name, freeze, freeze + m.memory / m.bandwidth,
                        "frozen only for the small images; memory follows", leans_on_source=True,
                        sent=m.memory)


class PreCopyModel(StrategyModel):
    """Pre-copy's rounds as its stop rule would run them (precopy.simulate); hybrid forecasts
    the same rounds, its switch chosen only once they ran."""

    def __init__(self, name: str) -> None:
        self.name = name

    def forecast(self, m: MoveFacts, rates: MoveRates, limits: precopy.Limits) -> Forecast:
        fixed = precopy_fixed(m.memory, rates) + m.rtt
        sim = precopy.simulate(m.memory, m.dirty_rate, m.bandwidth, limits, fixed, rates.scan)
        d = sim.decision
        last = precopy.residual(sim.rounds, d.dirty_rate, m.memory)
        return Forecast(self.name, d.predicted_freeze, sim.running_seconds + d.predicted_freeze,
                        f"{len(sim.rounds)} rounds, then {d.reason}", running_before=sim.running_seconds,
                        sent=sim.sent + last)


#: A model for each strategy `--strategy` offers that moves memory (restart moves none).
MODELS: dict[str, StrategyModel] = {
    m.name: m for m in (StopCopyModel(), StreamCopyModel(), PostCopyModel(), PreCopyModel("precopy"),
                        PreCopyModel("hybrid"))}


def precopy_fixed(memory: int, rates: MoveRates) -> float:
    """The part of pre-copy's freeze the rounds cannot shrink: the dump, comparing the dump with
    what was sent, and the restore."""
    return rates.overhead + memory / rates.dump + memory / rates.scan + memory / rates.restore


def choose(candidates: Iterable[str], m: MoveFacts, rates: MoveRates = MoveRates()) -> tuple[Forecast, tuple[Forecast, ...]]:
    """The forecast of the strategy to run and that of every candidate (in the candidates' order)."""
    limits = precopy.Limits(max_rounds=m.max_rounds, downtime_target=m.downtime_target)
    forecasts = tuple(MODELS[n].forecast(m, rates, limits) for n in candidates)
    if not forecasts:
        raise ValueError("no strategy to choose from")
    meets = [f for f in forecasts if f.freeze <= m.downtime_target and not f.leans_on_source]
    if not meets:
        meets = [f for f in forecasts if f.freeze <= m.downtime_target]
    if meets:
        return min(meets, key=lambda f: f.total), forecasts
    return min(forecasts, key=lambda f: (f.freeze, f.total)), forecasts


@functools.lru_cache(maxsize=4096)
def choose_cached(candidates: tuple[str, ...], m: MoveFacts, rates: MoveRates) -> tuple[Forecast, tuple[Forecast, ...]]:
    """choose, remembered: the policy prices the same process over the same links round after
    round, and the simulator thousands of times."""
    return choose(candidates, m, rates)
