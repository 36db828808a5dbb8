"""The target's side of one migration, as the source sees it: one typed object per migration
whose methods mirror `migrctl peer SUBCOMMAND` on the target (migrd/cli/peer.py ->
migrd/engine/target.py). The command lines are built here and nowhere else, and every answer is
read as untrusted input into a frozen dataclass, so a confused or hostile peer produces a
one-line error instead of a KeyError half-way through a migration.

Like Fabric's `Connection`, which delegates file copies to `Transfer`, `Target` delegates the
bytes (image streams, carried files, page streams) to the transport's `Connection` and keeps
only the protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from migrd.adapters import transport, untrusted
from migrd.core.precheck import Request
from migrd.engine import pagestream, precopy
from migrd.engine.manifest import sha256_file
from migrd.config import Config
from migrd.errors import MigrdError, PeerProtocolError, TransportError

T = TypeVar("T")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PrecheckAnswer:
    problems: tuple[str, ...]
    #: Where the images go on the target.
    incoming: str
    #: Size of each open file there (None: absent), for the rollback's clean-up.
    target_files: dict[str, int | None]
    #: Files the target may see already (shared storage): never copied onto themselves.
    not_to_copy: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restored:
    """The copy on the target, as `peer status` sees it."""

    pid: int
    alive: bool
    stopped: bool = False
    cmdline: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class RestoreAnswer:
    pid: int
    seconds: float
    start_time: float
    restored: Restored | None


@dataclass(frozen=True)
class StartAnswer:
    pid: int
    start_time: float
    name: str | None = None


@dataclass(frozen=True)
class FinishAnswer:
    finished: str
    resumed: int | None = None
    announce_error: str | None = None


@dataclass(frozen=True)
class Status:
    """What the target holds of this migration."""

    received: bool
    restored: Restored | None = None
    #: Why a post-copy's copy was ended after the switch (its pages stopped arriving).
    lost: str | None = None
    #: A post-copy is still settling there (fetching pages, or ending its copy).
    busy: bool = False


@dataclass(frozen=True)
class _Ready:
    ready: bool


@dataclass(frozen=True)
class _FilesFacts:
    """The one fact of the target's the source keeps: its open files' sizes there (a container's
    facts have none)."""

    files: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class _PrecheckRaw:
    problems: tuple[str, ...]
    incoming: str
    facts: dict[str, Any] = field(default_factory=dict)
    not_to_copy: tuple[str, ...] = ()


class Restoring:
    """A restore on the target that waits, stopped, for the source's word (one SSH session
    for restore and commit: saves a session start and a Python start while frozen)."""

    def __init__(self, target: Target, talk: transport.Conversation) -> None:
        self._target = target
        self._talk = talk

    def wait_ready(self) -> None:
        self._target.parse(_Ready, self._talk.readline(), "peer restore (ready)")

    def go(self, page_bytes: int | None) -> None:
        self._talk.send_line(json.dumps({"page_bytes": page_bytes}))

    def answer(self) -> RestoreAnswer:
        return self._target.parse(RestoreAnswer, self._talk.readline(), "peer restore")

    def commit(self) -> FinishAnswer | None:
        """Tell the target to go on; None when the session broke (then `Target.finish`)."""
        try:
            self._talk.send_line("commit")
            return self._target.parse(FinishAnswer, self._talk.readline(), "peer restore (commit)")
        except (TransportError, PeerProtocolError):
            return None

    def close(self) -> None:
        self._talk.close()


@dataclass(frozen=True)
class _Files:
    files: dict[str, int]


class FilesSink:
    """`migrctl peer files` there, started and waiting: the files a migration carries go
    through it after the freeze without a new session (SFTP cost three)."""

    def __init__(self, target: Target, talk: transport.Conversation) -> None:
        self._target = target
        self._talk = talk
        try:
            target.parse(_Ready, talk.readline(), "peer files (ready)")
        except BaseException:
            talk.close()
            raise

    def send(self, paths: list[Path]) -> int:
        """Each file with its header; returns the bytes the target confirmed."""
        for path in paths:
            st = path.stat()
            header = {"path": str(path), "size": st.st_size, "mode": st.st_mode & 0o7777,
                      "sha256": sha256_file(path)}
            self._talk.send_line(json.dumps(header))
            with open(path, "rb") as f:
                left = st.st_size
                while left and (chunk := f.read(min(left, 1 << 20))):
                    self._talk.send(chunk)
                    left -= len(chunk)
            if left:
                raise MigrdError(f"{path} shrank while it was being sent")
        self._talk.end_input()
        got = self._target.parse(_Files, self._talk.readline(), "peer files")
        return sum(got.files.values())

    def close(self) -> None:
        self._talk.close()


class Target:
    """The target host of migration `mid`, reached through `conn`."""

    def __init__(self, conn: transport.Connection, mid: str) -> None:
        self.conn = conn
        self.mid = mid

    @property
    def name(self) -> str:
        return self.conn.host.name

    # --- reading answers -------------------------------------------------------------------

    def parse(self, tp: type[T], line: bytes, what: str) -> T:
        value = untrusted.loads(line, PeerProtocolError, f"{self.name}: {what}")
        return untrusted.build(tp, value, PeerProtocolError, f"{self.name}: {what}")

    def _call(self, tp: type[T], args: list[str], payload: Any = None, timeout: float | None = None) -> T:
        """Run `migrctl peer ARGS --json` there; its error line becomes ours."""
        data = json.dumps(payload).encode() if payload is not None else None
        r = self.conn.migrctl(["peer", *args, "--json"], input=data, timeout=timeout)
        if r.status != 0:
            msg = r.stderr.decode(errors="replace").strip().splitlines()
            text = (msg[-1] if msg else f"exit {r.status}").removeprefix("migrctl: error: ")
            raise MigrdError(f"{self.name}: migrctl peer {args[0]}: {text}")
        return self.parse(tp, r.stdout, f"peer {args[0]}")

    def _remote(self, *args: str) -> list[str]:
        return [*self.conn.cfg.ssh.remote_migrctl, "peer", *args]

    def _converse(self, *args: str) -> transport.Conversation:
        # Named by its subcommand in errors ("host2: migrctl peer restore ended: ...").
        return self.conn.converse(self._remote(*args), what=f"migrctl peer {args[0]}")

    # --- the steps -------------------------------------------------------------------------

    def precheck(self, req: Request) -> PrecheckAnswer:
        raw = self._call(_PrecheckRaw, ["precheck"], asdict(req))
        files = untrusted.build(_FilesFacts, raw.facts.get("subject") or {}, PeerProtocolError,
                                f"{self.name}: peer precheck: facts.subject").files
        return PrecheckAnswer(raw.problems, raw.incoming, files, raw.not_to_copy)

    def page_stream(self, progress: ProgressFn | None, total: int) -> pagestream.Sender:
        """The target's page server for this migration, running and connected."""
        compression = self.conn.cfg.ssh.compression
        talk = self._converse("pages", self.mid, "--compression", compression)
        return pagestream.Sender(talk, compression, level=self.conn.tuning.zstd_level,
                                 progress=progress, total=total)

    def precopy(self) -> precopy.Pusher:
        """The target's pre-copy store for this migration, running (`peer precopy`)."""
        compression = self.conn.cfg.ssh.compression
        return precopy.Pusher(self._converse("precopy", self.mid, "--compression", compression), compression,
                              level=self.conn.tuning.zstd_level)

    def files_sink(self) -> FilesSink:
        return FilesSink(self, self._converse("files", "--json"))

    def image_sink(self, remote_dir: str) -> transport.ImageSink:
        return self.conn.image_sink(remote_dir)

    def prepare_restore(self, *, name: str | None, stdout: str | None, address: str | None) -> Restoring:
        """A restore session, started and waiting for `Restoring.go`: open it before the
        freeze, so SSH and Python start-up on the target are not downtime."""
        args = ["restore", self.mid, "--await-go"]
        args += ["--name", name] if name else []
        args += ["--stdout", stdout] if stdout else []
        args += ["--address", address] if address else []
        restoring = Restoring(self, self._converse(*args, "--await-commit", "--json"))
        try:
            restoring.wait_ready()
        except BaseException:
            restoring.close()
            raise
        return restoring

    def start(self, cmdline: tuple[str, ...], cwd: str, env: dict[str, str], name: str | None,
              user: str | None) -> StartAnswer:
        """Restart mode: the command fresh there, as user (None: root)."""
        spec = {"cmdline": list(cmdline), "cwd": cwd, "env": env, "name": name, "user": user}
        return self._call(StartAnswer, ["start", self.mid], spec)

    def status(self) -> Status:
        return self._call(Status, ["status", self.mid])

    def finish(self, address: str | None) -> FinishAnswer:
        return self._call(FinishAnswer, ["finish", self.mid, *(["--address", address] if address else [])])

    def abort(self, address: str | None, files: list[str]) -> None:
        args = ["abort", self.mid, *(["--address", address] if address else [])]
        for path in files:
            args += ["--file", path]
        self._call(dict[str, Any], args)


def connect(cfg: Config, host: str, mid: str) -> Target:
    return Target(transport.connect(cfg, host), mid)
