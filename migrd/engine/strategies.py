"""How a migration moves memory: the strategy port.

A strategy is an object with named phases. `forward` runs the phases up to and through the
switch, each opened with `run.begin(STEP)` (journaled, then failpoints and stop requests
honoured, then the step runs), using the phase helpers of the driver (`Migration`). Where a
strategy's point of no return lies, how the source is ended at the commit and how it comes
back on a rollback are the strategy's too, so the driver, the journal and recovery treat every
strategy alike. The journal records the strategy's name; recovery rebuilds the same object.

The registry is `STRATEGIES`; `migrctl migrate --strategy NAME` picks one, otherwise the first
available one of `migrate.strategies` (the config's preference list) runs. P.Haul's "haulers"
and its iteration driver with named loop limits are the model (phaul/iters.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from migrd.adapters import netaddr, untrusted, workloads
from migrd.adapters.criu import find_criu
from migrd.config import Config
from migrd.engine import lazy
from migrd.engine.peerclient import Restored
from migrd.errors import MigrdError, PeerProtocolError, WorkloadLost
from migrd.model import Link, ProcessInfo

if TYPE_CHECKING:  # the driver imports this module
    from migrd.core.precopy import Decision, Round
    from migrd.core.precopy import Limits as PrecopyLimits
    from migrd.engine.checkpoint import Parent
    from migrd.engine.precopy import Pusher
    from migrd.engine.migration import Migration, Options
    from migrd.engine.peerclient import Target

ProgressFn = Callable[[int, int], None]


class Strategy(ABC):
    name: ClassVar[str]
    #: The trade-off, one sentence (shown by --help, `migrctl check` and the README).
    summary: ClassVar[str]
    #: Steps after which the workload may run on the target: from here on a failure leaves the
    #: migration in doubt and recovery rolls forward, never back.
    point_of_no_return: ClassVar[str] = "commit"
    #: True when the dump leaves the source stopped (not ended) until the commit.
    keeps_source_stopped: ClassVar[bool] = False

    def unavailable(self, info: ProcessInfo, opts: Options, cfg: Config) -> str | None:
        """Why this strategy cannot move `info` with `opts` (None: it can)."""
        return None

    @abstractmethod
    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        """Every phase from the checkpoint through the commit."""

    @staticmethod
    def source_stays_unavailable(info: ProcessInfo, opts: Options) -> str | None:
        """Why the source cannot wait stopped (not ended) until the commit."""
        if opts.mode != "move":
            return f"it moves, and --mode {opts.mode} keeps or restarts the source"
        if not info.own_pid_namespace:
            # A stopped source keeps its PIDs: a clash on hosts that share one PID space.
            return "the process is not the init of its own PID namespace (start it with `migrctl run`)"
        if opts.tcp_established:
            # The stopped source's sockets would stay in repair mode behind CRIU's network lock.
            return "--tcp-established needs the source ended by the dump"
        return None

    def end_source(self, run: Migration) -> None:
        """At the commit, before the target's copy runs: make sure the source cannot run."""
        if self.keeps_source_stopped and run.opts.mode == "move":
            # A stopped task with SIGKILL pending never runs again, so freeing its memory need
            # not delay the target (grace 0); `reap_source` waits for it after.
            workloads.end(*run.source, grace=0)

    def reap_source(self, run: Migration) -> None:
        if self.keeps_source_stopped and run.opts.mode == "move":
            workloads.end(*run.source)

    def bring_back(self, run: Migration, states: list[str]) -> int | None:
        """On a rollback: make the source run here again. Returns the PID of a new local copy
        (None when the original runs on, or never stopped)."""
        if "checkpoint" not in states or "target_unclean" in states or run.opts.mode == "clone":
            # After target_unclean the local side was undone already (the source's PID and start
            # time no longer name the copy a local restore made).
            return None
        if run.source_alive():
            if self.keeps_source_stopped:
                workloads.resume(*run.source)
            return None
        return run.restore_locally()


