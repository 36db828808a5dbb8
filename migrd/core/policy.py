"""Migration policy: whether moving is worth it at all, what to move and where.

Pure functions over frozen dataclasses; no I/O. The caller (the agent) gathers a `Situation`
(this host's recent load snapshots, the peers' latest snapshots with link estimates, the
candidate processes) and gets back a `Decision`; `explain(decision)` renders it for people.

The four questions, in the order `decide` answers them (docs/policy.md has a worked example):

* When: `classify` turns this host's history into a `Level` (LOW/NORMAL/HIGH) with separate
  high/low watermarks, a hold time and hysteresis; each `Mode` needs a level to act at all
  (offload: this host HIGH; fill: an idle requester asks this busier host; consolidate: this
  host LOW). A host cooldown spaces out moves.
* Which: only opted-in candidates, not in their migration cooldown, older than `min_age_s`. A
  candidate is a process tree or a whole container (`Candidate.subject`): both are priced alike,
  a container by its cgroup's CPU and memory with its rootfs changes as its data.
* Where: peers that are not overloaded, can hold the process in memory, can restore it (CPU
  compatible), are cleared for its data's sensitivity label, and would not end up more loaded
  than this host (consolidate instead packs onto busier hosts, up to a ceiling).
* How (code or data): every (process, target, action) is priced by the cost model in
  `costmodel.py`; the best accepted gain wins, otherwise stay.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from migrd.core import costmodel
from migrd.model import (
    Action,
    Candidate,
    Decision,
    Estimate,
    HostLoad,
    Level,
    Link,
    Mode,
    PROCESS_TREE,
    Peer,
    PolicyConfig,
    Site,
    Situation,
    Watermarks,
    Work,
)
from migrd.errors import InputError

__all__ = [
    "Action", "Candidate", "Decision", "Estimate", "Level", "Link", "Mode", "Peer",
    "PolicyConfig", "Situation", "Watermarks", "classify", "cooling", "decide", "explain",
    "level", "NEEDS", "pick_fill_source",
]


# --------------------------------------------------------------------------- when


def measures(h: HostLoad) -> dict[str, float]:
    """The three load signals, each normalized by the host's CPU capacity."""
    return {
        "load": h.loadavg[0] / h.cpu_capacity,
        "util": h.cpu_util,
        "run_queue": h.run_queue / h.cpu_capacity,
    }


def _marks(cfg: PolicyConfig) -> dict[str, Watermarks]:
    return {"load": cfg.load, "util": cfg.util, "run_queue": cfg.run_queue}


# _is_high and _is_low are `measures` against the marks, spelled out: classify calls them for
# every sample of the history every round, and the simulator runs 720k rounds per hour of 1000
# hosts (the dicts cost a third of a round there).
def _is_high(h: HostLoad, cfg: PolicyConfig) -> bool:
    cap = h.cpu_capacity
    return (h.loadavg[0] / cap >= cfg.load.high or h.cpu_util >= cfg.util.high
            or h.run_queue / cap >= cfg.run_queue.high)


def _is_low(h: HostLoad, cfg: PolicyConfig) -> bool:
    cap = h.cpu_capacity
    return (h.loadavg[0] / cap <= cfg.load.low and h.cpu_util <= cfg.util.low
            and h.run_queue / cap <= cfg.run_queue.low)


def _held_for(history: Sequence[HostLoad], cond: Callable[[HostLoad, PolicyConfig], bool],
              cfg: PolicyConfig) -> float:
    """How long `cond(sample, cfg)` has held without a break, ending at the latest sample."""
    since = None
    for h in reversed(history):
        if not cond(h, cfg):
            break
        since = h.time
    return history[-1].time - since if since is not None else -1.0


def _describe_measures(h: HostLoad, cfg: PolicyConfig) -> str:
    # Every classify says this, every round: one format, the watermarks' text formatted once.
    cap = h.cpu_capacity
    return (f"load {h.loadavg[0] / cap:.2f} {cfg.load.text}, util {h.cpu_util:.2f} {cfg.util.text}, "
            f"run_queue {h.run_queue / cap:.2f} {cfg.run_queue.text}")


