"""The exception hierarchy. Messages are written for the operator; the CLI maps classes to
exit codes (documented in the README and in `migrctl --help`)."""

from __future__ import annotations

from pathlib import Path


class MigrdError(Exception):
    """Base class. `str(err)` is one line an operator can act on."""

    exit_code = 1


class InputError(MigrdError):
    """The request names something that does not exist or is malformed (PID, host, directory)."""

    exit_code = 3


class JournalCorrupt(MigrdError):
    """A migration journal holds a line that is not a record (damaged on disk, or edited);
    `migrd recover` leaves that migration alone and says so. Exit code 1: other error."""


class NotPermitted(MigrdError):
    """The request is well-formed but not allowed: not root, PID 1, process not opted in."""

    exit_code = 4


class CriuError(MigrdError):
    """CRIU ran and failed. Carries CRIU's own error lines and the log they came from."""

    exit_code = 5

    def __init__(self, action: str, error_lines: list[str], log_path: Path | None) -> None:
        self.action = action
        self.error_lines = error_lines
        self.log_path = log_path
        first = error_lines[0] if error_lines else "no error line in the log"
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"criu {action} failed: {first}{where}")


class DumpLockTimeout(MigrdError):
    """Another CRIU dump on this host kept the dump lock longer than criu.dump_lock_timeout
    (dumps run one at a time: see migrd/adapters/dumplock.py). Nothing was frozen."""

    exit_code = 14


class ImageError(MigrdError):
    """A checkpoint directory is incomplete, altered or not a checkpoint at all."""

    exit_code = 6


class TransportError(MigrdError):
    """SSH to a peer failed: unreachable, refused, timed out, or its host key is wrong."""

    exit_code = 7


class PeerProtocolError(TransportError):
    """The peer answered something migrd cannot read (a different version, or not migrd)."""


class ConfigError(MigrdError):
    """The configuration file is malformed; the message names the key and line."""

    exit_code = 8


class CommandError(MigrdError):
    """A helper program (ip, sshd, nsenter, ...) exited non-zero."""

    exit_code = 9


class PrecheckFailed(MigrdError):
    """A migration would not work; nothing was changed. Every reason is listed."""

    exit_code = 10


class InDoubt(MigrdError):
    """The target may or may not run the workload and cannot be asked; `migrd recover` settles
    it once the target answers. Nothing is restarted meanwhile: that could make two copies."""

    exit_code = 11


class WorkloadLost(MigrdError):
    """Post-copy only: after the switch the pages stopped arriving (the source's CRIU or the
    target's lazy-pages daemon died), so the copy there was ended rather than left running on
    missing memory. The source had been ended at the switch: nothing runs anywhere."""

    exit_code = 13


class AgentNotRunning(MigrdError):
    """No migrd agent answers on this host's admin socket."""

    exit_code = 12


class RegistryError(MigrdError):
    """The etcd load registry cannot be reached, or refused a request."""


class ContainerError(MigrdError):
    """A container runtime (runc) refused or failed: no such container, name taken, runtime
    missing. A failed checkpoint or restore is a CriuError (CRIU's own line comes first)."""
