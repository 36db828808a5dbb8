"""The migration driver: precheck, then the chosen strategy's phases (migrd/engine/strategies.py)
through the commit, with a journal that makes every step recoverable and a rollback that leaves
exactly one live copy. The target's side is reached through `peerclient.Target`.

Invariant: at every instant there is exactly one live copy of the workload (two only in clone
mode, by request). The source copy is either ended by the dump itself (CRIU kills the dumped
tree) and brought back from its own images on any failure before the target copy is confirmed
running, or, when its pages are streamed to the target during the dump, left stopped: then
the commit ends it and a rollback resumes it. The target copy stays stopped until the commit
and is ended on any failure before it. When the target cannot be reached after a restore was started there, migrd does not guess: the migration stays "in
doubt" and `migrd recover` settles it once the target answers, because guessing could make two
copies.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from migrd.adapters import netaddr, transport, untrusted, workloads
from migrd.adapters.criu import find_criu
from migrd.config import Config
from migrd.core import binding, precheck
from migrd.engine import checkpoint as cp
from migrd.engine import failpoints, pagestream, peerclient, predump, strategies
from migrd.engine.journal import FINAL, Journal, all_journals, new_id
from migrd.engine.manifest import process_from_dict
from migrd.engine.strategies import Strategy
from migrd.engine.subjects import SUBJECTS, PodmanContainer, ProcessTree, RuncContainer, Subject
from migrd.errors import (
    ConfigError,
    InDoubt,
    InputError,
    JournalCorrupt,
    MigrdError,
    NotPermitted,
    PrecheckFailed,
    TransportError,
    WorkloadLost,
)
from migrd.model import PROCESS_TREE, Link, ProcessInfo, SubjectRef


log = logging.getLogger(__name__)

#: Set by a SIGTERM/SIGINT handler (`migrctl migrate` installs one): the migration stops at the
#: next step boundary and rolls back; once at commit it finishes instead.
STOP = threading.Event()


@dataclass(frozen=True)
class Options:
    target: str
    mode: str = "move"
    #: A name from strategies.STRATEGIES; None: the first available of `preference`.
    strategy: str | None = None
    #: Strategies to try in order when none is pinned (the agent's daemon.strategies); empty:
    #: migrate.strategies.
    preference: tuple[str, ...] = ()
    with_files: bool = False
    move_address: str | None = None
    tcp_established: bool = False
    dry_run: bool = False
    #: The agent's last probe of the link to the target and its sampler's last dirty rate of
    #: the workload (bytes/s): `auto` decides on them instead of measuring again (None: it
    #: measures).
    link: Link | None = None
    dirty_rate: float | None = None


@dataclass(frozen=True)
class Outcome:
    id: str
    mode: str
    source: str
    target: str
    pid: int
    target_pid: int | None
    bytes: int
    phases: dict[str, float]
    downtime: float | None
    dry_run: bool
    dump_seconds: float | None = None
    transfer_seconds: float | None = None
    restore_seconds: float | None = None
    #: The strategy that ran (see migrd.engine.strategies).
    strategy: str | None = None
    #: The pages went to the target during the dump (see migrd.engine.pagestream).
    streamed: bool = False
    #: Why a moved address could not be announced there (None: announced, or none moved).
    announce_error: str | None = None
    #: Each resource with its binding and what the move does with it (core/binding.py).
    resources: tuple[dict[str, str], ...] = ()
    #: Strategies passed over before the one that ran, each with why.
    passed_over: tuple[str, ...] = ()
    #: `--strategy auto`: each candidate's estimated freeze and total time.
    estimates: tuple[str, ...] = ()
    #: `--strategy hybrid`: how it switched ("stop-copy" or "postcopy").
    hybrid_switch: str | None = None
    #: Pre-copy and hybrid: how the rounds found changed pages ("criu" pre-dumps or "content").
    dirty_tracking: str | None = None
    #: Pre-copy and hybrid: rounds run while the workload ran.
    rounds: int | None = None


ProgressFn = Callable[[int, int], None]


def _source_name(cfg: Config) -> str:
    return cfg.host or socket.gethostname()


@dataclass(frozen=True)
class _Request:
    pid: int
    start_time: float
    target: str
    mode: str


@dataclass(frozen=True)
class Recorded:
    """A journal's data as recovery reads it. Built (every type checked) before recovery acts,
    so a damaged journal is refused whole instead of failing half-way through a rollback."""

    source: str
    options: Options
    process: ProcessInfo
    request: _Request
    carry: tuple[str, ...]
    workload: str | None = None
    stdout: str | None = None
    reason: str | None = None
    strategy: str | None = None
    streamed: bool = False
    freeze: float | None = None
    nft_tables: tuple[str, ...] = ()
    target_files: dict[str, int | None] = field(default_factory=dict)
    address_interface: str | None = None


@dataclass(frozen=True)
class Switch:
    """The target's sessions for the switch, open and waiting (see `prepare_switch`)."""

    restoring: peerclient.Restoring
    images: transport.ImageSink
    files: peerclient.FilesSink | None
    #: The page server for pages streamed during the dump (stream-copy).
    pages: pagestream.Sender | None = None


