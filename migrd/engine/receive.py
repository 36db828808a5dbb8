"""The image stream: a checkpoint directory as one tar stream, and the receiver that trusts
nothing in it.

The stream is plain ustar: manifest.json first, then each file the manifest lists, then the
end-of-archive marker; optionally zstd-compressed as one frame. The writer and the reader live
together so the format is defined in one place.

The receiver (`migrctl receive DIR` on the target, fed by the sender over SSH) checks the
manifest's bytes against the sha256 the sender put on the command line, then writes each file
into DIR.partial while hashing it, refuses anything that is not a plain file named in the
manifest with the size the manifest gives, and renames DIR.partial to DIR only once every file
is present and verified. On any error DIR.partial is removed, so a failed transfer leaves
nothing behind. Memory stays constant: the stream is handled in CHUNK-sized pieces.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from migrd.engine import manifest
from migrd.adapters import private, untrusted
from migrd.errors import ImageError, InputError, MigrdError

CHUNK = 1 << 20
COMPRESSIONS = ("none", "zstd")
BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = bytes(2 * BLOCK)
#: Zeros accepted after the end-of-archive marker: tar writers pad the archive to a whole
#: record (20 blocks); more than that is not padding but junk (or an attempt to keep us busy).
MAX_TRAILING_ZEROS = tarfile.RECORDSIZE
#: A manifest describes a process, not its memory; anything bigger is not a migrd manifest.
MAX_MANIFEST = 16 << 20

_KINDS = {
    tarfile.DIRTYPE: "a directory",
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.XHDTYPE: "a pax extended header",
    tarfile.XGLTYPE: "a pax global header",
    tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
    tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
}


# --- writing (sender side) -----------------------------------------------------------------

def manifest_bytes(directory: Path) -> tuple[bytes, manifest.Manifest]:
    """The manifest exactly as it will be sent (its sha256 goes on the receiver's command line)."""
    path = directory / manifest.NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{directory} is not a migrd checkpoint (no {manifest.NAME})") from None
    return raw, manifest.from_json(raw, str(path))


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    try:
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    except (ValueError, UnicodeError) as e:
        raise ImageError(f"image file name {name!r} cannot be sent: {e}") from None


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def stream_size(manifest_size: int, file_sizes: list[int]) -> int:
    """Length of the (uncompressed) stream image_stream yields for these sizes."""
    return sum(BLOCK + size + -size % BLOCK for size in [manifest_size, *file_sizes]) + len(END_OF_ARCHIVE)


def image_stream(directory: Path, raw_manifest: bytes, names: list[str],
                 chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the tar stream of a checkpoint directory in pieces of at most `chunk` bytes.

    Each header carries the file's size now; if a file changed since the manifest was made the
    receiver refuses it, which is the point.
    """
    yield _header(manifest.NAME, len(raw_manifest)) + raw_manifest + _padding(len(raw_manifest))
    for name in names:
        manifest.check_name(name)
        path = directory / name
        try:
            f = open(path, "rb", buffering=0, opener=_open_nofollow)
        except OSError as e:
            raise ImageError(f"{path}: cannot read image file: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            yield _header(name, size)
            left = size
            while left:
                data = f.read(min(chunk, left))
                if not data:
                    raise ImageError(f"{path} shrank while being sent")
                left -= len(data)
                yield data
        if pad := _padding(size):
            yield pad
    yield END_OF_ARCHIVE


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


# --- reading (receiver side) ---------------------------------------------------------------

class ExactReader:
    """Exact-size reads over a `read(n)` that may return short pieces; b'' means end, which
    `ended` explains if it comes early."""

    def __init__(self, read: Callable[[int], bytes], chunk: int = CHUNK,
                 ended: str = "the image stream ended early (sender stopped or connection lost)") -> None:
        self._read = read
        self._chunk = chunk
        self._ended = ended
        self._buf = memoryview(b"")

    def take(self, n: int) -> Iterator[memoryview]:
        while n > 0:
            if not self._buf:
                data = self._read(self._chunk)
                if not data:
                    raise ImageError(self._ended)
                self._buf = memoryview(data)
            piece = self._buf[:n]
            self._buf = self._buf[len(piece):]
            n -= len(piece)
            yield piece

    def exact(self, n: int) -> bytes:
        if len(self._buf) >= n:  # the common case, without a generator: pre-copy reads per page
            piece, self._buf = self._buf[:n], self._buf[n:]
            return bytes(piece)
        return b"".join(self.take(n))

    def skip(self, n: int) -> None:
        for _ in self.take(n):
            pass

    def check_trailer(self) -> None:
        """Read to the end: at most MAX_TRAILING_ZEROS bytes of zero padding may follow."""
        seen = 0
        while True:
            if not self._buf:
                data = self._read(min(self._chunk, MAX_TRAILING_ZEROS + 1 - seen))
                if not data:
                    return
                self._buf = memoryview(data)
            if bytes(self._buf).strip(b"\0"):
                raise ImageError("the image stream has data after its end-of-archive marker")
            seen += len(self._buf)
            self._buf = memoryview(b"")
            if seen > MAX_TRAILING_ZEROS:
                raise ImageError(f"the image stream has more than {MAX_TRAILING_ZEROS} bytes of "
                                 f"padding after its end-of-archive marker")


@dataclass(frozen=True)
class CarriedFile:
    """One file the source copies to the same path on the target (the header before it)."""

    path: str
    size: int
    mode: int
    sha256: str

    @property
    def partial(self) -> Path:
        """Where it is written until its sha256 matched: beside its path, so the rename is
        atomic."""
        dest = Path(self.path)
        return dest.with_name(f".{dest.name}.migrd-part")


def carried_file(raw: bytes) -> CarriedFile:
    """A carried file's header from the source, checked; its missing parent directories are
    created (0700)."""
    f = untrusted.build(CarriedFile, untrusted.loads(raw, InputError, "a carried file's header"),
                        InputError, "a carried file's header")
    dest = Path(f.path)
    if not dest.is_absolute() or ".." in dest.parts or f.size < 0 or not 0 <= f.mode <= 0o7777:
        raise InputError(f"refusing a carried file {f.path!r} (size {f.size}, mode {f.mode:o})")
    private.missing_dirs(dest.parent)
    return f


def check_member_name(name: str) -> None:
    """Image directories are flat: a member name must be one plain file name."""
    if name.startswith("/"):
        raise ImageError(f"stream entry {name!r} is an absolute path")
    if ".." in name.split("/"):
        raise ImageError(f"stream entry {name!r} tries to leave the directory ('..')")
    if "/" in name:
        raise ImageError(f"stream entry {name!r} is a path; image directories are flat")
    if not name or name == "." or "\0" in name:
        raise ImageError(f"stream entry has an illegal name {name!r}")


def _next_header(r: ExactReader) -> tuple[str, int] | None:
    """(name, size) of the next regular-file entry, or None at the end-of-archive marker."""
    block = r.exact(BLOCK)
    if block == bytes(BLOCK):
        if r.exact(BLOCK) != bytes(BLOCK):
            raise ImageError("the image stream has a malformed end-of-archive marker")
        return None
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    except (tarfile.HeaderError, UnicodeError) as e:
        raise ImageError(f"the image stream has a corrupt tar header ({e})") from None
    check_member_name(info.name)
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = _KINDS.get(info.type, f"of tar type {info.type!r}")
        raise ImageError(f"stream entry {info.name!r} is {kind}; only regular files are accepted")
    return info.name, info.size


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Every byte of data to fd (a pipe or socket may take less than asked at a time)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _receive_into(r: ExactReader, partial: Path, manifest_sha256: str) -> manifest.Manifest:
    first = _next_header(r)
    if first is None or first[0] != manifest.NAME:
        raise ImageError(f"the image stream does not start with {manifest.NAME}")
    if first[1] > MAX_MANIFEST:
        raise ImageError(f"{manifest.NAME} in the stream is {first[1]} bytes; refusing (limit {MAX_MANIFEST})")
    raw = r.exact(first[1])
    r.skip(-first[1] % BLOCK)
    if hashlib.sha256(raw).hexdigest() != manifest_sha256.lower():
        raise ImageError(f"{manifest.NAME} was altered in transit (sha256 differs from the sender's)")
    m = manifest.from_json(raw, f"received {manifest.NAME}")
    for name in m.files:
        manifest.check_name(name)
    fd = private.open_private(partial / manifest.NAME, os.O_WRONLY | os.O_EXCL | os.O_NOFOLLOW)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)

    seen: set[str] = set()
    while (entry := _next_header(r)) is not None:
        name, size = entry
        if name == manifest.NAME or name in seen:
            raise ImageError(f"stream entry {name!r} appears twice")
        expected = m.files.get(name)
        if expected is None:
            raise ImageError(f"stream entry {name!r} is not in the manifest")
        if size != expected.size:
            raise ImageError(f"image file {name} is {size} bytes in the stream, manifest says {expected.size}")
        digest = hashlib.sha256()
        fd = private.open_private(partial / name, os.O_WRONLY | os.O_EXCL | os.O_NOFOLLOW)
        try:
            for piece in r.take(size):
                digest.update(piece)
                write_all(fd, piece)
        finally:
            os.close(fd)
        if digest.hexdigest() != expected.sha256:
            raise ImageError(f"image file {name} was altered (sha256 differs from the manifest)")
        r.skip(-size % BLOCK)
        seen.add(name)
    missing = sorted(set(m.files) - seen)
    if missing:
        raise ImageError(f"image file {missing[0]} is missing from the stream ({len(missing)} missing)")
    r.check_trailer()
    return m


def partial_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".partial")


def receive(read: Callable[[int], bytes], directory: Path, manifest_sha256: str,
            compression: str = "none") -> manifest.Manifest:
    """Receive an image stream from `read` into directory; all or nothing (see module doc)."""
    check_compression(compression)
    if os.path.lexists(directory):
        raise ImageError(f"{directory} already exists; refusing to overwrite it")
    partial = partial_path(directory)
    private.private_dir(directory.parent)
    try:
        partial.mkdir(mode=private.DIR_MODE)
    except FileExistsError:
        raise ImageError(f"{partial} exists: another transfer is running or one was interrupted"
                         " (remove it if not)") from None
    os.chmod(partial, private.DIR_MODE)  # the umask may have narrowed it, never widened it
    try:
        if compression == "zstd":
            # stream_reader bounds every read's output, so a stream of zeros cannot balloon.
            # The ignore: zstandard's stub wants IO[bytes], its docs and code only a read(size).
            read = zstandard.ZstdDecompressor().stream_reader(_RawRead(read), read_size=CHUNK).read  # type: ignore[arg-type]
        try:
            m = _receive_into(ExactReader(read), partial, manifest_sha256)
        except zstandard.ZstdError as e:
            raise ImageError(f"the image stream is not valid zstd ({e})") from None
        except OSError as e:  # a full or read-only disk here, typically
            raise MigrdError(f"cannot write the images into {directory.parent}: {e.strerror}") from None
        # No fsync: the image is restored right away and the source keeps the process until
        # that restore succeeded, so a crash here loses nothing that is not still at the source.
        if os.path.lexists(directory):
            raise ImageError(f"{directory} appeared while receiving; refusing to overwrite it")
        os.rename(partial, directory)
        return m
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class _RawRead:
    """The file-like face zstandard's stream_reader wants, over a read function."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read


def check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ImageError(f"unknown compression {compression!r} (known: {', '.join(COMPRESSIONS)})")


class Compressor:
    """A sender's side of `ssh.compression` on a stream whose receiver answers (pre-copy's
    rounds, post-copy's pages, the page server): with zstd each piece is compressed and
    flushed as a block, so the receiver can decompress all that was sent before the sender
    waits for its answer; with none, pieces go as they are."""

    def __init__(self, compression: str, level: int = 1) -> None:
        check_compression(compression)
        self._cobj = zstandard.ZstdCompressor(level=level).compressobj() if compression == "zstd" else None

    def block(self, data: bytes | bytearray) -> bytes | bytearray:
        if self._cobj is None:
            return data
        return self._cobj.compress(data) + self._cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def end(self) -> bytes:
        """What ends the stream (zstd: the frame's end, which the receiver can check)."""
        return b"" if self._cobj is None else self._cobj.flush()


def fd_content(fd: int, compression: str) -> Callable[[int], bytes]:
    """Reads of what arrives on fd, decompressed as `compression` says (see unzstd), for a
    stream whose sender waits for answers: each returns what has come, at most n bytes; b''
    at the end."""
    check_compression(compression)

    def raw(n: int) -> bytes:
        return os.read(fd, n)

    return unzstd(raw) if compression == "zstd" else raw


#: Compressed bytes decompressed at a time (zstd_steps). A block of zeros compresses to 4 bytes
#: for 128 KiB, so this bounds what one step can expand to (128 MiB), whatever the sender sent.
UNZSTD_STEP = 4096


def zstd_steps(dobj: zstandard.ZstdDecompressionObj, data: bytes | memoryview) -> Iterator[bytes]:
    """What `dobj` makes of `data`, UNZSTD_STEP compressed bytes at a time: a piece of a stream
    from elsewhere cannot balloon into one huge allocation. ImageError if it is not zstd."""
    view = memoryview(data)
    for i in range(0, len(view), UNZSTD_STEP):
        try:
            yield dobj.decompress(view[i:i + UNZSTD_STEP])
        except zstandard.ZstdError as e:
            raise ImageError(f"the stream is not valid zstd ({e})") from None


def unzstd(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """The content of a zstd stream that `read` returns in pieces (b'' at its end), for a
    stream whose sender waits for answers (pre-copy's rounds, post-copy's pages). Each call
    returns at most n bytes, as soon as some are there. zstandard's stream_reader, asked for
    n, holds back output it has whenever its output buffer filled, until more input comes
    (so does its read_to_iter): with a sender waiting for an answer to what was held back,
    both would wait forever. A one-way stream (receive) keeps the stream_reader, which
    decompresses about twice as fast. b'' at the end of the stream or of its frame; ImageError
    if it is not zstd."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    pending: Iterator[bytes] = iter(())
    out = memoryview(b"")

    def content(n: int) -> bytes:
        nonlocal pending, out
        while not out:
            if dobj.eof:
                return b""
            # Up to n bytes out of what has come: big pieces for the caller without waiting
            # for more input.
            parts: list[bytes] = []
            size = 0
            for step in pending:
                parts.append(step)
                size += len(step)
                if size >= n:
                    break
            else:
                if not parts:
                    data = read(CHUNK)
                    if not data:
                        return b""
                    pending = zstd_steps(dobj, data)
            out = memoryview(b"".join(parts))
        piece, out = out[:n], out[n:]
        return bytes(piece)

    return content


def read_line(fd: int, limit: int) -> bytes:
    """One line from fd, byte by byte so that nothing after it is consumed (the stream follows
    on the same descriptor); at most limit bytes before the newline."""
    line = bytearray()
    while (b := os.read(fd, 1)) not in (b"", b"\n"):
        line += b
        if len(line) > limit:
            raise ImageError(f"the sender's first line is longer than {limit} bytes")
    return bytes(line)


def receive_fd(fd: int, directory: Path, manifest_sha256: str, compression: str = "none") -> manifest.Manifest:
    """Receive from a file descriptor (stdin under sshd)."""
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        try:
            # sshd writes 32 KiB packets into this pipe; a 1 MiB pipe lets it run ahead of us.
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default
    src = open(fd, "rb", buffering=0, closefd=False)
    return receive(src.read, directory, manifest_sha256, compression)
