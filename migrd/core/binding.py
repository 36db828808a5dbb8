"""What a move does with each resource a process holds: the resource-binding model of code
mobility (Fuggetta, Picco and Vigna, "Understanding Code Mobility", IEEE TSE 1998), made
visible in `migrctl migrate --dry-run` and `migrctl explain`.

A unit of execution is bound to a resource
  by identifier  - it needs that very resource (its memory, a connection, a service address),
  by value       - any resource with the same content will do (an executable, a file's bytes),
  by type        - any resource of the kind will do (a listening port, /dev/null).
A resource is attached to its host
  unattached     - it can travel freely (memory pages),
  fastened       - it can travel, at a cost (files, an IP address),
  fixed          - it cannot travel (a device, the host's port space).
What the move does with the binding:
  move           - the resource travels and is gone here,
  copy           - a copy travels, the original stays,
  rebind         - the process is bound to an equivalent resource there,
  global_ref     - the process keeps using the original through a shared name,
  discard        - the binding is dropped (restart: the process starts afresh),
  refuse         - the move cannot keep it: the precheck refuses.

Pure: a function of the process description and the move's options. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from migrd.model import ProcessInfo


class Binding(str, Enum):
    IDENTIFIER = "by identifier"
    VALUE = "by value"
    TYPE = "by type"


class Attachment(str, Enum):
    UNATTACHED = "unattached"
    FASTENED = "fastened"
    FIXED = "fixed"


class Mechanism(str, Enum):
    MOVE = "move"
    COPY = "copy"
    REBIND = "rebind"
    GLOBAL_REF = "global_ref"
    DISCARD = "discard"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str
    binding: Binding
    attachment: Attachment
    mechanism: Mechanism
    #: How the mechanism is carried out, for the operator.
    how: str


@dataclass(frozen=True)
class MoveShape:
    """The options of a move that change what happens to resources."""

    mode: str = "move"
    carried: tuple[str, ...] = ()
    move_address: str | None = None
    tcp_established: bool = False


def carried(info: ProcessInfo, with_files: bool, stdout: str | None) -> tuple[str, ...]:
    """The open files a move copies to the target: all of them with --with-files, else only a
    `migrctl run` workload's own log."""
    held = {f.path for f in info.open_files}
    return tuple(sorted(held if with_files else ({stdout} & held if stdout else set())))


def _files(info: ProcessInfo, shape: MoveShape) -> list[Resource]:
    out = []
    for path in sorted({f.path for f in info.open_files}):  # one file, however many fds
        if path in shape.carried:
            out.append(Resource("file", path, Binding.VALUE, Attachment.FASTENED, Mechanism.COPY,
                                "copied to the same path there before the restore; the original stays here"))
        else:
            out.append(Resource("file", path, Binding.IDENTIFIER, Attachment.FASTENED, Mechanism.GLOBAL_REF,
                                "reopened at the same path there: a shared filesystem, or a copy put "
                                "there beforehand (--with-files copies it)"))
    return out


def network(info: ProcessInfo, shape: MoveShape) -> list[Resource]:
    out = []
    address = shape.move_address.split("/")[0] if shape.move_address else None
    for s in info.listening:
        name = f"{s.address}:{s.port}"
        if address is not None and s.address == address:
            out.append(Resource("listening socket", name, Binding.IDENTIFIER, Attachment.FASTENED, Mechanism.MOVE,
                                f"moves with the address {shape.move_address}"))
        else:
            out.append(Resource("listening socket", name, Binding.TYPE, Attachment.FIXED, Mechanism.REBIND,
                                "the same port opened there; the precheck makes sure it is free"))
    for c in info.established:
        if shape.mode == "restart":
            out.append(Resource("tcp connection", c.name, Binding.IDENTIFIER, Attachment.FIXED, Mechanism.DISCARD,
                                "closed: the process starts afresh there"))
        elif shape.tcp_established:
            moved = address is not None and c.local_address == address
            out.append(Resource("tcp connection", c.name, Binding.IDENTIFIER, Attachment.FASTENED, Mechanism.MOVE,
                                "kept open: repaired there, with the moved address" if moved else
                                "kept open: repaired there; its peer must reach that address there"))
        else:
            out.append(Resource("tcp connection", c.name, Binding.IDENTIFIER, Attachment.FIXED, Mechanism.REFUSE,
                                "an established connection moves only with --tcp-established (and "
                                "--move-address of its local address)"))
    if shape.move_address:
        out.append(Resource("address", shape.move_address, Binding.IDENTIFIER, Attachment.FASTENED, Mechanism.MOVE,
                            "deleted here before the restore, added and announced there"))
    return out


def resources(info: ProcessInfo, shape: MoveShape) -> tuple[Resource, ...]:
    """Every resource of the process tree with what `shape` does with it."""
    restart = shape.mode == "restart"
    clone = shape.mode == "clone"
    out = [
        Resource("memory", f"{info.rss} bytes resident", Binding.IDENTIFIER, Attachment.UNATTACHED,
                 Mechanism.DISCARD if restart else (Mechanism.COPY if clone else Mechanism.MOVE),
                 "dropped: the command starts afresh there" if restart
                 else "checkpointed by CRIU and restored there"),
        Resource("code", info.exe, Binding.VALUE, Attachment.FIXED, Mechanism.REBIND,
                 "the same executable and libraries at the same paths there"),
        Resource("directory", info.cwd, Binding.IDENTIFIER, Attachment.FIXED, Mechanism.GLOBAL_REF,
                 "the same working directory there"),
    ]
    if not restart:
        ids = f"{len(info.tree_ids)} PID(s)/thread ID(s)"
        out.append(Resource("pids", ids, Binding.IDENTIFIER, Attachment.UNATTACHED, Mechanism.REBIND,
                            "a new PID namespace there, the same PIDs inside") if info.own_pid_namespace
                   else Resource("pids", ids, Binding.IDENTIFIER, Attachment.FIXED, Mechanism.MOVE,
                                 "the same PIDs there, which must be free (the precheck checks)"))
    out += _files(info, shape)
    out += network(info, shape)
    out += [Resource("device", d, Binding.TYPE, Attachment.FIXED, Mechanism.REBIND,
                     "the same device node there") for d in info.devices]
    return tuple(out)


def from_dict(d: dict[str, str]) -> Resource:
    return Resource(d["kind"], d["name"], Binding(d["binding"]), Attachment(d["attachment"]),
                    Mechanism(d["mechanism"]), d["how"])


def refusals(rs: tuple[Resource, ...]) -> list[str]:
    return [f"{r.kind} {r.name}: {r.how}" for r in rs if r.mechanism is Mechanism.REFUSE]


def table(rs: tuple[Resource, ...]) -> list[str]:
    """One line per resource, for people."""
    return [f"{r.kind:<16} {r.name[:40]:<40} {r.binding.value:<13} {r.attachment.value:<10} "
            f"{r.mechanism.value:<10} {r.how}" for r in rs]
