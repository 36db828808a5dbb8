"""The migration journal: one JSON line per state, fsync'd before the step it names starts.

Everything `migrd recover` needs to finish or undo a migration after a crash is in here, and
`migrctl history` is a read of the same files.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrd.engine import failpoints
from migrd.adapters import private, untrusted
from migrd.errors import JournalCorrupt

#: The steps every strategy passes, in order; a strategy may add its own between them (each a
#: phase of its own in `summarize`). `rollback`/`rolled_back` can follow any state before the
#: strategy's point of no return. FINAL states need no recovery.
STEPS = ("precheck", "checkpoint", "transfer", "restore", "verify", "commit")
FINAL = ("done", "rolled_back", "refused", "lost")
#: States that mark an event, not the start of a phase (`auto`: the strategy chosen after the
#: `measure` phase; what follows is that strategy's own phases).
EVENTS = ("prechecked", "auto", "address_released", "resumed", "in_doubt", "target_unclean", "rollback")


def new_id() -> str:
    """Sortable by start: `migrctl history` lists journals in name order, and two migrations
    often start within the same second (milliseconds keep them apart)."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}-" + secrets.token_hex(3)


@dataclass(frozen=True)
class Record:
    state: str
    time: float
    data: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "journal.jsonl"

    @property
    def id(self) -> str:
        return self.dir.name

    def record(self, state: str, **data: Any) -> None:
        # Root only: the journal holds the process's command line and environment.
        private.private_dir(self.dir)
        self._repair_tail()
        line = json.dumps({"state": state, "time": time.time(), "data": data}, sort_keys=True)
        with os.fdopen(private.open_private(self.path, os.O_WRONLY | os.O_APPEND), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        failpoints.after_state(state)

    def _repair_tail(self) -> None:
        """Cut a torn last line (a crash mid-append) back to the last complete record, durably,
        so the next record starts on a line of its own instead of being glued to the torn one."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                return
            keep = size
            while keep > 0:
                start = max(0, keep - 4096)
                nl = os.pread(fd, keep - start, start).rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                keep = start
            os.ftruncate(fd, keep)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[Record]:
        """Every complete record; JournalCorrupt names the line of a malformed one. A torn last
        line (no newline: its append never completed) is not a record."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = raw.split(b"\n")[:-1]  # the piece after the last newline is torn or empty
        return [untrusted.build(Record, untrusted.loads(line, JournalCorrupt, f"{self.path}:{n}"),
                                JournalCorrupt, f"{self.path}:{n}")
                for n, line in enumerate(lines, 1)]

    def merged(self) -> dict[str, Any]:
        """All data recorded so far, later states overriding earlier keys."""
        data: dict[str, Any] = {}
        for r in self.records():
            data.update(r.data)
        return data

    def last_state(self) -> str | None:
        recs = self.records()
        return recs[-1].state if recs else None

    def lock(self, blocking: bool = True) -> int | None:
        """An exclusive flock on the migration directory, returned as an inheritable fd.

        The orchestrator passes it to CRIU, so a dump outlives a killed orchestrator *with*
        the lock held: recovery cannot act while CRIU is still writing or killing the task.
        """
        private.private_dir(self.dir)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        os.set_inheritable(fd, True)
        return fd


def all_journals(state_dir: Path) -> list[Journal]:
    root = state_dir / "migrations"
    if not root.is_dir():
        return []
    return [Journal(d) for d in sorted(root.iterdir()) if (d / "journal.jsonl").exists()]


@dataclass(frozen=True)
class Summary:
    id: str
    pid: int | None
    name: str | None
    source: str | None
    target: str | None
    mode: str | None
    outcome: str
    reason: str | None
    started: float
    phases: dict[str, float]
    bytes: int
    downtime: float | None
    target_pid: int | None
    strategy: str | None = None


def summarize(j: Journal) -> Summary:
    """Pure over the records: phase durations are the gaps between consecutive states. A
    corrupt journal is summarized as such, with the error as its reason."""
    try:
        recs = j.records()
        data: dict[str, Any] = {}
        for r in recs:
            data.update(r.data)
        phases: dict[str, float] = {}
        for a, b in zip(recs, recs[1:]):
            if a.state not in EVENTS and a.state not in FINAL:
                phases[a.state] = round(b.time - a.time, 4)
        last = recs[-1].state if recs else "empty"
        outcome = {"done": data.get("outcome", "ok"), "rolled_back": "rolled back",
                   "refused": "refused"}.get(last, f"unfinished (at {last})")
        req = data.get("request", {})
        if not isinstance(req, dict):
            raise JournalCorrupt(f"{j.path}: key 'request': expected an object")
        return untrusted.build(Summary, {
            "id": j.id, "pid": req.get("pid"), "name": data.get("workload"),
            "source": data.get("source"), "target": req.get("target"), "mode": req.get("mode"),
            "outcome": outcome, "reason": data.get("reason"),
            "started": recs[0].time if recs else 0.0, "phases": phases,
            "bytes": data.get("bytes", 0), "downtime": data.get("downtime"),
            "target_pid": data.get("target_pid"),
            # A hybrid move says how it switched.
            "strategy": (f"{data['strategy']}: {data['hybrid_switch']}" if data.get("hybrid_switch")
                         else data.get("strategy")),
        }, JournalCorrupt, str(j.path))
    except JournalCorrupt as e:
        return Summary(id=j.id, pid=None, name=None, source=None, target=None, mode=None,
                       outcome="corrupt journal", reason=str(e), started=0.0, phases={}, bytes=0,
                       downtime=None, target_pid=None)
