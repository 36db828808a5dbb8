"""Pre-copy's stop rule and the freeze it predicts (pure: no I/O).

Memory is sent while the workload runs, then again only what changed since, round after round;
the freeze comes when one more round would not pay. After each round the controller predicts
the freeze from what it measured: the pages dirtied while a round runs (the dirty rate times
the round's length) must cross while frozen, at the measured rate of a round, on top of the
fixed cost of the dump and restore. It stops

* when the prediction meets the downtime target,
* when the dirty rate is at or above the rate pages cross (diverging: more rounds only resend),
* when a round sent no more than a handful of pages (converged),
* when another round is forecast to shorten the freeze by less than a tenth (it would not pay:
  the freeze is mostly the dump and the restore, which rounds cannot shrink),
* when a round sent more than 90 % of the one before it (no longer shrinking: a round that only
  repeats the one before costs its whole time and leaves the freeze as it was),
* at the round limit.

The limits are named, as P.Haul's iteration driver names its own (phaul/iters.py); P.Haul stops
at 8 rounds, at <= 64 pages, or when a round grows by more than 10 % (so rounds of equal size
run on to the round limit). Those two rules are here too (`STOP_RULES`, migrate.precopy_stop_rule),
so that the benchmark can run each of them against this one on the same workloads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PAGE = 4096
#: Bytes per second assumed until a round moved enough to measure the link (a small workload
#: never does; then the residue is small whatever the rate).
ASSUMED_BANDWIDTH = 50e6


@dataclass(frozen=True)
class Limits:
    #: Rounds while running, the first (full) one included.
    max_rounds: int = 8
    #: A round that sent at most this many bytes leaves nothing worth another round.
    converged_bytes: int = 64 * PAGE
    #: A round that sent more than this fraction of the round before it is no longer
    #: shrinking: the freeze would not get shorter, and each round more costs its full time.
    shrink: float = 0.9
    #: Another round must be forecast to shorten the predicted freeze by at least this fraction
    #: of it: where the freeze is mostly the dump and restore, rounds past that cost their whole
    #: time and leave the freeze as it was. 0 turns the forecast off.
    min_gain: float = 0.1
    #: Seconds the workload may be frozen (migrate.downtime_target).
    downtime_target: float = 0.5


@dataclass(frozen=True)
class Round:
    """What one round measured."""

    #: Bytes whose content changed since the round before (the first round: all it read).
    changed: int
    #: Bytes the round sent (changed pages the target did not hold already).
    sent: int
    #: Seconds the round took: read, compare and send, until the target confirmed.
    seconds: float
    #: Seconds from the previous round's start to this one's: the window `changed` covers.
    interval: float


@dataclass(frozen=True)
class Decision:
    stop: bool
    #: One line for the journal and the operator.
    reason: str
    #: Seconds frozen if the switch came now.
    predicted_freeze: float
    #: Bytes per second the workload rewrites (None before two rounds).
    dirty_rate: float | None
    #: Bytes per second a round moved.
    bandwidth: float | None
    diverging: bool = False


def bandwidth(rounds: Sequence[Round], fallback: float) -> float:
    """The best rate a round moved pages at; rounds of less than a MiB say little about it."""
    rates = [r.sent / r.seconds for r in rounds if r.sent >= (1 << 20) and r.seconds > 0]
    return max(rates) if rates else fallback


def dirty_rate(rounds: Sequence[Round]) -> float | None:
    """Bytes per second rewritten, from the last round after the first (the first reads all)."""
    if len(rounds) < 2 or rounds[-1].interval <= 0:
        return None
    return rounds[-1].changed / rounds[-1].interval


def residual(rounds: Sequence[Round], rate: float | None, memory: int) -> int:
    """Bytes still to cross at the freeze: what is rewritten while one round runs (at most all
    memory); before a rate is known, all of the last round's changes."""
    if rate is None:
        return rounds[-1].changed if rounds else memory
    return min(memory, int(rate * rounds[-1].seconds))


def gain_of_another_round(rounds: Sequence[Round], rate: float, bw: float, memory: int) -> float:
    """Seconds one more round is forecast to take off the freeze. It would read as the last
    one did (its time less its sending) and send what is dirty now; the freeze after it holds
    what is rewritten meanwhile."""
    last = rounds[-1]
    now = residual(rounds, rate, memory)
    seconds = max(0.0, last.seconds - last.sent / bw) + now / bw
    return (now - min(memory, rate * seconds)) / bw