def _grade(history: Sequence[HostLoad], cfg: PolicyConfig, previous: Level) -> tuple[Level, int, float]:
    """`classify`'s level without its text: (level, which of its rules gave it, how long the
    condition has held). `level` needs only the first; the simulator asks it of every round."""
    if not history:
        raise InputError("the policy needs at least one load sample of this host")
    latest = history[-1]
    high_for = _held_for(history, _is_high, cfg)
    if high_for >= cfg.hold_s:
        return Level.HIGH, 0, high_for
    low_for = _held_for(history, _is_low, cfg)
    if low_for >= cfg.hold_s:
        return Level.LOW, 1, low_for
    if previous is Level.HIGH and not _is_low(latest, cfg):
        return Level.HIGH, 2, 0.0
    if previous is Level.LOW and not _is_high(latest, cfg):
        return Level.LOW, 3, 0.0
    if high_for >= 0:
        return Level.NORMAL, 4, high_for
    if low_for >= 0:
        return Level.NORMAL, 5, low_for
    return Level.NORMAL, 6, 0.0


def level(history: Sequence[HostLoad], cfg: PolicyConfig, previous: Level = Level.NORMAL) -> Level:
    """This host's level, as `classify` gives it."""
    return _grade(history, cfg, previous)[0]


def classify(
    history: Sequence[HostLoad], cfg: PolicyConfig, previous: Level = Level.NORMAL
) -> tuple[Level, tuple[str, ...]]:
    """This host's level from its recent snapshots, with the reason.

    Entering HIGH (LOW) needs some (every) signal at/above high (at/below low) in every sample
    of the last `hold_s` seconds. Hysteresis: once HIGH the host stays HIGH until every signal
    is back at or below its low watermark; once LOW it stays LOW until a signal reaches high.
    Between the watermarks a NORMAL host stays NORMAL.
    """
    lvl, rule, held = _grade(history, cfg, previous)
    now = _describe_measures(history[-1], cfg)
    return lvl, (_RULE_TEXT[rule].format(held=held, hold=cfg.hold_s, now=now),)


#: `classify`'s reason for each rule `_grade` names (its second value, the index here).
_RULE_TEXT = (
    "overloaded for {held:.0f} s (>= hold {hold:g} s): {now}",
    "lightly loaded for {held:.0f} s (>= hold {hold:g} s): {now}",
    "still overloaded (hysteresis: not yet back below low): {now}",
    "still lightly loaded (hysteresis: no signal at high): {now}",
    "above high for only {held:.0f} s (< hold {hold:g} s): {now}",
    "below low for only {held:.0f} s (< hold {hold:g} s): {now}",
    "between watermarks: {now}",
)


def pick_fill_source(local: HostLoad, peers: Sequence[Peer], cfg: PolicyConfig) -> str | None:
    """For an idle host: the busiest overloaded peer to ask for work (None: nobody to ask)."""
    if not _is_low(local, cfg):
        return None
    busy = [p.load for p in peers if _is_high(p.load, cfg)]
    if not busy:
        return None
    return max(busy, key=lambda h: (costmodel.demand(h) / h.cpu_capacity, h.host)).host


# --------------------------------------------------------------------------- which / where / how


@dataclass(frozen=True)
class _Target:
    """A peer with what placement needs precomputed once per decision."""

    site: Site
    link: Link
    cpu_compatible: bool
    mem_available: int
    #: Its effective speed before anything arrives (an upper bound for any arrival).
    speed0: float


@dataclass(frozen=True)
class _Option:
    """One priced way of moving one process to one target."""

    rank: tuple
    cand: Candidate
    target: str
    action: Action
    est: Estimate
    #: The target's load per CPU after the move.
    after: float = 0.0


#: Offload and fill: gains within this fraction of the best one are a tie, which goes to the
#: target left least loaded. Without it two near-equal targets are picked by noise, and the
#: same one can get a second move before its snapshot shows the first (seen in the bed's e2e
#: test: both moves to host3).
NEAR_TIE = 0.05


def _tie_floor(gain: float) -> float:
    """The least gain that ties with `gain` (rises with it, so a running best is safe)."""
    return gain - NEAR_TIE * abs(gain)


