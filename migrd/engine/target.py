"""The target side of a migration: what `migrctl peer ...` does when the source asks.

Each incoming migration has a directory state_dir/incoming/ID holding the received images and
a small record of what was done here (restored.json), so the source can ask after a crash
whether the copy here is running, and abort or finish it.
"""

from __future__ import annotations

import base64
import fcntl
import dataclasses
import functools
from dataclasses import dataclass
import json
import os
import shutil
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from migrd.engine import checkpoint as cp
from migrd.adapters import netaddr, private, procfs, untrusted, workloads
from migrd.engine import lazy as lazy_mod
from migrd.engine import pagestream, predump
from migrd.engine import receive
from migrd.core import precheck
from migrd.config import Config
from migrd.adapters.criu import find_criu
from migrd.errors import ImageError, InputError, MigrdError
from migrd.engine.manifest import read as read_manifest
from migrd.engine.subjects import SUBJECTS, Subject


@dataclass(frozen=True)
class Go:
    """The source's word to start a prepared restore."""

    #: Bytes of streamed pages the source sent; None when the pages are in the images.
    page_bytes: int | None = None


def parse_go(line: str) -> Go:
    return untrusted.build(Go, untrusted.loads(line, InputError, "the source's go line"), InputError,
                           "the source's go line")


def incoming(cfg: Config, mid: str) -> Path:
    if not mid or "/" in mid or mid.startswith("."):
        raise InputError(f"bad migration id {mid!r}")
    return cfg.state_dir / "incoming" / mid


def _existing_ancestor(path: Path) -> Path:
    """path, or its nearest ancestor that exists: the filesystem path will be created on."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gather(cfg: Config, req: precheck.Request) -> precheck.TargetFacts:
    """Facts about this host for req (adapter: CRIU, /proc, filesystem, ip)."""
    criu_ok, criu_msg, cpu_ok, cpu_msg = True, "", True, ""
    if req.needs_criu:
        try:
            criu = find_criu(cfg)
            criu_ok, criu_msg = criu.check()
            if criu_ok and req.cpuinfo:
                with tempfile.TemporaryDirectory(prefix="migrd-cpuinfo-") as tmp:
                    Path(tmp, "cpuinfo.img").write_bytes(base64.b64decode(req.cpuinfo))
                    try:
                        criu.cpuinfo_check(Path(tmp), Path(tmp) / "check.log")
                    except MigrdError as e:
                        cpu_ok, cpu_msg = False, str(e)
        except MigrdError as e:
            criu_ok, criu_msg = False, str(e)
    private.private_dir(cfg.state_dir)
    return precheck.TargetFacts(
        criu_ok=criu_ok, criu_message=criu_msg, cpu_ok=cpu_ok, cpu_message=cpu_msg,
        mem_available=procfs.mem_available(),
        # Where the images and streamed pages will land, which may be another filesystem
        # than state_dir's.
        disk_free=shutil.disk_usage(_existing_ancestor(incoming(cfg, req.id))).free,
        disk_path=str(incoming(cfg, req.id).parent),
        ports_taken=tuple(sorted(procfs.listening_ports() & set(req.ports))),
        address_present=bool(req.move_address and netaddr.holder_of(req.move_address)),
        address_interface=netaddr.interface_for(req.move_address) if req.move_address else None,
        incoming_exists=incoming(cfg, req.id).exists(),
        subject=subject_facts(req.ask, cfg, req.mode),
    )


@functools.singledispatch
def subject_facts(ask: precheck.Ask, cfg: Config, mode: str) -> precheck.SubjectFacts:
    """The facts here for the subject's own ask, by the ask's type."""
    raise TypeError(f"no facts for {type(ask).__name__}")  # a migrd bug: every Ask type is registered


@subject_facts.register
def _process_facts(ask: precheck.ProcessAsk, cfg: Config, mode: str) -> precheck.ProcessFacts:
    # On hosts sharing one PID space (the bed) the source process itself is visible here; in
    # move mode its PIDs are free once the dump ends it.
    source_here = mode == "move" and workloads.same_process(ask.pid, ask.start_time)
    taken = {}
    for pid in () if source_here else ask.tree_ids:
        if (who := procfs.holder(pid)) is not None:
            taken[pid] = who
    files: dict[str, int | None] = {}
    for path, _ in ask.files:
        try:
            files[path] = os.stat(path).st_size
        except OSError:
            files[path] = None
    # Over the bytes the source read: a shared file that grew since still matches.
    identities = {path: procfs.file_identity(path, here.size) for path, here in ask.identities.items()}
    return precheck.ProcessFacts(pids_taken=taken, files=files, identities=identities)


@subject_facts.register
def _container_facts(ask: precheck.ContainerAsk, cfg: Config, mode: str) -> precheck.ContainerFacts:
    subject = SUBJECTS.get(ask.runtime)
    if subject is None:
        return precheck.ContainerFacts(runtime_ok=False, runtime_message=f"unknown runtime {ask.runtime!r}")
    return subject.target_facts(cfg, ask)


def parse_precheck(raw: Any) -> precheck.Request:
    """The source's precheck request, every type checked (InputError naming what is wrong)."""
    req = untrusted.build(precheck.Request, raw, InputError, "precheck request")
    if req.cpuinfo is not None:
        try:
            base64.b64decode(req.cpuinfo, validate=True)
        except ValueError:
            raise InputError("precheck request: key 'cpuinfo': not base64") from None
    return req


