"""The migration orchestrator: precheck, checkpoint, transfer, restore, verify, commit, with a
journal that makes every step recoverable and a rollback that leaves exactly one live copy.

Invariant: at every instant there is exactly one live copy of the workload (two only in clone
mode, by request). The source copy is either ended by the dump itself (CRIU kills the dumped
tree) and brought back from its own images on any failure before the target copy is confirmed
running, or, when its pages are streamed to the target during the dump, left stopped: then
the commit ends it and a rollback resumes it. The target copy stays stopped until the commit
and is ended on any failure before it. When the target cannot be
reached after a restore was started there, migrd does not guess: the migration stays "in
doubt" and `migrd recover` settles it once the target answers, because guessing could make two
copies.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from migrd.engine import checkpoint as cp
from migrd.engine import failpoints, pagestream
from migrd.adapters import netaddr, procinfo, transport, untrusted, workloads
from migrd.core import precheck
from migrd.config import Config
from migrd.adapters.criu import find_criu
from migrd.errors import (
    ConfigError,
    InDoubt,
    InputError,
    JournalCorrupt,
    MigrdError,
    NotPermitted,
    PrecheckFailed,
    TransportError,
)
from migrd.engine.journal import FINAL, Journal, all_journals, new_id
from migrd.engine.manifest import process_from_dict
from migrd.model import ProcessInfo


log = logging.getLogger(__name__)

STRATEGIES = ("stop-copy",)

#: Set by a SIGTERM/SIGINT handler (`migrctl migrate` installs one): the migration stops at the
#: next step boundary and rolls back; once at commit it finishes instead.
STOP = threading.Event()


@dataclass(frozen=True)
class Options:
    target: str
    mode: str = "move"
    strategy: str = "stop-copy"
    with_files: bool = False
    move_address: str | None = None
    tcp_established: bool = False
    dry_run: bool = False


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
    #: The pages went to the target during the dump (see migrd.engine.pagestream).
    streamed: bool = False
    #: Why a moved address could not be announced there (None: announced, or none moved).
    announce_error: str | None = None


ProgressFn = Callable[[int, int], None]


def _source_name(cfg: Config) -> str:
    return cfg.host or socket.gethostname()


def _cgroups(pid: int) -> list[str]:
    try:
        return [line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    except OSError:
        return []


def _migrctl_json(conn: transport.Connection, args: list[str], payload: Any = None,
                  timeout: float | None = None) -> dict[str, Any]:
    """Run `migrctl ARGS --json` on the peer; its error line becomes ours."""
    data = json.dumps(payload).encode() if payload is not None else None
    r = conn.migrctl([*args, "--json"], input=data, timeout=timeout)
    if r.status != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        text = (msg[-1] if msg else f"exit {r.status}").removeprefix("migrctl: error: ")
        raise MigrdError(f"{conn.host.name}: migrctl {args[0]} {args[1] if len(args) > 1 else ''}: {text}")
    return json.loads(r.stdout)


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
    streamed: bool = False
    freeze: float | None = None
    nft_tables: tuple[str, ...] = ()
    target_files: dict[str, int | None] = field(default_factory=dict)
    address_interface: str | None = None


class Migration:
    """One migration's imperative shell. Its state lives in the journal, so a new instance
    built from the journal (recovery) can finish or undo what a crashed one started."""

    def __init__(self, cfg: Config, journal: Journal, lock_fd: int) -> None:
        self.cfg = cfg
        self.j = journal
        self.lock_fd = lock_fd
        self.images = journal.dir / "images"

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
    def source(self) -> tuple[int, float]:
        """The source process: PID and start time (a recycled PID is never taken for it)."""
        req = self.data["request"]
        return req["pid"], req["start_time"]

    def source_alive(self) -> bool:
        return workloads.same_process(*self.source)

    # --- the forward path ------------------------------------------------------------------

    def _begin(self, step: str, **data: Any) -> None:
        """Journal the step, then honour a failpoint or a stop request before it starts.
        Steps are never interrupted half-way: a CRIU killed mid-dump could leave its frozen
        task with parasite code in it."""
        self.j.record(step, **data)
        failpoints.step(step)
        if STOP.is_set() and step != "commit":
            raise MigrdError(f"interrupted (SIGTERM/SIGINT) before {step}; rolled back")

    def start(self, info: ProcessInfo, opts: Options, name: str | None, stdout: str | None,
              progress: ProgressFn | None) -> Outcome:
        carry = sorted({f.path for f in info.open_files} if opts.with_files
                       else ({stdout} & {f.path for f in info.open_files} if stdout else set()))
        self.j.record("precheck", source=_source_name(self.cfg), options=asdict(opts), workload=name,
                      stdout=stdout, carry=carry, process=asdict(info),
                      request={"pid": info.pid, "start_time": info.start_time,
                               "target": opts.target, "mode": opts.mode})
        try:
            conn = transport.connect(self.cfg, opts.target)
        except MigrdError as e:
            self.j.record("refused", reason=str(e))
            raise
        with conn:
            try:
                remote_images = self.precheck(conn, info, opts, carry)
            except MigrdError as e:
                if self.j.last_state() != "refused":
                    self.j.record("refused", reason=str(e))
                raise
            if opts.dry_run:
                self.j.record("done", outcome="dry run")
                return self.outcome()
            try:
                self.forward(conn, info, opts, remote_images, progress)
            except InDoubt:
                raise  # from a commit past its point of no return: recovery finishes it
            except BaseException as e:
                reason = str(e) or type(e).__name__
                self.rollback(conn, reason)
                raise
        return self.outcome()

    def precheck(self, conn: transport.Connection, info: ProcessInfo, opts: Options,
                 carry: list[str]) -> str:
        failpoints.step("precheck")
        cpuinfo = None
        if opts.mode != "restart":
            with tempfile.TemporaryDirectory(prefix="migrd-cpuinfo-") as tmp:
                find_criu(self.cfg).cpuinfo_dump(Path(tmp), Path(tmp) / "dump.log")
                cpuinfo = base64.b64encode(Path(tmp, "cpuinfo.img").read_bytes()).decode()
        local: list[str] = []
        if opts.move_address:
            netaddr.parse_cidr(opts.move_address)
            if netaddr.holder_of(opts.move_address) is None:
                local.append(f"address {opts.move_address} is not on this host")
        if opts.mode == "clone" and opts.move_address:
            local.append("--move-address makes no sense with --mode clone (both copies run)")
        req = precheck.Request(
            id=self.j.id, mode=opts.mode, pid=info.pid, start_time=info.start_time, rss=info.rss,
            tree_ids=info.tree_ids, own_pid_namespace=info.own_pid_namespace,
            ports=tuple(sorted({s.port for s in info.listening})),
            files=tuple((f.path, f.size) for f in info.open_files), carry=tuple(carry),
            with_files=opts.with_files, move_address=opts.move_address,
            headroom=self.cfg.migrate.headroom, cpuinfo=cpuinfo,
            identities={f.path: f.identity for f in info.open_files if f.identity})
        resp = _migrctl_json(conn, ["peer", "precheck"], asdict(req))
        problems = local + resp["problems"]
        if problems:
            self.j.record("refused", reason="; ".join(problems))
            raise PrecheckFailed(f"cannot migrate PID {info.pid} to {opts.target}: " + "; ".join(problems))
        # A file the target may see already (shared storage) is never copied onto itself.
        self.j.record("prechecked", remote_images=resp["incoming"],
                      target_files={p: s for p, s in resp["facts"]["files"].items()},
                      carry=[p for p in carry if p not in resp.get("not_to_copy", ())])
        return resp["incoming"]

    def forward(self, conn: transport.Connection, info: ProcessInfo, opts: Options,
                remote_images: str, progress: ProgressFn | None) -> None:
        if opts.mode == "restart":
            return self.forward_restart(conn, info, opts)
        stream = self.streams(info, opts)
        self._begin("checkpoint", streamed=stream)
        # A streamed dump leaves the source stopped (commit ends it, rollback resumes it) and
        # sends the pages to the target's page server, which is up before the freeze.
        with self.page_stream(conn, info, progress) if stream else contextlib.nullcontext() as pages:
            freeze = time.time()
            ck = cp.checkpoint(self.cfg, info.pid, self.images, leave_running=opts.mode == "clone",
                               leave_stopped=stream, tcp_established=opts.tcp_established,
                               pass_fds=(self.lock_fd,), page_server_fd=pages.criu_fd if pages else None)
            page_bytes = pages.finish(self.cfg.ssh.op_timeout) if pages else 0
        self._begin("transfer", freeze=freeze, dump_seconds=round(ck.dump_seconds, 4),
                      image_bytes=ck.manifest.image_bytes + page_bytes, page_bytes=page_bytes,
                      nft_tables=self.dump_tables())
        if opts.move_address:
            iface = netaddr.holder_of(opts.move_address)
            netaddr.delete(opts.move_address)
            self.j.record("address_released", address_interface=iface)
        moved = 0
        for path in self.data["carry"]:
            moved += conn.put_file(Path(path), path)
        stats = conn.send_images(self.images, remote_images, progress=progress)
        self._begin("restore", bytes=stats.bytes + moved + page_bytes, transfer_seconds=round(stats.seconds, 4))
        args = ["peer", "restore", self.j.id]
        args += ["--page-bytes", str(page_bytes)] if stream else []
        args += ["--name", self.data["workload"]] if self.data.get("workload") else []
        args += ["--stdout", self.data["stdout"]] if self.data.get("stdout") else []
        args += ["--address", opts.move_address] if opts.move_address else []
        # One session for restore and commit: the target restores, answers, and waits for our
        # word, which saves a whole SSH session + Python start while the process is frozen.
        talk = conn.converse([*self.cfg.ssh.remote_migrctl, *args, "--await-commit", "--json"])
        try:
            r = json.loads(talk.readline())
            self._begin("verify", target_pid=r["pid"], restore_seconds=r["seconds"])
            self.verify(conn, info, seen=r["restored"])
            self._begin("commit")
            self.commit(conn, talk)
        finally:
            talk.close()  # before any rollback: the target then leaves its copy to `peer abort`

    def streams(self, info: ProcessInfo, opts: Options) -> bool:
        """Stream the pages during the dump? Only a move leaves the source stopped instead of
        ended, and a stopped source keeps its PIDs: fine when the workload has its own PID
        namespace, a clash on hosts sharing one PID space otherwise. With --tcp-established
        the stopped source's sockets would stay in repair mode behind CRIU's network lock, so
        such moves keep the staged path, whose rollback is a full local restore."""
        return (self.cfg.migrate.stream == "auto" and opts.mode == "move"
                and info.own_pid_namespace and not opts.tcp_established)

    def page_stream(self, conn: transport.Connection, info: ProcessInfo,
                    progress: ProgressFn | None) -> pagestream.Sender:
        """The target's page server for this migration, running and connected."""
        compression = self.cfg.ssh.compression
        talk = conn.converse([*self.cfg.ssh.remote_migrctl, "peer", "pages", self.j.id,
                              "--compression", compression])
        return pagestream.Sender(talk, compression, level=conn.tuning.zstd_level,
                                 progress=progress, total=info.rss)

    def forward_restart(self, conn: transport.Connection, info: ProcessInfo, opts: Options) -> None:
        """Weak mobility: end the process here, start the same command line, directory and
        environment fresh there. Ending first keeps "never two copies"; a failure after it
        starts the command fresh here again (restart mode gives up execution state anyway)."""
        self._begin("checkpoint")
        # SIGTERM first, then SIGKILL: a PID namespace's init ignores SIGTERM unless it handles it.
        workloads.end(info.pid, info.start_time, (signal.SIGTERM, signal.SIGKILL), grace=2.0)
        self._begin("transfer")
        moved = sum(conn.put_file(Path(p), p) for p in self.data["carry"])
        self._begin("restore", bytes=moved)
        spec = {"cmdline": list(info.cmdline), "cwd": info.cwd, "env": info.environ,
                "name": self.data.get("workload")}
        r = _migrctl_json(conn, ["peer", "start", self.j.id], spec)
        self._begin("verify", target_pid=r["pid"])
        self.verify(conn, info, ports=False)
        self._begin("commit")
        self.commit(conn)

    def verify(self, conn: transport.Connection, info: ProcessInfo, ports: bool = True,
               seen: dict[str, Any] | None = None) -> None:
        """seen: the target's status as reported with the restore (saves a round trip)."""
        st = seen if seen is not None else _migrctl_json(conn, ["peer", "status", self.j.id])["restored"]
        if not st or not st["alive"]:
            raise MigrdError(f"the restored process is not running on {conn.host.name}")
        if tuple(st["cmdline"]) != info.cmdline:
            raise MigrdError(f"the process on {conn.host.name} runs {st['cmdline']!r}, "
                             f"expected {list(info.cmdline)!r}")
        missing = {s.port for s in info.listening} - set(st["ports"])
        if ports and missing:
            raise MigrdError(f"the restored process does not listen on port(s) "
                             f"{', '.join(map(str, sorted(missing)))} on {conn.host.name}")

    def commit(self, conn: transport.Connection | None,
               talk: transport.Conversation | None = None) -> None:
        """Past the point of no return: the target copy runs. Idempotent. talk: the restore's
        session, still waiting for our word; without it (or if it broke) a `peer finish`.
        A failure leaves the migration in doubt, never rolled back: by then the source may be
        ended and the copy there may run, so a rollback could kill the only copy or restore
        an older state beside it. `migrd recover` commits again."""
        try:
            self.finish_commit(conn, talk)
        except MigrdError as e:
            self.j.record("in_doubt", reason=f"commit not finished: {e}")
            raise InDoubt(f"migration {self.j.id}: the commit on {self.opts.target} did not finish ({e}); "
                          f"nothing was undone. Run `migrd recover` to finish it.") from None

    def finish_commit(self, conn: transport.Connection | None, talk: transport.Conversation | None) -> None:
        d = self.data
        opts = self.opts
        source = self.source
        streamed_move = bool(d.get("streamed")) and opts.mode == "move"
        if streamed_move:
            # The streamed dump left the source stopped: it goes before the target runs. A
            # stopped task with SIGKILL pending never runs again, so freeing its memory need
            # not delay the target (grace 0); we wait for it after.
            workloads.end(*source, grace=0)
        announce_error = None
        if conn is not None:
            reply: dict[str, Any] = {}
            if talk is not None:
                try:
                    talk.send_line("commit")
                    reply = json.loads(talk.readline())
                except (TransportError, ValueError):
                    pass  # `peer finish` below is idempotent
            if "finished" not in reply:
                args = ["peer", "finish", self.j.id] + (["--address", opts.move_address] if opts.move_address else [])
                reply = _migrctl_json(conn, args)
            announce_error = reply.get("announce_error")
            if announce_error:
                log.warning("migration %s: the moved address %s was not announced (%s); clients may "
                            "stall until their ARP entries expire", self.j.id, opts.move_address, announce_error)
            if opts.mode == "move" and "freeze" in d and "downtime" not in d:
                # From the freeze here to the copy there running again.
                self.j.record("resumed", downtime=round(time.time() - d["freeze"], 4))
        failpoints.step("resumed")
        if streamed_move:
            workloads.end(*source)
        if opts.mode in ("move", "restart"):
            for table in d.get("nft_tables", []):
                netaddr.nft_delete(table)
            if d.get("workload"):
                workloads.Registry(self.cfg.state_dir).remove(d["workload"])
        shutil.rmtree(self.images, ignore_errors=True)
        self.j.record("done", outcome="ok", announce_error=announce_error)

    # --- the way back ----------------------------------------------------------------------

    def rollback(self, conn: transport.Connection | None, reason: str) -> None:
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
        try:
            if conn is None:
                conn = transport.connect(self.cfg, opts.target)
            args = ["peer", "abort", self.j.id] + (["--address", opts.move_address] if opts.move_address else [])
            for path in created_there:
                args += ["--file", path]
            _migrctl_json(conn, args)
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
        if opts.mode == "move" and d.get("address_interface"):
            if netaddr.holder_of(opts.move_address) is None:
                netaddr.add(opts.move_address, d["address_interface"])
        local_pid = None
        # After target_unclean the local side was undone already (the source's PID and start
        # time no longer name the copy a local restore made).
        if (opts.mode in ("move", "restart") and "checkpoint" in states and "target_unclean" not in states
                and not self.source_alive()):
            local_pid = self.restore_locally() if opts.mode == "move" else self.start_locally()
        elif d.get("streamed") and self.source_alive():
            # A streamed dump leaves the source stopped, not ended: it simply runs on.
            workloads.resume(*self.source)
        tables = d.get("nft_tables")
        if tables is None:  # ended between the dump and `transfer`, which records them
            tables = self.dump_tables()
        shutil.rmtree(self.images, ignore_errors=True)
        for table in tables:
            netaddr.nft_delete(table)  # a local restore unlocks its own; a dump-only leaves it
        if unclean:
            self.j.record("target_unclean", reason=unclean, local_pid=local_pid)
            return
        self.j.record("rolled_back", reason=d.get("reason", reason), local_pid=local_pid or d.get("local_pid"))

    def dump_tables(self) -> list[str]:
        """CRIU's network-lock tables this migration's dump left here, found by the run id in
        its inventory.img (none if the dump never got that far)."""
        try:
            inventory = (self.images / "inventory.img").read_bytes()
        except OSError:
            return []
        return netaddr.tables_of_dump(netaddr.nft_tables(), inventory)

    def restore_locally(self) -> int:
        """Bring the dumped source back from its own images."""
        d = self.data
        try:
            if (self.images / "manifest.json").exists():
                r = cp.restore(self.cfg, self.images)
            else:
                # The orchestrator died between CRIU's dump and writing the manifest; these
                # images never left this host, so CRIU may read them unverified.
                info = self.info
                log = cp.log_path(self.cfg, "restore", info.pid)
                r = find_criu(self.cfg).restore(self.images, log, tcp_established=self.opts.tcp_established,
                                                shell_job=not info.session_leader)
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
            reg.add(workloads.Workload(d["workload"], r.pid, psutil.Process(r.pid).create_time(),
                                      info.cmdline, info.cwd, d.get("stdout") or "", self.cfg.host))
        return r.pid

    def start_locally(self) -> int:
        """Restart mode's way back: the command starts fresh here."""
        info = self.info
        reg = workloads.Registry(self.cfg.state_dir)
        if self.data.get("workload"):
            reg.remove(self.data["workload"])
        w = workloads.start(self.cfg.state_dir, info.cmdline, name=self.data.get("workload"),
                           cwd=info.cwd, env=info.environ, host=self.cfg.host)
        return w.pid

    def outcome(self) -> Outcome:
        from migrd.engine.journal import summarize

        s = summarize(self.j)
        d = self.data
        return Outcome(id=self.j.id, mode=self.opts.mode, source=d["source"], target=self.opts.target,
                       pid=d["request"]["pid"], target_pid=d.get("target_pid"), bytes=s.bytes,
                       phases=s.phases, downtime=s.downtime, dry_run=self.opts.dry_run,
                       dump_seconds=d.get("dump_seconds"), transfer_seconds=d.get("transfer_seconds"),
                       restore_seconds=d.get("restore_seconds"), streamed=bool(d.get("streamed")),
                       announce_error=d.get("announce_error"))


