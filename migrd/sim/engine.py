"""The discrete-event simulation: hosts share their CPUs among their jobs (processor sharing),
every host runs an agent round every `interval` seconds (at its own phase), and a migration
freezes its job for the strategy's downtime, then the job resumes on the target.

migrd's policies go through `migrd.core.step.step`, the agent's own round, with simulated snapshots
(load average with the kernel's 1-minute decay, utilization and run queue averaged since the
previous round, memory), links and candidates; `step.idle` first settles, exactly, the rounds
that end before looking at them. The baselines (policies.py) see the same
snapshots through the same probing.

A plain heap of events, no simulation library: the shared heap holds only what makes hosts meet
(rounds, migration arrivals); each host plays out its own arrivals and completions lazily
(`_catch_up`). Nothing waits on resources, which is what simpy is for; its generator-per-process
style would cost a Python frame switch per event for nothing here.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from migrd.core import step
from migrd.core.peerset import Probe
from migrd.model import Candidate, HostLoad, Link, Mode, Peer, PolicyConfig, ProcessLoad
from migrd.errors import InputError
from migrd.sim import policies, workload
from migrd.sim.probe import Prober
from migrd.sim.workload import Job, SimHost, Strategy

#: Policy name -> migrd daemon.mode, for the policies that run migrd's own step.
MIGRD_MODES = {"migrd": Mode.OFFLOAD.value, "migrd_fill": Mode.FILL.value,
               "migrd_consolidate": Mode.CONSOLIDATE.value}
POLICIES = (*policies.BASELINES, *MIGRD_MODES)
#: The kernel's 1-minute load average window.
LOADAVG_S = 60.0
#: Memory a simulated host keeps for itself.
RESERVED = 512 * workload.MB

MOVED, ROUND = 0, 1


@dataclass(frozen=True)
class SimConfig:
    hosts: int = 100
    load: float = 0.8
    seed: int = 1
    #: Simulated seconds of cluster time.
    duration: float = 3600.0
    #: Seconds between two rounds of one host (daemon.interval).
    interval: float = 5.0
    probe: str = "fingers"
    strategy: str = "streamed"
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def check(self) -> None:
        if self.hosts < 2:
            raise InputError(f"--hosts {self.hosts}: the simulation needs at least 2 hosts")
        if not 0 < self.load < 1.5:
            raise InputError(f"--load {self.load}: give the offered load as a fraction, e.g. 0.8")
        if self.duration <= 0 or self.interval <= 0:
            raise InputError("--duration and --interval must be > 0 seconds")
        try:
            Probe.parse(self.probe)
        except ValueError as e:
            raise InputError(f"--probe {e}") from None
        if self.strategy not in workload.STRATEGIES:
            raise InputError(f"--strategy {self.strategy!r}: one of {', '.join(workload.STRATEGIES)}")


class _Job:
    __slots__ = ("job", "finish_s", "arrived_here", "remaining", "left")

    def __init__(self, job: Job, arrived_here: float | None = None) -> None:
        self.job = job
        #: The host's virtual service at which it completes (while on a host).
        self.finish_s = 0.0
        #: When it arrived by migration (the process cooldown), None if never moved.
        self.arrived_here = arrived_here
        #: Reference CPU-seconds left (kept while in flight).
        self.remaining = job.work
        #: The hosts it was moved away from (a move back to one is ping-pong).
        self.left: tuple[int, ...] = ()


class _Host:
    """One simulated host. It is advanced lazily: its own arrivals and completions touch no one
    else, so they are played out only when something looks at it (its round, a migration
    arriving, the end of the run), not through the global event queue."""

    __slots__ = ("i", "spec", "cpus", "speed", "settings", "arrivals", "next_arrival", "jobs", "heap",
                 "served", "rate", "t_last", "mem_used", "loadavg", "area_n", "area_busy", "t_sample",
                 "snapshot", "version", "views", "state", "last_move_at")

    def __init__(self, i: int, spec: SimHost, settings: step.Settings | None, arrivals: list[Job]) -> None:
        self.i, self.spec, self.settings = i, spec, settings
        self.cpus, self.speed = spec.cpus, spec.speed
        #: The jobs submitted to it, in time order, and the next one to arrive.
        self.arrivals, self.next_arrival = arrivals, 0
        self.jobs: dict[int, _Job] = {}
        #: (finish_s, job id); entries of jobs that left are dropped when they reach the top.
        self.heap: list[tuple[float, int]] = []
        #: Service each job on it has received since t = 0 (processor sharing's virtual time).
        self.served = self.rate = self.t_last = 0.0
        self.mem_used = 0
        self.loadavg = self.area_n = self.area_busy = self.t_sample = 0.0
        self.snapshot: HostLoad | None = None
        #: Publications of its snapshot so far (a herd is several moves decided on one of them).
        self.version = 0
        #: This host as a Peer, by the bandwidth of the path to it (cached per publication).
        self.views: dict[float, Peer] = {}
        self.state = step.State()
        self.last_move_at: float | None = None


@dataclass(frozen=True)
class Result:
    policy: str
    jobs: int
    completed: int
    mean_slowdown: float
    p99_slowdown: float
    migrations: int
    migrations_per_job: float
    bytes_moved: int
    herd_events: int
    #: Migrations that took a job back to a host it had been moved away from.
    ping_pong: int
    idle_hosts: float
    peer_reads_per_round: float
    policy_rounds: int
    wall_s: float
    #: CPU time of this simulation (the machine may be shared: wall_s can be several times it).
    cpu_s: float
    #: Conservation: jobs (arrived) = completed + on hosts + in flight.
    jobs_on_hosts: int = 0
    jobs_in_flight: int = 0


def _percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class _OnDemand(Sequence):
    """A round's peers or candidates, built the first time the policy looks at them. Most
    rounds end before (this host is not overloaded, or is in its cooldown); the agent lists
    its processes and peers every round anyway, the simulator need not build them to match."""

    __slots__ = ("_make", "_items")

    def __init__(self, make: Callable[[], tuple]) -> None:
        self._make: Callable[[], tuple] | None = make
        self._items: tuple = ()

    def _get(self) -> tuple:
        if self._make is not None:
            self._items, self._make = self._make(), None
        return self._items

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, i: Any) -> Any:
        return self._get()[i]

    def __iter__(self) -> Iterator:
        return iter(self._get())


class Simulation:
    """One policy over one workload. `run()` once."""

    def __init__(self, cfg: SimConfig, cluster: Sequence[SimHost], arrivals: Sequence[Job], policy: str) -> None:
        if policy not in POLICIES:
            raise InputError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
        self.cfg, self.policy, self.arrivals = cfg, policy, arrivals
        self.strategy: Strategy = workload.STRATEGIES[cfg.strategy]
        mode = MIGRD_MODES.get(policy)
        by_host: list[list[Job]] = [[] for _ in cluster]
        for job in arrivals:
            by_host[job.home].append(job)
        self.hosts = [_Host(i, h, step.Settings(h.name, mode, cfg.interval, cfg.policy) if mode else None,
                            by_host[i]) for i, h in enumerate(cluster)]
        self.index = {h.name: i for i, h in enumerate(cluster)}
        self.home_speed = [h.speed for h in cluster]
        # Separate streams so the policies' choices never shift the workload or the phases.
        self.rng = random.Random(f"{cfg.seed}:{policy}")
        self.prober = Prober(cfg.probe, [h.name for h in cluster], random.Random(f"{cfg.seed}:probe"))
        #: Rounds and migration arrivals: (time, seq, kind, host or job, target).
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.in_flight: dict[int, _Job] = {}
        self.slowdowns: list[float] = []
        self.migrations = self.bytes_moved = self.rounds = self.reads = self.ping_pong = 0
        self.herds: Counter = Counter()
        self.idle_area = 0.0
        phases = random.Random(f"{cfg.seed}:phases")
        for h in self.hosts:
            self._push(phases.uniform(0.0, cfg.interval), ROUND, h.i, 0)

    # --- events ---------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: int, b: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self) -> Result:
        began, cpu = time.perf_counter(), time.process_time()
        end, events = self.cfg.duration, self.events
        with _no_gc():
            while events and events[0][0] < end:
                t, _, kind, a, b = heapq.heappop(events)
                if kind == ROUND:
                    self._round(a, t)
                else:
                    j = self.in_flight.pop(a)
                    j.arrived_here = t
                    self._join(j, self.hosts[b], t)
        for h in self.hosts:
            self._catch_up(h, end)
        on_hosts = sum(len(h.jobs) for h in self.hosts)
        n = sum(h.next_arrival for h in self.hosts)
        return Result(
            policy=self.policy, jobs=n, completed=len(self.slowdowns),
            mean_slowdown=math.fsum(self.slowdowns) / max(len(self.slowdowns), 1),
            p99_slowdown=_percentile(self.slowdowns, 0.99),
            migrations=self.migrations, migrations_per_job=self.migrations / max(n, 1),
            bytes_moved=self.bytes_moved, herd_events=sum(1 for c in self.herds.values() if c > 1),
            ping_pong=self.ping_pong,
            idle_hosts=self.idle_area / max(self.rounds, 1),
            peer_reads_per_round=self.reads / max(self.rounds, 1), policy_rounds=self.rounds,
            wall_s=time.perf_counter() - began, cpu_s=time.process_time() - cpu, jobs_on_hosts=on_hosts,
            jobs_in_flight=len(self.in_flight))

    def hosts_of_jobs(self) -> dict[int, list[int]]:
        """Every job not completed -> the hosts holding it ([] while in flight). For the
        invariant that no job is on two hosts."""
        out: dict[int, list[int]] = {jid: [] for jid in self.in_flight}
        for h in self.hosts:
            for jid in h.jobs:
                out.setdefault(jid, []).append(h.i)
        return out

    # --- processor sharing ------------------------------------------------------------------

    def _catch_up(self, h: _Host, t: float) -> None:
        """Play out h's own arrivals and completions up to time t, in time order (an arrival
        first on a tie), and advance it to t (its virtual time and its
        load areas). Written out, attributes in locals: most of the time of a run is here."""
        arrivals, k = h.arrivals, h.next_arrival
        n_arr = len(arrivals)
        heap, jobs, cpus, speed = h.heap, h.jobs, h.cpus, h.speed
        served, rate, t_last, area_n, area_busy = h.served, h.rate, h.t_last, h.area_n, h.area_busy
        slowdowns, home_speed = self.slowdowns, self.home_speed
        n = len(jobs)
        t_a = arrivals[k].arrival if k < n_arr else math.inf
        while True:
            while heap:
                fin, jid = heap[0]
                j = jobs.get(jid)
                if j is not None and j.finish_s == fin:
                    break
                heapq.heappop(heap)  # it left, or left and came back with another finish
            t_d = t_last + (heap[0][0] - served) / rate if heap else math.inf
            if t_a <= t_d:
                if t_a > t:
                    break
                dt = t_a - t_last
                if dt > 0:
                    served += rate * dt
                    area_n += n * dt
                    area_busy += (n if n < cpus else cpus) * dt
                    t_last = t_a
                job = arrivals[k]
                k += 1
                t_a = arrivals[k].arrival if k < n_arr else math.inf
                j = _Job(job)
                j.finish_s = served + job.work
                jobs[job.id] = j
                h.mem_used += job.rss
                heapq.heappush(heap, (j.finish_s, job.id))
                n += 1
            else:
                if t_d > t:
                    break
                dt = t_d - t_last
                if dt > 0:
                    area_n += n * dt
                    area_busy += (n if n < cpus else cpus) * dt
                    t_last = t_d
                fin, jid = heapq.heappop(heap)
                if fin > served:
                    served = fin
                job = jobs.pop(jid).job
                h.mem_used -= job.rss
                slowdowns.append((t_last - job.arrival) * home_speed[job.home] / job.work)
                n -= 1
            rate = (speed if n <= cpus else speed * (cpus / n)) if n else 0.0
        dt = t - t_last
        if dt > 0:
            served += rate * dt
            area_n += n * dt
            area_busy += (n if n < cpus else cpus) * dt
            t_last = t
        h.next_arrival = k
        h.served, h.rate, h.t_last, h.area_n, h.area_busy = served, rate, t_last, area_n, area_busy

    def _join(self, j: _Job, h: _Host, t: float) -> None:
        """A migrated job resumes on h at t."""
        self._catch_up(h, t)
        j.finish_s = h.served + j.remaining
        h.jobs[j.job.id] = j
        h.mem_used += j.job.rss
        heapq.heappush(h.heap, (j.finish_s, j.job.id))
        n = len(h.jobs)
        h.rate = h.speed * min(1.0, h.cpus / n)

    def _leave(self, h: _Host, jid: int) -> _Job:
        """h (advanced to now) gives up job jid; its entry in h.heap goes stale."""
        j = h.jobs.pop(jid)
        h.mem_used -= j.job.rss
        j.remaining = max(j.finish_s - h.served, 0.0)
        n = len(h.jobs)
        h.rate = h.speed * min(1.0, h.cpus / n) if n else 0.0
        return j

    # --- rounds -----------------------------------------------------------------------------

    def _sample(self, h: _Host, t: float) -> HostLoad:
        self._catch_up(h, t)
        s = h.spec
        dt = t - h.t_sample
        n = len(h.jobs)
        avg_n = h.area_n / dt if dt > 0 else n
        util = h.area_busy / dt / s.cpus if dt > 0 else min(n, s.cpus) / s.cpus
        h.loadavg = avg_n + (h.loadavg - avg_n) * math.exp(-dt / LOADAVG_S)
        h.area_n = h.area_busy = 0.0
        h.t_sample = t
        # host, time, source, cpus, cpu_capacity, cpu_speed, loadavg, cpu_util, run_queue,
        # mem_total, mem_available: positional, a round's largest constant cost otherwise.
        return HostLoad(s.name, t, "sim", s.cpus, float(s.cpus), s.speed, (h.loadavg,) * 3, util, n,
                        s.mem_total, s.mem_total - RESERVED - h.mem_used)

    def _bandwidth(self, a: SimHost, b: SimHost) -> float:
        return min(a.nic, b.nic, self.strategy.wire_bps)

    def _peers(self, h: _Host) -> list[int]:
        """The probed peers, plus any that offered to take work (an asked host reads its asker)."""
        idx = self.prober.peers(h.i)
        if h.state.offers:
            idx = [*idx, *(j for j in (self.index[o] for o in sorted(h.state.offers)) if j not in idx)]
        self.reads += len(idx)
        return idx

    def _views(self, viewer: _Host, idx: list[int]) -> tuple[Peer, ...]:
        """What viewer reads of the peers idx: their last snapshots (none yet: not a peer)."""
        out = []
        hosts, nic, wire = self.hosts, viewer.spec.nic, self.strategy.wire_bps
        for j in idx:
            p = hosts[j]
            if p.snapshot is None:
                continue
            bw = min(nic, p.spec.nic, wire)
            v = p.views.get(bw)
            if v is None:
                v = p.views[bw] = Peer(p.snapshot, Link(p.spec.rtt_s, bw))
            out.append(v)
        return tuple(out)

    def _candidates(self, h: _Host, t: float) -> tuple[Candidate, ...]:
        n = len(h.jobs)
        share = min(1.0, h.spec.cpus / n) if n else 0.0
        served, speed = h.served, h.spec.speed
        # Positional: keyword construction is a tenth of a round here.
        return tuple(Candidate(ProcessLoad(j.job.id, "job", (), "sim", share,
                                           (j.job.work - (j.finish_s - served)) / speed,
                                           j.job.rss, t - j.job.arrival, None, None, 0, 0),
                               True, j.arrived_here)
                     for j in h.jobs.values())

    def _round(self, i: int, t: float) -> None:
        h = self.hosts[i]
        sample = self._sample(h, t)
        h.snapshot, h.views = sample, {}
        h.version += 1
        self.rounds += 1
        self.idle_area += not h.jobs
        peers = self._peers(h)
        busy_until = t
        if h.settings is not None:
            # The agent's round; `step.idle` settles, exactly, the rounds that end before it looks.
            if (quiet := step.idle(h.state, sample, h.settings)) is not None:
                h.state = quiet
                self._push(t + self.cfg.interval, ROUND, i, 0)
                return
            out = step.step(h.state, step.Inputs(sample, _OnDemand(lambda: self._views(h, peers)),
                                                 _OnDemand(lambda: self._candidates(h, t))), h.settings)
            h.state = out.state
            if out.move:
                busy_until = self._move(h, out.decision.pid, out.decision.target, t)  # type: ignore[arg-type]
            elif out.ask is not None:
                asked = self.hosts[self.index[out.ask]]
                asked.state = asked.state.offered(h.spec.name, t)
        elif self.policy != "none":
            snaps = [p.snapshot for p in (self.hosts[j] for j in peers) if p.snapshot is not None]
            choice = self._baseline(h, snaps, t)
            if choice is not None:
                h.last_move_at = t
                busy_until = self._move(h, choice[0], choice[1], t)
        # The agent migrates inside its round: the next round starts when both are over.
        self._push(max(t + self.cfg.interval, busy_until), ROUND, i, 0)

    def _baseline(self, h: _Host, peers: list[HostLoad], t: float) -> tuple[int, str] | None:
        pc = self.cfg.policy
        if h.last_move_at is not None and t - h.last_move_at < pc.host_cooldown_s:
            return None
        if self.policy != "mosix" and len(h.jobs) <= h.cpus:
            return None  # random and least_loaded move only from a host with more jobs than CPUs
        eligible = [policies.Eligible(j.job.id, t - j.job.arrival, j.job.rss) for j in h.jobs.values()
                    if t - j.job.arrival >= pc.min_age_s
                    and (j.arrived_here is None or t - j.arrived_here >= pc.process_cooldown_s)]
        if not eligible:
            return None
        if self.policy == "random":
            return policies.random_move(len(h.jobs), h.spec.cpus, eligible, peers, self.rng)
        if self.policy == "least_loaded":
            return policies.least_loaded_move(len(h.jobs), h.spec.cpus, eligible, peers, self.rng)

        def migration_s(e: policies.Eligible, p: HostLoad) -> float:
            there = self.hosts[self.index[p.host]].spec
            return self.strategy.downtime(e.rss, self._bandwidth(h.spec, there), there.rtt_s)

        return policies.mosix_move(len(self.hosts), h.snapshot, len(h.jobs), h.mem_used,  # type: ignore[arg-type]
                                   eligible, peers, migration_s)

    def _move(self, h: _Host, jid: int, target: str, t: float) -> float:
        """Freeze job `jid`, send it; it resumes on `target` after the downtime."""
        ti = self.index[target]
        there = self.hosts[ti]
        j = self._leave(h, jid)
        self.in_flight[jid] = j
        self.ping_pong += ti in j.left
        j.left += (h.i,)
        down = self.strategy.downtime(j.job.rss, self._bandwidth(h.spec, there.spec), there.spec.rtt_s)
        self._push(t + down, MOVED, jid, ti)
        self.migrations += 1
        self.bytes_moved += j.job.rss
        self.herds[(ti, there.version)] += 1
        return t + down


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector off while the arrivals are drawn and while a simulation
    runs: neither makes reference cycles (tests/test_sim.py checks the run), so the collector's
    passes over the growing lists of jobs and hosts' state find nothing and only cost time
    (measured in docs/sim.md, "Speed"). Back to its previous state afterwards. CPython only:
    PyPy has no reference counting, its collector is what frees everything, and with it off a
    run only grows (docs/sim.md)."""
    if sys.implementation.name != "cpython":
        yield
        return
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run(cfg: SimConfig, names: Sequence[str] = POLICIES, jobs: int = 1) -> dict[str, Result]:
    """Every policy in `names` over the same cluster and jobs (drawn from cfg.seed).

    jobs > 1: that many policies at once, each in a process forked after the draw. The
    policies share nothing but the drawn cluster and jobs, and each draws its own choices from
    its own seeded stream, so the results are the same as in one process, policy by policy;
    only the wall time of the whole comparison shrinks (one policy's run cannot be split: its
    every round reads its peers as of that instant)."""
    cfg.check()
    rng = random.Random(cfg.seed)
    cluster = workload.hosts(cfg.hosts, rng)
    with _no_gc():
        arrivals = workload.jobs(cluster, cfg.load, cfg.duration, rng)
    workers = min(jobs, len(names))
    if workers <= 1:
        return {name: Simulation(cfg, cluster, arrivals, name).run() for name in names}
    # Fork, not spawn: the children inherit the drawn jobs (a million tuples at N = 1000)
    # instead of unpickling a copy each.
    global _drawn
    _drawn = (cfg, cluster, arrivals)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return dict(zip(names, pool.map(_run_drawn, names)))
    finally:
        _drawn = None


#: What a forked worker of `run` simulates: set by `run` just before it forks.
_drawn: tuple[SimConfig, Sequence[SimHost], Sequence[Job]] | None = None


def _run_drawn(name: str) -> Result:
    assert _drawn is not None, "_run_drawn runs only in a process forked by run()"
    return Simulation(*_drawn, name).run()