def run_precheck(cfg: Config, raw: Any) -> dict[str, Any]:
    req = parse_precheck(raw)
    facts = gather(cfg, req)
    return {"problems": precheck.evaluate(req, facts), "incoming": str(incoming(cfg, req.id) / "images"),
            "facts": dataclasses.asdict(facts), "not_to_copy": list(precheck.not_to_copy(req, facts))}


def _write(path: Path, data: dict[str, Any]) -> None:
    private.write_atomic(path, json.dumps(data))


#: A header line is a path and three small fields; anything longer is not one.
MAX_HEADER = 8192


def receive_files(infd: int = 0) -> dict[str, int]:
    """Files the source carries (`migrctl peer files`): on infd, a JSON header line then the
    bytes of each file, until EOF. Each is written beside its final path and renamed over it
    only once its sha256 matched; missing parents are created 0700. Returns path -> size."""
    from migrd.engine.manifest import sha256_file
    from migrd.engine.receive import read_line

    out: dict[str, int] = {}
    while line := read_line(infd, MAX_HEADER):
        f = receive.carried_file(line)
        tmp = f.partial
        fd = private.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
        try:
            left = f.size
            while left:
                chunk = os.read(infd, min(left, 1 << 20))
                if not chunk:
                    raise InputError(f"the source stopped in the middle of {f.path}")
                receive.write_all(fd, chunk)
                left -= len(chunk)
            os.fchmod(fd, f.mode)
        finally:
            os.close(fd)
        if sha256_file(tmp) != f.sha256:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"{f.path} arrived altered (sha256 mismatch)")
        os.replace(tmp, f.path)
        out[f.path] = f.size
    return out


def pages(cfg: Config, mid: str, compression: str) -> None:
    """Receive a dump's pages on stdin (answering on stdout) into incoming/ID/pages, and
    record what arrived in pages.json for the restore to check against the source's count."""
    d = incoming(cfg, mid)
    target = d / "pages"
    shutil.rmtree(target, ignore_errors=True)  # a retried stream starts clean
    private.private_dir(target)  # before the page server writes the process's memory into it
    received = pagestream.serve(find_criu(cfg), target, cp.log_path(cfg, "page-server", mid),
                                compression, cfg.ssh.op_timeout)
    private.restrict_files(target)
    files = {e.name: e.stat().st_size for e in os.scandir(target)}
    _write(d / "pages.json", {"bytes": received, "files": files})


def precopy(cfg: Config, mid: str, compression: str) -> None:
    """Pre-copy's store (migrd.engine.precopy): the dump's page images are rebuilt into
    incoming/ID/pages and recorded in pages.json, as a page stream's are."""
    from migrd.engine import precopy as precopy_mod

    d = incoming(cfg, mid)
    precopy_mod.serve(d / "precopy.store", d / "pages", lambda got: _write(d / "pages.json", got),
                      compression=compression)


def _take_pages(d: Path, images: Path, page_bytes: int) -> dict[str, int]:
    """Move the streamed page images in beside the received ones; return name -> size."""
    try:
        rec = json.loads((d / "pages.json").read_text())
    except FileNotFoundError:
        raise ImageError("the streamed pages never arrived here (no complete page stream)") from None
    if rec["bytes"] != page_bytes:
        raise ImageError(f"the page stream brought {rec['bytes']} bytes here, the source sent {page_bytes}")
    for name in rec["files"]:
        os.replace(d / "pages" / name, images / name)
    return {name: int(size) for name, size in rec["files"].items()}


