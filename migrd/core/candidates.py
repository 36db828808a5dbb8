"""The agent's candidates (pure): process trees and whole containers, as the policy sees them.

A container is one candidate: its cgroup's CPU and memory, its init's PID, command, user and
age, its rootfs changes as its data, and its runtime as its subject's kind. Every process inside
a container (opted in or not) belongs to the container and is never a process candidate of its
own: moving a container's init by the process path would tear it out of its runtime.

The agent's shell gathers the samples (migrd/engine/census.py for containers, the process
monitor for processes); these functions only combine them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from migrd.model import CONTAINER_STRATEGIES, Candidate, ProcessLoad, SubjectRef


@dataclass(frozen=True)
class ContainerSample:
    """One container at one instant, as its runtime, its cgroup and its rootfs show it."""

    name: str
    #: Its subject kind (the runtime): a key of migrd.engine.subjects.SUBJECTS.
    kind: str
    #: Its init process (PID, command, user, age); its CPU and memory are replaced by the cgroup's.
    init: ProcessLoad
    #: Every process of the container (its cgroup's members), init included.
    members: frozenset[int]
    #: The io.migrd.migratable=true annotation (runc) or label (Podman) is set.
    labeled: bool
    #: Its init's cgroup paths as /proc/PID/cgroup shows them (for migrate.allow_cgroups).
    cgroups: tuple[str, ...]
    #: Monotonic time of the cgroup reading.
    mono: float
    #: CPU time its cgroup used so far, seconds.
    cpu_seconds: float
    #: Memory its cgroup charges now, bytes.
    memory_bytes: int
    #: Bytes of the files it added or modified in its rootfs (None: not measured).
    rootfs_bytes: int | None
    #: When it arrived here by a migration (epoch seconds), None if it did not.
    arrived: float | None = None


#: (command line, user, cgroup paths) -> why the allow rules let it move, or None.
AllowFn = Callable[[tuple[str, ...], str, Sequence[str]], "str | None"]


def container_opt_in(c: ContainerSample, allow: AllowFn) -> str | None:
    """Why the container may move (its annotation or label, or the allow rules applied to its
    init), None when it may not: the rule `migrctl migrate --container` applies."""
    if c.labeled:
        return "io.migrd.migratable=true"
    return allow(c.init.cmdline, c.init.user, c.cgroups)


def cpu_share(prev: ContainerSample | None, cur: ContainerSample) -> float:
    """CPUs its cgroup used since the previous sample of the same container (same init);
    without one, since its init started."""
    if prev is not None and prev.init.pid == cur.init.pid and cur.mono > prev.mono:
        return max(cur.cpu_seconds - prev.cpu_seconds, 0.0) / (cur.mono - prev.mono)
    return cur.cpu_seconds / max(cur.init.age_s, 1e-9)


def container_candidate(prev: ContainerSample | None, cur: ContainerSample, allow: AllowFn) -> Candidate:
    """The container as one candidate: its init's identity with its cgroup's CPU and memory,
    its rootfs changes as its data (they travel with it; it has no open files of its own to carry)."""
    proc = replace(cur.init, name=cur.name, cpu_share=cpu_share(prev, cur), cpu_seconds=cur.cpu_seconds,
                   rss_bytes=cur.memory_bytes, read_bytes_per_s=None, write_bytes_per_s=None,
                   open_file_bytes=0, exe_bytes=0)
    return Candidate(proc, opted_in=container_opt_in(cur, allow) is not None, last_migrated=cur.arrived,
                     data_bytes=cur.rootfs_bytes or 0,
                     subject=SubjectRef(cur.kind, cur.name, open_files=False, strategies=CONTAINER_STRATEGIES))


def members(containers: Iterable[ContainerSample], also: frozenset[int] = frozenset()) -> frozenset[int]:
    """Every PID that belongs to a container (`also`: those of containers seen but not measured)."""
    return also.union(p for c in containers for p in c.members)


def build(processes: Sequence[ProcessLoad], arrived: Mapping[int, float | None],
          containers: Sequence[ContainerSample], previous: Mapping[str, ContainerSample],
          allow: AllowFn, inside: frozenset[int] = frozenset()) -> tuple[Candidate, ...]:
    """This round's candidates: the opted-in processes that belong to no container (`arrived`:
    when each `migrctl run` workload last arrived here; `inside`: processes of containers seen
    but not measured), then every container, opted in or not (the policy skips those that are
    not, and says so). `previous` holds last round's sample of each container by name, for its
    CPU rate."""
    taken = members(containers, inside)
    out = [Candidate(p, opted_in=True, last_migrated=arrived.get(p.pid)) for p in processes if p.pid not in taken]
    out += [container_candidate(previous.get(c.name), c, allow) for c in containers]
    return tuple(out)


def after_failures(cands: Sequence[Candidate], failed: Mapping[int, float]) -> tuple[Candidate, ...]:
    """The candidates with a failed move counted as a move for the process cooldown: a process
    CRIU cannot dump (or a target cannot take) is not tried again round after round while
    other candidates wait. `failed`: PID -> when its last move failed."""
    if not failed:
        return tuple(cands)
    out = []
    for c in cands:
        t = failed.get(c.proc.pid)
        if t is not None and (c.last_migrated is None or t > c.last_migrated):
            c = replace(c, last_migrated=t)
        out.append(c)
    return tuple(out)

