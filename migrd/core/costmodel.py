"""The cost model: what one way of moving one process to one host would cost and gain.

Pure arithmetic, no I/O. docs/policy.md walks through it with numbers. In short:

Every option is scored as   score = time_value x completion_time_s + money,   and
gain = score(stay) - score(option). The policy moves only if the gain is large enough.

Completion time of the process's remaining work:

* Expected remaining life R = age (Harchol-Balter & Downey 1997: a process that has run for
  `a` seconds runs more than T with probability ~ a/T, so its expected remaining life grows
  with its age), capped at `max_horizon_s`.
* The process computes for a fraction `busy` of its wall time (its wanted CPUs, at most 1);
  the rest (I/O, sleeping) does not speed up anywhere.
* Each host runs a process at an effective speed k = cpu_speed x share, where
  share = min(1, capacity / demand) is the fair share each runnable task gets, and demand
  counts the process itself (on a target: demand + what the process wants).
* Time on host H: R x ((1 - busy) + busy x k_here / k_H). Staying takes R.
* Moving stops the process for the freeze of the strategy the move would run: the one
  `--strategy auto` picks among `strategies` (migrd/core/choice.py forecasts each from the
  memory, the rate the process rewrites it, the link and the downtime target). Stop-and-copy
  freezes for the dump, the copy and the restore; pre-copy runs on at home during its rounds
  and freezes only for the last changes; data files cross while frozen. Time on the target
  starts at the switch.
* Data that lives on another host is read over the link while the process stays
  (RTT + data / bandwidth); running the code where the data is removes that term.

Money: bytes sent x byte_cost, plus CPU-seconds used x that host's cpu_second_cost (the work is
the same everywhere; a faster CPU needs fewer CPU-seconds for it).

Bytes sent per action:

* migrate:            checkpoint image (~ RSS)
* migrate_with_data:  image + the data files (CRIU needs open files present on the target)
* move_code_to_data:  image, to the host where the data already is
* restart_elsewhere:  code (+ data if it lived here); no checkpoint, but the work done so far
                      (the process's age) has to be done again
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple
from dataclasses import dataclass

from migrd.core import choice
from migrd.model import Action, Candidate, Estimate, HostLoad, Link, PolicyConfig, Site, Work


def demand(h: HostLoad) -> float:
    """CPUs' worth of runnable work: the larger of the 1-minute load average (includes queued
    tasks) and the measured busy CPUs."""
    return max(h.loadavg[0], h.cpu_util * h.cpu_capacity)


def site(h: HostLoad, cpu_price: float) -> Site:
    return Site(h.host, h.cpu_capacity, demand(h), h.cpu_speed, cpu_price)


def share(capacity: float, demand_cpus: float) -> float:
    """Fraction of what it wants each runnable task gets (fair share)."""
    return 1.0 if demand_cpus <= capacity else capacity / demand_cpus


def norm_after(s: Site, added: float) -> float:
    """Load per CPU of `s` after `added` CPUs of work arrive (negative: leave)."""
    return max(s.demand + added, 0.0) / s.capacity


def wants(c: Candidate, here: Site) -> float:
    """CPUs c would use uncontended: its measured share over the fair share `here` gives."""
    return c.proc.cpu_share / share(here.capacity, here.demand)


def work(c: Candidate, here: Site, cfg: PolicyConfig) -> Work:
    wanted = wants(c, here)
    remaining = min(c.proc.age_s, cfg.max_horizon_s)
    return Work(
        remaining_s=remaining,
        done_s=min(c.proc.age_s, cfg.max_horizon_s),
        wants=wanted,
        busy=min(wanted, 1.0),
        cpu_s=c.proc.cpu_share * remaining * here.speed,
        done_cpu_s=c.proc.cpu_seconds * here.speed,
    )


def effective_speed(s: Site, added: float) -> float:
    """Reference-CPU-seconds per second one computing task gets on `s` after `added` arrive."""
    return s.speed * share(s.capacity, s.demand + added)


def _pace(w: Work, k_here: float, k_there: float) -> float:
    """Wall time per wall second of work at home: the computing part scales with speed."""
    return (1.0 - w.busy) + w.busy * k_here / k_there


class Stay(NamedTuple):
    time_s: float
    cost: float
    score: float


def stay(c: Candidate, w: Work, here: Site, links: Mapping[str, Link], source: str,
         cfg: PolicyConfig) -> Stay:
    time_s = w.remaining_s
    cost = w.cpu_s / here.speed * here.cpu_price
    if c.data_host and c.data_host != source and c.data_host in links:
        time_s += links[c.data_host].send_s(c.data_size)
        cost += c.data_size * cfg.byte_cost
    return Stay(time_s, cost, cfg.time_value * time_s + cost)


def data_travels(c: Candidate, action: Action, source: str) -> bool:
    """Does `action` take c's data along from source? What is priced here is what the agent
    then executes (its migration copies the open files)."""
    return (action in (Action.MIGRATE_WITH_DATA, Action.RESTART_ELSEWHERE)
            and (c.data_host or source) == source)


def strategies(c: Candidate, cfg: PolicyConfig) -> tuple[str, ...]:
    """The strategies c's move is priced with: the configured ones it can be moved by."""
    only = c.subject.strategies
    if only is None:
        return cfg.strategies
    return tuple(n for n in cfg.strategies if n in only) or only