class StopCopy(Strategy):
    """Freeze, dump to disk here, send the images, restore there."""

    name = "stop-copy"
    summary = ("freeze, dump to disk here, send, restore there: works for every process, and the "
               "whole memory crosses while it is frozen")

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        self.switch(run, target, progress, strategy=self.name)

    @staticmethod
    def switch(run: Migration, target: Target, progress: ProgressFn | None,
               parent: Parent | None = None, **figures: Any) -> None:
        """The freeze through the commit. parent: the CRIU pre-dump the dump leans on (then
        only the pages written since it are dumped and sent). figures: for the journal."""
        with run.prepare_switch(target) as switch:  # the target waits before the freeze
            run.begin("checkpoint", **figures)
            called = time.time()
            ck = run.dump(leave_stopped=False, page_server_fd=None, parent=parent)
            run.begin("transfer", **ck.figures(called), page_bytes=0, nft_tables=run.dump_tables())
            run.release_address()
            moved, stats = run.send_after_freeze(switch, progress)
            run.begin("restore", bytes=stats.bytes + moved, transfer_seconds=round(stats.seconds, 4))
            run.restore_there(target, switch.restoring, page_bytes=None)


class StreamCopy(Strategy):
    """Stop-and-copy whose pages cross during the dump (migrd/engine/pagestream.py)."""

    name = "stream-copy"
    summary = ("freeze and stream the pages to the target while CRIU dumps them: the copy overlaps "
               "the dump; the source stays stopped (not ended) until the commit")
    keeps_source_stopped = True

    def unavailable(self, info: ProcessInfo, opts: Options, cfg: Config) -> str | None:
        return self.source_stays_unavailable(info, opts)

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        # The target's page server and restore are up (their sessions and Pythons started)
        # before the freeze.
        with run.prepare_switch(target, pages=True, progress=progress) as switch:
            run.begin("checkpoint", strategy=self.name, streamed=True)
            assert switch.pages is not None
            with switch.pages as pages:
                called = time.time()
                ck = run.dump(leave_stopped=True, page_server_fd=pages.criu_fd)
                page_bytes = pages.finish(run.cfg.ssh.op_timeout)
            run.begin("transfer", **ck.figures(called, page_bytes), page_bytes=page_bytes,
                      nft_tables=run.dump_tables())
            run.release_address()
            moved, stats = run.send_after_freeze(switch, progress)
            run.begin("restore", bytes=stats.bytes + moved + page_bytes, transfer_seconds=round(stats.seconds, 4))
            run.restore_there(target, switch.restoring, page_bytes=page_bytes)


class Restart(Strategy):
    """Weak mobility (--mode restart): end the process here, start the same command line,
    directory and environment fresh there. Not selectable with --strategy: the mode asks for it.
    Ending first keeps "never two copies"; a failure after it starts the command fresh here
    again (restart mode gives up execution state anyway)."""

    name = "restart"
    summary = "end it here and start the same command fresh there: only code and data travel"

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        info = run.info
        run.begin("checkpoint", strategy=self.name)
        # SIGTERM first, then SIGKILL: a PID namespace's init ignores SIGTERM unless it handles it.
        workloads.end(info.pid, info.start_time, (signal.SIGTERM, signal.SIGKILL), grace=2.0)
        run.begin("transfer")
        sink = target.files_sink() if run.data["carry"] else None
        try:
            moved = run.send_carried(sink)
        finally:
            if sink is not None:
                sink.close()
        run.begin("restore", bytes=moved)
        r = target.start(info.cmdline, info.cwd, info.environ, run.data.get("workload"), workloads.user_of(info.uid))
        run.begin("verify", target_pid=r.pid)
        run.verify(target, ports=False)
        run.begin("commit")
        run.commit(target)

    def bring_back(self, run: Migration, states: list[str]) -> int | None:
        if "checkpoint" not in states or "target_unclean" in states or run.source_alive():
            return None
        return run.start_locally()


