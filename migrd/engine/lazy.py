"""Post-copy over SSH: the target restores before the memory arrives, and fetches it from the
frozen source while the copy already runs.

CRIU does the hard part. On the source, `criu dump --lazy-pages` writes every image except
the process's anonymous memory, then serves that memory; on the target, `criu lazy-pages`
catches the restored process's page faults with userfaultfd, asks the source for those pages
first and pulls all the others in the background. Both speak over a socket handed to them
(`--ps-socket`), so, as for the streamed pages (pagestream), no TCP port opens: migrd relays
the bytes over one SSH channel to `migrctl peer lazy` on the target.

That one channel carries three kinds of traffic at once, so it is framed: page-protocol bytes
(both ways), the image stream (source to target, once), and control messages (JSON, both
ways: restored, commit, pages done). Page traffic is request and response, so every frame is
written at once: a page fault waits for a round trip, never for a buffer. With
`ssh.compression: zstd` the source-to-target direction (the pages, the images) is one zstd
stream with every write flushed as a block, which costs microseconds a frame; the requests
the other way are small and stay plain.

Order of events, and what can fail where:
1. The source starts `peer lazy` and waits for its `ready` before the freeze: SSH session and
   Python start on the target cost no downtime.
2. Freeze: the lazy dump writes the images and signals (its post-dump action script); the
   source sends them; the target verifies them, starts its lazy-pages daemon and restores the
   process stopped, which then pulls pages in the background.
3. The switch (commit): the source process is ended (CRIU serves the memory from the pipes it
   filled during the dump, not from the process), the copy there resumes. This resume is the
   point of no return. Until every page arrived, the copy depends on the source's CRIU: its
   death, or the target daemon's, loses the workload, and the copy there is ended rather than
   left running on zero-filled memory. The target reports when the last page arrived.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrd.adapters import workloads
from migrd.config import Config
from migrd.engine import checkpoint as cp
from migrd.engine import failpoints
from migrd.engine import receive
from migrd.engine.pagestream import READY, await_ready, socketpair
from migrd.errors import ImageError, MigrdError, TransportError, WorkloadLost

if TYPE_CHECKING:  # the target side must not pay for importing paramiko
    from migrd.adapters.transport import Connection, Conversation

log = logging.getLogger(__name__)

PAGES, CONTROL, IMAGES = b"P", b"C", b"I"
_KINDS = (PAGES, CONTROL, IMAGES)
HEADER = struct.Struct(">cI")
#: Larger than any piece either side writes (reads of CHUNK bytes); anything bigger is junk.
MAX_FRAME = 4 << 20
CHUNK = 1 << 20


class ProtocolError(TransportError):
    """The peer sent something that is not a frame of this protocol."""


def frame(kind: bytes, payload: bytes | memoryview) -> bytes:
    return HEADER.pack(kind, len(payload)) + bytes(payload)


class Deframer:
    """Bytes in, whole frames out (pure: no I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out = []
        at = 0
        while len(self._buf) - at >= HEADER.size:
            kind, size = HEADER.unpack_from(self._buf, at)
            if kind not in _KINDS or size > MAX_FRAME:
                raise ProtocolError(f"not a post-copy frame (kind {kind!r}, {size} bytes)")
            if len(self._buf) - at < HEADER.size + size:
                break
            out.append((kind, bytes(self._buf[at + HEADER.size:at + HEADER.size + size])))
            at += HEADER.size + size
        del self._buf[:at]
        return out

    @property
    def partial(self) -> bool:
        return bool(self._buf)


_END = object()


class Link:
    """One framed channel: control messages and images through queues, page bytes between the
    channel and a local CRIU socket (attach()). read() returns b"" at the end, None for a quiet
    spell; write() sends everything or raises."""

    def __init__(self, read: Callable[[], bytes | None], write: Callable[[bytes], None]) -> None:
        self._read = read
        self._write = write
        self._wlock = threading.Lock()
        self._control: queue.Queue[Any] = queue.Queue()
        self._images: queue.Queue[Any] = queue.Queue()
        self._image_buf = b""
        self._sock: socket.socket | None = None
        self._attached = threading.Event()
        self.closed = threading.Event()
        self.error: str | None = None
        self.pages_in = 0
        self.pages_out = 0
        threading.Thread(target=self._pump_in, name="lazy-in", daemon=True).start()

    def send(self, kind: bytes, payload: bytes | memoryview) -> None:
        with self._wlock:
            self._write(frame(kind, payload))

    def send_control(self, message: dict[str, Any]) -> None:
        self.send(CONTROL, json.dumps(message).encode())

    def control(self, timeout: float | None) -> dict[str, Any] | None:
        """The next control message; None if the link ended (or nothing came in time)."""
        try:
            item = self._control.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._control.put(_END)  # every later call sees the end too
            return None
        return item

    def send_images(self, directory: Path) -> int:
        """The image stream (receive's format) in frames, then an empty frame. Returns bytes."""
        raw, m = receive.manifest_bytes(directory)
        self.send_control({"images": hashlib.sha256(raw).hexdigest()})
        sent = 0
        for piece in receive.image_stream(directory, raw, sorted(m.files), CHUNK):
            self.send(IMAGES, piece)
            sent += len(piece)
        self.send(IMAGES, b"")
        return sent

    def image_read(self, n: int) -> bytes:
        """read(n) over the image frames, for receive.receive(); b"" after the last."""
        if not self._image_buf:
            item = self._images.get()
            if item is _END:
                self._images.put(_END)
                return b""
            self._image_buf = item
        data, self._image_buf = self._image_buf[:n], self._image_buf[n:]
        return data

    def attach(self, sock: socket.socket) -> None:
        """Carry page bytes between sock (a CRIU's --ps-socket peer) and the channel."""
        self._sock = sock
        self._attached.set()
        threading.Thread(target=self._pump_out, name="lazy-out", daemon=True).start()

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why

    def _pump_out(self) -> None:
        assert self._sock is not None
        try:
            while data := self._sock.recv(CHUNK):
                failpoints.step("relay")  # relay:delay holds each piece: pages still to come
                self.pages_out += len(data)
                self.send(PAGES, data)
        except (OSError, TransportError) as e:
            self._fail(f"sending pages: {e}")

    def _pump_in(self) -> None:
        frames = Deframer()
        try:
            while (data := self._read()) != b"":
                if not data:
                    continue
                for kind, payload in frames.feed(data):
                    if kind == CONTROL:
                        self._control.put(json.loads(payload))
                    elif kind == IMAGES:
                        self._images.put(payload if payload else _END)
                    else:
                        self._attached.wait()
                        assert self._sock is not None
                        self._sock.sendall(payload)
                        self.pages_in += len(payload)
            if frames.partial:
                self._fail("the channel ended in the middle of a frame")
        except (OSError, EOFError, ValueError, TransportError, ImageError) as e:
            self._fail(f"receiving: {e}")
        finally:
            self.closed.set()
            self._control.put(_END)
            self._images.put(_END)
            # CRIU on this side sees the end instead of waiting for answers forever.
            if self._sock is not None:
                with suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)