def predict_freeze(fixed: float, remaining: int, bw: float) -> float:
    """Seconds frozen: the dump and restore (fixed) plus the remaining bytes at bw."""
    return fixed + remaining / bw


@dataclass(frozen=True)
class Stop:
    """A rule's reason to switch now."""

    reason: str
    #: The workload rewrites faster than pages cross: more rounds would only resend them.
    diverging: bool = False


class StopRule(ABC):
    """When pre-copy's rounds end: after each round, switch now or run another. Every rule
    reports the freeze the switch would cost now, with the same measures."""

    #: Its value of migrate.precopy_stop_rule.
    name: str
    #: One line for the benchmark's report.
    summary: str

    def decide(self, rounds: Sequence[Round], limits: Limits, *, memory: int, fixed: float,
               fallback_bandwidth: float) -> Decision:
        """After the last round in `rounds`. memory: bytes the workload's dumpable memory
        holds; fixed: predicted seconds of the freeze that do not depend on the rounds (dump,
        restore)."""
        if not rounds:
            raise ValueError("decide needs at least one round")
        bw = bandwidth(rounds, fallback_bandwidth)
        rate = dirty_rate(rounds)
        freeze = predict_freeze(fixed, residual(rounds, rate, memory), bw)
        stop = self.stop(rounds, limits, memory=memory, freeze=freeze, rate=rate, bw=bw)
        if stop is None:
            return Decision(False, "another round", round(freeze, 4), rate, bw)
        return Decision(True, stop.reason, round(freeze, 4), rate, bw, stop.diverging)

    @abstractmethod
    def stop(self, rounds: Sequence[Round], limits: Limits, *, memory: int, freeze: float,
             rate: float | None, bw: float) -> Stop | None:
        """Why to switch now, or None for another round. freeze: the predicted one (seconds);
        rate: the dirty rate (None before two rounds); bw: the rate pages cross."""


class Adaptive(StopRule):
    """migrd's own: the predicted freeze, divergence, convergence, the forecast gain of another
    round, shrinking, the limit."""

    name = "migrd"
    summary = ("stop once the predicted freeze meets the downtime target, the workload outruns the "
               "link, a round sent almost nothing, another round would not shorten the freeze by a "
               "tenth, a round no longer shrinks, or at migrate.precopy_rounds")

    def stop(self, rounds: Sequence[Round], limits: Limits, *, memory: int, freeze: float,
             rate: float | None, bw: float) -> Stop | None:
        last = rounds[-1]
        if rate is not None and rate >= bw:
            return Stop(f"diverging: the workload rewrites {rate / 1e6:.1f} MB/s, pages cross at "
                        f"{bw / 1e6:.1f} MB/s; more rounds would only resend them", diverging=True)
        if len(rounds) >= 2 and freeze <= limits.downtime_target:
            return Stop(f"predicted freeze {freeze:.3f} s meets the target {limits.downtime_target:g} s")
        if len(rounds) >= 2 and last.sent <= limits.converged_bytes:
            return Stop(f"converged: round {len(rounds)} sent {last.sent} bytes")
        if (limits.min_gain > 0 and rate is not None
                and (gain := gain_of_another_round(rounds, rate, bw, memory)) < limits.min_gain * freeze):
            return Stop(f"another round would not pay: forecast to shorten the predicted freeze of "
                        f"{freeze:.2f} s by {gain:.2f} s (less than {limits.min_gain:.0%})")
        if len(rounds) >= 3 and last.sent > limits.shrink * rounds[-2].sent:
            return Stop(f"not shrinking: round {len(rounds)} sent {last.sent} bytes, the one before "
                        f"{rounds[-2].sent}")
        if len(rounds) >= limits.max_rounds:
            return Stop(f"round limit: {limits.max_rounds} rounds")
        return None


class PHaulRule(StopRule):
    """P.Haul's iteration driver (phaul/iters.py), with its own constants: a round that wrote at
    most 64 pages, a round that wrote more than 10 % more than the one before, 8 rounds. It
    counts the pages a pre-dump wrote, which is `changed` here."""

    name = "phaul"
    summary = "P.Haul's: <= 64 pages, a round grown by > 10 %, or 8 rounds"
    MIN_PAGES = 64
    GROW_MAX = 0.10
    MAX_ROUNDS = 8

    def stop(self, rounds: Sequence[Round], limits: Limits, *, memory: int, freeze: float,
             rate: float | None, bw: float) -> Stop | None:
        last = rounds[-1]
        if len(rounds) >= 2 and last.changed <= self.MIN_PAGES * PAGE:
            return Stop(f"P.Haul: round {len(rounds)} wrote at most {self.MIN_PAGES} pages")
        if len(rounds) >= 3 and last.changed > (1 + self.GROW_MAX) * rounds[-2].changed:
            return Stop(f"P.Haul: round {len(rounds)} grew by more than {self.GROW_MAX:.0%}")
        if len(rounds) >= self.MAX_ROUNDS:
            return Stop(f"P.Haul: {self.MAX_ROUNDS} rounds")
        return None


