"""What a migration moves: the subject port.

A subject knows how to describe itself (the manifest's description), which resources it holds
and what a move does with each (migrd/core/binding.py), which CRIU options its dump and restore
need, how its dump and restore are made, and how to tell that the copy on the target is itself.
Subjects register by kind, as P.Haul registers its "haulers": a process tree, a runc container.
The journal records the kind and the subject's own record; the manifest records the kind, so
the target restores with the same subject.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from migrd.core import binding, precheck
from migrd.core.precheck import Ask, ContainerAsk, ContainerFacts, ProcessAsk
from migrd.errors import InputError, JournalCorrupt, MigrdError, NotPermitted
from migrd.model import CONTAINER_STRATEGIES, ContainerInfo, ProcessInfo, SubjectRef

if TYPE_CHECKING:  # the target side imports subjects; it must not pay for paramiko
    from migrd.adapters.workloads import Workload
    from migrd.config import Config
    from migrd.engine.checkpoint import Checkpoint, Parent
    from migrd.engine.manifest import Manifest
    from migrd.engine.peerclient import Restored


class CriuOptions(TypedDict, total=False):
    """Keywords of Criu.dump and lazy_dump, passed as **options: a plain dict[str, bool]
    would let a bool reach their other keywords."""

    tcp_established: bool
    shell_job: bool


class Subject(ABC):
    kind: ClassVar[str]

    @property
    @abstractmethod
    def info(self) -> ProcessInfo:
        """The description the manifest and the journal record."""

    @abstractmethod
    def label(self) -> str:
        """How the operator names it: `PID 4242 (python3 job.py)`."""

    @abstractmethod
    def resources(self, shape: binding.MoveShape) -> tuple[binding.Resource, ...]:
        """Every resource it holds with what `shape` does with it."""

    @abstractmethod
    def criu_options(self, tcp_established: bool) -> CriuOptions:
        """The CRIU options its dump needs (recorded in the manifest for the restore)."""

    @abstractmethod
    def verify(self, restored: Restored | None, where: str, ports: bool) -> None:
        """Raise when the copy on `where` is not this subject, running."""

    # --- the source's side -----------------------------------------------------------------

    @classmethod
    @abstractmethod
    def locate(cls, cfg: Config, ref: SubjectRef, pid: int | None) -> Subject:
        """The live subject on this host that `ref` (and, when known, its PID) names."""

    @abstractmethod
    def opt_in(self, cfg: Config) -> str | None:
        """Why it may migrate (a reason), None when nothing opts it in."""

    @abstractmethod
    def not_opted_in(self) -> str:
        """The operator's one line when it is not opted in."""

    def workload(self, cfg: Config) -> tuple[str | None, str | None]:
        """Its `migrctl run` name and output log, when it is such a workload."""
        return None, None

    @classmethod
    def fits_request(cls, with_files: bool) -> None:
        """Raise InputError for an option this kind of subject cannot take."""

    def record(self) -> dict[str, Any]:
        """What the journal keeps beside the process description to rebuild this subject."""
        return {}

    @classmethod
    def from_record(cls, info: ProcessInfo, data: dict[str, Any]) -> Subject:
        return cls(info)  # type: ignore[call-arg]

    def refuses(self, strategy: str, mode: str) -> str | None:
        """Why this subject cannot be moved by `strategy` in `mode` (None: it can)."""
        return None

    @abstractmethod
    def precheck_ask(self) -> Ask:
        """Its own part of the target's precheck request."""

    @abstractmethod
    def dump(self, cfg: Config, images: Path, *, leave_running: bool, leave_stopped: bool,
             tcp_established: bool, pass_fds: tuple[int, ...], page_server_fd: int | None,
             parent: Parent | None = None) -> Checkpoint:
        """Checkpoint into images, manifest included. parent: the CRIU pre-dump it leans on
        (only subjects that pre_dump get one)."""

    def pre_dump(self, cfg: Config, images: Path, parent: Parent | None, tcp_established: bool) -> Checkpoint:
        """CRIU's pre-dump of the memory while the subject runs on (pre-copy on a soft-dirty
        kernel). Only a subject whose `refuses` lets pre-copy through is asked."""
        raise InputError(f"{self.label()} cannot be pre-dumped by CRIU")

    @abstractmethod
    def restore_local(self, cfg: Config, images: Path, tcp_established: bool) -> int:
        """A rollback: bring the dumped subject back here from its images; returns its PID."""

    def after_commit(self, cfg: Config) -> None:
        """On the source once the copy there runs: drop what only the source copy needed."""

    def dump_inventory(self, images: Path) -> bytes | None:
        """The dump's inventory.img (it names CRIU's run, hence its network-lock table), None
        before the dump wrote one."""
        try:
            return (images / "inventory.img").read_bytes()
        except OSError:
            return None

    # --- the target's side (the manifest names the kind) ------------------------------------

    @staticmethod
    @abstractmethod
    def restore_there(cfg: Config, images: Path, m: Manifest, *, hashed: bool,
                      streamed: dict[str, int] | None, lazy_work: Path | None) -> tuple[int, float]:
        """Restore stopped (until the commit); returns the PID and the seconds it took."""

    @staticmethod
    def committed_there(cfg: Config, restored: dict[str, Any]) -> None:
        """The commit on the target, before the copy is resumed."""

    @staticmethod
    def target_facts(cfg: Config, ask: ContainerAsk) -> ContainerFacts:
        """A container's facts here for the precheck: the target asks the subject that a
        container's ask names as its runtime (a process tree is no runtime, whatever it says)."""
        return ContainerFacts(runtime_ok=False, runtime_message="not a container runtime")

    @staticmethod
    def ended_there(cfg: Config, restored: dict[str, Any]) -> None:
        """An abort on the target, after the copy was ended."""


