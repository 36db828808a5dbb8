"""SSH to peers with paramiko: run commands, stream checkpoint images, measure the link.

A thin wrapper in the spirit of paramiko's Transport/Channel and Fabric's Connection. Host keys
come only from the config (strict: unknown or changed keys are refused), authentication is the
configured client key only, and every network wait is bounded by connect_timeout or op_timeout.
Commands are sent as shlex-quoted argv, never as strings built any other way. Only modern
algorithms are offered (see CIPHERS and MACS); a peer that insists on anything older is refused.

Throughput: paramiko spends Python time per SSH packet, and OpenSSH's sshd caps a session
channel's packets at 32 KiB, so the per-packet cost decides the rate. `Tuning` holds the knobs
bench/transfer.py measures; its defaults are the ones that helped (see bench/results).
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import select
import shlex
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import paramiko
import zstandard

from migrd.engine import receive
from migrd.config import Config, HostEntry
from migrd.errors import ConfigError, ImageError, InputError, TransportError

#: progress(done_bytes, total_bytes) of the uncompressed stream; called from the sending thread.
ProgressFn = Callable[[int, int], None]

#: The only ciphers offered (paramiko also keeps CBC modes and 3DES as fallbacks): AEAD first,
#: then AES-CTR, whose MAC is then one of MACS. chacha20-poly1305 counts when paramiko has it.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes192-ctr", "aes256-ctr")
#: The only MACs offered (paramiko also keeps hmac-sha1 and hmac-md5): SHA-2, encrypt-then-MAC.
#: SSH negotiates a MAC even for AEAD ciphers, which then ignore it.
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")


@dataclass(frozen=True)
class RunResult:
    status: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class TransferStats:
    #: Image bytes moved (file contents incl. the manifest, before compression).
    bytes: int
    seconds: float
    #: Bytes written to the SSH channel (after compression, before encryption).
    wire_bytes: int

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LinkEstimate:
    rtt_s: float
    bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class Tuning:
    """Transport knobs. bench/transfer.py measures each (1 GiB, 2 cores, bed and loopback;
    "CPU" is the sender's CPU per GB, the cost that decides the rate when the ends share cores).
    The defaults are the knobs that helped; the others stay so the benchmark can show why not."""

    #: Cipher preference (the client's order decides). paramiko's own list starts with
    #: aes128-ctr + a separate hmac-sha2-256 pass: 2.9-3.1 s/GB; AES-GCM 2.2-2.3, +25-30% rate.
    ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
    #: Our receive window and packet size. They only govern data sent *to* us, so they leave
    #: sending alone (16 MiB window: no change); sshd's 2 MiB window and 32 KiB packets apply.
    window_size: int = paramiko.common.DEFAULT_WINDOW_SIZE
    max_packet_size: int = paramiko.common.DEFAULT_MAX_PACKET_SIZE
    #: File reads and channel writes: 1 MiB over 32 KiB: -20% CPU, +6-25% rate; 4 MiB no better.
    chunk: int = 1 << 20
    #: Read (and compress) in a second thread while this one sends: no faster (5 reps: 329 vs
    #: 340 MB/s plain, 400 vs 402 with zstd) and 7-13% more CPU (GIL hand-offs), so off.
    pipeline: bool = False
    #: zstd level 1 is as fast as 3 on page images and costs less CPU.
    zstd_level: int = 1


DEFAULT_TUNING = Tuning()


def describe(host: HostEntry) -> str:
    return f"{host.name} ({host.address}:{host.port})"


def _load_host_keys(host: HostEntry, keys: paramiko.HostKeys) -> None:
    """Add the host's configured known_hosts lines to keys (nothing else is ever trusted)."""
    for i, line in enumerate(host.host_keys):
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        except Exception as e:  # paramiko raises several kinds for a bad base64 or key type
            entry = None
            why = f" ({e})"
        else:
            why = ""
        if entry is None or entry.key is None:
            raise ConfigError(f"hosts {host.name}: host_keys[{i}] is not a known_hosts line{why}: {line[:60]!r}")
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)