class PostCopy(Strategy):
    """Restore there before the memory arrives: CRIU's lazy pages over SSH (migrd/engine/lazy.py).
    The point of no return is the resume there; until the last page arrived the copy depends on
    the source's CRIU serving its memory, and a failure then loses the workload (reported)."""

    name = "postcopy"
    summary = ("freeze, send only the small images, resume there at once and fetch the memory after: "
               "downtime nearly flat in memory size, but until the last page arrives the copy needs "
               "the source")
    keeps_source_stopped = True

    def unavailable(self, info: ProcessInfo, opts: Options, cfg: Config) -> str | None:
        return self.source_stays_unavailable(info, opts) or find_criu(cfg).lazy_unready()

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        def verify(seen: dict[str, Any]) -> None:
            st = untrusted.build(Restored, seen, PeerProtocolError, f"{target.name}: peer lazy")
            if not st.cmdline:
                # /proc/PID/cmdline reads the copy's stack, whose page may not have arrived:
                # the images were checked against the manifest, alive and ports still are.
                st = dataclasses.replace(st, cmdline=run.info.cmdline)
            run.verify(target, seen=st)

        def dumped() -> dict[str, Any]:
            tables = run.dump_tables()
            run.release_address()
            return {"nft_tables": tables}

        pid, start_time = run.source
        d = run.data
        sink = target.files_sink() if d["carry"] else None  # started before the freeze
        try:
            lazy.move(run.cfg, target.conn, pid, start_time, run.images, run.j.id, run.begin, run.j.record,
                      name=d.get("workload"), stdout=d.get("stdout"), address=run.opts.move_address,
                      send_carried=lambda: run.send_carried(sink), pass_fds=(run.lock_fd,), verify=verify,
                      dumped=dumped)
        except WorkloadLost:
            with contextlib.suppress(MigrdError):
                # Its record of the loss, heard; once it has finished ending its copy.
                deadline = time.monotonic() + run.cfg.ssh.op_timeout
                while target.status().busy and time.monotonic() < deadline:
                    time.sleep(0.2)
                target.abort(run.opts.move_address, [])
            raise
        finally:
            if sink is not None:
                sink.close()
        # Every page is there: what the driver's commit does after the resume.
        self.reap_source(run)
        for table in run.data.get("nft_tables", []):
            netaddr.nft_delete(table)
        if d.get("workload"):
            workloads.Registry(run.cfg.state_dir).remove(d["workload"])
        run.drop_images()
        run.j.record("done", outcome="ok")


class PreCopy(Strategy):
    """Memory crosses while the workload runs, round after round of what changed, until the
    stop rule (migrd/core/precopy.py) predicts a short enough freeze; then a dump of what the
    target still lacks. The rounds find changed pages with CRIU's pre-dumps where the kernel
    tracks soft-dirty pages (migrd/engine/predump.py), else by content on any kernel
    (migrd/engine/precopy.py): `migrate.dirty_tracking`. The dump ends the source, as
    stop-copy's does: rollback restores it here."""

    name = "precopy"
    summary = ("send the memory while it runs, then what changed, then freeze and send only what "
               "the target lacks: the freeze is the dump and the last changes")

    def unavailable(self, info: ProcessInfo, opts: Options, cfg: Config) -> str | None:
        return tracking(cfg)[1]

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        with self.rounds(run, target) as rounds_port:
            rounds, decision = precopy_rounds(run, rounds_port)
            rounds_port.switch(run, target, progress, **round_figures(rounds, decision))

    def rounds(self, run: Migration, target: Target) -> contextlib.AbstractContextManager[Rounds]:
        """The rounds' way of finding changed pages, journaled with what the kernel offers."""
        way, why = tracking(run.cfg)
        if way is None:
            raise MigrdError(f"cannot pre-copy: {why}")
        run.begin("precopy", strategy=self.name, dirty_tracking=way)
        return ROUNDS[way].opened(run, target)


class Rounds(ABC):
    """How pre-copy's rounds find and send the pages that changed, and how its switch sends
    what the target still lacks."""

    @classmethod
    @abstractmethod
    def opened(cls, run: Migration, target: Target) -> contextlib.AbstractContextManager[Rounds]:
        """Ready for round 1; closed after the switch."""

    @abstractmethod
    def round(self, number: int) -> Round:
        """One round while the workload runs."""

    @abstractmethod
    def switch(self, run: Migration, target: Target, progress: ProgressFn | None, **figures: Any) -> None:
        """The freeze through the commit."""


