"""This host's containers as the agent sees them each round (the shell behind
migrd/core/candidates.py): every runc and Podman container this host runs, with its cgroup's
CPU, memory and member processes, its opt-in annotation or label, and the size of its rootfs
changes.

Measuring the rootfs changes hashes the container's tree and its image's, so it is done at most
every `ROOTFS_EVERY` seconds per container (the image's scan is kept for the agent's life).
Podman is asked only on a host whose Podman storage exists (its listing is slow; a host that
never ran or received a Podman container has none).
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from migrd.adapters import cgroup, load, procinfo, rootfs, runc
from migrd.adapters import podman as podman_adapter
from migrd.config import Config
from migrd.core import candidates
from migrd.core import rootfs as rootfs_core
from migrd.engine import arrivals, containers, podman
from migrd.engine.subjects import PodmanContainer, RuncContainer
from migrd.errors import InputError, MigrdError

log = logging.getLogger(__name__)

#: Seconds between two measures of one container's rootfs changes.
ROOTFS_EVERY = 30.0


@dataclass(frozen=True)
class Seen:
    """One container as its runtime lists it."""

    runtime: Runtime
    name: str
    pid: int
    running: bool
    labeled: bool
    image: str | None


@dataclass(frozen=True)
class Census:
    #: The running containers that could be measured.
    samples: tuple[candidates.ContainerSample, ...]
    #: Every process of every container seen, measured or not: none may be a process candidate.
    inside: frozenset[int]


class Runtime(ABC):
    """A container runtime as the census asks it: what runs, and where a container's rootfs is."""

    kind: ClassVar[str]

    @abstractmethod
    def seen(self, cfg: Config) -> list[Seen]:
        """Its containers on this host ([] when the runtime is absent or has none)."""

    @abstractmethod
    def rootfs(self, cfg: Config, name: str) -> contextlib.AbstractContextManager[Path]:
        """The container's root filesystem as it sees it, while the context lasts."""


class Runc(Runtime):
    kind = RuncContainer.kind

    def seen(self, cfg: Config) -> list[Seen]:
        try:
            states = containers.runtime(cfg).list()
        except MigrdError:
            return []  # no runc here, or no state yet
        return [Seen(self, s.name, s.pid, s.status == "running",
                     s.annotations.get(runc.MIGRATABLE) == "true", s.annotations.get(runc.IMAGE))
                for s in states]

    @contextlib.contextmanager
    def rootfs(self, cfg: Config, name: str) -> Iterator[Path]:
        st = containers.runtime(cfg).state(name)
        if st is None:
            raise InputError(f"container {name} is gone")
        yield Path(st.bundle) / "rootfs"


class Podman(Runtime):
    kind = PodmanContainer.kind

    def seen(self, cfg: Config) -> list[Seen]:
        if not (cfg.state_dir / "podman" / "storage").is_dir():
            return []
        try:
            pm = podman.runtime(cfg)
            states = [s for s in map(pm.state, pm.names()) if s is not None]
        except MigrdError:
            return []
        return [Seen(self, s.name, s.pid, s.status == "running",
                     s.labels.get(podman_adapter.MIGRATABLE) == "true", s.annotations.get(podman_adapter.IMAGE))
                for s in states]

    @contextlib.contextmanager
    def rootfs(self, cfg: Config, name: str) -> Iterator[Path]:
        pm = podman.runtime(cfg)
        try:
            yield pm.mount(name)
        finally:
            pm.unmount(name)


RUNTIMES: tuple[Runtime, ...] = (Runc(), Podman())


def _tree(pid: int) -> set[int]:
    """The process and its descendants, from /proc (a container whose cgroup cannot be read)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return {pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.Error:
        return {pid}


def _members(pid: int) -> set[int]:
    """A container's processes: its init's cgroup (the runtime made it for the container
    alone), else its init's process tree."""
    try:
        return set(cgroup.pids(cgroup.of_process(pid))) | {pid}
    except (OSError, MigrdError):
        return _tree(pid)


def container_of(cfg: Config, pid: int) -> Seen | None:
    """The container of this host that `pid` belongs to (None: none)."""
    for s in (seen for rt in RUNTIMES for seen in rt.seen(cfg)):
        if s.pid and (s.pid == pid or pid in _members(s.pid)):
            return s
    return None


@dataclass
class ContainerCensus:
    """Remembers each container's rootfs measure and each image's scan between rounds."""

    cfg: Config
    _rootfs: dict[str, tuple[int, float, int | None]] = field(default_factory=dict)
    _images: dict[str, dict[str, rootfs_core.Entry]] = field(default_factory=dict)

    def take(self) -> Census:
        samples, inside = [], set()
        listed = [seen for rt in RUNTIMES for seen in rt.seen(self.cfg)]
        # Forget the rootfs measures of containers gone from this host.
        self._rootfs = {n: v for n, v in self._rootfs.items() if n in {s.name for s in listed}}
        for s in listed:
            if not s.pid:
                continue
            members = _members(s.pid)
            inside |= members
            if not s.running:
                continue
            try:
                group = cgroup.of_process(s.pid)
                init = load.process_load(None, load.read_process_raw(s.pid))
                paths = tuple(procinfo.cgroup_paths(s.pid))
                mono = time.monotonic()
                used, memory = cgroup.cpu_usage_ns(group) / 1e9, cgroup.memory_bytes(group)
            except (OSError, MigrdError, IndexError, ValueError) as e:
                log.debug("container %s: not measured (%s)", s.name, e)
                continue
            samples.append(candidates.ContainerSample(
                s.name, s.runtime.kind, init, frozenset(members), s.labeled, paths, mono, used, memory,
                self._changed_bytes(s), arrivals.arrived(self.cfg, s.runtime.kind, s.name, s.pid)))
        return Census(tuple(samples), frozenset(inside))

    def _changed_bytes(self, s: Seen) -> int | None:
        """Bytes of the files the container added or modified, measured at most every ROOTFS_EVERY."""
        now = time.monotonic()
        kept = self._rootfs.get(s.name)
        if kept is not None and kept[0] == s.pid and now - kept[1] < ROOTFS_EVERY:
            return kept[2]
        try:
            size = self._measure(s)
        except (OSError, MigrdError) as e:
            log.debug("container %s: rootfs changes not measured (%s)", s.name, e)
            size = None
        self._rootfs[s.name] = (s.pid, now, size)
        return size

    def _measure(self, s: Seen) -> int | None:
        if not s.image:
            return None
        base = self._images.get(s.image)
        if base is None:
            base = self._images[s.image] = rootfs.scan(containers.image_root(s.image))
        with s.runtime.rootfs(self.cfg, s.name) as root:
            now = rootfs.scan(root)
        return sum(ch.size for ch in rootfs_core.changes(base, now) if ch.change != "deleted")