def _configured(host: HostEntry) -> str:
    fps = []
    for line in host.host_keys:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        if entry is not None and entry.key is not None:
            fps.append(f"{entry.key.get_name()} {entry.key.fingerprint} for {','.join(entry.hostnames)}")
    return "; ".join(fps) or "no host_keys"


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """RejectPolicy, but saying what was offered and what the config holds."""

    def __init__(self, host: HostEntry) -> None:
        self.host = host

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise TransportError(
            f"{describe(self.host)}: unknown host key: it offered {key.get_name()} {key.fingerprint}"
            f" as {hostname}, the config has {_configured(self.host)}; refusing to connect"
        )


def _transport_factory(tuning: Tuning, sock: socket.socket, **kw: Any) -> paramiko.Transport:
    # Small requests (channel open, echo probes) otherwise sit out Nagle + delayed ACK: ~40 ms
    # per channel open on loopback; OpenSSH sets this too.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = paramiko.Transport(sock, default_window_size=tuning.window_size,
                           default_max_packet_size=tuning.max_packet_size, **kw)
    opts = t.get_security_options()
    opts.ciphers = offered(tuning.ciphers, CIPHERS, tuple(opts.ciphers))
    opts.digests = offered((), MACS, tuple(opts.digests))
    return t


def offered(preferred: Sequence[str], allowed: Sequence[str], have: Sequence[str]) -> tuple[str, ...]:
    """The algorithms to offer, in order: the preferred ones, then the rest of allowed, each
    only if allowed and implemented (have). Nothing outside allowed is ever offered."""
    order = [*preferred, *(a for a in allowed if a not in preferred)]
    return tuple(a for a in order if a in allowed and a in have)


def load_client_key(cfg: Config) -> paramiko.PKey:
    """ssh.client_key as a key paramiko can sign with; a ConfigError naming the file and what
    is wrong with it otherwise. It is this host's configuration that is broken, not a peer or
    the network, so the error is the config's (exit 8), and no retry can help."""
    path = cfg.ssh.client_key
    where = f"{cfg.source or '<config>'}: key 'ssh.client_key'"
    try:
        path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {(e.strerror or str(e)).lower()}") from None
    try:
        return paramiko.PKey.from_path(path)
    except (TypeError, paramiko.PasswordRequiredException):
        # cryptography's TypeError: "key is encrypted but no password was given".
        raise ConfigError(f"{where}: {path} is protected by a passphrase, which migrd cannot give; "
                          f"use a key without one (ssh-keygen -p -N '' -f {path})") from None
    except Exception as e:  # paramiko and cryptography raise ValueError, SSHException and others
        raise ConfigError(f"{where}: {path} is not a private key migrd can use (OpenSSH or PEM "
                          f"ed25519, ECDSA or RSA): {str(e).split('. ')[0] or type(e).__name__}") from None


def command_line(argv: Sequence[str | bytes | os.PathLike[str] | os.PathLike[bytes]]) -> bytes:
    """The shell command for argv as the bytes sshd hands to the peer's shell. File names are
    bytes on Linux: one that is not UTF-8 (os.fsdecode gives it lone surrogates) goes out as
    its very bytes, so the peer gets the same name. What an argv cannot carry is refused: a
    NUL byte (the peer would silently run a truncated command), or text no bytes encode."""
    args = [os.fsdecode(a) for a in argv]
    for a in args:
        if "\0" in a:
            raise InputError(f"cannot pass {a!r} to a command on a peer: it contains a NUL byte")
        try:
            a.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise InputError(f"cannot pass {a!r} to a command on a peer: it is not a file name "
                             f"or text that can be sent as bytes") from None
    return shlex.join(args).encode("utf-8", "surrogateescape")


def _negotiation_failed(where: str, e: paramiko.ssh_exception.IncompatiblePeer,
                        t: paramiko.Transport | None) -> TransportError:
    """Say which list found no match, and what migrd offered in it."""
    reason = str(e).rpartition("(")[2].rstrip(")") or str(e)
    opts = t.get_security_options() if t is not None else None
    lists = {"cipher": ("ciphers", "ciphers"), "mac": ("MACs", "digests"),
             "kex": ("key exchanges", "kex"), "host key": ("host key types", "key_types")}
    kind = next((v for k, v in lists.items() if k in reason), None)
    offer = f": migrd offers only {', '.join(getattr(opts, kind[1]))} as {kind[0]}" if kind and opts else ""
    return TransportError(f"{where}: SSH algorithm negotiation failed ({reason}){offer}; refusing to connect")