def restore(cfg: Config, mid: str, name: str | None, stdout: str | None,
            address: str | None, page_bytes: int | None = None, lazy_work: Path | None = None) -> dict[str, Any]:
    """lazy_work: the work directory of the `criu lazy-pages` daemon serving this migration's
    memory (post-copy)."""
    if name is not None:
        workloads.check_name(name)
    d = incoming(cfg, mid)
    images = d / "images"
    streamed = _take_pages(d, images, page_bytes) if page_bytes is not None else None
    if address:
        ifname = netaddr.interface_for(address)
        if ifname is None:
            raise InputError(f"no interface for {address} on this host")
        if not netaddr.holder_of(address):
            netaddr.add(address, ifname)
    # Stopped until the source commits: a copy that never ran can be discarded without losing
    # any progress, whatever fails before the commit.
    # `migrctl receive` hashed every file as it wrote it moments ago; hashing again here would
    # add ~0.6 s per GiB of downtime for nothing.
    m = read_manifest(images)
    if m.parents:
        predump.link_chain(images, m.parents)
    pid, seconds = _subject(m.subject).restore_there(cfg, images, m, hashed=True, streamed=streamed,
                                                      lazy_work=lazy_work)
    start_time = procfs.start_time(pid)
    if start_time is None:
        raise MigrdError(f"the restored process {pid} ended at once")
    _write(d / "restored.json", {"pid": pid, "start_time": start_time, "name": name, "subject": m.subject,
                                 "container": m.container.name if m.container else None})
    if name:
        workloads.Registry(cfg.state_dir).add(workloads.Workload(
            name, pid, start_time, m.process.cmdline, m.process.cwd, stdout or "", cfg.host,
            arrived=time.time()))
    return {"pid": pid, "seconds": round(seconds, 4), "start_time": start_time,
            "restored": status(cfg, mid)["restored"]}


def _subject(kind: str | None) -> type[Subject]:
    """The subject a manifest or restore record names (records before subjects: a process)."""
    subject = SUBJECTS.get(kind or "process")
    if subject is None:
        raise ImageError(f"the images hold an unknown kind of subject {kind!r}")
    return subject


def lazy(cfg: Config, mid: str, name: str | None, stdout: str | None, address: str | None,
         link: lazy_mod.Link) -> None:
    """Post-copy's target side, driven by the source over one framed channel (see
    migrd.engine.lazy): receive the images, restore stopped with lazy pages, resume on
    `commit`, and report when the last page arrived. Anything but a commit (an `abort`, the
    source's end) ends the copy; a failure of the page transfer after the commit ends it too,
    since its missing memory would read as zeros."""
    d = incoming(cfg, mid)
    private.private_dir(d)
    # Held until this function is done with d: `peer status` reports a post-copy in progress,
    # so a recovering source waits instead of acting on half-settled state.
    busy = private.open_private(d / BUSY, os.O_WRONLY)
    fcntl.flock(busy, fcntl.LOCK_EX)
    try:
        _lazy(cfg, mid, name, stdout, address, link, d)
    finally:
        os.close(busy)


def _lazy(cfg: Config, mid: str, name: str | None, stdout: str | None, address: str | None,
          link: lazy_mod.Link, d: Path) -> None:
    images = d / "images"
    criu = find_criu(cfg)
    daemon = None
    committed = False
    try:
        sha = _expect(link, "images", cfg.ssh.op_timeout)["images"]
        receive.receive(link.image_read, images, sha)
        ours, theirs = pagestream.socketpair()
        work = private.private_dir(d / "lazy")
        daemon = criu.lazy_pages(images, work, cp.log_path(cfg, "lazy-pages", mid), theirs.fileno(),
                                 cfg.ssh.op_timeout)
        theirs.close()
        link.attach(ours)
        link.send_control(restore(cfg, mid, name, stdout, address, lazy_work=work))
        word = link.control(cfg.ssh.op_timeout) or {}
        if word.get("do") != "commit":
            raise InputError(f"no commit from the source ({word.get('do') or 'it went away'}); copy ended")
        if error := daemon.failed():
            raise error  # pages missing and no one to fetch them: the copy must never run
        committed = True
        link.send_control(finish(cfg, mid, address, cleanup=False))
        stats = daemon.wait(cfg.migrate.lazy_timeout)
    except BaseException as e:
        if daemon is not None:
            daemon.kill()
        if committed:
            rec = _restored(d)
            if rec:
                workloads.end(rec["pid"], rec["start_time"])
        if not link.closed.is_set():
            with suppress(OSError):
                link.send_control({"error": str(e) or type(e).__name__, "committed": committed})
        if committed:
            # The record stays until the source (or its recovery) has heard of the loss.
            for entry in os.scandir(d):
                if entry.name not in ("restored.json", BUSY):
                    shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir() else os.unlink(entry.path)
            _write(d / LOST, {"reason": str(e) or type(e).__name__})
        else:
            abort(cfg, mid, address, [])
        raise
    # Every page is here: the copy no longer needs the source, whether or not it still listens.
    shutil.rmtree(d, ignore_errors=True)
    with suppress(OSError):
        link.send_control({"pages_done": round(time.time(), 4), "copied_pages": stats.copied_pages,
                           "total_pages": stats.total_pages, "on_demand_pages": stats.on_demand_pages,
                           "faults": stats.faults, "bytes_in": link.pages_in})