class ContentRounds(Rounds):
    """Pages read from the running process and compared by content (any kernel); the switch
    sends only the dump's pages whose content the target lacks (migrd/engine/precopy.py)."""

    def __init__(self, run: Migration, pusher: Pusher) -> None:
        self.run = run
        self.pusher = pusher

    @classmethod
    @contextlib.contextmanager
    def opened(cls, run: Migration, target: Target) -> Iterator[Rounds]:
        with target.precopy() as pusher:
            yield cls(run, pusher)

    def round(self, number: int) -> Round:
        info = self.run.info
        return self.pusher.round(info.tree_ids or (info.pid,), number, carried(self.run))

    def switch(self, run: Migration, target: Target, progress: ProgressFn | None, **figures: Any) -> None:
        from migrd.engine import precopy as precopy_mod

        pusher = self.pusher
        # The carried files go with the pages (read ahead in the rounds), not on a files session.
        with run.prepare_switch(target, files=False) as switch:
            run.begin("checkpoint", **figures)
            called = time.time()
            ck = run.dump(leave_stopped=False, page_server_fd=None)
            run.begin("transfer", **ck.figures(called), page_bytes=0, nft_tables=run.dump_tables())
            run.release_address()
            rest = run.j.dir / "images.rest"
            try:
                files = precopy_mod.split_images(run.images, rest)
                stats = switch.images.send(rest, progress)
                final = pusher.final(files, carried(run))
            finally:
                shutil.rmtree(rest, ignore_errors=True)
            run.begin("restore", bytes=stats.bytes + final.carried_bytes + pusher.wire,
                      transfer_seconds=round(stats.seconds + final.seconds, 4),
                      final_page_bytes=final.page_bytes, final_sent_bytes=final.sent, final_wire_bytes=final.wire,
                      carried_bytes=final.carried_bytes)
            run.restore_there(target, switch.restoring, page_bytes=final.page_bytes)


class PreDumpRounds(Rounds):
    """CRIU's pre-dumps on a soft-dirty kernel, each sent whole to the target; the switch is a
    stop-and-copy whose dump holds only the pages written since the last pre-dump
    (migrd/engine/predump.py). The carried files go after the freeze, as stop-copy's do."""

    def __init__(self, run: Migration, target: Target) -> None:
        self.run = run
        self.target = target
        self.depth = 0
        self._last_start: float | None = None

    @classmethod
    @contextlib.contextmanager
    def opened(cls, run: Migration, target: Target) -> Iterator[Rounds]:
        yield cls(run, target)

    def round(self, number: int) -> Round:
        from migrd.adapters import private
        from migrd.core import precopy
        from migrd.engine import predump

        run = self.run
        start = time.monotonic()
        interval = start - self._last_start if self._last_start is not None else 0.0
        self._last_start = start
        here = predump.round_dir(private.private_dir(run.pre_dumps), number)
        run.subject.pre_dump(run.cfg, here, predump.round_parent(number), run.opts.tcp_established)
        with self.target.image_sink(predump.remote_round_dir(run.remote_images, number)) as sink:
            stats = sink.send(here)
        self.depth = number
        return precopy.Round(changed=predump.page_bytes(here), sent=stats.bytes,
                             seconds=time.monotonic() - start, interval=interval)

    def switch(self, run: Migration, target: Target, progress: ProgressFn | None, **figures: Any) -> None:
        from migrd.engine import predump

        StopCopy.switch(run, target, progress, parent=predump.final_parent(self.depth), **figures)


#: The ways rounds find changed pages, by migrd.core.precopy.TRACKING name.
ROUNDS: dict[str, type[Rounds]] = {"criu": PreDumpRounds, "content": ContentRounds}


def tracking(cfg: Config) -> tuple[str | None, str | None]:
    """How pre-copy finds changed pages here: (way, None) or (None, why it cannot run)."""
    from migrd.core import precopy

    setting = cfg.migrate.dirty_tracking
    soft_dirty = setting != "content" and find_criu(cfg).has_feature("mem_dirty_track")
    return precopy.dirty_tracking(setting, soft_dirty)


