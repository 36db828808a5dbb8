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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import failpoints, private

#: States in the order a migration passes them; `rollback`/`rolled_back` can follow any state
#: before `commit`. FINAL states need no recovery.
STEPS = ("precheck", "checkpoint", "transfer", "restore", "verify", "commit")
FINAL = ("done", "rolled_back", "refused")


def new_id() -> str:
    """Sortable by start: `migrctl history` lists journals in name order, and two migrations
    often start within the same second (milliseconds keep them apart)."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}-" + secrets.token_hex(3)


@dataclass(frozen=True)
class Record:
    state: str
    time: float
    data: dict[str, Any]


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
        line = json.dumps({"state": state, "time": time.time(), "data": data}, sort_keys=True)
        with os.fdopen(private.open_private(self.path, os.O_WRONLY | os.O_APPEND), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        failpoints.after_state(state)

    def records(self) -> list[Record]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                raw = json.loads(line)
            except ValueError:
                break  # a torn last line from a crash mid-write: everything before it stands
            out.append(Record(raw["state"], raw["time"], raw.get("data", {})))
        return out

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


def summarize(j: Journal) -> Summary:
    """Pure over the records: phase durations are the gaps between consecutive states."""
    recs = j.records()
    data = j.merged()
    phases: dict[str, float] = {}
    for a, b in zip(recs, recs[1:]):
        if a.state in STEPS:
            phases[a.state] = round(b.time - a.time, 4)
    last = recs[-1].state if recs else "empty"
    outcome = {"done": data.get("outcome", "ok"), "rolled_back": "rolled back",
               "refused": "refused"}.get(last, f"unfinished (at {last})")
    req = data.get("request", {})
    return Summary(
        id=j.id, pid=req.get("pid"), name=data.get("workload"), source=data.get("source"),
        target=req.get("target"), mode=req.get("mode"), outcome=outcome, reason=data.get("reason"),
        started=recs[0].time if recs else 0.0, phases=phases, bytes=int(data.get("bytes", 0)),
        downtime=data.get("downtime"), target_pid=data.get("target_pid"),
    )