class Migration:
    """One migration's imperative shell: a driver over its strategy's phases. Its state lives
    in the journal, so a new instance built from the journal (recovery) can finish or undo
    what a crashed one started. The phase helpers below are what strategies compose."""

    def __init__(self, cfg: Config, journal: Journal, lock_fd: int) -> None:
        self.cfg = cfg
        self.j = journal
        self.lock_fd = lock_fd
        self.images = journal.dir / "images"
        #: CRIU's pre-dumps (pre-copy on a soft-dirty kernel), which the images lean on.
        self.pre_dumps = journal.dir / predump.CHAIN

    # --- journal-derived state -------------------------------------------------------------

    @property
    def data(self) -> dict[str, Any]:
        return self.j.merged()

    @property
    def opts(self) -> Options:
        return untrusted.build(Options, self.data.get("options"), JournalCorrupt, f"{self.j.path}: options")

    @property
    def info(self) -> ProcessInfo:
        return process_from_dict(self.data.get("process"), JournalCorrupt, f"{self.j.path}: process")

    @property
    def subject(self) -> Subject:
        d = self.data
        kind = d.get("subject", ProcessTree.kind)
        if kind not in SUBJECTS:
            raise JournalCorrupt(f"{self.j.path}: unknown subject {kind!r}")
        return SUBJECTS[kind].from_record(self.info, d)

    @property
    def strategy(self) -> Strategy:
        d = self.data
        return strategies.recorded(d.get("strategy"), bool(d.get("streamed")))

    @property
    def source(self) -> tuple[int, float]:
        """The source process: PID and start time (a recycled PID is never taken for it)."""
        req = self.data["request"]
        return req["pid"], req["start_time"]

    @property
    def remote_images(self) -> str:
        return self.data["remote_images"]

    def source_alive(self) -> bool:
        return workloads.same_process(*self.source)

    # --- the forward path ------------------------------------------------------------------

    def begin(self, step: str, **data: Any) -> None:
        """Journal the step, then honour a failpoint or a stop request before it starts.
        Steps are never interrupted half-way: a CRIU killed mid-dump could leave its frozen
        task with parasite code in it."""
        self.j.record(step, **data)
        failpoints.step(step)
        if STOP.is_set() and step != "commit":
            raise MigrdError(f"interrupted (SIGTERM/SIGINT) before {step}; rolled back")

    def start(self, subject: Subject, opts: Options, name: str | None, stdout: str | None,
              progress: ProgressFn | None) -> Outcome:
        info = subject.info
        carry = list(binding.carried(info, opts.with_files, stdout))
        strategy, skipped = strategies.choose(info, opts, self.cfg,
                                              refuses=lambda s: subject.refuses(s, opts.mode))
        shape = binding.MoveShape(mode=opts.mode, carried=tuple(carry), move_address=opts.move_address,
                                  tcp_established=opts.tcp_established)
        self.j.record("precheck", source=_source_name(self.cfg), options=asdict(opts), workload=name,
                      stdout=stdout, carry=carry, process=asdict(info), subject=subject.kind,
                      **subject.record(),
                      resources=[asdict(r) for r in subject.resources(shape)],
                      strategy=strategy.name if strategy else None, passed_over=skipped,
                      request={"pid": info.pid, "start_time": info.start_time,
                               "target": opts.target, "mode": opts.mode})
        if strategy is None:
            reason = "no strategy can move it: " + "; ".join(skipped)
            self.j.record("refused", reason=reason)
            raise PrecheckFailed(f"cannot migrate {subject.label()} to {opts.target}: {reason}")
        try:
            target = peerclient.connect(self.cfg, opts.target, self.j.id)
        except MigrdError as e:
            self.j.record("refused", reason=str(e))
            raise
        with target.conn:
            try:
                self.precheck(target, subject, opts, carry, shape)
            except MigrdError as e:
                if self.j.last_state() != "refused":
                    self.j.record("refused", reason=str(e))
                raise
            if opts.dry_run:
                self.j.record("done", outcome="dry run")
                return self.outcome()
            try:
                strategy.forward(self, target, progress)
            except (InDoubt, WorkloadLost):
                raise  # from past the point of no return: recovery finishes it, or nothing can
            except BaseException as e:
                reason = str(e) or type(e).__name__
                self.rollback(target, reason)
                raise
        return self.outcome()

    def precheck(self, target: peerclient.Target, subject: Subject, opts: Options,
                 carry: list[str], shape: binding.MoveShape) -> None:
        failpoints.step("precheck")
        info = subject.info
        cpuinfo = criu_version = None
        if opts.mode != "restart":
            criu = find_criu(self.cfg)
            criu_version = criu.version()
            with tempfile.TemporaryDirectory(prefix="migrd-cpuinfo-") as tmp:
                criu.cpuinfo_dump(Path(tmp), Path(tmp) / "dump.log")
                cpuinfo = base64.b64encode(Path(tmp, "cpuinfo.img").read_bytes()).decode()
        local = binding.refusals(subject.resources(shape))
        if opts.move_address:
            netaddr.parse_cidr(opts.move_address)
            if netaddr.holder_of(opts.move_address) is None:
                local.append(f"address {opts.move_address} is not on this host")
        if opts.mode == "clone" and opts.move_address:
            local.append("--move-address makes no sense with --mode clone (both copies run)")
        req = precheck.Request(
            id=self.j.id, mode=opts.mode, rss=info.rss, ports=tuple(sorted({s.port for s in info.listening})),
            carry=tuple(carry), with_files=opts.with_files, move_address=opts.move_address,
            headroom=self.cfg.migrate.headroom, ask=subject.precheck_ask(), cpuinfo=cpuinfo)
        resp = target.precheck(req)
        problems = local + list(resp.problems)
        if problems:
            self.j.record("refused", reason="; ".join(problems))
            raise PrecheckFailed(f"cannot migrate {subject.label()} to {opts.target}: " + "; ".join(problems))
        # A file the target may see already (shared storage) is never copied onto itself.
        self.j.record("prechecked", criu_version=criu_version, remote_images=resp.incoming, target_files=resp.target_files,
                      carry=[p for p in carry if p not in resp.not_to_copy])

    # --- phase helpers (what strategies compose) -------------------------------------------

    def dump(self, *, leave_stopped: bool, page_server_fd: int | None, parent: cp.Parent | None = None) -> cp.Checkpoint:
        opts = self.opts
        return self.subject.dump(self.cfg, self.images, leave_running=opts.mode == "clone",
                                 leave_stopped=leave_stopped, tcp_established=opts.tcp_established,
                                 pass_fds=(self.lock_fd,), page_server_fd=page_server_fd, parent=parent)

    def release_address(self) -> None:
        """A moved address leaves this host before the target restores (one holder at a time)."""
        address = self.opts.move_address
        if address:
            iface = netaddr.holder_of(address)
            netaddr.delete(address)
            self.j.record("address_released", address_interface=iface)

    def send_carried(self, sink: peerclient.FilesSink | None) -> int:
        return sink.send([Path(p) for p in self.data["carry"]]) if sink is not None else 0

    @contextlib.contextmanager
    def prepare_switch(self, target: peerclient.Target, *, pages: bool = False, files: bool = True,
                       progress: ProgressFn | None = None) -> Iterator[Switch]:
        """Everything the target needs after the freeze, started and waiting before it: the
        restore (`peer restore --await-go`), the image receiver, the files receiver when files
        travel and the page server when pages stream. Their SSH sessions and Python start-ups
        run in parallel and cost no downtime. All closed at the end whatever happened: before
        any rollback, so the target leaves its copy to `peer abort`, and without a restore when
        the source never said go. files=False: the strategy sends the carried files itself."""
        d = self.data
        with ThreadPoolExecutor(4) as pool:
            futures: dict[str, Future[Any] | None] = {
                "restoring": pool.submit(target.prepare_restore, name=d.get("workload"), stdout=d.get("stdout"),
                                         address=self.opts.move_address),
                "images": pool.submit(target.image_sink, self.remote_images),
                "files": pool.submit(target.files_sink) if files and d["carry"] else None,
                "pages": pool.submit(target.page_stream, progress, self.info.rss) if pages else None,
            }
        opened = {k: f.result() for k, f in futures.items() if f is not None and f.exception() is None}
        failed = next((f.exception() for f in futures.values() if f is not None and f.exception() is not None), None)
        try:
            if failed is not None:
                raise failed
            yield Switch(opened["restoring"], opened["images"], opened.get("files"), opened.get("pages"))
        finally:
            for session in opened.values():
                session.close()

    def send_after_freeze(self, switch: Switch, progress: ProgressFn | None) -> tuple[int, transport.TransferStats]:
        """The carried files and the images, at once on their waiting sessions: (file bytes,
        image transfer)."""
        with ThreadPoolExecutor(1) as pool:
            files = pool.submit(self.send_carried, switch.files)
            images = switch.images.send(self.images, progress)
            return files.result(), images

    def restore_there(self, target: peerclient.Target, restoring: peerclient.Restoring,
                      page_bytes: int | None) -> None:
        """Restore (stopped) there, verify, commit: one session for all three."""
        restoring.go(page_bytes)
        r = restoring.answer()
        self.begin("verify", target_pid=r.pid, restore_seconds=r.seconds)
        self.verify(target, seen=r.restored)
        self.begin("commit")
        self.commit(target, restoring)

    def verify(self, target: peerclient.Target, ports: bool = True,
               seen: peerclient.Restored | None = None) -> None:
        """seen: the target's status as reported with the restore (saves a round trip)."""
        self.subject.verify(seen if seen is not None else target.status().restored, target.name, ports)

    def commit(self, target: peerclient.Target | None, restoring: peerclient.Restoring | None = None) -> None:
        """Past the point of no return: the target copy runs. Idempotent. restoring: the
        restore's session, still waiting for our word; without it (or if it broke) a `peer
        finish`. A failure leaves the migration in doubt, never rolled back: by then the
        source may be ended and the copy there may run, so a rollback could kill the only copy
        or restore an older state beside it. `migrd recover` commits again."""
        try:
            self.finish_commit(target, restoring)
        except MigrdError as e:
            self.j.record("in_doubt", reason=f"commit not finished: {e}")
            raise InDoubt(f"migration {self.j.id}: the commit on {self.opts.target} did not finish ({e}); "
                          f"nothing was undone. Run `migrd recover` to finish it.") from None

    def finish_commit(self, target: peerclient.Target | None, restoring: peerclient.Restoring | None) -> None:
        d = self.data
        opts = self.opts
        strategy = self.strategy
        strategy.end_source(self)
        announce_error = None
        if target is not None:
            reply = restoring.commit() if restoring is not None else None
            if reply is None:
                reply = target.finish(opts.move_address)  # idempotent
            announce_error = reply.announce_error
            if announce_error:
                log.warning("migration %s: the moved address %s was not announced (%s); clients may "
                            "stall until their ARP entries expire", self.j.id, opts.move_address, announce_error)
            if opts.mode == "move" and "freeze" in d and "downtime" not in d:
                # From the freeze here to the copy there running again.
                self.j.record("resumed", downtime=round(time.time() - d["freeze"], 4))
        failpoints.step("resumed")
        strategy.reap_source(self)
        if opts.mode in ("move", "restart"):
            self.subject.after_commit(self.cfg)
            for table in d.get("nft_tables", []):
                netaddr.nft_delete(table)
            if d.get("workload"):
                workloads.Registry(self.cfg.state_dir).remove(d["workload"])
        self.drop_images()
        self.j.record("done", outcome="ok", announce_error=announce_error)

    # --- the way back ----------------------------------------------------------------------

    def rollback(self, target: peerclient.Target | None, reason: str) -> None:
        """Undo everything before commit. Idempotent; safe after a crash at any point."""
        states = [r.state for r in self.j.records()]
        if "rollback" not in states:
            self.j.record("rollback", reason=reason)
        d = self.data
        opts = self.opts
        restore_started = "restore" in states
        target_files = d.get("target_files", {})
        created_there = [p for p in d.get("carry", []) if target_files.get(p) is None]
        unclean = None
        given = target
        try:
            try:
                if target is None:
                    target = peerclient.connect(self.cfg, opts.target, self.j.id)
                target.abort(opts.move_address, created_there)
            except TransportError:
                if given is None:
                    raise
                # The connection the migration used may have gone down with the failure that
                # brought us here (seen: "connection is not open" after a failed restore under
                # load); a fresh one asks again before anything counts as in doubt. Abort is
                # idempotent there.
                target = peerclient.connect(self.cfg, opts.target, self.j.id)
                target.abort(opts.move_address, created_there)
        except MigrdError as e:
            if restore_started:
                self.j.record("in_doubt", reason=f"target unreachable during rollback: {e}")
                raise InDoubt(f"migration {self.j.id}: {opts.target} cannot be asked whether the "
                              f"restored copy runs ({e}); nothing was restarted here. Run "
                              f"`migrd recover` once {opts.target} answers.") from None
            # Nothing can be running there: no restore was started. Its images (the streamed
            # pages: up to the whole memory) and carried files wait for a later rollback: the
            # journal stays unfinished, so `migrd recover` asks again.
            unclean = f"{opts.target} could not be cleaned: {e}"
        if opts.mode == "move" and opts.move_address and d.get("address_interface"):
            if netaddr.holder_of(opts.move_address) is None:
                netaddr.add(opts.move_address, d["address_interface"])
        local_pid = self.strategy.bring_back(self, states)
        tables = d.get("nft_tables")
        if tables is None:  # ended between the dump and `transfer`, which records them
            tables = self.dump_tables()
        self.drop_images()
        for table in tables:
            netaddr.nft_delete(table)  # a local restore unlocks its own; a dump-only leaves it
        if unclean:
            self.j.record("target_unclean", reason=unclean, local_pid=local_pid)
            return
        self.j.record("rolled_back", reason=d.get("reason", reason), local_pid=local_pid or d.get("local_pid"))

    def drop_images(self) -> None:
        """The process's memory leaves this host's disk: the dump and the pre-dumps it leans on."""
        shutil.rmtree(self.images, ignore_errors=True)
        shutil.rmtree(self.pre_dumps, ignore_errors=True)

    def dump_tables(self) -> list[str]:
        """CRIU's network-lock tables this migration's dump left here, found by the run id in
        its inventory.img (none if the dump never got that far)."""
        inventory = self.subject.dump_inventory(self.images)
        return netaddr.tables_of_dump(netaddr.nft_tables(), inventory) if inventory else []

    def restore_locally(self) -> int:
        """Bring the dumped source back from its own images."""
        d = self.data
        try:
            pid = self.subject.restore_local(self.cfg, self.images, self.opts.tcp_established)
        except MigrdError as e:
            keep = self.j.dir / "images.kept"
            if self.images.exists():
                os.replace(self.images, keep)
            self.j.record("in_doubt", reason=f"local restore failed: {e}")
            raise InDoubt(f"migration {self.j.id}: could not restore the process here ({e}); "
                          f"its images are kept in {keep}") from None
        if d.get("workload"):
            info = self.info
            reg = workloads.Registry(self.cfg.state_dir)
            reg.add(workloads.Workload(d["workload"], pid, psutil.Process(pid).create_time(),
                                      info.cmdline, info.cwd, d.get("stdout") or "", self.cfg.host))
        return pid

    def start_locally(self) -> int:
        """Restart mode's way back: the command starts fresh here."""
        info = self.info
        reg = workloads.Registry(self.cfg.state_dir)
        if self.data.get("workload"):
            reg.remove(self.data["workload"])
        w = workloads.start(self.cfg.state_dir, info.cmdline, name=self.data.get("workload"),
                           cwd=info.cwd, env=info.environ, host=self.cfg.host, user=workloads.user_of(info.uid))
        return w.pid

    def outcome(self) -> Outcome:
        from migrd.engine.journal import summarize

        s = summarize(self.j)
        d = self.data
        return Outcome(id=self.j.id, mode=self.opts.mode, source=d["source"], target=self.opts.target,
                       pid=d["request"]["pid"], target_pid=d.get("target_pid"), bytes=s.bytes,
                       phases=s.phases, downtime=s.downtime, dry_run=self.opts.dry_run,
                       dump_seconds=d.get("dump_seconds"), transfer_seconds=d.get("transfer_seconds"),
                       restore_seconds=d.get("restore_seconds"), strategy=d.get("strategy"),
                       streamed=bool(d.get("streamed")), resources=tuple(d.get("resources", ())),
                       passed_over=tuple(d.get("passed_over", ())),
                       estimates=tuple(d.get("auto_estimates", ())), hybrid_switch=d.get("hybrid_switch"),
                       dirty_tracking=d.get("dirty_tracking"), rounds=d.get("rounds"),
                       announce_error=d.get("announce_error"))