def round_figures(rounds: list[Round], decision: Decision) -> dict[str, Any]:
    """What the rounds did and why they stopped, for the journal."""
    return {"rounds": len(rounds), "round_sent_bytes": sum(r.sent for r in rounds),
            "round_seconds": round(sum(r.seconds for r in rounds), 4),
            "stop_reason": decision.reason, "predicted_freeze": decision.predicted_freeze,
            "diverging": decision.diverging,
            "dirty_rate": round(decision.dirty_rate) if decision.dirty_rate is not None else None}


class Hybrid(PreCopy):
    """Pre-copy's rounds, then the stop rule's prediction picks the switch: a brief
    stop-and-copy of what is still dirty (as `precopy`) when it meets the downtime target,
    else post-copy (`postcopy`). The journal's `hybrid_switch` says which; the source is then
    ended and brought back as that strategy does it."""

    name = "hybrid"
    summary = ("pre-copy rounds, then a brief stop-and-copy if the predicted freeze meets the "
               "downtime target, else post-copy")

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        from migrd.core import precopy

        postcopy = ALL["postcopy"]
        with self.rounds(run, target) as rounds_port:
            rounds, decision = precopy_rounds(run, rounds_port)
            way = precopy.hybrid_switch(decision, precopy_limits(run.cfg),
                                        postcopy.unavailable(run.info, run.opts, run.cfg) is None)
            run.j.record("switch", hybrid_switch=way, rounds=len(rounds), stop_reason=decision.reason,
                         predicted_freeze=decision.predicted_freeze)
            if way == "stop-copy":
                rounds_port.switch(run, target, progress, **round_figures(rounds, decision))
                return
        # Post-copy moves every page itself: what the rounds sent is not used (the lazy-pages
        # daemon serves pages from the source only).
        postcopy.forward(run, target, progress)

    def _way(self, run: Migration) -> Strategy:
        return ALL["postcopy"] if run.data.get("hybrid_switch") == "postcopy" else ALL["precopy"]

    def end_source(self, run: Migration) -> None:
        self._way(run).end_source(run)

    def reap_source(self, run: Migration) -> None:
        self._way(run).reap_source(run)

    def bring_back(self, run: Migration, states: list[str]) -> int | None:
        return self._way(run).bring_back(run, states)


def carried(run: Migration) -> list[Path]:
    """The files this migration copies to the target (its stdout log, --with-files)."""
    return [Path(p) for p in run.data["carry"]]


def precopy_limits(cfg: Config) -> PrecopyLimits:
    """Pre-copy's stop rule as the config sets it, for the rounds and hybrid's switch (`auto`'s
    forecast builds the same limits from MoveFacts, which carries the same two settings)."""
    from migrd.core import precopy

    return precopy.Limits(max_rounds=cfg.migrate.precopy_rounds, downtime_target=cfg.migrate.downtime_target)


def precopy_rounds(run: Migration, rounds_port: Rounds) -> tuple[list[Round], Decision]:
    """Rounds while the workload runs, until the stop rule says switch. Each round can be made
    to fail (or the orchestrator to die) with the failpoint `roundN`."""
    from migrd.core import choice, precopy
    from migrd.engine import failpoints

    info = run.info
    limits = precopy_limits(run.cfg)
    rule = precopy.STOP_RULES[run.cfg.migrate.precopy_stop_rule]
    fixed = choice.precopy_fixed(info.rss, run.cfg.policy.move_rates)
    rounds: list[Round] = []
    while True:
        failpoints.point(f"round{len(rounds) + 1}")
        rounds.append(rounds_port.round(len(rounds) + 1))
        decision = rule.decide(rounds, limits, memory=info.rss, fixed=fixed,
                               fallback_bandwidth=precopy.ASSUMED_BANDWIDTH)
        if decision.stop:
            return rounds, decision


#: Pages `auto` samples to measure the dirty rate: a workload rewriting 40 MiB/s changes ~1 % of a
#: GiB in the 0.25 s window, ~80 of these pages, enough for a rate within ~10 %; more only costs
#: time before the move.
AUTO_SAMPLE_PAGES = 8192