@dataclass
class _Search:
    """Running best of one decision's search, plus counts of why options were rejected."""

    best: _Option | None = None
    best_rejected: _Option | None = None
    # A defaultdict, not a Counter: one is made per search, and Counter() costs ten times more.
    rejected: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Offload and fill: accepted options that tied with the best so far when found.
    near: list[_Option] = field(default_factory=list)

    def floor(self, cfg: PolicyConfig) -> float:
        """The gain an option must reach to matter (offload and fill)."""
        return cfg.min_gain if self.best is None else max(cfg.min_gain, _tie_floor(self.best.est.gain))

    def choice(self, mode: Mode) -> _Option | None:
        """The move: consolidate's best fit; otherwise, among the options tying with the best
        gain, the one leaving its target least loaded (then the best rank)."""
        if self.best is None or mode is Mode.CONSOLIDATE:
            return self.best
        floor = _tie_floor(self.best.est.gain)
        return max((o for o in self.near if o.est.gain >= floor), key=lambda o: (-o.after, o.rank))


def _eligible(sit: Situation, cfg: PolicyConfig) -> tuple[list[Candidate], list[str]]:
    ok: list[Candidate] = []
    # Counted by kind, the text formatted once: a busy host has hundreds of candidates. Only
    # the eligible ones are sorted (by PID): on a busy host most are too young.
    skipped = [0, 0, 0]
    for c in sit.candidates:
        if not c.opted_in:
            skipped[0] += 1
        elif c.last_migrated is not None and sit.now - c.last_migrated < cfg.process_cooldown_s:
            skipped[1] += 1
        elif c.proc.age_s < cfg.min_age_s:
            skipped[2] += 1
        else:
            ok.append(c)
    ok.sort(key=lambda c: c.proc.pid)
    why = ("not opted in", f"in migration cooldown (< {cfg.process_cooldown_s:g} s since last move or failed move)",
           f"younger than {cfg.min_age_s:g} s")
    reasons = [f"{len(ok)} of {len(sit.candidates)} processes eligible"]
    reasons += [f"{n} {w}" for w, n in sorted((why[k], n) for k, n in enumerate(skipped) if n)]
    return ok, reasons


_BY_HOST = operator.attrgetter("load.host")


def _targets(sit: Situation, source: HostLoad, cfg: PolicyConfig) -> list[_Target]:
    src_norm = costmodel.demand(source) / source.cpu_capacity
    out = []
    # Only whether a peer is HIGH matters here (_is_high), not its full level: every search of a
    # busy host asks it of every peer.
    for p in sorted(sit.peers, key=_BY_HOST):
        h = p.load
        if h.host == source.host:
            continue
        if sit.mode is Mode.FILL and h.host != sit.requester:
            continue
        if sit.mode is Mode.OFFLOAD and _is_high(h, cfg):
            continue
        if sit.mode is Mode.CONSOLIDATE and (
            _is_high(h, cfg) or costmodel.demand(h) / h.cpu_capacity < src_norm
        ):
            continue  # packing goes onto hosts at least as busy as this one
        s = costmodel.site(h, cfg.cpu_price(h.host))
        out.append(_Target(s, p.link, p.cpu_compatible, h.mem_available,
                           costmodel.effective_speed(s, 0.0)))
    return out


def _actions(c: Candidate, source: str, target: str) -> list[Action]:
    """The ways `c` could go to `target`. Data elsewhere: only the code goes to the data."""
    data_host = c.data_host or source
    if data_host != source:
        if target != data_host:
            return []  # the link between the data's host and a third host is not known
        acts = [Action.MOVE_CODE_TO_DATA]
    else:
        acts = [Action.MIGRATE_WITH_DATA if c.data_size > 0 else Action.MIGRATE]
    if c.restartable:
        acts.append(Action.RESTART_ELSEWHERE)
    return acts