class Connection:
    """One authenticated SSH connection to a configured peer. Use as a context manager."""

    def __init__(self, cfg: Config, host: HostEntry, tuning: Tuning = DEFAULT_TUNING) -> None:
        self.cfg = cfg
        self.host = host
        self.tuning = tuning
        self.where = describe(host)
        self._client: paramiko.SSHClient | None = None

    def __enter__(self) -> Connection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport:
        t = self._client.get_transport() if self._client else None
        if t is None or not t.is_active():
            raise TransportError(f"{self.where}: connection is not open")
        return t

    def open(self) -> None:
        ssh = self.cfg.ssh
        timeout = ssh.connect_timeout
        pkey = load_client_key(self.cfg)
        client = paramiko.SSHClient()
        _load_host_keys(self.host, client.get_host_keys())
        client.set_missing_host_key_policy(_RefuseUnknown(self.host))
        try:
            client.connect(
                self.host.address, port=self.host.port, username=self.host.user, pkey=pkey,
                allow_agent=False, look_for_keys=False, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, channel_timeout=ssh.op_timeout,
                transport_factory=functools.partial(_transport_factory, self.tuning),
            )
        except TransportError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise TransportError(
                f"{self.where}: HOST KEY CHANGED: it offered {e.key.get_name()} {e.key.fingerprint},"
                f" the config expects {e.expected_key.get_name()} {e.expected_key.fingerprint};"
                " refusing to connect"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise TransportError(
                f"{self.where}: login as {self.host.user} with key {ssh.client_key} was refused"
            ) from None
        except paramiko.ssh_exception.IncompatiblePeer as e:
            error = _negotiation_failed(self.where, e, client.get_transport())
            client.close()
            raise error from None
        except paramiko.ssh_exception.NoValidConnectionsError as e:
            client.close()
            err = next(iter(e.errors.values()))
            raise TransportError(f"{self.where} unreachable: {_socket_reason(err, timeout)}") from None
        except (socket.timeout, TimeoutError) as e:
            client.close()
            raise TransportError(f"{self.where} unreachable: {_socket_reason(e, timeout)}") from None
        except paramiko.SSHException as e:
            # paramiko's errors after a handshake timeout are about later steps ("No existing
            # session"); whether the server's banner ever came says what really happened.
            t = client.get_transport()
            banner = bool(t and t.remote_version)
            client.close()
            reason = f"SSH handshake failed ({e})" if banner else f"no SSH banner within {timeout:g} s"
            raise TransportError(f"{self.where}: {reason}") from None
        except (OSError, EOFError) as e:
            client.close()
            raise TransportError(f"{self.where} unreachable: {_socket_reason(e, timeout)}") from None
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- commands ------------------------------------------------------------------------

    def _exec(self, argv: Sequence[str], timeout: float) -> paramiko.Channel:
        command = command_line(argv)
        try:
            chan = self.transport.open_session(timeout=self.cfg.ssh.op_timeout)
            chan.settimeout(timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError) as e:
            raise TransportError(f"{self.where}: cannot start {argv[0]}: {e}") from None
        return chan

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float | None = None) -> RunResult:
        """Run argv on the peer (each argument shell-quoted) and collect its output."""
        timeout = self.cfg.ssh.op_timeout if timeout is None else timeout
        chan = self._exec(argv, timeout)
        try:
            try:
                if input:
                    self._send_all(chan, memoryview(input), f"sending input to {argv[0]}")
                chan.shutdown_write()
            except _PeerClosed:
                pass  # it exited without reading all its input; its status tells
            return self._finish(chan, argv[0], timeout)
        finally:
            chan.close()

    def migrctl(self, args: Sequence[str], input: bytes | None = None, timeout: float | None = None) -> RunResult:
        """Run migrctl ARGS on the peer (ssh.remote_migrctl says how it is started there)."""
        return self.run([*self.cfg.ssh.remote_migrctl, *args], input=input, timeout=timeout)

    def converse(self, argv: Sequence[str], timeout: float | None = None, what: str | None = None) -> Conversation:
        """Start argv on the peer and talk to it line by line (its stdout answers, our lines go
        to its stdin), so one SSH session can carry several steps."""
        timeout = self.cfg.ssh.op_timeout if timeout is None else timeout
        return Conversation(self, self._exec(argv, timeout), what or (argv[-1] if argv else "?"), timeout)

    def _finish(self, chan: paramiko.Channel, what: str, timeout: float) -> RunResult:
        """Collect stdout/stderr until the remote command exits."""
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        while True:
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                return RunResult(chan.recv_exit_status(), bytes(out), bytes(err))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"{self.where}: {what} did not finish within {timeout:g} s")
            if not self.transport.is_active():
                raise TransportError(f"{self.where}: connection lost while {what} was running")
            if chan.eof_received:
                # The channel stays "readable" after EOF; only the exit status is still to come.
                chan.status_event.wait(min(left, 0.5))
            else:
                select.select([chan], [], [], min(left, 0.5))

    def _send_all(self, chan: paramiko.Channel, data: memoryview, what: str) -> None:
        # Channel.sendall re-slices a bytes object after every 32 KiB packet (a copy of the
        # rest each time); slicing a memoryview is free.
        while data:
            try:
                n = chan.send(data)
            except socket.timeout:
                raise TransportError(
                    f"{self.where}: no progress for {chan.gettimeout():g} s while {what}") from None
            except OSError:
                n = 0
            if n == 0:
                raise _PeerClosed()
            data = data[n:]

    # --- images ---------------------------------------------------------------------------

    def send_images(self, local_dir: Path, remote_dir: str | os.PathLike[str],
                    progress: ProgressFn | None = None, compression: str | None = None) -> TransferStats:
        """Stream a checkpoint directory to remote_dir on the peer over one exec channel;
        the peer's `migrctl receive` verifies everything before the directory appears."""
        with self.image_sink(remote_dir, compression) as sink:
            return sink.send(Path(local_dir), progress)

    def image_sink(self, remote_dir: str | os.PathLike[str], compression: str | None = None) -> ImageSink:
        """`migrctl receive` started on the peer and waiting for a checkpoint directory: open
        it before a freeze, so its session and Python start-up are not downtime."""
        compression = compression or self.cfg.ssh.compression
        if compression not in receive.COMPRESSIONS:
            raise ConfigError(f"ssh.compression: unknown value {compression!r} (known: {', '.join(receive.COMPRESSIONS)})")
        args = ["receive", os.fspath(remote_dir), "--manifest-sha256", "-", "--compression", compression]
        return ImageSink(self, self._exec([*self.cfg.ssh.remote_migrctl, *args], self.cfg.ssh.op_timeout),
                         os.fspath(remote_dir), compression)

    # --- data files ------------------------------------------------------------------------

    def put_file(self, local: Path, remote: str) -> int:
        """Copy one regular file to the same or another path on the peer (missing parents
        created 0700, the file's mode kept) over SFTP and check its sha256 there; return its size."""
        from migrd.engine.manifest import sha256_file

        size = local.stat().st_size
        parent = os.path.dirname(remote) or "/"
        # Each level named, so that every directory created there is 0700 (mkdir -p alone
        # would make the intermediate ones 0755 under sshd's umask); existing ones are kept.
        levels = [str(p) for p in reversed(PurePosixPath(parent).parents)] + [parent]
        r = self.run(["mkdir", "-m", "0700", "-p", "--", *levels])
        if r.status != 0:
            raise TransportError(f"{self.where}: cannot create {parent}: {_remote_error(r)}")
        try:
            with self._client.open_sftp() as sftp:  # type: ignore[union-attr]
                sftp.get_channel().settimeout(self.cfg.ssh.op_timeout)
                # As bytes: the peer gets the very name, UTF-8 or not (see command_line).
                sftp.put(str(local), os.fsencode(remote), confirm=True)
                sftp.chmod(os.fsencode(remote), local.stat().st_mode & 0o7777)
        except (OSError, paramiko.SSHException) as e:
            raise TransportError(f"{self.where}: copying {local} to {remote} failed: {e}") from None
        r = self.run(["sha256sum", "--", remote])
        if r.status != 0 or r.stdout.split()[:1] != [sha256_file(local).encode()]:
            raise TransportError(f"{self.where}: {remote} does not match {local} after the copy")
        return size

    # --- link measurement -----------------------------------------------------------------

    def probe(self, rounds: int = 7, bulk_bytes: int = 32 << 20, bulk_seconds: float = 1.0) -> LinkEstimate:
        """RTT (median of small echo round trips through `cat`) and bandwidth (a bulk write of
        at most bulk_bytes / bulk_seconds into `cat > /dev/null`). Both clocks start once the
        remote program answers, so sshd's session start-up (~0.1 s here) is not counted."""
        timeout = self.cfg.ssh.op_timeout
        chan = self._exec(["cat"], timeout)
        try:
            samples = []
            for _ in range(rounds + 1):  # the first round trip waits for cat to start: not counted
                t0 = time.perf_counter()
                self._send_all(chan, memoryview(b"x"), "measuring round trips")
                if not chan.recv(1):
                    raise _PeerClosed()
                samples.append(time.perf_counter() - t0)
            chan.shutdown_write()
            self._finish(chan, "cat", timeout)
        except socket.timeout:
            raise TransportError(f"{self.where}: no echo within {timeout:g} s") from None
        except _PeerClosed:
            raise TransportError(f"{self.where}: cat ended during the round-trip probe") from None
        finally:
            chan.close()

        block = memoryview(os.urandom(1 << 20))  # incompressible, like the worst image pages
        # "done" comes as soon as cat has consumed everything, before sshd reaps the shell.
        chan = self._exec(["sh", "-c", "echo ready && cat > /dev/null && echo done"], timeout)
        try:
            if chan.recv(6) != b"ready\n":
                raise _PeerClosed()
            sent = 0
            t0 = time.perf_counter()
            while sent < bulk_bytes and time.perf_counter() - t0 < bulk_seconds:
                self._send_all(chan, block, "measuring bandwidth")
                sent += len(block)
            chan.shutdown_write()
            if chan.recv(5) != b"done\n":
                raise _PeerClosed()
            seconds = time.perf_counter() - t0
            self._finish(chan, "cat", timeout)
        except socket.timeout:
            raise TransportError(f"{self.where}: the bandwidth probe did not start within {timeout:g} s") from None
        except _PeerClosed:
            raise TransportError(f"{self.where}: the bandwidth probe's cat ended early") from None
        finally:
            chan.close()
        return LinkEstimate(rtt_s=statistics.median(samples[1:]), bandwidth_bytes_per_s=sent / seconds)