def _check_request(cfg: Config, opts: Options) -> None:
    if opts.mode not in precheck.MODES:
        raise InputError(f"unknown mode {opts.mode!r} (known: {', '.join(precheck.MODES)})")
    if opts.strategy is not None and opts.strategy not in strategies.STRATEGIES:
        raise InputError(f"unknown strategy {opts.strategy!r} (known: {', '.join(strategies.STRATEGIES)})")
    if opts.target == cfg.host:
        raise InputError(f"{opts.target} is this host; choose another target")
    cfg.peer(opts.target)  # unknown host -> InputError before anything else


def migrate(cfg: Config, pid: int, opts: Options, progress: ProgressFn | None = None) -> Outcome:
    """Move (or check, with dry_run) the process tree of PID."""
    return migrate_subject(cfg, PROCESS_TREE, pid, opts, progress)


def migrate_container(cfg: Config, name: str, opts: Options, progress: ProgressFn | None = None) -> Outcome:
    """Move (or check, with dry_run) the container NAME: runc's when runc has it, else Podman's."""
    from migrd.engine import containers, podman

    kind = RuncContainer.kind if containers.exists(cfg, name) or not podman.exists(cfg, name) else PodmanContainer.kind
    return migrate_subject(cfg, SubjectRef(kind, name, open_files=False), None, opts, progress)