# --- the source's side --------------------------------------------------------------------

class Source:
    """The source's end of `peer lazy`. Built before the freeze: returns once the target's
    side runs (its `ready`). Hand criu_fd to Criu.lazy_dump."""

    def __init__(self, talk: Conversation, compression: str = "none", level: int = 1) -> None:
        await_ready(talk, "peer lazy")
        self.talk = talk
        self._ours, self._criu = socketpair()
        self._compressor = receive.Compressor(compression, level)
        self.link = Link(self._recv, self._send)
        self.link.attach(self._ours)

    def _recv(self) -> bytes | None:
        return self.talk.recv(CHUNK)

    def _send(self, data: bytes) -> None:
        self.talk.send(self._compressor.block(data))  # Link serializes its writes: one compressor will do

    @property
    def criu_fd(self) -> int:
        return self._criu.fileno()

    def criu_started(self) -> None:
        """CRIU holds its own copy of the socket now; ours would keep it open after CRIU ends."""
        self._criu.close()

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """The target's next message, which must carry key; its error (or the session's end)
        as a TransportError otherwise."""
        msg = self.link.control(timeout)
        if msg is None:
            raise TransportError(f"{self.talk.conn.where}: peer lazy: {self.target_failure()}")
        if "error" in msg:
            raise TransportError(f"{self.talk.conn.where}: {msg['error']}")
        if key not in msg:
            raise TransportError(f"{self.talk.conn.where}: peer lazy sent {sorted(msg)}, expected {key!r}")
        return msg

    def target_failure(self) -> str:
        if not self.link.closed.is_set():
            return "no answer in time"
        result = self.talk.close(5.0)
        text = result.stderr.decode(errors="replace").strip().splitlines()
        why = text[-1] if text else f"exit status {result.status}"
        return why.removeprefix("migrctl: error: ") if result.status else (self.link.error or "ended")

    def close(self) -> None:
        """End the session: the target aborts anything not committed; CRIU here sees EOF."""
        with suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)
        self.talk.close(5.0)
        for s in (self._ours, self._criu):
            with suppress(OSError):
                s.close()


# --- the target's side --------------------------------------------------------------------

def fd_link(infd: int = 0, outfd: int = 1, compression: str = "none") -> Link:
    content = receive.fd_content(infd, compression)

    def read() -> bytes:
        return content(CHUNK)

    def write(data: bytes) -> None:
        receive.write_all(outfd, data)

    os.write(outfd, READY + b"\n")
    return Link(read, write)