class ImageSink:
    """A `migrctl receive` session on the peer, waiting for one checkpoint directory."""

    def __init__(self, conn: Connection, chan: paramiko.Channel, remote_dir: str, compression: str) -> None:
        self.conn = conn
        self.chan = chan
        self.remote_dir = remote_dir
        self.compression = compression

    def send(self, local_dir: Path, progress: ProgressFn | None = None) -> TransferStats:
        conn = self.conn
        raw, m = receive.manifest_bytes(local_dir)
        total = receive.stream_size(len(raw), [f.size for f in m.files.values()])
        pieces = _wire_pieces(receive.image_stream(local_dir, raw, sorted(m.files), conn.tuning.chunk),
                              self.compression, conn.tuning.zstd_level)
        if conn.tuning.pipeline:
            pieces = _prefetch(pieces, depth=8)
        start = time.monotonic()
        done = wire = 0
        try:
            try:
                # The receiver reads the manifest's sha256 first: it was not known when it started.
                conn._send_all(self.chan, memoryview(hashlib.sha256(raw).hexdigest().encode() + b"\n"),
                               "sending images")
                for plain, data in pieces:
                    conn._send_all(self.chan, memoryview(data), "sending images")
                    done += plain
                    wire += len(data)
                    if progress:
                        progress(done, total)
                self.chan.shutdown_write()
            except _PeerClosed:
                pass  # the receiver quit early; its exit status and message say why
            result = conn._finish(self.chan, "migrctl receive", conn.cfg.ssh.op_timeout)
        finally:
            self.chan.close()
            close = getattr(pieces, "close", None)
            if close:
                close()
        seconds = time.monotonic() - start
        if result.status != 0:
            msg = _remote_error(result)
            cls = ImageError if result.status == ImageError.exit_code else TransportError
            raise cls(f"{conn.where}: receiving into {self.remote_dir} failed: {msg}")
        return TransferStats(bytes=len(raw) + m.image_bytes, seconds=seconds, wire_bytes=wire)

    def close(self) -> None:
        """Give up: the receiver sees EOF before a whole stream and leaves nothing behind; wait
        for it to have ended, so that a rollback's clean-up there comes after its own."""
        if self.chan.closed:
            return
        try:
            self.chan.shutdown_write()
            self.conn._finish(self.chan, "migrctl receive", 15.0)
        except (OSError, EOFError, paramiko.SSHException, TransportError):
            pass  # gone already: nothing of it is left to wait for
        finally:
            self.chan.close()

    def __enter__(self) -> ImageSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Conversation:
    """A remote command in progress, read and written a line at a time. close() ends our side
    (the command sees EOF on stdin) and collects its exit status."""

    def __init__(self, conn: Connection, chan: paramiko.Channel, what: str, timeout: float) -> None:
        self.conn = conn
        self.chan = chan
        self.what = what
        self.timeout = timeout
        self._buf = bytearray()
        self.result: RunResult | None = None

    def readline(self) -> bytes:
        """The next line of the command's stdout; if it ends without one, its own error line."""
        while b"\n" not in self._buf:
            try:
                data = self.chan.recv(1 << 16)
            except socket.timeout:
                raise TransportError(f"{self.conn.where}: no answer from {self.what} within "
                                     f"{self.timeout:g} s") from None
            if not data:
                result = self.close()
                raise TransportError(f"{self.conn.where}: {self.what} ended: {_remote_error(result)}")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line

    def send_line(self, text: str) -> None:
        try:
            self.conn._send_all(self.chan, memoryview(text.encode() + b"\n"), f"talking to {self.what}")
        except _PeerClosed:
            raise TransportError(f"{self.conn.where}: {self.what} stopped listening") from None

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Raw bytes to the command's stdin."""
        try:
            self.conn._send_all(self.chan, memoryview(data), f"streaming to {self.what}")
        except _PeerClosed:
            raise TransportError(f"{self.conn.where}: {self.what} stopped reading") from None

    def recv(self, n: int = 1 << 16) -> bytes | None:
        """Raw bytes of the command's stdout: b"" once it closed it, None after a quiet
        timeout (silence may be normal for the caller's protocol)."""
        if self._buf:  # what readline() read past its line
            data, self._buf = bytes(self._buf[:n]), self._buf[n:]
            return data
        try:
            return self.chan.recv(n)
        except socket.timeout:
            return None

    def end_input(self) -> None:
        """EOF on the command's stdin; its output can still be read."""
        self.chan.shutdown_write()

    def close(self, timeout: float = 15.0) -> RunResult:
        if self.result is None:
            try:
                self.chan.shutdown_write()
                self.result = self.conn._finish(self.chan, self.what, timeout)
            except (OSError, EOFError, paramiko.SSHException, TransportError) as e:
                self.result = RunResult(-1, b"", f"connection lost: {e}".encode())
            finally:
                self.chan.close()
        return self.result


