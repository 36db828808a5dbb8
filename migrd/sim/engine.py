"""The discrete-event simulation: hosts share their CPUs among their jobs (processor sharing),
every host runs an agent round every `interval` seconds (at its own phase), and a migration
freezes its job for the strategy's downtime, then the job resumes on the target.

migrd's policies go through `migrd.step.step`, the agent's own round, with simulated snapshots
(load average with the kernel's 1-minute decay, utilization and run queue averaged since the
previous round, memory), links and candidates. The baselines (policies.py) see the same
snapshots through the same probing.

A plain heap of events, no simulation library: the model has three kinds of event (arrival,
completion, round) and no processes waiting on resources, which is what simpy is for; its
generator-per-process style would cost a Python frame switch per event for nothing here.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from migrd.core import step
from migrd.model import Candidate, HostLoad, Link, Mode, Peer, PolicyConfig, ProcessLoad
from migrd.errors import InputError
from migrd.sim import policies, workload
from migrd.sim.probe import PROBES, Prober
from migrd.sim.workload import Job, SimHost, Strategy

#: Policy name -> migrd daemon.mode, for the policies that run migrd's own step.
MIGRD_MODES = {"migrd": Mode.OFFLOAD.value, "migrd_fill": Mode.FILL.value,
               "migrd_consolidate": Mode.CONSOLIDATE.value}
POLICIES = (*policies.BASELINES, *MIGRD_MODES)
#: The kernel's 1-minute load average window.
LOADAVG_S = 60.0
#: Memory a simulated host keeps for itself.
RESERVED = 512 * workload.MB

ARRIVE, MOVED, DONE, ROUND = 0, 1, 2, 3


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
        if self.probe not in PROBES:
            raise InputError(f"--probe {self.probe!r}: one of {', '.join(PROBES)}")
        if self.strategy not in workload.STRATEGIES:
            raise InputError(f"--strategy {self.strategy!r}: one of {', '.join(workload.STRATEGIES)}")


@dataclass
class _Job:
    job: Job
    #: The host's virtual service at which it completes (while on a host).
    finish_s: float = 0.0
    #: Host index, or -1 while in flight.
    host: int = -1
    arrived_here: float | None = None
    #: Reference CPU-seconds left (kept while in flight).
    remaining: float = 0.0


@dataclass
class _Host:
    i: int
    spec: SimHost
    settings: step.Settings | None
    jobs: dict[int, _Job] = field(default_factory=dict)
    heap: list[tuple[float, int]] = field(default_factory=list)
    #: Service each job on it has received since t = 0 (processor sharing's virtual time).
    served: float = 0.0
    rate: float = 0.0
    t_last: float = 0.0
    epoch: int = 0
    mem_used: int = 0
    loadavg: float = 0.0
    area_n: float = 0.0
    area_busy: float = 0.0
    t_sample: float = 0.0
    snapshot: HostLoad | None = None
    #: Publications of its snapshot so far (a herd is several moves decided on one of them).
    version: int = 0
    #: This host as a Peer, by the bandwidth of the path to it (cached per publication).
    views: dict[float, Peer] = field(default_factory=dict)
    state: step.State = field(default_factory=step.State)
    last_move_at: float | None = None


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


class Simulation:
    """One policy over one workload. `run()` once."""

    def __init__(self, cfg: SimConfig, cluster: Sequence[SimHost], arrivals: Sequence[Job], policy: str) -> None:
        if policy not in POLICIES:
            raise InputError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
        self.cfg, self.policy, self.arrivals = cfg, policy, arrivals
        self.strategy: Strategy = workload.STRATEGIES[cfg.strategy]
        mode = MIGRD_MODES.get(policy)
        self.hosts = [_Host(i, h, step.Settings(h.name, mode, cfg.interval, cfg.policy) if mode else None)
                      for i, h in enumerate(cluster)]
        self.index = {h.name: i for i, h in enumerate(cluster)}
        # Separate streams so the policies' choices never shift the workload or the phases.
        self.rng = random.Random(f"{cfg.seed}:{policy}")
        self.prober = Prober(cfg.probe, [h.name for h in cluster], random.Random(f"{cfg.seed}:probe"))
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.live: dict[int, _Job] = {}
        self.slowdowns: list[float] = []
        self.migrations = self.bytes_moved = self.rounds = self.reads = 0
        self.herds: Counter = Counter()
        self.idle_area = 0.0
        self.arrived = 0
        phases = random.Random(f"{cfg.seed}:phases")
        for h in self.hosts:
            self._push(phases.uniform(0.0, cfg.interval), ROUND, h.i, 0)

    # --- events ---------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: int, b: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self) -> Result:
        began, cpu = time.perf_counter(), time.process_time()
        end, arrivals, events = self.cfg.duration, self.arrivals, self.events
        nxt, n_arr = 0, len(arrivals)
        while True:
            t_ev = events[0][0] if events else math.inf
            if nxt < n_arr and arrivals[nxt].arrival <= t_ev:
                job = arrivals[nxt]
                nxt += 1
                self._join(_Job(job, remaining=job.work), job.home, job.arrival)
                continue
            if t_ev >= end:
                break
            t, _, kind, a, b = heapq.heappop(events)
            if kind == DONE:
                self._done(a, b, t)
            elif kind == ROUND:
                self._round(a, t)
            else:
                j = self.live[a]
                self._join(j, b, t)
        self.arrived = nxt
        on_hosts = sum(len(h.jobs) for h in self.hosts)
        n = nxt
        return Result(
            policy=self.policy, jobs=n, completed=len(self.slowdowns),
            mean_slowdown=sum(self.slowdowns) / max(len(self.slowdowns), 1),
            p99_slowdown=_percentile(self.slowdowns, 0.99),
            migrations=self.migrations, migrations_per_job=self.migrations / max(n, 1),
            bytes_moved=self.bytes_moved, herd_events=sum(1 for c in self.herds.values() if c > 1),
            idle_hosts=self.idle_area / max(self.rounds, 1),
            peer_reads_per_round=self.reads / max(self.rounds, 1), policy_rounds=self.rounds,
            wall_s=time.perf_counter() - began, cpu_s=time.process_time() - cpu, jobs_on_hosts=on_hosts,
            jobs_in_flight=sum(1 for j in self.live.values() if j.host < 0))

    def hosts_of_jobs(self) -> dict[int, list[int]]:
        """Every job not completed -> the hosts holding it ([] while in flight). For the
        invariant that no job is on two hosts."""
        out: dict[int, list[int]] = {jid: [] for jid in self.live}
        for h in self.hosts:
            for jid in h.jobs:
                out.setdefault(jid, []).append(h.i)
        return out

    # --- processor sharing ------------------------------------------------------------------

    def _advance(self, h: _Host, t: float) -> None:
        dt = t - h.t_last
        if dt > 0:
            n = len(h.jobs)
            h.served += h.rate * dt
            h.area_n += n * dt
            h.area_busy += min(n, h.spec.cpus) * dt
            h.t_last = t

    def _reschedule(self, h: _Host, t: float) -> None:
        n = len(h.jobs)
        h.rate = h.spec.speed * min(1.0, h.spec.cpus / n) if n else 0.0
        h.epoch += 1
        heap = h.heap
        while heap and (heap[0][1] not in h.jobs or h.jobs[heap[0][1]].finish_s != heap[0][0]):
            heapq.heappop(heap)
        if heap:
            self._push(t + max(heap[0][0] - h.served, 0.0) / h.rate, DONE, h.i, h.epoch)

    def _join(self, j: _Job, i: int, t: float) -> None:
        h = self.hosts[i]
        self._advance(h, t)
        if j.host == -1 and j.job.id in self.live:
            j.arrived_here = t  # a migration's arrival
        self.live[j.job.id] = j
        j.host, j.finish_s = i, h.served + j.remaining
        h.jobs[j.job.id] = j
        h.mem_used += j.job.rss
        heapq.heappush(h.heap, (j.finish_s, j.job.id))
        self._reschedule(h, t)

    def _leave(self, h: _Host, jid: int) -> _Job:
        j = h.jobs.pop(jid)
        h.mem_used -= j.job.rss
        j.remaining = max(j.finish_s - h.served, 0.0)
        j.host = -1
        return j

    def _done(self, i: int, epoch: int, t: float) -> None:
        h = self.hosts[i]
        if epoch != h.epoch:
            return  # the host's jobs changed since this completion was scheduled
        self._advance(h, t)
        while h.heap and h.heap[0][0] <= h.served + 1e-9:
            fin, jid = heapq.heappop(h.heap)
            j = h.jobs.get(jid)
            if j is None or j.finish_s != fin:
                continue
            self._leave(h, jid)
            del self.live[jid]
            home = self.hosts[j.job.home].spec
            self.slowdowns.append((t - j.job.arrival) / (j.job.work / home.speed))
        self._reschedule(h, t)

    # --- rounds -----------------------------------------------------------------------------

    def _sample(self, h: _Host, t: float) -> HostLoad:
        self._advance(h, t)
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

    def _peers(self, h: _Host) -> list[_Host]:
        """The probed peers, plus any that offered to take work (an asked host reads its asker)."""
        idx = self.prober.peers(h.i)
        if h.state.offers:
            idx = [*idx, *(j for j in (self.index[o] for o in sorted(h.state.offers)) if j not in idx)]
        self.reads += len(idx)
        return [p for p in (self.hosts[j] for j in idx) if p.snapshot is not None]

    def _view(self, viewer: _Host, p: _Host) -> Peer:
        bw = self._bandwidth(viewer.spec, p.spec)
        v = p.views.get(bw)
        if v is None:
            v = p.views[bw] = Peer(p.snapshot, Link(p.spec.rtt_s, bw))  # type: ignore[arg-type]
        return v

    def _candidates(self, h: _Host, t: float) -> tuple[Candidate, ...]:
        n = len(h.jobs)
        share = min(1.0, h.spec.cpus / n) if n else 0.0
        out = []
        for j in h.jobs.values():
            done = j.job.work - (j.finish_s - h.served)
            # Positional: keyword construction is a tenth of a round here.
            out.append(Candidate(ProcessLoad(j.job.id, "job", (), "sim", share, done / h.spec.speed,
                                             j.job.rss, t - j.job.arrival, None, None, 0, 0),
                                 True, j.arrived_here))
        return tuple(out)

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
            out = step.step(h.state, step.Inputs(sample, tuple(self._view(h, p) for p in peers),
                                                 self._candidates(h, t)), h.settings)
            h.state = out.state
            if out.move:
                busy_until = self._move(h, out.decision.pid, out.decision.target, t)  # type: ignore[arg-type]
            elif out.ask is not None:
                asked = self.hosts[self.index[out.ask]]
                asked.state = asked.state.offered(h.spec.name, t)
        elif self.policy != "none":
            choice = self._baseline(h, [p.snapshot for p in peers], t)  # type: ignore[misc]
            if choice is not None:
                h.last_move_at = t
                busy_until = self._move(h, choice[0], choice[1], t)
        # The agent migrates inside its round: the next round starts when both are over.
        self._push(max(t + self.cfg.interval, busy_until), ROUND, i, 0)

    def _baseline(self, h: _Host, peers: list[HostLoad], t: float) -> tuple[int, str] | None:
        pc = self.cfg.policy
        if h.last_move_at is not None and t - h.last_move_at < pc.host_cooldown_s:
            return None
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
        self._advance(h, t)
        j = self._leave(h, jid)
        self._reschedule(h, t)
        down = self.strategy.downtime(j.job.rss, self._bandwidth(h.spec, there.spec), there.spec.rtt_s)
        self._push(t + down, MOVED, jid, ti)
        self.migrations += 1
        self.bytes_moved += j.job.rss
        self.herds[(ti, there.version)] += 1
        return t + down


def run(cfg: SimConfig, names: Sequence[str] = POLICIES) -> dict[str, Result]:
    """Every policy in `names` over the same cluster and jobs (drawn from cfg.seed)."""
    cfg.check()
    rng = random.Random(cfg.seed)
    cluster = workload.hosts(cfg.hosts, rng)
    arrivals = workload.jobs(cluster, cfg.load, cfg.duration, rng)
    return {name: Simulation(cfg, cluster, arrivals, name).run() for name in names}