class ProcessTree(Subject):
    """A process and its descendants."""

    kind = "process"

    def __init__(self, info: ProcessInfo) -> None:
        self._info = info

    @property
    def info(self) -> ProcessInfo:
        return self._info

    def label(self) -> str:
        return f"PID {self._info.pid} ({' '.join(self._info.cmdline)[:60]})"

    @classmethod
    def locate(cls, cfg: Config, ref: SubjectRef, pid: int | None) -> Subject:
        from migrd.adapters import procinfo
        from migrd.engine import census

        if pid is None:
            raise InputError("a process is named by its PID")
        # Moving a container's process on its own would tear it out of its runtime.
        owner = census.container_of(cfg, pid)
        if owner is not None:
            raise NotPermitted(f"PID {pid} belongs to the {owner.runtime.kind} container {owner.name}: "
                               f"move the container (migrctl migrate --container {owner.name})")
        if procinfo.mounts_apart(pid):
            raise NotPermitted(
                f"migrd runs in a mount namespace of its own, not the host's that PID {pid} runs in "
                f"(a sandboxing setting of its systemd unit or a drop-in, e.g. PrivateTmp= or "
                f"ProtectKernelLogs=): CRIU would dump and rebuild the host's whole mount tree. "
                f"Run migrd in the host's mount namespace")
        return cls(procinfo.inspect(pid))

    def opt_in(self, cfg: Config) -> str | None:
        from migrd.adapters import procinfo

        pid = self._info.pid
        return precheck.opt_in(cfg.migrate, self._info, procinfo.user_of(pid, self._info.uid),
                               procinfo.cgroup_paths(pid), self._workload(cfg) is not None)

    def not_opted_in(self) -> str:
        return (f"{self.label()} is not opted in to migration: start it with `migrctl run`, or allow it "
                f"in migrate.allow_users, allow_commands or allow_cgroups")

    def _workload(self, cfg: Config) -> Workload | None:
        from migrd.adapters import workloads

        return workloads.Registry(cfg.state_dir).by_pid(self._info.pid)

    def workload(self, cfg: Config) -> tuple[str | None, str | None]:
        w = self._workload(cfg)
        return (w.name, w.stdout) if w is not None else (None, None)

    def resources(self, shape: binding.MoveShape) -> tuple[binding.Resource, ...]:
        return binding.resources(self._info, shape)

    def precheck_ask(self) -> Ask:
        info = self._info
        return ProcessAsk(pid=info.pid, start_time=info.start_time, tree_ids=info.tree_ids,
                          own_pid_namespace=info.own_pid_namespace,
                          files=tuple((f.path, f.size) for f in info.open_files),
                          identities={f.path: f.identity for f in info.open_files if f.identity})

    def criu_options(self, tcp_established: bool) -> CriuOptions:
        # A process that is not its own session leader was started from a shell: CRIU needs
        # --shell-job to leave its session and terminal alone.
        return {"tcp_established": tcp_established, "shell_job": not self._info.session_leader}

    def verify(self, restored: Restored | None, where: str, ports: bool) -> None:
        info = self._info
        if not restored or not restored.alive:
            raise MigrdError(f"the restored process is not running on {where}")
        if restored.cmdline != info.cmdline:
            raise MigrdError(f"the process on {where} runs {list(restored.cmdline)!r}, "
                             f"expected {list(info.cmdline)!r}")
        missing = {s.port for s in info.listening} - set(restored.ports)
        if ports and missing:
            raise MigrdError(f"the restored process does not listen on port(s) "
                             f"{', '.join(map(str, sorted(missing)))} on {where}")

    def dump(self, cfg: Config, images: Path, *, leave_running: bool, leave_stopped: bool,
             tcp_established: bool, pass_fds: tuple[int, ...], page_server_fd: int | None,
             parent: Parent | None = None) -> Checkpoint:
        from migrd.engine import checkpoint as cp

        return cp.checkpoint(cfg, self._info.pid, images, leave_running=leave_running,
                             leave_stopped=leave_stopped, tcp_established=tcp_established,
                             pass_fds=pass_fds, page_server_fd=page_server_fd, parent=parent)

    def pre_dump(self, cfg: Config, images: Path, parent: Parent | None, tcp_established: bool) -> Checkpoint:
        from migrd.engine import checkpoint as cp

        return cp.checkpoint(cfg, self._info.pid, images, tcp_established=tcp_established, parent=parent, pre=True)

    def restore_local(self, cfg: Config, images: Path, tcp_established: bool) -> int:
        from migrd.adapters.criu import find_criu
        from migrd.engine import checkpoint as cp

        if (images / "manifest.json").exists():
            return cp.restore(cfg, images).pid
        # The orchestrator died between CRIU's dump and writing the manifest; these images
        # never left this host, so CRIU may read them unverified.
        log = cp.log_path(cfg, "restore", self._info.pid)
        return find_criu(cfg).restore(images, log, tcp_established=tcp_established,
                                      shell_job=not self._info.session_leader).pid

    @staticmethod
    def restore_there(cfg: Config, images: Path, m: Manifest, *, hashed: bool,
                      streamed: dict[str, int] | None, lazy_work: Path | None) -> tuple[int, float]:
        from migrd.engine import checkpoint as cp

        r = cp.restore(cfg, images, pid_wait=cfg.migrate.pid_wait, leave_stopped=True, hashed=hashed,
                       streamed=streamed, lazy_work=lazy_work)
        return r.pid, r.seconds