def _placement_problem(
    c: Candidate, t: _Target, action: Action, work: Work, src: Site, mode: Mode,
    cfg: PolicyConfig, source: str,
) -> str | None:
    """Why `c` may not go to `t` by `action` (None: it may)."""
    if t.mem_available - c.proc.rss_bytes < cfg.min_free_memory:
        return "target lacks memory"
    if action is not Action.RESTART_ELSEWHERE and not t.cpu_compatible:
        return "target CPU not compatible"
    data_host = c.data_host or source
    if t.site.host != data_host and not cfg.cleared(c.data_label, t.site.host):
        return f"target not cleared for label {c.data_label!r}"
    if mode is Mode.CONSOLIDATE:
        if costmodel.norm_after(t.site, work.wants) > cfg.consolidate_ceiling:
            return "target would exceed the consolidation ceiling"
    elif _more_loaded(t.site, src, work.wants):
        return "target would end up more loaded than this host"
    return None


def _more_loaded(there: Site, here: Site, wants: float) -> bool:
    """Offload and fill: would `there` end up more loaded per CPU than `here` once a process
    wanting `wants` CPUs moved? Rises with `wants` (see `_with_room`)."""
    return costmodel.norm_after(there, wants) > costmodel.norm_after(here, -wants)


def _with_room(candidates: Sequence[Candidate], targets: Sequence[_Target],
               src: Site) -> tuple[list[_Target], float] | None:
    """Offload and fill: the targets that can take the lightest candidate without
    `_more_loaded`, and what it wants (CPUs). No other target can take any candidate (no
    option on it can pass `_placement_problem`), so the search may leave them out; none left:
    nothing can move. None: no such proof here (a NaN, a capacity not above zero).

    Exact, not a heuristic: with positive capacities `norm_after(s, x)` never falls as x rises
    (an IEEE sum, max and division by a positive number are monotone), so a target left more
    loaded by the lightest process is left more loaded by any heavier one. NaN breaks that
    ordering (min skips it). A busy host out of cooldown searches every round, and most of
    the time nothing it has fits on most of its peers: this saves pricing it there."""
    wants = [costmodel.wants(c, src) for c in candidates]
    if math.isnan(sum(wants)) or src.capacity <= 0:
        return None
    lightest = min(wants)
    return [t for t in targets
            if t.site.capacity <= 0 or not _more_loaded(t.site, src, lightest)], lightest


def _required_gain(est: Estimate, mode: Mode, cfg: PolicyConfig) -> float:
    """The least gain that makes a move worth it (consolidate tolerates a small loss)."""
    if mode is Mode.CONSOLIDATE:
        return -cfg.consolidate_max_loss_ratio * est.stay_score
    return max(cfg.min_gain, cfg.min_gain_ratio * est.stay_score)


_ACTION_ORDER = {a: i for i, a in enumerate(Action)}


def _rank(est: Estimate, mode: Mode, after: float, pid: int, target: str, action: Action) -> tuple:
    """Larger is better; ties fall to the lower PID, then the target name, then action order."""
    return (_primary(est, mode, after), est.gain, -pid, _neg(target), -_ACTION_ORDER[action])


def _primary(est: Estimate, mode: Mode, after: float) -> float:
    """What a mode maximizes: gain, or for consolidate how full the target gets."""
    return after if mode is Mode.CONSOLIDATE else est.gain


def _neg(s: str) -> tuple[int, ...]:
    return tuple(-ord(ch) for ch in s) + (1,)


