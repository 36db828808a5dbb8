"""Pre-copy by content, on any kernel: memory crosses while the workload runs, and at the
freeze only the pages of the dump the target does not hold already.

No kernel tracking is needed (this kernel has no soft-dirty, so CRIU's pre-dump cannot run).
The source reads the running process's memory (memread), keeps a digest of every page it read
and sends the pages whose digest changed since the round before and whose content the target
does not hold yet; the target (`migrctl peer precopy`) appends each page it receives to a pool,
and the source mirrors which content sits in which slot of it. After the freeze CRIU dumps as
usual; the source walks the dump's pages-*.img and sends runs: pages the target holds (by slot),
zero pages (by count) and the rest as bytes. The target rebuilds every pages-*.img byte for byte
and checks it against the sha256 the source's manifest holds: what restores there is exactly
the frozen dump, whatever was read ahead, and a digest collision could only make the migration
fail, never restore wrong memory.

The pages are matched by content, not by address, so nothing of CRIU's pagemap format is read
here, and memory that moved or repeats (zero pages, copies) costs a run record. Runs let the
target copy held pages with one read per run, not one per page: the freeze's work on the
target does not grow with the number of pages.

Wire format, source to target, on the peer's stdin (the target answers lines on stdout):
  S page(4096)               store a page in the pool's next slot
  A round(4)                 confirm a round: the target answers {"round": N, "pages": SLOTS}
  F size(4) JSON             a page image follows: {"name", "size", "sha256"}, then runs
    P count(4) bytes         count pages as bytes (the image's last one may be shorter); the
                             whole ones also go to the pool's next slots
    R slot(4) count(4)       count pages the pool holds from slot on
    Z count(4)               count zero pages
  C size(4) JSON             a carried file follows, as runs: {"path", "size", "mode", "sha256"}
  E                          the end: the target answers {"bytes": N, "files": {NAME: SIZE},
                             "carried": {PATH: SIZE}}
The whole stream is zstd-compressed when `ssh.compression` says so (`peer precopy
--compression zstd`), each batch flushed as a block so the target can answer a round at once.
Every run is at most MAX_RUN pages. The files a migration carries (its stdout log, --with-files)
are read ahead with the memory, page by page into the same pool, so the freeze sends only their
pages that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from migrd.adapters import memread, private, untrusted
from migrd.core import dirtyrate
from migrd.core.precopy import Round
from migrd.engine import manifest as mf
from migrd.engine import pagestream, receive
from migrd.errors import ImageError, PeerProtocolError

if TYPE_CHECKING:  # the target side must not pay for importing paramiko
    from migrd.adapters.transport import Conversation

PAGE = 4096
ZERO = bytes(PAGE)
BATCH = 1 << 20
#: Pages in one run record: bounds what either side holds of a run at once.
MAX_RUN = BATCH // PAGE
_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")


def digest(page: bytes | memoryview) -> bytes:
    # SHA-1 runs ~4x faster than BLAKE2 here (CPU instructions); collisions are caught by the
    # sha256 of every rebuilt image, so speed is what counts.
    return hashlib.sha1(page).digest()


ZERO_DIGEST = digest(ZERO)


def is_page_image(name: str) -> bool:
    return name.startswith("pages-") and name.endswith(".img")


@dataclass(frozen=True)
class PageFile:
    name: str
    path: Path
    size: int
    sha256: str


def split_images(images: Path, rest: Path) -> list[PageFile]:
    """Hard-link every image but the page images into `rest` with a manifest of its own (sent
    the usual way); return the page images (sent by content). `images` stays whole: a
    rollback restores from it."""
    m = mf.read(images)
    private.private_dir(rest)
    pages, others = [], {}
    for name, entry in m.files.items():
        if is_page_image(name):
            pages.append(PageFile(name, images / name, entry.size, entry.sha256))
        else:
            os.link(images / name, rest / name)
            others[name] = entry
    mf.write(rest, dataclasses.replace(m, files=others))
    return pages


@dataclass(frozen=True)
class Final:
    #: Bytes of the rebuilt page images (what `peer restore` checks against).
    page_bytes: int
    #: Bytes that crossed as bytes during the freeze (the rest went as runs of held or zero
    #: pages), carried files included.
    sent: int
    #: Bytes of the carried files (their content, not what crossed).
    carried_bytes: int
    #: Bytes on the channel during the freeze, digests included.
    wire: int
    seconds: float


class Pusher:
    """The source half of one migration's pre-copy session (`migrctl peer precopy`). With
    `compression` "zstd" the stream is compressed as the image stream is, each batch flushed
    whole (the target answers rounds: it must be able to read all that came before)."""

    def __init__(self, talk: Conversation, compression: str = "none", level: int = 1) -> None:
        self.talk = talk
        self._compressor = receive.Compressor(compression, level)
        pagestream.await_ready(talk, "peer precopy")
        #: Digest of each page the target holds -> its slot in the target's pool (zero pages
        #: are never stored: every host has them).
        self.slots: dict[bytes, int] = {}
        #: (task, address) or (carried file, offset) -> digest of the page when last read.
        self.seen: dict[tuple[int | str, int], bytes] = {}
        self._buf = bytearray()
        self._last_start: float | None = None
        self.wire = 0

    def _put(self, *parts: bytes | memoryview) -> None:
        for p in parts:
            self._buf += p
        if len(self._buf) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            data = self._compressor.block(self._buf)
            self.talk.send(data)
            self.wire += len(data)
            self._buf = bytearray()

    def _answer(self, what: str) -> dict:
        value = untrusted.loads(self.talk.readline(), PeerProtocolError, f"peer precopy ({what})")
        if not isinstance(value, dict):
            raise PeerProtocolError(f"{self.talk.conn.where}: peer precopy ({what}): not an object")
        return value

    def round(self, pids: Iterable[int], number: int, carried: Iterable[Path] = ()) -> Round:
        """Read every task's memory and the carried files; send the pages that changed and the
        target lacks."""
        start = time.monotonic()
        interval = start - self._last_start if self._last_start is not None else 0.0
        self._last_start = start
        changed = sent = 0
        seen, slots = self.seen, self.slots
        memory: Iterator[tuple[tuple[int | str, int], bytes]] = (
            ((pid, addr), page) for pid in pids for addr, page in memread.pages(pid))
        for key, page in itertools.chain(memory, _file_pages(carried)):
            h = ZERO_DIGEST if page == ZERO else digest(page)
            if seen.get(key) == h:
                continue
            seen[key] = h
            changed += PAGE
            if h == ZERO_DIGEST or h in slots:
                continue
            slots[h] = len(slots)
            self._put(b"S", page)
            sent += PAGE
        self._put(b"A", _U32.pack(number))
        self._flush()
        got = self._answer("round")
        if got.get("round") != number or got.get("pages") != len(slots):
            raise PeerProtocolError(f"{self.talk.conn.where}: peer precopy confirmed round "
                                    f"{got.get('round')!r} holding {got.get('pages')!r} pages, expected "
                                    f"round {number} holding {len(slots)}")
        return Round(changed=changed, sent=sent, seconds=time.monotonic() - start, interval=interval)

    def final(self, files: list[PageFile], carried: Iterable[Path] = ()) -> Final:
        """The dump's page images, then the carried files, as runs of held, zero and new
        pages."""
        start = time.monotonic()
        wire0 = self.wire
        sent = total = 0
        for f in files:
            header = {"name": f.name, "size": f.size, "sha256": f.sha256}
            sent += self._runs_of(b"F", header, f.path, f.size)
            total += f.size
        sizes = {}
        for path in carried:
            st = path.stat()
            header = {"path": str(path), "size": st.st_size, "mode": st.st_mode & 0o7777,
                      "sha256": mf.sha256_file(path)}
            sent += self._runs_of(b"C", header, path, st.st_size)
            sizes[str(path)] = st.st_size
        self._put(b"E")
        self._flush()
        got = self._answer("end")
        if got.get("bytes") != total or got.get("carried") != sizes:
            raise ImageError(f"{self.talk.conn.where}: the target rebuilt {got.get('bytes')!r} page bytes "
                             f"and the carried files {got.get('carried')!r:.200}, the dump has {total} "
                             f"and the files are {sizes!r:.200}")
        return Final(page_bytes=total, sent=sent, carried_bytes=sum(sizes.values()), wire=self.wire - wire0,
                     seconds=time.monotonic() - start)

    def _runs_of(self, kind: bytes, header: dict, path: Path, size: int) -> int:
        """One file (a page image or a carried file) with its header; returns the bytes that
        went as bytes."""
        raw = json.dumps(header).encode()
        self._put(kind, _U32.pack(len(raw)), raw)
        runs = _Runs(self)
        sent = 0
        with open(path, "rb", buffering=0) as src:
            left = size
            while left:
                data = src.read(min(memread.CHUNK, left))
                if not data:
                    raise ImageError(f"{path} shrank while being sent")
                left -= len(data)
                sent += runs.add(data)
        runs.close()
        return sent

    def close(self) -> None:
        self.talk.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Runs:
    """One page image's pages as run records: consecutive pages of one kind (held in
    consecutive slots, zero, or new) make one record."""

    def __init__(self, pusher: Pusher) -> None:
        self.pusher = pusher
        self.kind = b""
        self.first = self.count = 0
        self.new: list[bytes] = []

    def add(self, data: bytes) -> int:
        """Every page of data (only an image's last piece may end in a short page); returns
        the bytes that go as bytes."""
        slots = self.pusher.slots
        sent = 0
        whole = len(data) - len(data) % PAGE
        for off in range(0, whole, PAGE):
            # bytes, not memoryview slices: comparing a memoryview goes item by item, far
            # slower than the memcmp of bytes.
            page = data[off:off + PAGE]
            if page == ZERO:
                if self.kind != b"Z" or self.count == MAX_RUN:
                    self._emit(b"Z")
                self.count += 1
                continue
            h = digest(page)
            at = slots.get(h)
            if at is None:
                slots[h] = len(slots)  # the target keeps every whole page sent as bytes
                if self.kind != b"P" or self.count == MAX_RUN:
                    self._emit(b"P")
                self.new.append(page)
                self.count += 1
                sent += PAGE
            else:
                if self.kind != b"R" or self.count == MAX_RUN or at != self.first + self.count:
                    self._emit(b"R", at)
                self.count += 1
        if whole < len(data):
            self._emit(b"P")
            self.new.append(data[whole:])  # the tail: not a page the target keeps
            self.count = 1
            sent += len(data) - whole
            self._emit(b"")
        return sent

    def _emit(self, kind: bytes, first: int = 0) -> None:
        """Send the pending run, start one of kind."""
        if self.count:
            if self.kind == b"R":
                self.pusher._put(b"R", _U32x2.pack(self.first, self.count))
            elif self.kind == b"Z":
                self.pusher._put(b"Z", _U32.pack(self.count))
            else:
                self.pusher._put(b"P", _U32.pack(self.count), *self.new)
                self.new = []
        self.kind, self.first, self.count = kind, first, 0

    def close(self) -> None:
        self._emit(b"")


def _file_pages(paths: Iterable[Path]) -> Iterator[tuple[tuple[str, int], bytes]]:
    """((path, offset), page) for every whole page of the files; a file that vanished or
    cannot be read is skipped (the freeze sends whatever it then is)."""
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as f:
                at = 0
                while len(data := f.read(memread.CHUNK)) >= PAGE:
                    for off in range(0, len(data) - PAGE + 1, PAGE):
                        yield (str(path), at + off), data[off:off + PAGE]
                    at += len(data)
        except OSError:
            continue


def sample_dirty_rate(pids: Iterable[int], seconds: float, stride: int) -> float:
    """Bytes per second the tasks rewrite, from every `stride`-th page read twice `seconds`
    apart (a sample: `auto` decides on it before anything is sent). Each read is one small read
    per sampled page (memread.sample), so its cost is the pages sampled, not the memory."""
    pids = tuple(pids)
    phase = dirtyrate.phase_for(time.time(), stride)
    first = memread.sample(pids, stride, phase, math.inf)
    start = time.monotonic()
    time.sleep(seconds)
    second = memread.sample(pids, stride, phase, math.inf)
    elapsed = time.monotonic() - start
    assert first is not None and second is not None  # only a deadline makes them None
    return dirtyrate.changed(first, second) * stride * PAGE / elapsed


# --- the target half -----------------------------------------------------------------------

#: A page image's or carried file's header is a name or path and a few short fields.
MAX_HEADER = 8192


class _Pool:
    """The target's pages, one slot each, in the order they came."""

    def __init__(self, path: Path) -> None:
        self.fd = private.open_private(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self.slots = 0
        self._pending = bytearray()  # appended, not yet written

    def append(self, pages: bytes | memoryview) -> None:
        """Whole pages only."""
        self._pending += pages
        if len(self._pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            # Slots only ever grow at the end, and reads use pread: plain appends will do.
            receive.write_all(self.fd, self._pending)
            self.slots += len(self._pending) // PAGE
            self._pending = bytearray()

    def read(self, first: int, count: int) -> bytes:
        self.flush()
        if first + count > self.slots:
            raise ImageError("the source named pages this host never received")
        data = os.pread(self.fd, count * PAGE, first * PAGE)
        if len(data) != count * PAGE:
            raise ImageError("the pre-copy pool is shorter than it should be")
        return data

    def close(self) -> None:
        os.close(self.fd)


def serve(store: Path, pages_dir: Path, record: Callable[[dict], None] | None = None,
          infd: int = 0, outfd: int = 1, compression: str = "none") -> dict:
    """Receive pages into `store` (the pool) and rebuild the page images into `pages_dir`.
    Once every image was rebuilt and matched its sha256, `record` gets what `E` answers
    before the answer goes (the source restores as soon as it has it)."""
    src = receive.ExactReader(receive.fd_content(infd, compression), BATCH,
                              "the source stopped in the middle of the pre-copy stream")
    private.private_dir(store.parent)
    pool = _Pool(store)
    out = os.fdopen(os.dup(outfd), "wb", buffering=0)

    def answer(value: dict) -> None:
        out.write(json.dumps(value).encode() + b"\n")

    out.write(pagestream.READY + b"\n")
    try:
        return _serve(src, pool, pages_dir, record, answer)
    finally:
        pool.close()
        store.unlink(missing_ok=True)
        out.close()


def _serve(src: receive.ExactReader, pool: _Pool, pages_dir: Path, record: Callable[[dict], None] | None,
           answer: Callable[[dict], None]) -> dict:
    files: dict[str, int] = {}
    carried: dict[str, int] = {}
    while True:
        kind = src.exact(1)
        if kind == b"S":
            pool.append(src.exact(PAGE))
        elif kind == b"A":
            pool.flush()
            answer({"round": _U32.unpack(src.exact(4))[0], "pages": pool.slots})
        elif kind == b"F":
            f = untrusted.loads(_header(src), ImageError, "a page image header")
            if not isinstance(f, dict):
                raise ImageError("a page image header is not an object")
            name, want, sha = f.get("name"), f.get("size"), f.get("sha256")
            if not (isinstance(name, str) and is_page_image(name) and isinstance(want, int)
                    and want >= 0 and isinstance(sha, str)):
                raise ImageError(f"refusing a page image header {f!r:.100}")
            mf.check_name(name)
            if not files:
                shutil.rmtree(pages_dir, ignore_errors=True)
                private.private_dir(pages_dir)
            files[name] = _rebuild(src, pages_dir / name, want, sha, pool)
        elif kind == b"C":
            c = receive.carried_file(_header(src))
            try:
                carried[c.path] = _rebuild(src, c.partial, c.size, c.sha256, pool, c.mode)
                os.replace(c.partial, c.path)
            except BaseException:
                c.partial.unlink(missing_ok=True)
                raise
        elif kind == b"E":
            if files:
                private.restrict_files(pages_dir)
            got = {"bytes": sum(files.values()), "files": files, "carried": carried}
            if record is not None:
                record(got)
            answer(got)
            return got
        else:
            raise ImageError(f"not a pre-copy record: {kind!r}")


def _header(src: receive.ExactReader) -> bytes:
    (size,) = _U32.unpack(src.exact(4))
    if size > MAX_HEADER:
        raise ImageError("a page image or carried file header is too long")
    return src.exact(size)


def _rebuild(src: receive.ExactReader, dest: Path, size: int, sha256: str, pool: _Pool, mode: int | None = None) -> int:
    """Write the runs that make up dest's size bytes; refuse (and remove) it unless its sha256
    matches. mode: its permission bits (else private)."""
    h256 = hashlib.sha256()
    fd = private.open_private(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        left = size
        buf = bytearray()
        while left:
            kind = src.exact(1)
            if kind == b"R":
                first, count = _U32x2.unpack(src.exact(8))
                _check_run(dest, count, left, whole=True)
                data: bytes = pool.read(first, count)
            elif kind == b"Z":
                (count,) = _U32.unpack(src.exact(4))
                _check_run(dest, count, left, whole=True)
                data = bytes(count * PAGE)
            elif kind == b"P":
                (count,) = _U32.unpack(src.exact(4))
                _check_run(dest, count, left, whole=False)
                data = src.exact(min(count * PAGE, left))
                pool.append(memoryview(data)[:len(data) - len(data) % PAGE])
            else:
                raise ImageError(f"{dest.name}: not a page record: {kind!r}")
            buf += data
            left -= len(data)
            if len(buf) >= BATCH:
                h256.update(buf)
                receive.write_all(fd, buf)
                buf = bytearray()
        h256.update(buf)
        receive.write_all(fd, buf)
    finally:
        os.close(fd)
    if h256.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise ImageError(f"{dest.name} rebuilt here differs from the dump (sha256 mismatch)")
    return size


def _check_run(dest: Path, count: int, left: int, *, whole: bool) -> None:
    """A run must hold pages, no more than MAX_RUN, and (whole: all of them) fit in the image."""
    if not 0 < count <= MAX_RUN or (count - 1) * PAGE >= left or (whole and count * PAGE > left):
        raise ImageError(f"{dest.name}: a run of {count} pages where {left} bytes were left")
