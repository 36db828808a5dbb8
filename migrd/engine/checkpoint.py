"""Checkpoint a process into a directory and restore it from one: CRIU plus the manifest.

This is the single-host building block; the migration orchestrator composes it with the
transport."""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrd.engine import failpoints
from migrd.adapters import dumplock, private, procfs
from migrd.engine import manifest as mf
from migrd.config import Config
from migrd.engine.subjects import CriuOptions, ProcessTree
from migrd.adapters import criu as criu_mod
from migrd.adapters.criu import Criu, LazyDump, find_criu
from migrd.model import ProcessInfo
from migrd.errors import InputError, NotPermitted

@dataclass(frozen=True)
class Parent:
    """The pre-dump a dump leans on (pre-copy on a soft-dirty kernel): CRIU's link to its
    images, relative to the dump's, and how many pre-dumps the chain holds."""

    link: str
    depth: int


@dataclass(frozen=True)
class Checkpoint:
    manifest: mf.Manifest
    images: Path
    dump_seconds: float
    log: Path
    #: Seconds spent waiting for another CRIU dump on this host before this one could start.
    lock_wait: float = 0.0

    def frozen_at(self, called_at: float) -> float:
        """When the task froze, for a dump called at `called_at`: only once the dump lock was
        ours."""
        return called_at + self.lock_wait

    def figures(self, called_at: float, streamed_bytes: int = 0) -> dict[str, Any]:
        """The transfer step's journal figures for a dump called at `called_at`: the freeze,
        how long the dump took, the lock wait when it delayed the freeze noticeably, and the
        image's bytes (with any pages streamed past the image directory)."""
        note = {"dump_lock_wait": round(self.lock_wait, 3)} if dumplock.notable_wait(self.lock_wait) else {}
        return {"freeze": self.frozen_at(called_at), "dump_seconds": round(self.dump_seconds, 4), **note,
                "image_bytes": self.manifest.image_bytes + streamed_bytes}


def log_path(cfg: Config, action: str, pid: int | str) -> Path:
    logs = private.private_dir(cfg.state_dir / "logs")
    path = logs / f"{action}-{pid}-{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns() % 10**6}.log"
    # Created here 0600: CRIU would create it 0644 less the umask of whoever ran migrctl.
    os.close(private.open_private(path, os.O_WRONLY))
    return path


def _prepare_dir(images: Path) -> bool:
    """Create images 0700 (returns True) or accept an existing empty directory only root can
    write (False): CRIU writes the process's memory there."""
    if images.is_symlink() or images.exists():
        if not images.is_symlink() and not images.is_dir():
            raise InputError(f"{images} exists and is not a directory")
        private.check_trusted_dir(images, "image directory")
        if any(images.iterdir()):
            raise InputError(f"{images} exists and is not empty; choose a new directory")
        private.private_dir(images)
        return False
    private.private_dir(images)
    try:
        private.check_trusted_dir(images, "image directory")
    except NotPermitted:
        images.rmdir()
        raise
    return True