def migrate(cfg: Config, pid: int, opts: Options, progress: ProgressFn | None = None) -> Outcome:
    if opts.mode not in precheck.MODES:
        raise InputError(f"unknown mode {opts.mode!r} (known: {', '.join(precheck.MODES)})")
    if opts.strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {opts.strategy!r} (available here: {', '.join(STRATEGIES)})")
    if opts.target == cfg.host:
        raise InputError(f"{opts.target} is this host; choose another target")
    cfg.peer(opts.target)  # unknown host -> InputError before anything else
    info = procinfo.inspect(pid)
    reg = workloads.Registry(cfg.state_dir)
    w = reg.by_pid(pid)
    try:
        user = psutil.Process(pid).username()
    except (psutil.Error, KeyError):
        user = str(info.uid)
    if precheck.opt_in(cfg.migrate, info, user, _cgroups(pid), w is not None) is None:
        raise NotPermitted(f"PID {pid} ({' '.join(info.cmdline)[:60]}) is not opted in to migration: "
                           f"start it with `migrctl run`, or allow it in migrate.allow_users, "
                           f"allow_commands or allow_cgroups")
    j = Journal(cfg.state_dir / "migrations" / new_id())
    fd = j.lock()
    assert fd is not None
    try:
        return Migration(cfg, j, fd).start(info, opts, w.name if w else None,
                                            w.stdout if w else None, progress)
    finally:
        os.close(fd)