class Auto(Strategy):
    """Measures, then runs the strategy migrd/core/choice.py picks: the link (a short probe),
    the rate the workload rewrites its memory (a sample) and its size, against the downtime
    target and what can run here; a move the agent decided brings the link and rate it measured
    (Options.link, Options.dirty_rate) and is not measured again. The journal then names the
    strategy that ran (recovery and `history` see that one) with every candidate's estimate."""

    name = "auto"
    summary = ("measure the link and how fast the workload rewrites its memory, then run the "
               "strategy whose estimated freeze meets migrate.downtime_target soonest")

    def forward(self, run: Migration, target: Target, progress: ProgressFn | None) -> None:
        from migrd.core import choice, dirtyrate
        from migrd.engine import precopy as precopy_mod

        info, opts = run.info, run.opts
        run.begin("measure")

        def dirty_rate() -> float:
            if opts.dirty_rate is not None:
                return opts.dirty_rate
            return precopy_mod.sample_dirty_rate(info.tree_ids or (info.pid,), 0.25,
                                                 dirtyrate.stride_for(info.rss, AUTO_SAMPLE_PAGES))

        # The sample and the strategies' checks (CRIU starts) mostly wait: they run beside the
        # link probe, not after it. The agent's moves bring what it measured already.
        with ThreadPoolExecutor(max_workers=2) as pool:
            sampling = pool.submit(dirty_rate)
            checking = pool.submit(lambda: [n for n, s in STRATEGIES.items() if not isinstance(s, (Auto, Hybrid))
                                            and s.unavailable(info, opts, run.cfg) is None])
            if opts.link is not None:
                link = opts.link
            else:
                probed = target.conn.probe(rounds=3, bulk_bytes=8 << 20, bulk_seconds=0.3)
                link = Link(probed.rtt_s, probed.bandwidth_bytes_per_s)
            rate, candidates = sampling.result(), checking.result()
        facts = choice.MoveFacts(memory=info.rss, dirty_rate=rate, bandwidth=link.bandwidth,
                                 rtt=link.rtt_s, downtime_target=run.cfg.migrate.downtime_target,
                                 max_rounds=run.cfg.migrate.precopy_rounds)
        chosen, forecasts = choice.choose(candidates, facts, run.cfg.policy.move_rates)
        name = chosen.strategy
        run.j.record("auto", strategy=name, auto_estimates=[f.line() for f in forecasts],
                     sampled_dirty_rate=round(rate), link_bandwidth=round(link.bandwidth),
                     link_rtt=round(link.rtt_s, 5),
                     measured={"link": "probe" if opts.link is None else "agent",
                               "dirty_rate": "sample" if opts.dirty_rate is None else "agent"})
        STRATEGIES[name].forward(run, target, progress)


#: The strategies `--strategy` offers, by name.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (StopCopy(), StreamCopy(), PostCopy(), PreCopy(), Hybrid(), Auto())}
#: Every strategy a journal may name (recovery rebuilds it from there).
ALL: dict[str, Strategy] = {**STRATEGIES, Restart.name: Restart()}


def recorded(name: str | None, streamed: bool) -> Strategy:
    """The strategy a journal names. Journals written before strategies were recorded say only
    whether the pages were streamed."""
    if name is None:
        return ALL["stream-copy" if streamed else "stop-copy"]
    return ALL[name]


def choose(info: ProcessInfo, opts: Options, cfg: Config,
           refuses: Callable[[str], str | None] = lambda name: None) -> tuple[Strategy | None, list[str]]:
    """The strategy for this move and why the ones before it were passed over. With
    `opts.strategy` set only that one is tried, else opts.preference or migrate.strategies in
    order. refuses: the subject's own word on a strategy (Subject.refuses), asked first."""
    if opts.mode == "restart":
        why = refuses("restart")
        return (ALL["restart"], []) if why is None else (None, [f"restart: {why}"])
    skipped: list[str] = []
    for name in ((opts.strategy,) if opts.strategy else opts.preference or cfg.migrate.strategies):
        s = STRATEGIES[name]
        why = refuses(name) or s.unavailable(info, opts, cfg)
        if why is None:
            return s, skipped
        skipped.append(f"{name}: {why}")
    return None, skipped