def forecasts(c: Candidate, link: Link, cfg: PolicyConfig) -> tuple[choice.Forecast, tuple[choice.Forecast, ...]]:
    """The forecast of the strategy that would move c's memory over link, and every one's."""
    facts = choice.MoveFacts(memory=c.proc.rss_bytes, dirty_rate=c.dirty_rate or 0.0, bandwidth=link.bandwidth,
                             rtt=link.rtt_s, downtime_target=cfg.downtime_target, max_rounds=cfg.precopy_rounds)
    return choice.choose_cached(strategies(c, cfg), facts, cfg.move_rates)


def estimate(c: Candidate, w: Work, st: Stay, action: Action, here: Site, there: Site,
             link: Link, cfg: PolicyConfig) -> Estimate:
    """Price `action` taking `c` from `here` to `there` over `link`."""
    data = c.data_size if data_travels(c, action, here.host) else 0
    k_here = effective_speed(here, 0.0)
    k_there = effective_speed(there, w.wants)
    pace = _pace(w, k_here, k_there)
    lines: tuple[str, ...] = ()
    if action is Action.RESTART_ELSEWHERE:
        nbytes = c.code_size + data
        transfer_s = downtime_s = link.send_s(nbytes)
        run_s = (w.done_s + w.remaining_s) * pace
        cpu_s = (w.done_cpu_s + w.cpu_s) / there.speed
        strategy = None
    else:
        chosen, every = forecasts(c, link, cfg)
        nbytes = chosen.sent + data
        data_s = data / link.bandwidth
        downtime_s = chosen.freeze + data_s
        transfer_s = chosen.total + data_s
        # Pre-copy's rounds run while the process still works at home at its own pace.
        before = min(chosen.running_before, w.remaining_s)
        run_s = before + (w.remaining_s - before) * pace
        cpu_s = w.cpu_s / there.speed
        strategy, lines = chosen.strategy, tuple(f.line() for f in every)
    transfer_cost = nbytes * cfg.byte_cost
    there_s = downtime_s + run_s
    there_cost = transfer_cost + cpu_s * there.cpu_price
    move_score = cfg.time_value * there_s + there_cost
    return Estimate(
        transfer_bytes=nbytes,
        transfer_s=transfer_s,
        transfer_cost=transfer_cost,
        remaining_s=w.remaining_s,
        here_s=st.time_s,
        here_cost=st.cost,
        there_s=there_s,
        there_cost=there_cost,
        speedup=k_there / k_here,
        stay_score=st.score,
        move_score=move_score,
        gain=st.score - move_score,
        strategy=strategy,
        downtime_s=downtime_s,
        forecasts=lines,
    )


def upper_gain(w: Work, st: Stay, k_here: float, k_there: float, downtime_s: float,
               price_per_work: float, cfg: PolicyConfig) -> float:
    """No move gains more than this if the target's effective speed is at most `k_there`,
    the process stands still at least `downtime_s` and a unit of work costs at least
    `price_per_work` there. Used to skip options without pricing them in full. Pre-copy's
    rounds run at home's pace: at best all of the work at the faster of the two."""
    best_time = downtime_s + w.remaining_s * min(1.0, _pace(w, k_here, k_there))
    return st.score - (cfg.time_value * best_time + w.cpu_s * price_per_work)


def min_downtime_s(c: Candidate, link: Link, cfg: PolicyConfig) -> float:
    """The shortest any action could stop `c` for over `link` (restart skips the checkpoint)."""
    freeze = min(f.freeze for f in forecasts(c, link, cfg)[1])
    if c.restartable:
        return min(freeze, link.send_s(c.code_size))
    return freeze


@dataclass(frozen=True)
class Bound:
    """Per-decision precomputation for bounding any process's gain: no target is faster than
    the fastest one before anything arrives, none is cheaper per unit of work than the
    cheapest, and no transfer is cheaper than free."""

    best_speed: float
    cheapest_per_work: float

    @classmethod
    def of(cls, sites: Sequence[Site]) -> Bound:
        return cls(
            best_speed=max(effective_speed(s, 0.0) for s in sites),
            cheapest_per_work=min(s.cpu_price / s.speed for s in sites),
        )

    def max_gain(self, c: Candidate, w: Work, st: Stay, k_here: float, cfg: PolicyConfig) -> float:
        """No move of `c` anywhere gains more than this (`w`, `st`: its work and staying,
        priced on a host whose effective speed is `k_here`)."""
        return upper_gain(w, st, k_here, self.best_speed, 0.0, self.cheapest_per_work, cfg)


# --------------------------------------------------------------------------- text


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def table(e: Estimate) -> list[str]:
    how = [f"strategy: {e.strategy}, frozen {e.downtime_s:.2f} s; forecasts:"] if e.strategy else []
    return how + [f"  {line}" for line in e.forecasts] + [
        f"transfer: {_mb(e.transfer_bytes)} in {e.transfer_s:.2f} s, cost {e.transfer_cost:.2f}",
        f"expected remaining life: {e.remaining_s:.0f} s",
        f"stay: {e.here_s:.1f} s, cost {e.here_cost:.2f} -> score {e.stay_score:.1f}",
        f"move: {e.there_s:.1f} s, cost {e.there_cost:.2f} -> score {e.move_score:.1f}"
        f" (speed there x{e.speedup:.2f})",
        f"gain: {e.gain:.1f}",
    ]


def describe(e: Estimate, action: Action, target: str, need: float) -> list[str]:
    return [
        f"{action.value} to {target}: sends {_mb(e.transfer_bytes)} in {e.transfer_s:.2f} s"
        + (f" by {e.strategy}, frozen {e.downtime_s:.2f} s" if e.strategy else ""),
        f"runs x{e.speedup:.2f} as fast there: done in {e.there_s:.1f} s instead of "
        f"{e.here_s:.1f} s",
        f"gain {e.gain:.1f} >= required {need:.1f}",
    ]