def connect(cfg: Config, name: str, tuning: Tuning = DEFAULT_TUNING) -> Connection:
    """An open Connection to the configured host `name` (close it, or use `with`)."""
    conn = Connection(cfg, cfg.peer(name), tuning)
    conn.open()
    return conn


class _PeerClosed(Exception):
    """The remote end closed the channel while we were still sending."""


def _socket_reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def _remote_error(result: RunResult) -> str:
    """The receiver's own message ("migrctl: error: ..." is the CLI's one-line format)."""
    line = result.stderr.decode(errors="replace").strip().splitlines()
    text = line[-1] if line else f"exit status {result.status}, no message"
    return text.removeprefix("migrctl: error: ")


def _wire_pieces(stream: Iterable[bytes], compression: str, level: int) -> Iterator[tuple[int, bytes]]:
    """(plain bytes consumed, bytes to put on the wire) for each piece of the tar stream."""
    if compression == "none":
        for piece in stream:
            yield len(piece), piece
        return
    cobj = zstandard.ZstdCompressor(level=level).compressobj()
    for piece in stream:
        yield len(piece), cobj.compress(piece)
    yield 0, cobj.flush()


def _prefetch(items: Iterator[tuple[int, bytes]], depth: int) -> Iterator[tuple[int, bytes]]:
    """Run an iterator in a thread, `depth` items ahead (reading and zstd release the GIL)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as e:  # handed to the consumer, raised there
            put("error", e)
        finally:
            close = getattr(items, "close", None)
            if close:
                close()  # closes the image files when the consumer stopped early

    worker = threading.Thread(target=produce, name="migrd-image-reader", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=5)