def _search_candidate(
    c: Candidate, work: Work, stay: costmodel.Stay, k_here: float, targets: Sequence[_Target],
    src: Site, mode: Mode, cfg: PolicyConfig, source: str, s: _Search, bound: costmodel.Bound | None,
) -> None:
    """Price every way of moving `c` (its `work` and `stay` priced on `src`, whose effective
    speed is `k_here`) to each target. With a bound, `targets` must come fastest first: the
    search stops at the first target too slow to beat the best move so far."""
    for t in targets:
        if bound is not None:
            floor = s.floor(cfg)
            if costmodel.upper_gain(work, stay, k_here, t.speed0, 0.0, bound.cheapest_per_work,
                                    cfg) < floor:
                break  # this and every later (slower) target
            k_there = costmodel.effective_speed(t.site, work.wants)
            if costmodel.upper_gain(work, stay, k_here, k_there,
                                    costmodel.min_downtime_s(c, t.link, cfg),
                                    t.site.cpu_price / t.site.speed, cfg) < floor:
                continue  # cannot beat the best so far
        for action in _actions(c, source, t.site.host):
            problem = _placement_problem(c, t, action, work, src, mode, cfg, source)
            if problem:
                s.rejected[problem] += 1
                continue
            est = costmodel.estimate(c, work, stay, action, src, t.site, t.link, cfg)
            after = costmodel.norm_after(t.site, work.wants)
            if est.gain >= _required_gain(est, mode, cfg):
                tie = mode is not Mode.CONSOLIDATE and (
                    s.best is None or est.gain >= _tie_floor(s.best.est.gain))
                # The full rank (with its tie-breaks) only for moves that can compete.
                if tie or s.best is None or _primary(est, mode, after) >= s.best.rank[0]:
                    o = _Option(_rank(est, mode, after, c.proc.pid, t.site.host, action), c,
                                t.site.host, action, est, after)
                    if tie:
                        s.near.append(o)
                    if s.best is None or o.rank > s.best.rank:
                        s.best = o
            else:
                s.rejected["gain too small"] += 1
                if s.best_rejected is None or est.gain > s.best_rejected.est.gain:
                    s.best_rejected = _Option((), c, t.site.host, action, est)


def cooling(last_move_at: float | None, now: float, cfg: PolicyConfig) -> bool:
    """Is this host in its host cooldown (no mode moves anything)?"""
    return last_move_at is not None and now - last_move_at < cfg.host_cooldown_s


#: The level offload and consolidate need to act at all (fill is judged by its requester).
NEEDS = {Mode.OFFLOAD: Level.HIGH, Mode.CONSOLIDATE: Level.LOW}


def _trigger(sit: Situation, level: Level, cfg: PolicyConfig) -> str | None:
    """Why this mode has nothing to do right now (None: go ahead)."""
    if cooling(sit.last_move_at, sit.now, cfg):
        return (f"host cooldown: last move {sit.now - sit.last_move_at:.0f} s ago "  # type: ignore[operator]
                f"(< {cfg.host_cooldown_s:g} s)")
    if sit.mode is Mode.OFFLOAD and level is not NEEDS[Mode.OFFLOAD]:
        return f"offload needs this host overloaded; it is {level.value}"
    if sit.mode is Mode.CONSOLIDATE and level is not NEEDS[Mode.CONSOLIDATE]:
        return f"consolidate needs this host lightly loaded; it is {level.value}"
    if sit.mode is Mode.FILL:
        req = next((p for p in sit.peers if p.load.host == sit.requester), None)
        if req is None:
            return f"fill: requester {sit.requester!r} is not a known peer"
        if not _is_low(req.load, cfg):
            return f"fill: requester {sit.requester} is not lightly loaded"
        if level is Level.LOW:
            return "fill: this host is lightly loaded itself, no work to give"
    return None