class RuncContainer(Subject):
    """A runc container: its init's process tree, its rootfs changes against its image, its
    bundle's configuration. Moved by stop-copy only (the rootfs is read once the dump ended
    the container, so nothing can change it behind the copy)."""

    kind = "runc"

    def __init__(self, info: ProcessInfo, container: ContainerInfo) -> None:
        self._info = info
        self.container = container

    @property
    def info(self) -> ProcessInfo:
        return self._info

    def label(self) -> str:
        return f"container {self.container.name} ({self.kind}, init PID {self._info.pid})"

    @staticmethod
    def _describe(cfg: Config, name: str) -> tuple[ContainerInfo, ProcessInfo]:
        from migrd.engine import containers

        return containers.describe(cfg, name)

    @classmethod
    def locate(cls, cfg: Config, ref: SubjectRef, pid: int | None) -> Subject:
        if ref.name is None:
            raise InputError("a container is named by its name")
        container, info = cls._describe(cfg, ref.name)
        if pid is not None and info.pid != pid:
            raise InputError(f"container {ref.name} now runs as init PID {info.pid}, not {pid}")
        return cls(info, container)

    def opt_in(self, cfg: Config) -> str | None:
        from migrd.adapters import procinfo

        if self.container.migratable:
            return "io.migrd.migratable=true"
        pid = self._info.pid
        return precheck.opt_in(cfg.migrate, self._info, procinfo.user_of(pid, self._info.uid),
                               procinfo.cgroup_paths(pid), False)

    def not_opted_in(self) -> str:
        return (f"container {self.container.name} is not opted in to migration: set the annotation (runc) "
                f"or label (Podman) io.migrd.migratable=true, or allow it in migrate.allow_users, "
                f"allow_commands or allow_cgroups")

    @classmethod
    def fits_request(cls, with_files: bool) -> None:
        if with_files:
            raise InputError("--with-files is for processes: a container's files travel as its rootfs changes")

    def resources(self, shape: binding.MoveShape) -> tuple[binding.Resource, ...]:
        c = self.container
        B, A, M = binding.Binding, binding.Attachment, binding.Mechanism
        return (
            binding.Resource("memory", f"{self._info.rss} bytes resident (init)", B.IDENTIFIER, A.UNATTACHED,
                             M.MOVE, f"checkpointed by {self.kind} with CRIU and restored there"),
            binding.Resource("image", c.image, B.VALUE, A.FIXED, M.REBIND,
                             "the same image there, checked by content"),
            binding.Resource("rootfs changes", f"container {c.name}", B.VALUE, A.FASTENED, M.COPY,
                             "added, modified and deleted files carried with the images, by sha256"),
            binding.Resource("pids", "the container's PID namespace", B.IDENTIFIER, A.UNATTACHED, M.REBIND,
                             "a new PID namespace there, the same PIDs inside"),
            *binding.network(self._info, shape),
        )

    def criu_options(self, tcp_established: bool) -> CriuOptions:
        return {"tcp_established": tcp_established}

    def verify(self, restored: Restored | None, where: str, ports: bool) -> None:
        name = self.container.name
        if not restored or not restored.alive:
            raise MigrdError(f"the restored container {name} is not running on {where}")
        if restored.cmdline != self._info.cmdline:
            raise MigrdError(f"container {name} on {where} runs {list(restored.cmdline)!r}, "
                             f"expected {list(self._info.cmdline)!r}")

    def record(self) -> dict[str, Any]:
        return {"container": dataclasses.asdict(self.container)}

    @classmethod
    def from_record(cls, info: ProcessInfo, data: dict[str, Any]) -> Subject:
        from migrd.adapters import untrusted

        return cls(info, untrusted.build(ContainerInfo, data.get("container"), JournalCorrupt, "journal: container"))

    def refuses(self, strategy: str, mode: str) -> str | None:
        if mode != "move":
            return f"a container moves; --mode {mode} is for processes"
        if strategy not in CONTAINER_STRATEGIES:
            return f"containers move with {', '.join(CONTAINER_STRATEGIES)} only"
        return None

    def precheck_ask(self) -> Ask:
        c = self.container
        return ContainerAsk(c.name, c.runtime, c.image, c.image_digest, c.image_id)

    def dump(self, cfg: Config, images: Path, *, leave_running: bool, leave_stopped: bool,
             tcp_established: bool, pass_fds: tuple[int, ...], page_server_fd: int | None,
             parent: Parent | None = None) -> Checkpoint:
        from migrd.engine import containers

        return containers.checkpoint(cfg, self.container, self._info, images, tcp_established=tcp_established)

    def restore_local(self, cfg: Config, images: Path, tcp_established: bool) -> int:
        from migrd.engine import containers

        if (images / "manifest.json").exists():
            return containers.restore(cfg, images, leave_stopped=False, fresh_bundle=False)[0]
        return containers.restore_unverified(cfg, self.container, images, tcp_established)

    def after_commit(self, cfg: Config) -> None:
        from migrd.engine import containers

        containers.remove(cfg, self.container.name)

    @staticmethod
    def restore_there(cfg: Config, images: Path, m: Manifest, *, hashed: bool,
                      streamed: dict[str, int] | None, lazy_work: Path | None) -> tuple[int, float]:
        from migrd.engine import containers

        return containers.restore(cfg, images, leave_stopped=True, hashed=hashed)

    @staticmethod
    def committed_there(cfg: Config, restored: dict[str, Any]) -> None:
        from migrd.engine import containers

        containers.resume(cfg, restored["container"])
        _arrived(cfg, restored)

    @staticmethod
    def ended_there(cfg: Config, restored: dict[str, Any]) -> None:
        from migrd.engine import containers

        containers.remove(cfg, restored["container"])

    @staticmethod
    def target_facts(cfg: Config, ask: ContainerAsk) -> ContainerFacts:
        from migrd.adapters import netaddr
        from migrd.engine import containers

        try:
            rt = containers.runtime(cfg)
            ok, msg = rt.works()
            taken = rt.state(ask.name) is not None or containers.bundle_of(cfg, ask.name).exists()
        except MigrdError as e:
            return ContainerFacts(runtime_ok=False, runtime_message=str(e))
        return ContainerFacts(runtime_ok=ok, runtime_message=msg, image_digest=containers.image_digest(ask.image),
                              name_taken=taken, loopback_up=netaddr.loopback_up())