def _expect(link: lazy_mod.Link, key: str, timeout: float) -> dict[str, Any]:
    msg = link.control(timeout)
    if msg is None or key not in msg:
        raise InputError(f"the source never sent {key} ({link.error or 'session ended'})")
    return msg


@dataclass(frozen=True)
class StartSpec:
    """Restart mode's request (JSON from the source): the command line to run fresh here."""

    cmdline: tuple[str, ...]
    cwd: str | None = None
    env: dict[str, str] | None = None
    name: str | None = None
    #: The user it ran as there, by number (names may differ between hosts); None: root.
    user: str | None = None


def start(cfg: Config, mid: str, raw: Any) -> dict[str, Any]:
    """Restart mode: run the command line fresh here as a migratable workload, as the user it
    ran as there."""
    spec = untrusted.build(StartSpec, raw, InputError, "start request")
    if not spec.cmdline:
        raise InputError("start request: the command line is empty")
    if spec.user is not None and not spec.user.isdigit():
        raise InputError(f"restart as user {spec.user!r}: not a user number")
    d = private.private_dir(incoming(cfg, mid))
    w = workloads.start(cfg.state_dir, spec.cmdline, name=spec.name, cwd=spec.cwd, env=spec.env,
                        host=cfg.host, user=spec.user)
    _write(d / "restored.json", {"pid": w.pid, "start_time": w.start_time, "name": w.name})
    return {"pid": w.pid, "start_time": w.start_time, "name": w.name}


def _restored(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "restored.json").read_text())
    except FileNotFoundError:
        return None


#: Left by a post-copy whose pages stopped arriving after the switch: the copy was ended.
LOST = "lost.json"
#: Locked while `peer lazy` works on the migration's directory.
BUSY = "lazy.lock"


def _busy(d: Path) -> bool:
    try:
        fd = os.open(d / BUSY, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def status(cfg: Config, mid: str) -> dict[str, Any]:
    d = incoming(cfg, mid)
    rec = _restored(d)
    out: dict[str, Any] = {"received": (d / "images").is_dir(), "restored": None}
    try:
        out["lost"] = json.loads((d / LOST).read_text())["reason"]
    except FileNotFoundError:
        pass
    out["busy"] = _busy(d)
    if rec:
        alive = workloads.same_process(rec["pid"], rec["start_time"])
        info: dict[str, Any] = {"pid": rec["pid"], "alive": alive}
        if alive:
            pid = rec["pid"]
            info["stopped"] = procfs.state(pid) == "T"
            info["cmdline"] = procfs.cmdline(pid)
            info["ports"] = sorted(procfs.listening_ports(pid))
        out["restored"] = info
    return out


def abort(cfg: Config, mid: str, address: str | None, files: list[str]) -> dict[str, Any]:
    """Undo whatever this host did for migration mid: end the copy, drop images, address and
    carried files. Idempotent."""
    d = incoming(cfg, mid)
    rec = _restored(d)
    if rec:
        workloads.end(rec["pid"], rec["start_time"])  # SIGKILL: the copy is stopped, never ran
        _subject(rec.get("subject")).ended_there(cfg, rec)
        if rec.get("name"):
            w = workloads.Registry(cfg.state_dir).get(rec["name"])
            if w and w.pid == rec["pid"]:
                workloads.Registry(cfg.state_dir).remove(rec["name"])
    if address:
        netaddr.delete(address)
    for path in files:
        Path(path).unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(Path(str(d / "images") + ".partial"), ignore_errors=True)
    return {"aborted": mid, "ended_pid": rec["pid"] if rec else None}


def finish(cfg: Config, mid: str, address: str | None, cleanup: bool = True) -> dict[str, Any]:
    """Commit on the target: let the restored copy run, announce a moved address, drop the
    images (unless cleanup=False: a lazy-pages daemon still reads them). Idempotent (recovery
    may repeat it)."""
    d = incoming(cfg, mid)
    rec = _restored(d)
    if rec:
        _subject(rec.get("subject")).committed_there(cfg, rec)
        workloads.resume(rec["pid"], rec["start_time"])
    announce_error = None
    if address:
        ifname = netaddr.holder_of(address)
        announce_error = netaddr.announce(address, ifname) if ifname else f"{address} is not on this host"
    if cleanup:
        shutil.rmtree(d, ignore_errors=True)
    return {"finished": mid, "resumed": rec["pid"] if rec else None, "announce_error": announce_error}


def checksums(paths: list[str]) -> dict[str, str | None]:
    from migrd.engine.manifest import sha256_file

    out: dict[str, str | None] = {}
    for p in paths:
        try:
            out[p] = sha256_file(Path(p))
        except OSError:
            out[p] = None
    return out