def decide(sit: Situation, cfg: PolicyConfig, *, prune: bool = True) -> Decision:
    """The policy. Deterministic: the same Situation and config give the same Decision.

    `prune=False` evaluates every candidate (the baseline the benchmark and tests compare
    against); with pruning, candidates are visited best-bound first and the search stops when
    no remaining candidate's upper bound on gain can beat the best move found.
    """
    level, reasons_t = classify(sit.history, cfg, sit.previous_level)
    local = sit.history[-1]
    reasons = list(reasons_t)

    def stay(*why: str, est: Estimate | None = None) -> Decision:
        return Decision(Action.STAY, sit.mode, level, local.host, estimate=est,
                        reasons=tuple(reasons) + why)

    blocked = _trigger(sit, level, cfg)
    if blocked:
        return stay(blocked)
    candidates, why = _eligible(sit, cfg)
    reasons += why
    if not candidates:
        return stay("no eligible process")
    targets = _targets(sit, local, cfg)
    if not targets:
        return stay(f"no peer can take work in {sit.mode.value} mode")

    s = _search(sit, local, candidates, targets, cfg, prune, reasons)
    rejected = [f"{n} options rejected: {why}" for why, n in sorted(s.rejected.items())]
    b = s.choice(sit.mode)
    if b is None:
        if (r := s.best_rejected) is not None:
            rejected.append(
                f"best rejected: {r.action.value} {_label(r.cand)} to {r.target} gains "
                f"{r.est.gain:.1f} (needs >= {_required_gain(r.est, sit.mode, cfg):.1f})")
            return stay(*rejected, "no move pays off: stay", est=r.est)
        return stay(*rejected, "no feasible move: stay")
    reasons += rejected
    if b is not s.best and s.best is not None:
        reasons.append(f"near tie: {s.best.target} gains {s.best.est.gain:.1f}, within {NEAR_TIE:.0%} of "
                       f"{b.target}'s {b.est.gain:.1f}; {b.target} is left less loaded "
                       f"({b.after:.2f} against {s.best.after:.2f} per CPU)")
    reasons += costmodel.describe(b.est, b.action, b.target, _required_gain(b.est, sit.mode, cfg))
    return Decision(b.action, sit.mode, level, local.host, pid=b.cand.proc.pid,
                    name=b.cand.proc.name, target=b.target, subject=b.cand.subject, estimate=b.est,
                    reasons=tuple(reasons))


def _label(c: Candidate) -> str:
    return c.subject.label(c.proc.pid, c.proc.name)


def _search(sit: Situation, local: HostLoad, candidates: list[Candidate], targets: list[_Target],
            cfg: PolicyConfig, prune: bool, reasons: list[str]) -> _Search:
    """Price the options; with `prune`, skip those that provably cannot win (see Bound and
    `_with_room`)."""
    src = costmodel.site(local, cfg.cpu_price(local.host))
    links = {p.load.host: p.link for p in sit.peers}
    k_here = costmodel.effective_speed(src, 0.0)
    s = _Search()

    def priced(c: Candidate) -> tuple[Work, costmodel.Stay]:
        w = costmodel.work(c, src, cfg)
        return w, costmodel.stay(c, w, src, links, local.host, cfg)

    if not prune or sit.mode is Mode.CONSOLIDATE:  # consolidate ranks by fullness, not gain
        for c in candidates:
            _search_candidate(c, *priced(c), k_here, targets, src, sit.mode, cfg, local.host, s, None)
        return s
    if (room := _with_room(candidates, targets, src)) is not None:
        targets, lightest = room
        if not targets:
            reasons.append(f"no peer can take even the lightest eligible process ({lightest:.2f} "
                           f"CPUs) without ending up more loaded than this host")
            return s
    bound = costmodel.Bound.of([t.site for t in targets])
    targets = sorted(targets, key=lambda t: (-t.speed0, t.site.host))
    ranked = sorted(((bound.max_gain(c, w, st, k_here, cfg), c, w, st)
                     for c, (w, st) in ((c, priced(c)) for c in candidates)),
                    key=lambda r: (-r[0], r[1].proc.pid))
    if ranked[0][0] < cfg.min_gain:
        reasons.append(f"no move can gain {cfg.min_gain:g}: at most {ranked[0][0]:.1f} "
                       f"({_label(ranked[0][1])}, ignoring transfers)")
    for ub, c, w, st in ranked:
        if ub < s.floor(cfg):
            break  # this and every later candidate
        _search_candidate(c, w, st, k_here, targets, src, sit.mode, cfg, local.host, s, bound)
    return s


# --------------------------------------------------------------------------- explain


def explain(d: Decision) -> str:
    """The decision as text: headline, the estimate's numbers, then every reason."""
    if d.action is Action.STAY:
        head = f"{d.source} ({d.level.value}, {d.mode.value}): stay"
    else:
        what = (d.subject or PROCESS_TREE).label(d.pid, d.name)
        head = f"{d.source} ({d.level.value}, {d.mode.value}): {d.action.value} {what} -> {d.target}"
    lines = [head]
    if d.estimate is not None:
        lines += ["  " + ln for ln in costmodel.table(d.estimate)]
    lines += [f"  - {r}" for r in d.reasons]
    return "\n".join(lines)