class PodmanContainer(RuncContainer):
    """A Podman container (run by runc): its exported checkpoint plus migrd's own rootfs diff,
    since Podman's export loses files modified in place (migrd/engine/podman.py)."""

    kind = "podman"

    @staticmethod
    def _describe(cfg: Config, name: str) -> tuple[ContainerInfo, ProcessInfo]:
        from migrd.engine import podman

        return podman.describe(cfg, name)

    def dump(self, cfg: Config, images: Path, *, leave_running: bool, leave_stopped: bool,
             tcp_established: bool, pass_fds: tuple[int, ...], page_server_fd: int | None,
             parent: Parent | None = None) -> Checkpoint:
        from migrd.engine import podman

        return podman.checkpoint(cfg, self.container, self._info, images, tcp_established=tcp_established)

    def restore_local(self, cfg: Config, images: Path, tcp_established: bool) -> int:
        from migrd.engine import podman

        return podman.restore_local(cfg, self.container, tcp_established)

    def dump_inventory(self, images: Path) -> bytes | None:
        from migrd.engine import podman

        return podman.inventory(images)

    def after_commit(self, cfg: Config) -> None:
        from migrd.engine import podman

        podman.remove(cfg, self.container.name)

    @staticmethod
    def restore_there(cfg: Config, images: Path, m: Manifest, *, hashed: bool,
                      streamed: dict[str, int] | None, lazy_work: Path | None) -> tuple[int, float]:
        from migrd.engine import podman

        return podman.restore(cfg, images, hashed=hashed)

    @staticmethod
    def committed_there(cfg: Config, restored: dict[str, Any]) -> None:
        from migrd.engine import podman

        podman.resume(cfg, restored["container"])
        _arrived(cfg, restored)

    @staticmethod
    def ended_there(cfg: Config, restored: dict[str, Any]) -> None:
        from migrd.engine import podman

        podman.remove(cfg, restored["container"])

    @staticmethod
    def target_facts(cfg: Config, ask: ContainerAsk) -> ContainerFacts:
        from migrd.adapters import netaddr
        from migrd.engine import containers, podman

        try:
            pm = podman.runtime(cfg)
            ok, msg = pm.works()
            taken = pm.state(ask.name) is not None
            image_id = podman.ensure_image(pm, ask.image)
        except MigrdError as e:
            return ContainerFacts(runtime_ok=False, runtime_message=str(e))
        return ContainerFacts(runtime_ok=ok, runtime_message=msg, image_digest=containers.image_digest(ask.image),
                              image_id=image_id, name_taken=taken, loopback_up=netaddr.loopback_up())


def _arrived(cfg: Config, restored: dict[str, Any]) -> None:
    """A container committed here has just arrived (the policy's migration cooldown)."""
    import time

    from migrd.engine import arrivals

    arrivals.record(cfg, restored["subject"], restored["container"], restored["pid"], time.time())


#: Subjects by kind (the journal and manifest record the kind).
SUBJECTS: dict[str, type[Subject]] = {s.kind: s for s in (ProcessTree, RuncContainer, PodmanContainer)}
