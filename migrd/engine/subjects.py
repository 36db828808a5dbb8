"""What a migration moves: the subject port.

A subject knows how to describe itself (the manifest's description), which resources it holds
and what a move does with each (migrd/core/binding.py), which CRIU options its dump and restore
need, and how to tell that the copy on the target is itself. Today's subject is a process tree;
containers (runc, Podman) register here next, as P.Haul registers its "haulers" by kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from migrd.core import binding
from migrd.errors import MigrdError
from migrd.model import ProcessInfo

if TYPE_CHECKING:  # the target side imports subjects; it must not pay for paramiko
    from migrd.engine.peerclient import Restored


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
    def criu_options(self, tcp_established: bool) -> dict[str, bool]:
        """The CRIU options its dump needs (recorded in the manifest for the restore)."""

    @abstractmethod
    def verify(self, restored: Restored | None, where: str, ports: bool) -> None:
        """Raise when the copy on `where` is not this subject, running."""


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

    def resources(self, shape: binding.MoveShape) -> tuple[binding.Resource, ...]:
        return binding.resources(self._info, shape)

    def criu_options(self, tcp_established: bool) -> dict[str, bool]:
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


#: Subjects by kind (the journal and manifest record the kind).
SUBJECTS: dict[str, type[Subject]] = {ProcessTree.kind: ProcessTree}