def migrate_subject(cfg: Config, ref: SubjectRef, pid: int | None, opts: Options,
                    progress: ProgressFn | None = None) -> Outcome:
    """Move what `ref` names (the agent's candidate, or the operator's PID or container): its
    subject's kind finds it here, says why it may move and how it moves."""
    _check_request(cfg, opts)
    cls = SUBJECTS.get(ref.kind)
    if cls is None:
        raise InputError(f"unknown subject kind {ref.kind!r} (known: {', '.join(SUBJECTS)})")
    cls.fits_request(opts.with_files)
    subject = cls.locate(cfg, ref, pid)
    if subject.opt_in(cfg) is None:
        raise NotPermitted(subject.not_opted_in())
    name, stdout = subject.workload(cfg)
    j = Journal(cfg.state_dir / "migrations" / new_id())
    fd = j.lock()
    assert fd is not None
    try:
        return Migration(cfg, j, fd).start(subject, opts, name, stdout, progress)
    finally:
        os.close(fd)


def recover(cfg: Config) -> list[dict[str, Any]]:
    """Finish or undo every migration a crash left unfinished. Returns what was done; a
    corrupt journal is left alone and reported (with "corrupt": the error), the others are
    still recovered."""
    report: list[dict[str, Any]] = []
    for j in all_journals(cfg.state_dir):
        try:
            last = j.last_state()
        except JournalCorrupt as e:
            report.append({"id": j.id, "action": "skipped: corrupt journal", "corrupt": str(e)})
            continue
        if last in FINAL:
            continue
        fd = j.lock(blocking=False)
        if fd is None:
            report.append({"id": j.id, "action": "skipped: still in progress"})
            continue
        try:
            report.append({"id": j.id, "from": last, "action": _recover_one(Migration(cfg, j, fd), last)})
        except JournalCorrupt as e:
            report.append({"id": j.id, "from": last, "action": "skipped: corrupt journal", "corrupt": str(e)})
        except MigrdError as e:
            report.append({"id": j.id, "from": last, "action": f"failed: {e}"})
        finally:
            os.close(fd)
    return report


