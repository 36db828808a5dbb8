"""A dump's memory pages streamed to the target while CRIU writes them.

CRIU can send pages to a page server instead of writing pages-*.img; with `--ps-socket FD` it
speaks that protocol over a socket it is handed. migrd hands the dump one end of a socketpair
on the source and `criu page-server` one end of another on the target, and carries the bytes
between them over an SSH channel (`migrctl peer pages`), zstd-compressed like the image stream.
No TCP port opens on either host, the pages cross the network only inside SSH, and the copy
overlaps the dump instead of following it: the manual pipeline's dump-then-scp pays both.

Protocol traffic is one-sided: the dump sends commands with their page data, the page server
answers a few of them (a flush at the end). Both directions are pumped by plain threads; the
GIL is released in socket I/O and zstd.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import zstandard

from migrd.adapters.criu import Criu
from migrd.engine import receive
from migrd.errors import CriuError, ImageError, TransportError

if TYPE_CHECKING:  # the target side must not pay for importing paramiko
    from migrd.adapters.transport import Conversation

CHUNK = 1 << 20

ProgressFn = Callable[[int, int], None]


def socketpair() -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    for s in pair:
        # Bigger buffers let each pump read a whole page batch at a time.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return pair


READY = b"ready"
#: The target's complaint when the source's stream stops early: a consequence, never the cause.
SOURCE_GONE = "the page stream ended in the middle (source gone?)"


def await_ready(talk: Conversation, what: str) -> None:
    """Wait for a target-side session's `ready` line (its Python started, its config read);
    close it and raise if anything else comes."""
    try:
        line = talk.readline()
    except BaseException:
        talk.close(5.0)
        raise
    if line != READY:
        talk.close(5.0)
        raise TransportError(f"{talk.conn.where}: {what} said {line[:60]!r}, expected {READY!r}")


class Sender:
    """The source half. Hand `criu_fd` to `criu dump --page-server --ps-socket`; after the
    dump, `finish()` returns the page bytes sent once the target's page server has them all.
    Used as a context manager, it tears the stream down if the dump failed.

    It returns only once the target's page server runs (its `ready` line), so the caller can
    freeze the process after that: the SSH session and Python start-up on the target
    (~0.3 s) are not downtime."""

    def __init__(self, talk: Conversation, compression: str, level: int = 1,
                 progress: ProgressFn | None = None, total: int = 0) -> None:
        await_ready(talk, "peer pages")
        self.talk = talk
        self.compression = compression
        self.level = level
        self.progress = progress
        self.total = total
        self.sent = 0
        self.error: str | None = None
        self._ours, self._criu = socketpair()
        self._up = threading.Thread(target=self._pump_up, name="pages-up", daemon=True)
        self._down = threading.Thread(target=self._pump_down, name="pages-down", daemon=True)
        self._up.start()
        self._down.start()

    @property
    def criu_fd(self) -> int:
        return self._criu.fileno()

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        # The dump must not wait forever on a stream that goes nowhere: break its socket.
        with suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)

    def _pump_up(self) -> None:
        # A block per read: the page server must see each command whole before it answers,
        # or both ends would wait for each other.
        compressor = receive.Compressor(self.compression, self.level)
        try:
            while data := self._ours.recv(CHUNK):
                self.sent += len(data)
                self.talk.send(compressor.block(data))
                if self.progress:
                    self.progress(self.sent, max(self.total, self.sent))
            if tail := compressor.end():
                self.talk.send(tail)
            self.talk.end_input()
        except (OSError, TransportError, EOFError) as e:
            self._fail(f"sending pages: {e}")

    def _pump_down(self) -> None:
        try:
            while (data := self.talk.recv()) != b"":
                if data:  # None: a quiet spell, normal while the dump sends
                    self._ours.sendall(data)
        except (OSError, EOFError) as e:
            self._fail(f"relaying the page server's answers: {e}")
        # The page server is done or gone: the dump gets EOF instead of waiting for answers.
        with suppress(OSError):
            self._ours.shutdown(socket.SHUT_WR)

    def _target_failure(self, timeout: float) -> str | None:
        """Wait for `peer pages` to end; its own error line if it failed."""
        result = self.talk.close(timeout)
        if result.status == 0:
            return None
        text = result.stderr.decode(errors="replace").strip().splitlines()
        return (text[-1] if text else f"exit status {result.status}").removeprefix("migrctl: error: ")

    def finish(self, timeout: float) -> int:
        """End the stream after a successful dump; raise with the target's own message if its
        page server did not take everything."""
        self._criu.close()  # with CRIU's copy gone too, the up pump sees EOF
        self._up.join(timeout)
        self._down.join(timeout)
        failure = self._target_failure(timeout) or self.error
        self._ours.close()
        if failure:
            raise TransportError(f"{self.talk.conn.where}: receiving the pages failed: {failure}")
        return self.sent

    def close(self) -> None:
        """Tear the stream down (idempotent): the target's page server sees the end and
        `peer pages` exits; wait for that."""
        for s in (self._criu, self._ours):
            with suppress(OSError):
                s.close()
        self.talk.close(5.0)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            return
        for s in (self._criu, self._ours):
            with suppress(OSError):
                s.close()
        # A dump that failed because the target's page server gave up only says "the page
        # server doesn't answer"; the target's own message (a full disk, say) is the cause.
        # When the dump failed by itself, the target only saw the stream stop. Which one came
        # first cannot be told from here, so a CRIU failure keeps its own line first and gets
        # the target's beside it.
        failure = self._target_failure(5.0)
        if not failure or failure == SOURCE_GONE or exc is None or isinstance(exc, TransportError):
            return
        where = self.talk.conn.where
        if isinstance(exc, CriuError):
            first = exc.error_lines[0] if exc.error_lines else "no error line in the log"
            lines = [f"{first}; {where}: the page server: {failure}", *exc.error_lines[1:]]
            raise CriuError(exc.action, lines, exc.log_path) from exc
        raise TransportError(f"{where}: receiving the pages failed: {failure}") from exc


def serve(criu: Criu, pages: Path, log: Path, compression: str, timeout: float,
          infd: int = 0, outfd: int = 1) -> int:
    """The target half: run a page server writing into pages, feed it what arrives on infd and
    relay its answers to outfd. Returns the page bytes received (uncompressed)."""
    receive.check_compression(compression)
    ours, theirs = socketpair()
    server = criu.page_server(pages, log, theirs.fileno())
    theirs.close()

    def answers() -> None:
        with suppress(OSError):
            while data := ours.recv(1 << 16):
                receive.write_all(outfd, data)

    os.write(outfd, READY + b"\n")  # before any answer can exist: nothing to interleave
    relay = threading.Thread(target=answers, name="pages-answers", daemon=True)
    relay.start()
    dobj = zstandard.ZstdDecompressor().decompressobj() if compression == "zstd" else None
    received = 0
    problem: str | None = None
    try:
        while chunk := os.read(infd, CHUNK):
            for data in receive.zstd_steps(dobj, chunk) if dobj is not None else (chunk,):
                if data:
                    ours.sendall(data)
                    received += len(data)
        if dobj is not None and not dobj.eof:
            problem = SOURCE_GONE
    except ImageError as e:
        problem = f"the page stream: {e}"
    except OSError as e:
        problem = f"the page server stopped reading ({e.strerror})"
    finally:
        with suppress(OSError):
            ours.shutdown(socket.SHUT_WR)
    try:
        criu.page_server_done(server, log, timeout)  # its own error explains a stop best
    finally:
        relay.join(timeout)
        ours.close()
    if problem:
        raise ImageError(problem)
    return received