# --- the source's procedure ---------------------------------------------------------------

@dataclass(frozen=True)
class Moved:
    target_pid: int
    freeze: float
    #: The copy there resumed (the point of no return).
    resumed: float
    #: The last page reached the target: from then on the source is no longer needed.
    last_page: float
    image_bytes: int
    on_demand_bytes: int
    pushed_bytes: int
    dump_seconds: float
    restore_seconds: float


Begin = Callable[..., None]


def move(cfg: Config, conn: Connection, pid: int, start_time: float, images: Path, mid: str,
         begin: Begin, record: Begin, *, name: str | None = None, stdout: str | None = None,
         address: str | None = None, send_carried: Callable[[], int] = lambda: 0, tcp_established: bool = False,
         pass_fds: tuple[int, ...] = (), verify: Callable[[dict[str, Any]], None] | None = None,
         dumped: Callable[[], dict[str, Any]] | None = None) -> Moved:
    """Move pid to conn's host with post-copy. begin(step, **data) journals a step (and may
    raise: a failpoint, a stop request); record(state, **data) only journals. send_carried()
    copies the files that travel to the same paths there after the dump (the workload's stdout
    log) and returns their bytes. verify(seen)
    checks the copy there as it reported itself; dumped() runs once the images are complete
    and returns more data for the transfer step's journal record.

    A failure before the switch leaves the source stopped here (resume it to roll back) and
    nothing there; after it, WorkloadLost (the copy there ended, the source already gone)."""
    page = os.sysconf("SC_PAGE_SIZE")
    args = [*cfg.ssh.remote_migrctl, "peer", "lazy", mid]
    args += ["--name", name] if name else []
    args += ["--stdout", stdout] if stdout else []
    args += ["--address", address] if address else []
    args += ["--compression", cfg.ssh.compression]
    src = Source(conn.converse(args, what="migrctl peer lazy"), cfg.ssh.compression, conn.tuning.zstd_level)
    dump = None
    try:
        begin("checkpoint", streamed=True, postcopy=True)
        called = time.time()
        ck, dump = cp.lazy_checkpoint(cfg, pid, images, src.criu_fd, tcp_established=tcp_established,
                                      pass_fds=pass_fds, timeout=cfg.ssh.op_timeout)
        src.criu_started()
        freeze = ck.frozen_at(called)
        begin("transfer", **ck.figures(called), **(dumped() if dumped else {}))
        sent = send_carried()
        sent += src.link.send_images(images)
        begin("restore", bytes=sent)
        r = src.expect("pid", cfg.ssh.op_timeout)
        begin("verify", target_pid=r["pid"], restore_seconds=r["seconds"])
        if verify is not None:
            verify(r["restored"])
        begin("commit")
    except BaseException:
        src.close()  # the target ends its copy; CRIU here sees the end of its lazy client
        if dump is not None:
            with suppress(MigrdError):
                dump.wait(cfg.ssh.op_timeout)  # leaves the source stopped
        raise
    # The switch. The source goes first, so it can never run beside the copy: CRIU serves
    # its memory from the pipes it filled during the dump.
    workloads.end(pid, start_time, grace=0)
    try:
        src.link.send_control({"do": "commit"})
        src.expect("finished", cfg.ssh.op_timeout)
        resumed = time.time()
        record("resumed", downtime=round(resumed - freeze, 4), resumed=round(resumed, 4))
        failpoints.step("resumed")  # the copy runs, the memory still comes from here
        done = src.expect("pages_done", cfg.migrate.lazy_timeout)
    except MigrdError as e:
        src.close()
        dump.kill()
        record("lost", reason=str(e))
        raise WorkloadLost(f"migration {mid}: the pages stopped arriving after the switch ({e}); the copy "
                           f"on {conn.host.name} was ended and the source is gone: the workload is lost") from None
    on_demand = done["on_demand_pages"] * page
    moved = Moved(target_pid=r["pid"], freeze=freeze, resumed=resumed, last_page=done["pages_done"],
                  image_bytes=sent, on_demand_bytes=on_demand,
                  pushed_bytes=done["copied_pages"] * page - on_demand,
                  dump_seconds=ck.dump_seconds, restore_seconds=r["seconds"])
    record("pages_done", last_page=moved.last_page, on_demand_bytes=moved.on_demand_bytes,
           pushed_bytes=moved.pushed_bytes, page_bytes=src.link.pages_in)
    src.close()
    try:
        dump.wait(cfg.ssh.op_timeout)
    except MigrdError as e:
        # Every page is there (the target said so): CRIU's complaint about a task it no
        # longer finds is no reason to fail a finished move.
        if not dump.served_all():
            log.warning("migration %s: the lazy dump ended badly after the last page: %s", mid, e)
    return moved