#: Journal states before the target was asked anything: nothing to undo anywhere.
_TARGET_NOT_ASKED = (None, "precheck")
#: States after the precheck but before anything was frozen: the source ran on untouched, but
#: the target's receivers start before the next record and may hold an incoming directory
#: (seen: a chaos run's kill landed there and left it), so the target is still asked to drop it.
_NOTHING_FROZEN = ("prechecked", "measure")
_UNCHANGED = "interrupted before the checkpoint; nothing had changed"


def _recover_one(m: Migration, last: str | None) -> str:
    if last in _TARGET_NOT_ASKED:
        m.j.record("rolled_back", reason=_UNCHANGED)
        return "nothing had changed"
    untrusted.build(Recorded, m.data, JournalCorrupt, str(m.j.path))
    states = [r.state for r in m.j.records()]
    try:
        target: peerclient.Target | None = peerclient.connect(m.cfg, m.opts.target, m.j.id)
    except (TransportError, ConfigError):  # e.g. an unusable ssh.client_key: as if unreachable
        target = None
    try:
        if m.strategy.point_of_no_return in states:
            if target is None:
                # The target's copy waits, stopped, for our word: finishing here alone would
                # leave no copy running at all.
                raise InDoubt(f"migration {m.j.id}: committed, but {m.opts.target} cannot be reached to "
                              f"resume its copy; run `migrd recover` again once it answers")
            st = target.status()
            if st.busy:
                return f"skipped: {m.opts.target} is still settling the post-copy; run recover again"
            if st.lost is not None:
                # Post-copy: the pages stopped arriving after the switch, and the target
                # ended its copy rather than run it on zero-filled memory.
                m.j.record("lost", reason=st.lost)
                target.abort(m.opts.move_address, [])
                return f"lost: {st.lost}"
            m.commit(target)
            return "committed"
        if "rollback" not in states and "restore" in states and target is not None:
            restored = target.status().restored
            if restored and restored.alive:
                try:
                    m.verify(target, ports=m.opts.mode != "restart", seen=restored)
                except MigrdError as e:
                    m.rollback(target, f"recovered after a crash at {last}; the target copy failed "
                                       f"verification: {e}")
                    return "rolled back"
                m.j.record("commit", recovered=True)
                m.commit(target)
                return "rolled forward: the target copy was restored and verified"
        unchanged = last in _NOTHING_FROZEN
        m.rollback(target, _UNCHANGED if unchanged else m.data.get("reason") or f"recovered after a crash at {last}")
        if m.j.last_state() == "target_unclean":
            return f"rolled back here; {m.opts.target} still cannot be cleaned (run recover again once it answers)"
        return "nothing had changed" if unchanged else "rolled back"
    finally:
        if target is not None:
            target.conn.close()
