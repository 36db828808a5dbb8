"""The migrd agent: every `daemon.interval` seconds one round of

  sample this host's load and its opted-in processes -> publish the snapshot -> read the
  peers' snapshots -> policy.decide -> maybe migrate.migrate (one at a time) -> log the decision

plus the admin API (migrd.admin) and systemd's notify protocol (migrd.sdnotify).

Functional core: the round's logic is `step.step` (pure, shared with the simulator in
migrd/sim); `usable_peers`, `options_for`, `decision_dict`, `trimmed`, `parse_request` are pure
and unit-tested; `Agent` is the imperative shell (load sources, SSH, the filesystem, threads,
signals).

Modes (daemon.mode): offload pushes work away when this host is HIGH; fill never pushes on its
own, but a LOW host asks the busiest HIGH peer for work (`migrctl peer offer` over SSH, which
queues an offer with that peer's agent; its next round decides in fill mode with the asker as
the only target); consolidate packs work onto busier peers when this host is LOW. Offers are
honoured in every mode.

An automatic move executes the action the policy priced: "migrate with its data" copies the
process's open files with it (with_files on), a plain "migrate" copies none, so its data must
already be where the process goes (shared storage) or the target's precheck refuses. Files the
target sees as the very same file (shared storage) are never copied onto themselves. A
`migrctl run` workload's own output log travels with it anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from migrd.agent import admin, metrics
from migrd.adapters import exchange, load, memread, private, procinfo, registry, sdnotify, untrusted, workloads
from migrd.engine import census, journal, migration as migrate
from migrd.engine.subjects import SUBJECTS
from migrd.core import binding, candidates as candidates_core, costmodel, dirtyrate, peerset, policy, precheck, step
from migrd.config import Config
from migrd.model import PROCESS_TREE, Action, Candidate, Decision, HostLoad, Mode, Peer, Situation
from migrd.errors import ConfigError, InputError, MigrdError, RegistryError

log = logging.getLogger(__name__)
LOAD_SOURCES = ("system", "cgroup")


# --------------------------------------------------------------------------- pure core


def check_settings(cfg: Config) -> None:
    """Values the schema cannot check by type alone; the daemon refuses to start on these."""
    d = cfg.daemon
    where = f"{cfg.source or '<config>'}: key"
    if d.mode not in {m.value for m in Mode}:
        raise ConfigError(f"{where} 'daemon.mode': {d.mode!r} is not one of offload, fill, consolidate")
    if d.load_source not in LOAD_SOURCES:
        raise ConfigError(f"{where} 'daemon.load_source': {d.load_source!r} is not system or cgroup")
    if d.load_source == "cgroup" and not d.cgroup_dirs:
        raise ConfigError(f"{where} 'daemon.cgroup_dirs': load_source cgroup needs this host's cgroup dirs")
    if d.interval <= 0:
        raise ConfigError(f"{where} 'daemon.interval': must be > 0, not {d.interval}")
    try:
        peerset.Probe.parse(d.probe)
    except ValueError as e:
        raise ConfigError(f"{where} 'daemon.probe': {e}") from None
    if d.registry == "etcd":
        if d.etcd.ttl < 2:
            raise ConfigError(f"{where} 'daemon.etcd.ttl': must be >= 2 seconds, not {d.etcd.ttl}")
        if d.etcd.target_slots < 1:
            raise ConfigError(f"{where} 'daemon.etcd.target_slots': must be >= 1, not {d.etcd.target_slots}")
    dr = d.dirty_rate
    for key, value in (("budget_s", dr.budget_s), ("budget_bytes", dr.budget_bytes), ("pages", dr.pages),
                       ("every", dr.every)):
        if value <= 0:
            raise ConfigError(f"{where} 'daemon.dirty_rate.{key}': must be > 0, not {value}")
    if not 0 < d.metrics.port < 65536:
        raise ConfigError(f"{where} 'daemon.metrics.port': {d.metrics.port} is not a TCP port")


def usable_peers(views: Iterable[exchange.PeerView], now: float, stale_after: float,
                 full: frozenset[str] = frozenset()) -> tuple[Peer, ...]:
    """Peers with a fresh snapshot and a measured link; stale ones (dead agent) do not count, nor
    do targets whose reservation slots are all taken (`full`, etcd registry)."""
    return tuple(
        Peer(v.snapshot.load, v.link) for v in sorted(views, key=lambda v: v.name)
        if v.snapshot is not None and v.link is not None and now - v.snapshot.load.time <= stale_after
        and v.name not in full
    )


def options_for(d: Decision, candidates: Iterable[Candidate] = (), preference: tuple[str, ...] = (),
                peers: Iterable[Peer] = ()) -> migrate.Options | None:
    """The orchestrator's options for a decision (None: nothing to do): the action as it was
    priced, so the open files travel exactly when their bytes were counted (a container's data,
    its rootfs changes, travel with it anyway); the strategies tried in `preference`'s order;
    the link to the target and the candidate's dirty rate as the round knew them, so that
    `auto` decides on what the policy priced instead of measuring again."""
    if d.action is Action.STAY or d.target is None:
        return None
    c = next((c for c in candidates if c.proc.pid == d.pid), None)
    with_files = c is not None and c.subject.open_files and costmodel.data_travels(c, d.action, d.source)
    link = next((p.link for p in peers if p.load.host == d.target), None)
    return migrate.Options(target=d.target, mode="restart" if d.action is Action.RESTART_ELSEWHERE else "move",
                           with_files=with_files, preference=preference, link=link,
                           dirty_rate=c.dirty_rate if c is not None else None)


def decision_dict(d: Decision, now: float) -> dict[str, Any]:
    out = dataclasses.asdict(d)
    out["time"] = round(now, 3)
    return json.loads(json.dumps(out))  # enums -> their values


def trimmed(lines: list[str], limit: int) -> list[str]:
    """Bound the log: past `limit` records keep the newest half (rewrites stay rare)."""
    return lines if len(lines) <= limit else lines[-max(limit // 2, 1):]


# --------------------------------------------------------------------------- shell


class DecisionLog:
    """state_dir/decisions.jsonl: one JSON record per decision (and per move's outcome)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        try:
            self.count = len(path.read_text().splitlines())
        except FileNotFoundError:
            self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        private.private_dir(self.path.parent)
        with os.fdopen(private.open_private(self.path, os.O_WRONLY | os.O_APPEND), "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.count += 1
        if self.count > self.limit:
            kept = trimmed(self.path.read_text().splitlines(), self.limit)
            private.write_atomic(self.path, "".join(ln + "\n" for ln in kept), durable=False)
            self.count = len(kept)

    def records(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []


@dataclasses.dataclass(frozen=True)
class Request:
    """One admin request, checked: the operation and its arguments (unknown keys ignored)."""

    op: str
    #: explain: the candidate to explain (None: the last decision).
    pid: int | None = None
    #: explain: the container to explain, by name (instead of a PID).
    container: str | None = None
    #: history: the newest N migrations (0: all).
    limit: int = 50
    #: offer: the idle peer asking for work.
    requester: str | None = None


OPS = ("status", "hosts", "ps", "explain", "history", "pause", "resume", "offer")


def parse_request(raw: Any) -> Request:
    """Pure: a decoded admin request as a Request, or InputError saying what is wrong."""
    req = untrusted.build(Request, raw, InputError, "request")
    if req.op not in OPS:
        raise InputError(f"unknown operation {req.op!r} (known: {', '.join(OPS)})")
    if req.limit < 0:
        raise InputError(f"request: key 'limit': expected at least 0, got {req.limit}")
    if req.op == "offer" and req.requester is None:
        raise InputError("request: key 'requester' is missing")
    if req.pid is not None and req.container is not None:
        raise InputError("request: name a PID or a container, not both")
    return req


class Agent:
    def __init__(self, cfg: Config, env: dict[str, str] | None = None) -> None:
        check_settings(cfg)
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.host = cfg.host or socket.gethostname()
        d = cfg.daemon
        self.source = load.make_source(d.load_source, self.host, cgroup_dirs=d.cgroup_dirs,
                                       cpu_speed=d.cpu_speed)
        self.monitor = load.ProcessMonitor()
        self.census = census.ContainerCensus(cfg)
        #: Last round's sample of each container by name (its CPU rate).
        self.containers: dict[str, candidates_core.ContainerSample] = {}
        #: The candidates' dirty rates and half-done measurements (monotonic clock); replaced,
        #: never mutated, so the admin thread reads a consistent one.
        self.dirty = dirtyrate.Tracker()
        #: Each container's processes by name, from the last census (a container's rate is theirs).
        self.members: dict[str, frozenset[int]] = {}
        dr = d.dirty_rate
        self.dirty_budget = dirtyrate.Budget(dr.budget_bytes, dr.pages, dr.every)
        self.peers = registry.make(cfg, self.host)
        self.metrics = metrics.Metrics()
        self.decisions = DecisionLog(cfg.state_dir / "decisions.jsonl", d.max_decisions_log)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        # The policy prices a move's freeze against the downtime its migrations aim at, with
        # the round limit they pre-copy with.
        self.settings = step.Settings(self.host, d.mode, d.interval,
                                      dataclasses.replace(cfg.policy, downtime_target=cfg.migrate.downtime_target,
                                                          precopy_rounds=cfg.migrate.precopy_rounds))
        self.state = step.State()
        #: PID -> when its move last failed: cooled down as if it had moved (after_failures).
        self.failed: dict[int, float] = {}
        self.paused = False
        self.situation: Situation | None = None
        self.decision: Decision | None = None
        self.in_flight: dict[str, Any] | None = None
        self.rounds = 0
        self.started = time.time()
        self.server: admin.Server | None = None
        self.watchdog = sdnotify.watchdog_seconds(self.env)

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Recover unfinished migrations, open the admin socket, tell systemd we are ready."""
        try:
            for r in migrate.recover(self.cfg):
                why = f" ({r['corrupt']})" if "corrupt" in r else ""
                log.warning("recover %s: %s%s", r["id"], r["action"], why)
        except MigrdError as e:  # the agent must still start (and answer `migrctl status`)
            log.error("recover failed: %s", e)
        except Exception:
            log.exception("recover failed")
        self.server = admin.Server(self.cfg.daemon.socket, self.handle)
        self.server.start()
        self.metrics.serve(self.cfg.daemon.metrics)
        sdnotify.notify(self.env, READY=1, STATUS=f"migrd agent on {self.host}: {self.cfg.daemon.mode}")

    def close(self) -> None:
        sdnotify.notify(self.env, STOPPING=1)
        if self.server is not None:
            self.server.close()
        self.peers.close()
        self.metrics.close()

    def run(self, once: bool = False) -> None:
        """Rounds until SIGTERM/SIGINT (or one round with once). A signal during a migration
        lets it finish (or roll back): the orchestrator is never interrupted half-way."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        self.start()
        try:
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    self.round()
                except MigrdError as e:
                    log.error("round failed: %s", e)
                except Exception as e:  # a bug; the next round may well work, dying helps nobody
                    log.error("round failed unexpectedly: %s: %s", type(e).__name__, e)
                    log.debug("round failed unexpectedly", exc_info=True)
                self._ping()
                if once:
                    break
                self._sleep_until(began + self.cfg.daemon.interval)
        finally:
            self.close()

    def _ping(self) -> None:
        if self.watchdog:
            sdnotify.notify(self.env, WATCHDOG=1)

    def _sleep_until(self, deadline: float) -> None:
        # Wake at least three times per watchdog period to ping it.
        tick = self.watchdog / 3 if self.watchdog else None
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.stop.wait(min(left, tick) if tick else left)
            self._ping()

    @contextlib.contextmanager
    def _pinging(self) -> Iterator[None]:
        """Keep the watchdog fed while a migration blocks the loop, but not forever: a migration
        hung past a few op timeouts gets the agent restarted (and recovered)."""
        if not self.watchdog:
            yield
            return
        done = threading.Event()
        limit = time.monotonic() + 4 * self.cfg.ssh.op_timeout

        def feed() -> None:
            while not done.wait(self.watchdog / 3) and time.monotonic() < limit:  # type: ignore[operator]
                self._ping()

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    # --- one round ----------------------------------------------------------------------

    def round(self) -> Decision:
        sample = self.source.sample()
        now = sample.time
        # This round's probe set (daemon.probe), and any peer that offered to take work.
        read = self.peers.poll(now, tuple(self.state.offers))
        views = self.peers.views()
        peers = usable_peers((v for v in views if v.name in read), now, self.cfg.daemon.peer_stale_after,
                             self.peers.full_targets())
        self.failed = {pid: t for pid, t in self.failed.items() if now - t < self.settings.policy.process_cooldown_s}
        candidates = self.measure(candidates_core.after_failures(self._candidates(), self.failed), sample)
        with self.lock:  # offers arrive from the admin thread
            out = step.step(self.state, step.Inputs(sample, peers, candidates, self.paused), self.settings)
            self.state, self.situation, self.decision = out.state, out.situation, out.decision
            self.rounds += 1
        d = out.decision
        self.peers.publish(exchange.Snapshot(sample, d.level.value, os.getpid()))
        self.metrics.round(d.action.value, [sample, *(v.snapshot.load for v in views if v.snapshot)],
                           self.peers.errors())
        record = decision_dict(d, now)
        if out.skipped:
            record["skipped"] = out.skipped
        opts = options_for(d, out.situation.candidates, self.cfg.daemon.strategies,
                           out.situation.peers) if out.move else None
        if opts is None:
            self.decisions.append(record)
            if out.ask is not None:
                self._ask(out.ask, now)
            return d
        self._act(d, opts, record)
        return d

    def _act(self, d: Decision, opts: migrate.Options, record: dict[str, Any]) -> None:
        assert d.pid is not None
        ref = d.subject or PROCESS_TREE
        what = ref.label(d.pid, d.name)
        with self.lock:
            self.in_flight = {"pid": d.pid, "name": d.name, "what": what, "target": d.target, "since": time.time()}
        began = time.monotonic()
        try:
            # The target's reservation (etcd registry) is held from before the precheck to the end.
            with self.peers.reserve(opts.target, registry.ident(self.host, d.pid)), self._pinging():
                out = migrate.migrate_subject(self.cfg, ref, d.pid, opts)
            record["migration"] = {"id": out.id, "outcome": "ok", "target_pid": out.target_pid,
                                   "downtime": out.downtime}
            self.metrics.migration("ok", metrics.strategy(out.mode, out.strategy), time.monotonic() - began,
                                   out.downtime, out.bytes)
            log.warning("moved %s to %s as PID %s", what, d.target, out.target_pid)
        except RegistryError as e:  # target full (ReservationRefused) or etcd away
            record["migration"] = {"outcome": "not_reserved", "error": str(e)}
            self.metrics.migration("not_reserved", metrics.strategy(opts.mode, None))
            log.warning("not moving %s to %s: %s", what, d.target, e)
        except MigrdError as e:
            self.failed[d.pid] = time.time()
            record["migration"] = {"outcome": "failed", "error": str(e)}
            self.metrics.migration("failed", metrics.strategy(opts.mode, None), time.monotonic() - began)
            log.error("moving %s to %s failed: %s", what, d.target, e)
        finally:
            with self.lock:
                self.in_flight = None
            self.decisions.append(record)

    def _candidates(self) -> tuple[Candidate, ...]:
        """Opted-in processes and every container of this host; no process of a container is
        a process candidate (the container is the unit)."""
        seen = self.census.take()
        inside = candidates_core.members(seen.samples, seen.inside)
        reg = {w.pid: w for w in workloads.Registry(self.cfg.state_dir).all() if w.alive()}
        pids = [p for p in reg if p not in inside]
        m = self.cfg.migrate
        if m.allow_users or m.allow_commands or m.allow_cgroups:
            pids += [p for p in self._host_pids() if p not in reg and p not in inside and self._allowed(p)]
        out = candidates_core.build(self.monitor.sample(pids), {p: w.arrived for p, w in reg.items()},
                                    seen.samples, self.containers, self._allow, inside)
        self.containers = {c.name: c for c in seen.samples}
        self.members = {c.name: c.members for c in seen.samples}
        return out

    def measure(self, cands: tuple[Candidate, ...], sample: HostLoad) -> tuple[Candidate, ...]:
        """The candidates with their dirty rates: this round's share of sampling (at most
        daemon.dirty_rate.budget_s of reads, none on a host the policy would not move from)."""
        dr = self.cfg.daemon.dirty_rate
        if not dr.enabled:
            return cands
        now = time.monotonic()
        todo = dirtyrate.targets(cands, self.members)
        tracker = dirtyrate.keep(self.dirty, (t.key for t in todo), now, self.dirty_budget)
        with self.lock:
            level, offers = self.state.level, bool(self.state.offers)
        if dirtyrate.worth_measuring(self.cfg.daemon.mode, level, sample, offers, self.settings.policy):
            deadline = now + dr.budget_s
            for read in dirtyrate.plan(tracker, todo, now, self.dirty_budget):
                digests = memread.sample(read.pids, read.stride, read.phase, deadline)
                if digests is None:
                    break  # out of this round's time: the rest waits for the next round
                tracker = dirtyrate.record(tracker, read, digests, time.monotonic())
        self.dirty = tracker
        return dirtyrate.apply(cands, tracker)

    def _dirty_view(self, c: Candidate) -> dict[str, Any]:
        """A candidate's measured dirty rate for ps and explain (None: not measured)."""
        r = self.dirty.rates.get(dirtyrate.key_of(c))
        if r is None:
            return {"dirty_rate": None, "dirty_rate_age_s": None, "dirty_rate_samples": 0}
        return {"dirty_rate": round(r.bytes_per_s), "dirty_rate_age_s": round(time.monotonic() - r.at, 1),
                "dirty_rate_samples": r.samples}

    def _allow(self, cmdline: tuple[str, ...], user: str, cgroups: Sequence[str]) -> str | None:
        return precheck.allowed(self.cfg.migrate, cmdline, user, list(cgroups), False)

    def _host_pids(self) -> list[int]:
        if self.cfg.daemon.load_source == "cgroup":
            pids = sorted(load._cgroup_pids(self.cfg.daemon.cgroup_dirs))
        else:
            pids = psutil.pids()
        return [p for p in pids if p not in (1, os.getpid())]

    def _allowed(self, pid: int) -> bool:
        try:
            p = psutil.Process(pid)
            cmdline = tuple(p.cmdline())
            if not cmdline:
                return False  # kernel thread
            user = p.username()
        except (psutil.Error, OSError, KeyError):
            return False
        return self._allow(cmdline, user, procinfo.cgroup_paths(pid)) is not None

    def _ask(self, src: str, now: float) -> None:
        """Fill mode: ask the busy peer `src` for work (the step spaces asks by the host cooldown)."""
        ok, why = self.peers.ask_for_work(src, self.host)
        self.decisions.append({"time": round(now, 3), "asked": src, "ok": ok, **({"error": why} if not ok else {})})

    # --- admin API ----------------------------------------------------------------------

    def handle(self, raw: dict[str, Any]) -> Any:
        req = parse_request(raw)
        return getattr(self, f"op_{req.op}")(req)

    def op_status(self, req: Request) -> dict[str, Any]:
        with self.lock:
            d = self.decision
            return {"host": self.host, "pid": os.getpid(), "mode": self.cfg.daemon.mode,
                    "level": self.state.level.value, "paused": self.paused, "rounds": self.rounds,
                    "uptime_s": round(time.time() - self.started, 1),
                    "last_decision": decision_dict(d, self.situation.now) if d and self.situation else None,
                    "explain": policy.explain(d) if d else None, "in_flight": self.in_flight,
                    "offers": sorted(self.state.offers), "registry": self.peers.health()}

    def op_hosts(self, req: Request) -> list[dict[str, Any]]:
        now = time.time()
        with self.lock:
            own = self.state.history[-1] if self.state.history else None
            rows = [{"name": self.host, "self": True, "level": self.state.level.value,
                     "age_s": round(now - own.time, 3) if own else None,
                     "load": own.to_dict() if own else None, "link": None, "error": None}]
        return rows + [{"self": False, **v.to_dict(now)} for v in self.peers.views()]

    def _last(self) -> Situation:
        with self.lock:
            sit = self.situation
        if sit is None:
            raise MigrdError("the agent has not finished its first round yet")
        return sit

    def _alone(self, sit: Situation, c: Candidate) -> Decision:
        """The decision as if c were the only candidate: its own score and reasons."""
        mode = sit.mode if sit.requester or step.own_mode(self.cfg.daemon.mode) else Mode.OFFLOAD
        return policy.decide(dataclasses.replace(sit, candidates=(c,), mode=mode), self.settings.policy)

    def op_ps(self, req: Request) -> list[dict[str, Any]]:
        sit = self._last()
        rows = []
        for c in sit.candidates:
            d = self._alone(sit, c)
            rows.append({"pid": c.proc.pid, "name": c.proc.name, "subject": dataclasses.asdict(c.subject),
                         "opted_in": c.opted_in, "cmdline": list(c.proc.cmdline),
                         "cpu_share": round(c.proc.cpu_share, 3), "rss": c.proc.rss_bytes,
                         "age_s": round(c.proc.age_s, 1), "last_migrated": c.last_migrated,
                         "action": d.action.value, "target": d.target,
                         "gain": round(d.estimate.gain, 2) if d.estimate else None,
                         "reason": d.reasons[-1] if d.reasons else None, **self._dirty_view(c)})
        return rows

    def op_explain(self, req: Request) -> dict[str, Any]:
        pid = req.pid
        if pid is None and req.container is None:
            with self.lock:
                d, sit = self.decision, self.situation
            if d is None or sit is None:
                raise MigrdError("the agent has not finished its first round yet")
            c = next((c for c in sit.candidates if c.proc.pid == d.pid), None) if d.pid is not None else None
        else:
            sit = self._last()
            if req.container is not None:
                c = next((c for c in sit.candidates if c.subject.name == req.container), None)
                if c is None:
                    raise InputError(f"container {req.container} is not a candidate on {self.host} "
                                     f"(not running here, or gone)")
            else:
                c = next((c for c in sit.candidates if c.proc.pid == pid), None)
                if c is None:
                    raise InputError(f"PID {pid} is not a migration candidate on {self.host} (not opted "
                                     f"in, not running here, or gone)")
            d = self._alone(sit, c)
        rows = self._resources(d)
        text = policy.explain(d)
        dirty = self._dirty_view(c) if c is not None else None
        if c is not None:
            text += f"\n{dirtyrate.describe(self.dirty.rates.get(dirtyrate.key_of(c)), time.monotonic())}"
        if rows:
            text += ("\nresources (binding, attachment to the host, what the move does):\n"
                     + "\n".join(f"  {r}" for r in binding.table(rows)))
        return {"decision": decision_dict(d, sit.now), "text": text, "dirty": dirty,
                "resources": [dataclasses.asdict(r) for r in rows]}

    def _resources(self, d: Decision) -> tuple[binding.Resource, ...]:
        """What the decided move would do with each resource of the process (none for stay)."""
        opts = options_for(d)
        if opts is None or d.pid is None:
            return ()
        ref = d.subject or PROCESS_TREE
        try:
            subject = SUBJECTS[ref.kind].locate(self.cfg, ref, d.pid)
        except MigrdError:
            return ()  # gone or not inspectable since the round: nothing to show
        _, stdout = subject.workload(self.cfg)
        shape = binding.MoveShape(mode=opts.mode, carried=binding.carried(subject.info, opts.with_files, stdout))
        return subject.resources(shape)

    def op_history(self, req: Request) -> list[dict[str, Any]]:
        why = {r["migration"]["id"]: r["reasons"] for r in self.decisions.records()
               if r.get("migration", {}).get("id")}
        rows = []
        for j in journal.all_journals(self.cfg.state_dir)[-req.limit:]:
            s = dataclasses.asdict(journal.summarize(j))
            s["decision_reasons"] = why.get(s["id"])
            rows.append(s)
        return rows

    def op_pause(self, req: Request) -> dict[str, Any]:
        with self.lock:
            self.paused = True
        return {"paused": True}

    def op_resume(self, req: Request) -> dict[str, Any]:
        with self.lock:
            self.paused = False
        return {"paused": False}

    def op_offer(self, req: Request) -> dict[str, Any]:
        requester = str(req.requester)
        self.cfg.peer(requester)  # unknown host -> InputError
        if requester == self.host:
            raise InputError("an agent cannot offer itself work")
        with self.lock:
            self.state = self.state.offered(requester, time.time())
        return {"queued": requester}
