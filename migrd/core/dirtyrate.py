"""How fast the agent's candidates rewrite their memory (pure): which to sample within a round's
budget, and the rate their samples give.

Pricing a move's freeze (migrd/core/choice.py) needs each candidate's dirty rate; without
kernel tracking (no soft-dirty here) the only way to know it is to read memory twice and compare,
which costs reads of the process's memory. So the agent samples a strided subset of each
candidate's pages (at most `pages` per read, the same addresses both times), completes a pair
of reads in its next round (the rounds' spacing is the measuring window: nothing waits inside a
round), refreshes a candidate's rate at most every `every` seconds, and spends at most its
byte budget per round, biggest candidates first (memory weighs most in a freeze). The reads
themselves are the adapter's (migrd/adapters/memread.py `sample`); this module only plans and
estimates.

The window is a round interval long, so a page rewritten many times in it counts once: the rate
is the distinct memory a workload rewrites per second over seconds, what a pre-copy round of
that length would resend. Its ceiling is the sampled memory per window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from migrd.model import Candidate, HostLoad, Level, Mode, PolicyConfig

PAGE = 4096
#: The adapter's digest of an all-zero page: a page that appears between two reads and is still
#: zero was not written (untouched memory reads as zeros).
ZERO = b""
#: Weight of the newest sample in the kept rate: a workload that changes its pace shows within
#: two measurements, one odd window does not swing the price alone.
WEIGHT = 0.5
#: A rate not refreshed for this many `every` periods is dropped (priced as unmeasured again).
STALE_PERIODS = 4

#: (task, address) -> digest of the page read there (ZERO for an all-zero page).
Digests = Mapping[tuple[int, int], bytes]


@dataclass(frozen=True)
class Budget:
    """daemon.dirty_rate, as the planner needs it."""

    #: Bytes of memory one round may read.
    bytes: int
    #: Pages read of one candidate per read (its stride follows from its size).
    pages: int
    #: Seconds between two measurements of one candidate.
    every: float


@dataclass(frozen=True)
class Target:
    """A candidate as the sampler sees it: what to read, how big it is."""

    #: Stable name of the candidate: "pid N" or "container NAME".
    key: str
    pids: tuple[int, ...]
    rss: int


@dataclass(frozen=True)
class Read:
    """One read the round should make: the tasks' pages whose page number is `phase` modulo
    `stride`."""

    key: str
    pids: tuple[int, ...]
    stride: int
    phase: int
    #: It completes a pair (a baseline exists): the read that yields a rate.
    completes: bool


@dataclass(frozen=True)
class Baseline:
    at: float
    stride: int
    phase: int
    digests: Digests


@dataclass(frozen=True)
class Rate:
    #: Bytes per second rewritten (weighted over the measurements so far).
    bytes_per_s: float
    #: When it was last refreshed (the clock of the caller's readings).
    at: float
    #: Measurements folded into it.
    samples: int


@dataclass(frozen=True)
class Tracker:
    """What the agent keeps between rounds. Never mutated: every function returns a new one."""

    baselines: Mapping[str, Baseline] = field(default_factory=dict)
    rates: Mapping[str, Rate] = field(default_factory=dict)


def key_of(c: Candidate) -> str:
    return f"pid {c.proc.pid}" if c.subject.name is None else f"{c.subject.kind} {c.subject.name}"


def targets(cands: Iterable[Candidate], members: Mapping[str, Iterable[int]]) -> tuple[Target, ...]:
    """The candidates worth measuring: opted-in ones (the policy skips the rest). A container is
    read as all its processes (`members` by container name): its rate is their sum."""
    out = []
    for c in cands:
        if not c.opted_in:
            continue
        if c.subject.name is None:
            pids: tuple[int, ...] = (c.proc.pid,)
        else:
            pids = tuple(sorted(members.get(c.subject.name, ()))) or (c.proc.pid,)
        out.append(Target(key_of(c), pids, c.proc.rss_bytes))
    return tuple(out)


def worth_measuring(mode: str, level: Level, latest: HostLoad, offers: bool, cfg: PolicyConfig) -> bool:
    """Whether the policy may move something soon, so rates are worth their reads. Offload and
    fill move only from a HIGH host (a fill host is asked only when HIGH), consolidate only
    from a LOW one; measuring starts as soon as the latest sample crosses the watermark, so the
    rates are there when the hold time has passed and the level changes."""
    if mode == Mode.CONSOLIDATE.value:
        return level is Level.LOW or latest_is(latest, cfg, low=True)
    return offers or level is Level.HIGH or latest_is(latest, cfg, low=False)


def latest_is(h: HostLoad, cfg: PolicyConfig, *, low: bool) -> bool:
    """The sample at or below every low watermark (low) or at or above some high one."""
    signals = (h.loadavg[0] / h.cpu_capacity, h.cpu_util, h.run_queue / h.cpu_capacity)
    marks = (cfg.load, cfg.util, cfg.run_queue)
    if low:
        return all(s <= m.low for s, m in zip(signals, marks))
    return any(s >= m.high for s, m in zip(signals, marks))


def stride_for(rss: int, pages: int) -> int:
    return max(1, math.ceil(rss / PAGE / max(pages, 1)))


def phase_for(now: float, stride: int) -> int:
    """Which page of every `stride` a new measurement reads. It changes from one measurement to
    the next: a fixed one (page 0 of every stride) would sample the first page of aligned
    regions, where a heap or stack is busiest, every time, and each sampled page stands for
    `stride` pages."""
    return int(now * 1000) % stride


def plan(t: Tracker, cands: Sequence[Target], now: float, b: Budget) -> tuple[Read, ...]:
    """This round's reads within the byte budget: pairs begun last round first (half done, and
    their window is right now), then candidates never measured, then those whose rate is older
    than `every`; biggest first within each. A candidate that does not fit is passed over for
    smaller ones."""
    ranked: list[tuple[tuple[int, float, int], Read, int]] = []
    for c in cands:
        base = t.baselines.get(c.key)
        rate = t.rates.get(c.key)
        if base is not None:
            rank = (0, 0.0, -c.rss)
            stride, phase = base.stride, base.phase
        elif rate is None or now - rate.at >= b.every:
            rank = (1, 0.0, -c.rss) if rate is None else (2, rate.at, -c.rss)
            stride = stride_for(c.rss, b.pages)
            phase = phase_for(now, stride)
        else:
            continue
        cost = min(b.pages, math.ceil(c.rss / PAGE / stride) or 1) * PAGE
        ranked.append((rank, Read(c.key, c.pids, stride, phase, base is not None), cost))
    out, spent = [], 0
    for _, read, cost in sorted(ranked, key=lambda x: x[0]):
        if spent + cost <= b.bytes:
            out.append(read)
            spent += cost
    return tuple(out)


def changed(before: Digests, after: Digests) -> int:
    """Pages of `after` whose content differs from `before`; a page new since then counts
    unless it is still zero (mapped, never written)."""
    n = 0
    for k, h in after.items():
        old = before.get(k)
        if (old is None and h != ZERO) or (old is not None and old != h):
            n += 1
    return n


def record(t: Tracker, read: Read, digests: Digests, at: float) -> Tracker:
    """Fold one read in: the second of a pair gives a sample of the rate (pages changed times
    the stride, over the time between the reads), weighted into the kept rate; a first read is
    kept as the baseline. An empty read (its tasks gone or unreadable) changes nothing."""
    if not digests:
        return t  # none of its tasks could be read: nothing measured
    base = t.baselines.get(read.key)
    if base is None or (base.stride, base.phase) != (read.stride, read.phase) or at <= base.at:
        return replace(t, baselines={**t.baselines, read.key: Baseline(at, read.stride, read.phase, digests)})
    sample = changed(base.digests, digests) * read.stride * PAGE / (at - base.at)
    old = t.rates.get(read.key)
    rate = Rate(sample, at, 1) if old is None else \
        Rate(old.bytes_per_s + WEIGHT * (sample - old.bytes_per_s), at, old.samples + 1)
    return Tracker({k: v for k, v in t.baselines.items() if k != read.key}, {**t.rates, read.key: rate})


def keep(t: Tracker, keys: Iterable[str], now: float, b: Budget) -> Tracker:
    """Only the candidates still here, and only rates fresh enough to price with."""
    alive = set(keys)
    return Tracker({k: v for k, v in t.baselines.items() if k in alive},
                   {k: v for k, v in t.rates.items() if k in alive and now - v.at < STALE_PERIODS * b.every})


def apply(cands: Iterable[Candidate], t: Tracker) -> tuple[Candidate, ...]:
    """The candidates with their measured rates (None where not measured)."""
    return tuple(replace(c, dirty_rate=r.bytes_per_s) if (r := t.rates.get(key_of(c))) else c for c in cands)


def describe(r: Rate | None, now: float) -> str:
    """One line for `migrctl explain`."""
    if r is None:
        return "dirty rate: not measured (priced as idle)"
    return (f"dirty rate: {r.bytes_per_s / 1e6:.2f} MB/s, measured {now - r.at:.0f} s ago "
            f"({r.samples} sample{'s' if r.samples != 1 else ''})")