def checkpoint(cfg: Config, pid: int, images: Path, *, leave_running: bool = False,
               leave_stopped: bool = False, tcp_established: bool = False,
               criu: Criu | None = None, pass_fds: tuple[int, ...] = (),
               page_server_fd: int | None = None, parent: Parent | None = None,
               pre: bool = False) -> Checkpoint:
    """page_server_fd: send the pages to a page server over this socket (they are then not
    in images, nor in the manifest). parent: the pre-dump whose pages this dump need not hold
    again. pre: a CRIU pre-dump (the memory only; the process runs on)."""
    from migrd.adapters import procinfo  # psutil, for the source only: the target imports this module

    criu = criu or find_criu(cfg)
    info = procinfo.inspect(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        raise InputError(f"process {pid} exited while being inspected") from None
    if procfs.proc_unreachable(status):
        raise NotPermitted(
            f"PID {pid} is the init of its own PID namespace but runs without root's rights "
            f"(uid {info.uid}); CRIU cannot dump it there. Start such a service with "
            f"`migrctl run --user USER -- CMD` (migrctl drops the rights itself)")
    created = _prepare_dir(images)
    log = log_path(cfg, "pre-dump" if pre else "dump", pid)
    options = ProcessTree(info).criu_options(tcp_established)
    as_user = criu_mod.dump_user(procinfo.tree_creds(pid),
                                 procfs.capabilities(Path("/proc/self/status").read_text()))
    try:
        # CRIU inherits the lock: a dump outliving a killed caller still holds it.
        with dumplock.held(cfg.criu.dump_lock_timeout) as lock:
            dumplock.clear_stale(info.tree_ids or (pid,))
            with failpoints.dying_while("dumping"):
                result = criu.dump(pid, images, log, leave_running=leave_running, leave_stopped=leave_stopped,
                                   pass_fds=(*pass_fds, lock.fd), page_server_fd=page_server_fd,
                                   as_user=as_user, parent=parent.link if parent else None, pre=pre,
                                   **options)
        m = _seal(cfg, criu, images, info, options, parents=parent.depth if parent else 0, pre=pre)
    except BaseException:
        # CRIU resumes the task when a dump fails; leave no half-written checkpoint behind.
        if created:
            shutil.rmtree(images, ignore_errors=True)
        else:
            for child in images.iterdir():
                child.unlink()
        raise
    return Checkpoint(m, images, result.seconds, log, lock.waited)


def _seal(cfg: Config, criu: Criu, images: Path, info: ProcessInfo, options: CriuOptions,
          parents: int = 0, pre: bool = False) -> mf.Manifest:
    """After CRIU wrote the images: make them root's only and write the manifest. The failpoint
    `dumped` is the freeze's dump, not a pre-dump."""
    private.restrict_files(images)
    if not pre:
        failpoints.point("dumped")
    return write_manifest(cfg, criu, images, info, dict(options), parents=parents)


def write_manifest(cfg: Config, criu: Criu, images: Path, info: ProcessInfo, options: dict[str, Any],
                   **subject: Any) -> mf.Manifest:
    """The manifest of the (already root-only) files in images, written beside them. subject:
    what a container subject adds (its kind, record and rootfs changes)."""
    m = mf.Manifest(format=mf.FORMAT, created=time.time(), criu_version=criu.version(),
                    host=cfg.host or socket.gethostname(), process=info, options=options,
                    files=mf.scan(images), **subject)
    mf.write(images, m)
    return m


def lazy_checkpoint(cfg: Config, pid: int, images: Path, sock_fd: int, *, tcp_established: bool = False,
                    criu: Criu | None = None, pass_fds: tuple[int, ...] = (),
                    timeout: float = 600) -> tuple[Checkpoint, LazyDump]:
    """Post-copy's dump: every image but the anonymous memory, which the returned running
    dump serves over sock_fd (Criu.lazy_dump). Returns once the images and manifest are
    complete; the process stays frozen."""
    from migrd.adapters import procinfo  # psutil, for the source only: the target imports this module

    criu = criu or find_criu(cfg)
    info = procinfo.inspect(pid)
    created = _prepare_dir(images)
    log = log_path(cfg, "dump", pid)
    options = ProcessTree(info).criu_options(tcp_established)
    dump: LazyDump | None = None
    try:
        # Held until the images are complete (the parasite is gone by then), not while CRIU
        # serves pages for the rest of the post-copy; so CRIU does not inherit it.
        with dumplock.held(cfg.criu.dump_lock_timeout) as lock:
            dumplock.clear_stale(info.tree_ids or (pid,))
            t0 = time.monotonic()
            dump = criu.lazy_dump(pid, images, log, sock_fd, pass_fds=pass_fds, **options)
            try:
                with failpoints.dying_while("dumping"):
                    dump.wait_images(timeout)
            except BaseException:
                dump.kill()  # before the lock goes: no parasite runs without it
                raise
            seconds = time.monotonic() - t0
        m = _seal(cfg, criu, images, info, options)
    except BaseException:
        if dump is not None:
            dump.kill()  # a failed dump resumed the task itself; a killed one leaves it to the caller
        if created:
            shutil.rmtree(images, ignore_errors=True)
        raise
    return Checkpoint(m, images, seconds, log, lock.waited), dump


def restore(cfg: Config, images: Path, *, criu: Criu | None = None,
            pid_wait: float | None = None, leave_stopped: bool = False, hashed: bool = False,
            streamed: dict[str, int] | None = None, lazy_work: Path | None = None):
    """Verify the manifest, make sure the PID is free, and restore detached. hashed=True: the
    files' sha256 were checked as they arrived, so only names and sizes are checked again.
    streamed: page images a page server wrote (see manifest.verify)."""
    if images.is_dir() or images.is_symlink():  # anything else: verify says what it is
        private.check_trusted_dir(images, "image directory")
    m = mf.verify(images, hashes=not hashed, streamed=streamed)
    criu = criu or find_criu(cfg)
    pid_wait = cfg.migrate.pid_wait if pid_wait is None else pid_wait
    if not m.process.own_pid_namespace:
        taken = procfs.wait_pids_free(m.process.tree_ids or (m.process.pid,), pid_wait)
        if taken is not None:
            pid, who = taken
            raise NotPermitted(
                f"PID {pid} is needed for the restore but is still taken by {who} "
                f"after {pid_wait:g} s; end that process (or wait for it to be reaped)")
    log = log_path(cfg, "restore", m.process.pid)
    try:
        return criu.restore(images, log, tcp_established=bool(m.options.get("tcp_established")),
                            shell_job=bool(m.options.get("shell_job")), leave_stopped=leave_stopped,
                            lazy_work=lazy_work)
    finally:
        private.restrict_files(images)  # CRIU's stats-restore, 0644 less the umask
