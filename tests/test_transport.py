"""The SSH image transport: the stream receiver on crafted tar streams (no root, no SSH), and
the real thing against a private OpenSSH sshd on 127.0.0.1 (root)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from migrd import model
from migrd import config
from migrd.engine import manifest, receive
from migrbed import sshd
from migrd.adapters import transport
from migrd.cli import main
from migrd.config import Config, HostEntry, SshSettings
from migrd.errors import ImageError, TransportError
from migrd.cli.progress import Progress, render

# --- images ---------------------------------------------------------------------------------


def make_image(directory: Path, files: dict[str, bytes] | None = None) -> manifest.Manifest:
    """A checkpoint-like directory: random and zero pages in CRIU-like file names."""
    if files is None:
        files = {
            "pages-1.img": os.urandom(300_000) + bytes(200_000),
            "pages-2.img": bytes(70_000),
            "core-42.img": os.urandom(1234),
            "empty.img": b"",
        }
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    m = manifest.Manifest(
        format=manifest.FORMAT, created=time.time(), criu_version="test", host="test",
        process=model.ProcessInfo(pid=42, cmdline=("sleep", "1"), exe="/bin/sleep", cwd="/",
                                     uid=0, rss=0, start_time=0.0),
        options={}, files=manifest.scan(directory),
    )
    manifest.write(directory, m)
    return m


def stream_of(directory: Path, compression: str = "none") -> tuple[bytes, str]:
    raw, m = receive.manifest_bytes(directory)
    data = b"".join(receive.image_stream(directory, raw, sorted(m.files), chunk=4096))
    if compression == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    return data, hashlib.sha256(raw).hexdigest()


def crafted(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


def reader(data: bytes, piece: int = 1000):
    f = io.BytesIO(data)
    return lambda n: f.read(min(n, piece))  # short reads, like a pipe


def assert_nothing_left(target: Path) -> None:
    assert not target.exists()
    assert not receive.partial_path(target).exists()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    make_image(tmp_path / "src")
    return tmp_path / "src"


# --- receiver unit tests --------------------------------------------------------------------


@pytest.mark.parametrize("compression", receive.COMPRESSIONS)
def test_stream_round_trip(image: Path, tmp_path: Path, compression: str) -> None:
    data, sha = stream_of(image, compression)
    target = tmp_path / "dst" / "img"
    m = receive.receive(reader(data), target, sha, compression)
    assert sorted(m.files) == sorted(manifest.scan(image))
    assert manifest.verify(target) == manifest.read(image)
    assert not receive.partial_path(target).exists()


def test_stream_starts_with_manifest(image: Path) -> None:
    data, _ = stream_of(image)
    assert tarfile.TarInfo.frombuf(data[:512], "utf-8", "strict").name == manifest.NAME


def _with_manifest(image: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]],
                   skip: set[str] = frozenset()) -> tuple[bytes, str]:
    """A stream with the real manifest and files (minus skip) followed by crafted entries."""
    raw, m = receive.manifest_bytes(image)
    entries = [(member(manifest.NAME), raw)]
    entries += [(member(n), (image / n).read_bytes()) for n in sorted(m.files) if n not in skip]
    return crafted(entries + extra), hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("bad, message", [
    (member("../evil"), "leave the directory"),
    (member("/etc/evil"), "absolute path"),
    (member("sub/pages-1.img"), "image directories are flat"),
    (member("x", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    (member("x", tarfile.LNKTYPE, linkname="pages-1.img"), "hard link"),
    (member("x", tarfile.CHRTYPE, devmajor=1, devminor=3), "character device"),
    (member("x", tarfile.BLKTYPE, devmajor=8, devminor=0), "block device"),
    (member("x", tarfile.DIRTYPE), "a directory"),
    (member("x", tarfile.FIFOTYPE), "FIFO"),
])
def test_refuses_bad_entries(image: Path, tmp_path: Path, bad: tarfile.TarInfo, message: str) -> None:
    data, sha = _with_manifest(image, [(bad, None)])
    target = tmp_path / "img"
    with pytest.raises(ImageError, match=message):
        receive.receive(reader(data), target, sha)
    assert_nothing_left(target)


def test_refuses_traversal_before_writing_anything(image: Path, tmp_path: Path) -> None:
    # The bad entry comes first after the manifest: nothing may be written outside the target.
    raw, _ = receive.manifest_bytes(image)
    data = crafted([(member(manifest.NAME), raw), (member("../escaped"), b"owned")])
    target = tmp_path / "img"
    with pytest.raises(ImageError, match="leave the directory"):
        receive.receive(reader(data), target, hashlib.sha256(raw).hexdigest())
    assert not (tmp_path / "escaped").exists()
    assert_nothing_left(target)


@pytest.mark.parametrize("case, message", [
    ("duplicate", "appears twice"),
    ("extra", "not in the manifest"),
    ("missing", "missing from the stream"),
    ("flipped", "altered"),
    ("size", "manifest says"),
    ("manifest", "manifest.json was altered in transit"),
    ("no-manifest-first", "does not start with manifest.json"),
    ("truncated", "ended early"),
    ("trailing", "data after its end-of-archive"),
])
def test_refuses_altered_streams(image: Path, tmp_path: Path, case: str, message: str) -> None:
    good = (image / "pages-1.img").read_bytes()
    if case == "duplicate":
        data, sha = _with_manifest(image, [(member("pages-1.img"), good)])
    elif case == "extra":
        data, sha = _with_manifest(image, [(member("surprise.img"), b"hello")])
    elif case == "missing":
        data, sha = _with_manifest(image, [], skip={"pages-2.img"})
    elif case == "flipped":
        flipped = bytearray(good)
        flipped[1000] ^= 1
        data, sha = _with_manifest(image, [(member("pages-1.img"), bytes(flipped))], skip={"pages-1.img"})
    elif case == "size":
        data, sha = _with_manifest(image, [(member("pages-1.img"), good + b"x")], skip={"pages-1.img"})
    elif case == "manifest":
        data, sha = stream_of(image)
        m = json.loads((image / manifest.NAME).read_text())
        m["files"]["pages-1.img"]["sha256"] = "0" * 64  # edited, but the sender's digest is kept
        raw = json.dumps(m).encode()
        data = crafted([(member(manifest.NAME), raw)]) + data[1024:]
    elif case == "no-manifest-first":
        data, sha = _with_manifest(image, [])
        data = crafted([(member("pages-2.img"), bytes(70_000))]) + data
    elif case == "truncated":
        data, sha = stream_of(image)
        data = data[: len(data) // 2]
    else:
        data, sha = stream_of(image)
        data += b"junk"
    target = tmp_path / "img"
    with pytest.raises(ImageError, match=message):
        receive.receive(reader(data), target, sha)
    assert_nothing_left(target)


def test_refuses_existing_target_and_corrupt_zstd(image: Path, tmp_path: Path) -> None:
    data, sha = stream_of(image)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ImageError, match="already exists"):
        receive.receive(reader(data), tmp_path / "exists", sha)
    assert (tmp_path / "exists").is_dir()
    with pytest.raises(ImageError, match="not valid zstd"):
        receive.receive(reader(data), tmp_path / "z", sha, "zstd")
    assert_nothing_left(tmp_path / "z")


def test_zstd_steps_bound_what_one_piece_of_a_stream_expands_to(monkeypatch) -> None:
    """Zeros compress about 32000:1: a small piece of a stream from elsewhere, decompressed at
    once, could be gigabytes in one allocation. zstd_steps hands it out UNZSTD_STEP
    compressed bytes at a time (shrunk here so that a 64 MiB stream shows it)."""
    import zstandard
    monkeypatch.setattr(receive, "UNZSTD_STEP", 64)
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    assert len(bomb) < 4096
    dobj = zstandard.ZstdDecompressor().decompressobj()
    sizes = [len(piece) for piece in receive.zstd_steps(dobj, bomb)]
    assert sum(sizes) == 64 << 20 and dobj.eof
    assert max(sizes) <= 64 * 32768  # at most 16 blocks of 128 KiB from 64 compressed bytes


class _CountingPageServer:
    """The page server's side of pagestream.serve without CRIU: counts what it is fed."""

    def page_server(self, images: Path, log: Path, sock_fd: int) -> subprocess.Popen[bytes]:
        code = ("import os, sys\nn = 0\nwhile b := os.read(int(sys.argv[1]), 1 << 16):\n    n += len(b)\n"
                "open(sys.argv[2], 'w').write(str(n))")
        return subprocess.Popen([sys.executable, "-c", code, str(sock_fd), str(images / "fed")],
                                pass_fds=(sock_fd,))

    def page_server_done(self, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
        assert server.wait(timeout) == 0


@pytest.mark.parametrize("stream", ["whole", "cut", "not-zstd"])
def test_page_stream_target_feeds_the_page_server_in_bounded_steps(tmp_path: Path, stream: str) -> None:
    import zstandard
    from migrd.engine import pagestream
    content = os.urandom(1 << 20) + bytes(32 << 20)
    data = {"whole": zstandard.ZstdCompressor().compress(content),
            "cut": zstandard.ZstdCompressor().compress(content)[:-100],
            "not-zstd": os.urandom(4096)}[stream]
    infd, w = os.pipe()

    def send() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answers_r, answers_w = os.pipe()
    try:
        if stream == "whole":
            got = pagestream.serve(_CountingPageServer(), tmp_path, tmp_path / "log", "zstd", 30,  # type: ignore[arg-type]
                                   infd, answers_w)
            assert got == len(content) == int((tmp_path / "fed").read_text())
        else:
            with pytest.raises(ImageError, match="ended in the middle" if stream == "cut" else "not valid zstd"):
                pagestream.serve(_CountingPageServer(), tmp_path, tmp_path / "log", "zstd", 30,  # type: ignore[arg-type]
                                 infd, answers_w)
    finally:
        for fd in (infd, answers_r, answers_w):
            os.close(fd)


def test_page_stream_target_refuses_an_unknown_compression_before_starting_a_page_server(tmp_path: Path) -> None:
    from migrd.engine import pagestream
    with pytest.raises(ImageError, match="unknown compression 'gzip'"):
        pagestream.serve(_CountingPageServer(), tmp_path, tmp_path / "log", "gzip", 30)  # type: ignore[arg-type]
    assert not (tmp_path / "fed").exists()


def test_refuses_a_running_or_stale_partial(image: Path, tmp_path: Path) -> None:
    data, sha = stream_of(image)
    receive.partial_path(tmp_path / "img").mkdir()
    with pytest.raises(ImageError, match="another transfer"):
        receive.receive(reader(data), tmp_path / "img", sha)
    assert receive.partial_path(tmp_path / "img").is_dir()  # not ours: left alone


def test_cli_receive_exit_code(image: Path, tmp_path: Path) -> None:
    data, sha = stream_of(image)
    cmd = [sys.executable, "-m", "migrd.cli", "receive", str(tmp_path / "img"), "--manifest-sha256"]
    ok = subprocess.run(cmd + [sha], input=data, capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["files"] == 4
    bad = subprocess.run(cmd[:-2] + [str(tmp_path / "img2"), "--manifest-sha256", "0" * 64],
                         input=data, capture_output=True, timeout=60)
    assert bad.returncode == ImageError.exit_code
    assert bad.stderr.decode().strip().splitlines() == [
        "migrctl: error: manifest.json was altered in transit (sha256 differs from the sender's)"]
    assert_nothing_left(tmp_path / "img2")


def test_reader_thread_passes_items_and_errors_and_stops_early() -> None:
    def items():
        yield 1, b"a"
        yield 2, b"bb"
        raise ImageError("disk gone")

    got = []
    with pytest.raises(ImageError, match="disk gone"):
        for item in transport._prefetch(items(), depth=1):
            got.append(item)
    assert got == [(1, b"a"), (2, b"bb")]
    closed = []

    def endless():
        try:
            while True:
                yield 1, b"x"
        finally:
            closed.append(True)

    stream = transport._prefetch(endless(), depth=2)
    assert next(stream) == (1, b"x")
    stream.close()  # the consumer gave up: the reader thread stops and closes its source
    assert closed == [True]


def test_wire_pieces_zstd_round_trip(image: Path) -> None:
    import zstandard

    plain, _ = stream_of(image)
    pieces = list(transport._wire_pieces([plain[:5000], plain[5000:]], "zstd", 1))
    assert sum(n for n, _ in pieces) == len(plain)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(d for _, d in pieces)) == plain


def test_progress_render_and_quiet() -> None:
    line = render("img", 50 << 20, 100 << 20, 1.0)
    assert "50%" in line and "50.0 MiB/100.0 MiB" in line and "52.4 MB/s" in line and "ETA 1 s" in line
    out = io.StringIO()
    clock = iter([0.0, 0.5, 2.0, 3.0]).__next__
    p = Progress("img", enabled=True, stream=out, clock=clock)
    p(1, 10)  # at 0.5 s: too early to show anything
    assert out.getvalue() == ""
    p(5, 10)
    p.close()
    assert "50%" in out.getvalue() and out.getvalue().endswith("\n")
    quiet = io.StringIO()
    Progress("img", stream=quiet)(5, 10)  # StringIO is not a terminal
    assert quiet.getvalue() == ""


def test_config_remote_migrctl() -> None:
    cfg = config.parse("ssh:\n  remote_migrctl: [/usr/bin/python3, -m, migrd.cli]\n")
    assert cfg.ssh.remote_migrctl == ("/usr/bin/python3", "-m", "migrd.cli")
    assert config.Config().ssh.remote_migrctl == ("migrctl",)


# --- over SSH: a private sshd on 127.0.0.1 ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory):
    """(cfg, sshd files): a real sshd for this module, config host `peer`."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a private sshd")
    base = tmp_path_factory.mktemp("peer")
    key = sshd.ensure_keypair(base / "client" / "id_ed25519")
    port = free_port()
    files = sshd.prepare(base / "sshd", "127.0.0.1", port, [key.with_suffix(".pub").read_text()])
    server = sshd.start(files, log_file=base / "sshd.log")
    try:
        wait_listening(port)
        host = HostEntry("peer", "127.0.0.1", port,
                         host_keys=(sshd.known_hosts_line("127.0.0.1", port, files.host_public_key()),))
        ssh = SshSettings(client_key=key, connect_timeout=5.0, op_timeout=60.0,
                          remote_migrctl=(sys.executable, "-m", "migrd.cli"))
        yield Config(host="self", hosts=(host,), ssh=ssh), files
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


def with_host(cfg: Config, **changes: object) -> Config:
    return dataclasses.replace(cfg, hosts=(dataclasses.replace(cfg.hosts[0], **changes),))


@pytest.mark.root
@pytest.mark.parametrize("compression", receive.COMPRESSIONS)
@pytest.mark.parametrize("pipeline", [True, False])
def test_send_images_arrive_intact(peer, image: Path, tmp_path: Path, compression: str, pipeline: bool) -> None:
    cfg, _ = peer
    seen: list[tuple[int, int]] = []
    target = tmp_path / "remote" / "img"
    tuning = transport.Tuning(pipeline=pipeline, chunk=64 << 10)
    with transport.Connection(cfg, cfg.hosts[0], tuning) as conn:
        stats = conn.send_images(image, target, progress=lambda d, t: seen.append((d, t)),
                                 compression=compression)
    assert manifest.verify(target) == manifest.read(image)
    assert seen[-1][0] == seen[-1][1] == len(stream_of(image)[0])
    assert stats.bytes == sum(p.stat().st_size for p in image.iterdir())
    assert stats.seconds > 0 and stats.wire_bytes > 0
    if compression == "zstd":
        assert stats.wire_bytes < stats.bytes  # the zero pages shrink
    assert not receive.partial_path(target).exists()


@pytest.mark.root
def test_altered_file_is_refused_and_nothing_left(peer, image: Path, tmp_path: Path) -> None:
    cfg, _ = peer
    data = bytearray((image / "pages-1.img").read_bytes())
    data[4096] ^= 0x40  # after the manifest was made: what a flipped byte in transit looks like
    (image / "pages-1.img").write_bytes(data)
    target = tmp_path / "remote" / "img"
    with transport.connect(cfg, "peer") as conn:
        with pytest.raises(ImageError, match=r"peer \(127\.0\.0\.1:\d+\): receiving into .* failed: "
                                             r"image file pages-1.img was altered"):
            conn.send_images(image, target)
    assert_nothing_left(target)


@pytest.mark.root
@pytest.mark.parametrize("case", ["manifest", "traversal"])
def test_crafted_streams_refused_over_ssh(peer, image: Path, tmp_path: Path, case: str) -> None:
    cfg, _ = peer
    data, sha = stream_of(image)
    if case == "manifest":
        sha = hashlib.sha256(b"some other manifest").hexdigest()
        message = "manifest.json was altered in transit"
    else:
        raw, _ = receive.manifest_bytes(image)
        data = crafted([(member(manifest.NAME), raw), (member("../../escaped"), b"owned")])
        message = "tries to leave the directory"
    target = tmp_path / "remote" / "img"
    with transport.connect(cfg, "peer") as conn:
        res = conn.migrctl(["receive", str(target), "--manifest-sha256", sha], input=data)
    assert res.status == ImageError.exit_code
    assert message in res.stderr.decode()
    assert_nothing_left(target)
    assert not (tmp_path / "escaped").exists()


@pytest.mark.root
def test_receiver_error_reaches_sender(peer, image: Path, tmp_path: Path) -> None:
    cfg, _ = peer
    (tmp_path / "taken").mkdir()
    with transport.connect(cfg, "peer") as conn:
        with pytest.raises(ImageError, match="taken already exists; refusing to overwrite"):
            conn.send_images(image, tmp_path / "taken")


def foreign_host_key(tmp_path: Path) -> tuple[str, str]:
    """(key type, base64 blob) of a host key the peer does not have."""
    other = sshd.ensure_keypair(tmp_path / "other_host_key")
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    return kind, blob


@pytest.mark.root
def test_unknown_host_key_refused(peer, tmp_path: Path) -> None:
    cfg, files = peer
    kind, blob = foreign_host_key(tmp_path)
    port = cfg.hosts[0].port
    # A key for another address only: nothing is known about this one.
    unknown = with_host(cfg, host_keys=(f"[127.0.0.9]:{port} {kind} {blob}",))
    with pytest.raises(TransportError, match=r"peer \(127\.0\.0\.1:\d+\): unknown host key: it offered "
                                             r"ssh-ed25519 SHA256:\S+ as \[127\.0\.0\.1\]:\d+, the config has "
                                             r"ssh-ed25519 SHA256:\S+ for \[127\.0\.0\.9\]"):
        transport.connect(unknown, "peer")
    none = with_host(cfg, host_keys=())
    with pytest.raises(TransportError, match="unknown host key.*the config has no host_keys"):
        transport.connect(none, "peer")


@pytest.mark.root
def test_changed_host_key_refused(peer, tmp_path: Path) -> None:
    cfg, files = peer
    kind, blob = foreign_host_key(tmp_path)
    port = cfg.hosts[0].port
    changed = with_host(cfg, host_keys=(sshd.known_hosts_line("127.0.0.1", port, f"{kind} {blob}"),))
    real = files.host_public_key().split()[1]
    real_fp = "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(real)).digest()).decode().rstrip("=")
    with pytest.raises(TransportError, match=rf"HOST KEY CHANGED: it offered ssh-ed25519 {re.escape(real_fp)}"
                                             r", the config expects ssh-ed25519 SHA256:"):
        transport.connect(changed, "peer")


@pytest.mark.root
def test_unreachable_is_clear_and_bounded(peer) -> None:
    cfg, _ = peer
    fast = dataclasses.replace(cfg, ssh=dataclasses.replace(cfg.ssh, connect_timeout=1.5))
    nobody = free_port()
    with pytest.raises(TransportError, match=rf"^peer \(127\.0\.0\.1:{nobody}\) unreachable: connection refused$"):
        transport.connect(with_host(fast, port=nobody), "peer")
    # A listener that never speaks SSH: the banner wait is bounded by connect_timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=rf"^peer \(127\.0\.0\.1:{port}\): no SSH banner within 1.5 s$"):
            transport.connect(with_host(fast, port=port), "peer")
        assert time.monotonic() - t0 < 30  # bounded (generous: 2 busy cores)


@pytest.mark.root
def test_run_quotes_every_argument(peer) -> None:
    cfg, _ = peer
    nasty = ["it's a \"test\"", "$(touch /tmp/migrd-pwned)", "; echo injected", "`id`", "a\nb", "", "*"]
    with transport.connect(cfg, "peer") as conn:
        res = conn.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *nasty])
        assert res.status == 0, res.stderr
        assert json.loads(res.stdout) == nasty
        echo = conn.run(["cat"], input=b"\x00binary\xff" * 1000)
        assert echo.stdout == b"\x00binary\xff" * 1000
        failed = conn.run(["sh", "-c", "echo oops >&2; exit 3"])
        assert (failed.status, failed.stderr) == (3, b"oops\n")


@pytest.mark.root
def test_probe_and_hosts_command(peer, tmp_path: Path) -> None:
    cfg, _ = peer
    with transport.connect(cfg, "peer") as conn:
        est = conn.probe(bulk_bytes=4 << 20)
    assert est.rtt_s > 0 and est.bandwidth_bytes_per_s > 0
    dead = HostEntry("dead", "127.0.0.1", free_port())
    path = tmp_path / "migrd.yaml"
    path.write_text(config.dump(dataclasses.replace(cfg, hosts=(*cfg.hosts, dead))))
    out = CliRunner().invoke(main, ["hosts", "--json"], env={"MIGRD_CONFIG": str(path)})
    assert out.exit_code == 0, out.output
    rows = {r["name"]: r for r in json.loads(out.output)}
    assert rows["peer"]["reachable"] and rows["peer"]["rtt_ms"] > 0 and rows["peer"]["bandwidth_mb_s"] > 0
    assert not rows["dead"]["reachable"] and "connection refused" in rows["dead"]["error"]


@pytest.mark.root
def test_send_command(peer, image: Path, tmp_path: Path) -> None:
    cfg, _ = peer
    path = tmp_path / "migrd.yaml"
    path.write_text(config.dump(cfg))
    target = tmp_path / "remote" / "img"
    out = CliRunner().invoke(main, ["send", str(image), "peer", str(target), "--compression", "zstd", "--json"],
                             env={"MIGRD_CONFIG": str(path)})
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output)
    assert figures["bytes"] == sum(p.stat().st_size for p in image.iterdir()) and figures["wire_bytes"] > 0
    assert manifest.verify(target) == manifest.read(image)
    again = CliRunner().invoke(main, ["send", str(image), "peer", str(target)], env={"MIGRD_CONFIG": str(path)})
    assert again.exit_code == ImageError.exit_code
    assert "already exists; refusing to overwrite" in again.output
