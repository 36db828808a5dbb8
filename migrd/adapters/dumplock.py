"""One CRIU dump at a time on this machine, and no stale `proc.crtools` in a dump's way.

When a dumped task's /proc is not its own (a `migrctl run` workload: its own PID namespace,
the host's /proc), CRIU's parasite creates `proc.crtools` in the task's working directory,
mounts a procfs there and removes it again (criu/pie/parasite.c, get_proc_fd). Two dumps of
tasks sharing a working directory collide on that name ("Can't create a directory (-17)"),
and a dump killed between the mkdir and the rmdir leaves an empty directory that fails every
later dump from there. The lock is machine-wide rather than per state_dir because the name
collides in the one filesystem every migrd on the machine (bed hosts included) shares.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import private
from migrd.errors import DumpLockTimeout

log = logging.getLogger(__name__)

LOCK_PATH = Path("/run/migrd/criu-dump.lock")
CRTOOLS = "proc.crtools"
#: Seconds of waiting for the lock after which the wait is logged and journaled.
NOTABLE_WAIT = 1.0
_POLL = 0.05


@dataclass(frozen=True)
class Entry:
    """What lstat and listdir say about `proc.crtools` in one working directory."""

    is_dir: bool
    entries: int
    dev: int
    cwd_dev: int


def is_stale(e: Entry) -> bool:
    """A leftover of a killed dump: a real (not symlinked) directory, empty, and on the same
    device as the directory holding it, so nothing is mounted there (pure)."""
    return e.is_dir and e.entries == 0 and e.dev == e.cwd_dev


def notable_wait(seconds: float) -> bool:
    """Worth telling the operator: the freeze started this much later than asked (pure)."""
    return seconds >= NOTABLE_WAIT


def busy_message(path: Path, timeout: float, holder: str) -> str:
    """The one line a timed-out wait raises (pure)."""
    who = f" (last taken by PID {holder})" if holder.isdigit() else ""
    return (f"another CRIU dump on this host held {path}{who} for {timeout:g} s; "
            f"retry when it is done, or raise criu.dump_lock_timeout")


@dataclass(frozen=True)
class Hold:
    """The lock, held through fd (inheritable by CRIU through pass_fds); waited: seconds."""

    fd: int
    waited: float


def acquire(timeout: float, path: Path = LOCK_PATH) -> Hold:
    """Take the lock, waiting at most timeout seconds (DumpLockTimeout after that)."""
    private.private_dir(path.parent)
    fd = private.open_private(path, os.O_RDWR)
    t0 = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= timeout:
                    holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
                    raise DumpLockTimeout(busy_message(path, timeout, holder)) from None
                time.sleep(_POLL)
        # Names the holder for a waiter's message; a CRIU that inherited the lock may outlive us.
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    waited = time.monotonic() - t0
    if notable_wait(waited):
        log.warning("waited %.1f s for another CRIU dump on this host to finish (%s)", waited, path)
    return Hold(fd, waited)


@contextlib.contextmanager
def held(timeout: float, path: Path = LOCK_PATH) -> Iterator[Hold]:
    hold = acquire(timeout, path)
    try:
        yield hold
    finally:
        os.close(hold.fd)


def _entry(cwd: Path) -> Entry | None:
    try:
        st = os.lstat(cwd / CRTOOLS)
        is_dir = stat.S_ISDIR(st.st_mode)
        entries = len(os.listdir(cwd / CRTOOLS)) if is_dir else -1
        return Entry(is_dir, entries, st.st_dev, os.stat(cwd).st_dev)
    except OSError:
        return None


def clear_stale(pids: Iterable[int]) -> list[str]:
    """With the lock held: remove an empty, unmounted `proc.crtools` from the working
    directory of each task (rmdir only: anything with content is not ours to delete). Returns
    the paths removed, as the tasks see them."""
    seen: set[tuple[int, int]] = set()
    removed: list[str] = []
    for pid in pids:
        cwd = Path(f"/proc/{pid}/cwd")  # resolved in the task's own mount namespace
        try:
            st = os.stat(cwd)
            shown = os.readlink(cwd)
        except OSError:
            continue  # exited: CRIU will say so if it matters
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        entry = _entry(cwd)
        if entry is None or not is_stale(entry):
            continue
        where = os.path.join(shown, CRTOOLS)
        try:
            os.rmdir(cwd / CRTOOLS)
        except OSError as e:
            log.warning("could not remove the stale %s: %s", where, e.strerror)
            continue
        log.warning("removed a stale %s (left by an interrupted CRIU dump; it would fail this one)", where)
        removed.append(where)
    return removed