class LXDRule(StopRule):
    """LXD's (migration.incremental.memory.goal and .iterations, defaults 70 and 10): stop once
    the last round found at least 70 % of memory unchanged, or after 10 rounds."""

    name = "lxd"
    summary = "LXD's: 70 % of memory unchanged in the last round, or 10 rounds"
    GOAL = 0.70
    MAX_ROUNDS = 10

    def stop(self, rounds: Sequence[Round], limits: Limits, *, memory: int, freeze: float,
             rate: float | None, bw: float) -> Stop | None:
        if len(rounds) >= 2 and rounds[-1].changed <= (1 - self.GOAL) * memory:
            return Stop(f"LXD: {self.GOAL:.0%} of memory unchanged in round {len(rounds)}")
        if len(rounds) >= self.MAX_ROUNDS:
            return Stop(f"LXD: {self.MAX_ROUNDS} rounds")
        return None


#: migrate.precopy_stop_rule -> the rule. migrd's own is the default and the only one the
#: forecasts (`simulate`, `auto`, the policy) assume; the others are there to be measured.
STOP_RULES: Mapping[str, StopRule] = {r.name: r for r in (Adaptive(), PHaulRule(), LXDRule())}
ADAPTIVE = STOP_RULES["migrd"]


def decide(rounds: Sequence[Round], limits: Limits, *, memory: int, fixed: float,
           fallback_bandwidth: float) -> Decision:
    """migrd's own rule (`Adaptive`) after the last round in `rounds`."""
    return ADAPTIVE.decide(rounds, limits, memory=memory, fixed=fixed, fallback_bandwidth=fallback_bandwidth)


@dataclass(frozen=True)
class Simulated:
    rounds: tuple[Round, ...]
    decision: Decision

    @property
    def running_seconds(self) -> float:
        return sum(r.seconds for r in self.rounds)

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.rounds)


def simulate(memory: int, rate: float, bw: float, limits: Limits, fixed: float,
             scan_rate: float) -> Simulated:
    """The rounds the controller would run for a workload of `memory` bytes rewriting `rate`
    bytes/s over a link of `bw` bytes/s, when reading and comparing memory runs at `scan_rate`
    (the same `decide` as the real loop: estimates and runs agree on the stop rule)."""
    rounds: list[Round] = []
    to_send = memory
    while True:
        seconds = memory / scan_rate + to_send / bw
        changed = memory if not rounds else to_send
        rounds.append(Round(changed=changed, sent=to_send, seconds=seconds,
                            interval=rounds[-1].seconds if rounds else 0.0))
        d = decide(rounds, limits, memory=memory, fixed=fixed, fallback_bandwidth=bw)
        if d.stop:
            return Simulated(tuple(rounds), d)
        to_send = min(memory, int(rate * seconds))


def hybrid_switch(decision: Decision, limits: Limits, postcopy_possible: bool) -> str:
    """How a hybrid move ends once its rounds stopped: a brief stop-and-copy of what is still
    dirty when that meets the downtime target (or post-copy cannot run), else post-copy."""
    if decision.predicted_freeze <= limits.downtime_target or not postcopy_possible:
        return "stop-copy"
    return "postcopy"


#: How rounds find the pages that changed: CRIU's pre-dumps (the kernel's soft-dirty bits) or
#: by content (read and compare; any kernel).
TRACKING = ("criu", "content")


def dirty_tracking(setting: str, soft_dirty: bool) -> tuple[str | None, str | None]:
    """The tracking migrate.dirty_tracking (auto, criu or content) gives on a kernel with or
    without soft-dirty tracking: (tracking, None), or (None, why it cannot run)."""
    if setting == "content":
        return "content", None
    if soft_dirty:
        return "criu", None
    if setting == "criu":
        return None, ("migrate.dirty_tracking is criu, but this kernel has no soft-dirty tracking "
                      "(`criu check --feature mem_dirty_track` fails); set it to auto or content")
    return "content", None