def recover(cfg: Config) -> list[dict[str, Any]]:
    """Finish or undo every migration a crash left unfinished. Returns what was done; a
    corrupt journal is left alone and reported (with "corrupt": the error), the others are
    still recovered."""
    report = []
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


def _recover_one(m: Migration, last: str | None) -> str:
    if last in (None, "precheck", "prechecked"):
        m.j.record("rolled_back", reason="interrupted before the checkpoint; nothing had changed")
        return "nothing had changed"
    untrusted.build(Recorded, m.data, JournalCorrupt, str(m.j.path))
    states = [r.state for r in m.j.records()]
    try:
        conn: transport.Connection | None = transport.connect(m.cfg, m.opts.target)
    except (TransportError, ConfigError):  # e.g. an unusable ssh.client_key: as if unreachable
        conn = None
    try:
        if "commit" in states:
            if conn is None:
                # The target's copy waits, stopped, for our word: finishing here alone would
                # leave no copy running at all.
                raise InDoubt(f"migration {m.j.id}: committed, but {m.opts.target} cannot be reached to "
                              f"resume its copy; run `migrd recover` again once it answers")
            m.commit(conn)
            return "committed"
        if "rollback" not in states and "restore" in states and conn is not None:
            st = _migrctl_json(conn, ["peer", "status", m.j.id])["restored"]
            if st and st["alive"]:
                try:
                    m.verify(conn, m.info, ports=m.opts.mode != "restart")
                except MigrdError as e:
                    m.rollback(conn, f"recovered after a crash at {last}; the target copy failed "
                                     f"verification: {e}")
                    return "rolled back"
                m.j.record("commit", recovered=True)
                m.commit(conn)
                return "rolled forward: the target copy was restored and verified"
        m.rollback(conn, m.data.get("reason") or f"recovered after a crash at {last}")
        if m.j.last_state() == "target_unclean":
            return f"rolled back here; {m.opts.target} still cannot be cleaned (run recover again once it answers)"
        return "rolled back"
    finally:
        if conn is not None:
            conn.close()
