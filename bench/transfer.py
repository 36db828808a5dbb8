#!/usr/bin/env python3
"""Image transfer throughput: migrd's paramiko transport against OpenSSH scp, in one run.

Sends the same image-like directory (CRIU-style pages-*.img files: runs of random pages and
runs of zero pages, about half each) to a private sshd with migrd (each wire compression) and
with `scp -r` (same client key, same sshd, strict host key checking), alternating, `--reps`
times each. Then a knob sweep: paramiko's defaults and one change at a time, on a smaller
image. Prints a summary and writes JSON (default bench/results/transfer.json).

Topology (recorded in the JSON): by default the sender in the root network namespace and a
private sshd on 127.0.0.1; with --bed, a fresh 2-host embedded bed and the whole benchmark run
inside host1 against host2's sshd. Either way both ends share the machine's cores.

Needs root. Run: .venv/bin/python bench/transfer.py [--size 1G] [--reps 3] [--bed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from migrd import model
from migrd.engine import manifest
from migrd.adapters import command, transport
from migrbed import sshd
from migrd.config import Config, HostEntry, SshSettings

PAGE = 4096
#: pages-N.img share of the image (CRIU writes one big and several smaller page files).
PAGE_FILES = {"pages-1.img": 0.45, "pages-2.img": 0.30, "pages-3.img": 0.15, "pages-4.img": 0.10}
SMALL_FILES = {"core-1.img": 8192, "mm-1.img": 4096, "pagemap-1.img": 65536, "inventory.img": 100}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_image(directory: Path, size: int, seed: int = 1, zero_runs: bool = True) -> int:
    """Write an image-like directory of about `size` bytes; return its exact size."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    zero = bytes(256 * PAGE)
    for name, share in PAGE_FILES.items():
        left = max(PAGE, int(size * share) // PAGE * PAGE)
        with open(directory / name, "wb") as f:
            while left:
                n = min(left, rng.randint(1, 256) * PAGE)
                f.write(os.urandom(n))
                left -= n
                n = min(left, rng.randint(1, 256) * PAGE)
                f.write(zero[:n] if zero_runs else os.urandom(n))
                left -= n
    for name, n in SMALL_FILES.items():
        (directory / name).write_bytes(os.urandom(n))
    m = manifest.Manifest(
        format=manifest.FORMAT, created=time.time(), criu_version="bench", host=platform.node(),
        process=model.ProcessInfo(pid=1, cmdline=("bench",), exe="/bin/true", cwd="/", uid=0,
                                     rss=size, start_time=0.0),
        options={}, files=manifest.scan(directory),
    )
    manifest.write(directory, m)
    return sum(p.stat().st_size for p in directory.iterdir())


class Peer:
    """A configured host that receives the images, by migrd and by scp (same key, host key)."""

    def __init__(self, cfg: Config, name: str, workdir: Path) -> None:
        self.cfg = cfg
        self.host = cfg.peer(name)
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text("".join(line + "\n" for line in self.host.host_keys))

    def scp(self, src: Path, dst: str, legacy: bool = False) -> None:
        command.run(["scp", "-r", "-q", *(["-O"] if legacy else []), "-P", str(self.host.port),
                  "-i", str(self.cfg.ssh.client_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                  "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                  "-o", "GlobalKnownHostsFile=/dev/null",
                  str(src), f"{self.host.user}@[{self.host.address}]:{dst}"], timeout=600)

    def migrd(self, src: Path, dst: str, tuning: transport.Tuning, compression: str) -> transport.TransferStats:
        with transport.Connection(self.cfg, self.host, tuning) as conn:
            return conn.send_images(src, dst, compression=compression)

    def remove(self, dst: str) -> None:
        with transport.Connection(self.cfg, self.host) as conn:
            res = conn.run(["rm", "-rf", "--", dst])
            if res.status != 0:
                raise RuntimeError(f"rm -rf {dst} on {self.host.name}: {res.stderr.decode().strip()}")

    def negotiated(self, tuning: transport.Tuning) -> str:
        with transport.Connection(self.cfg, self.host, tuning) as conn:
            t = conn.transport
            return t.local_cipher if "gcm" in t.local_cipher else f"{t.local_cipher} + {t.local_mac}"


def loopback_sshd(base: Path) -> tuple[Config, subprocess.Popen[bytes]]:
    """A private sshd on 127.0.0.1 and a config naming it `peer`."""
    key = sshd.ensure_keypair(base / "client" / "id_ed25519")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    files = sshd.prepare(base / "sshd", "127.0.0.1", port, [key.with_suffix(".pub").read_text()])
    server = sshd.start(files, log_file=base / "sshd.log")
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                server.wait()
                raise
            time.sleep(0.05)
    host = HostEntry("peer", "127.0.0.1", port,
                     host_keys=(sshd.known_hosts_line("127.0.0.1", port, files.host_public_key()),))
    ssh = SshSettings(client_key=key, op_timeout=300.0, remote_migrctl=(sys.executable, "-m", "migrd.cli"))
    return Config(host="bench", hosts=(host,), ssh=ssh), server


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_in_bed(args: argparse.Namespace) -> int:
    """Bring up a 2-host bed and run this benchmark inside host1 against host2."""
    from migrbed import bed
    from migrd import config

    root = Path(tempfile.mkdtemp(prefix="migrd-bench-bed-"))
    name = bed.new_name("bench")
    try:
        state = bed.up(name, hosts=2, root=root)
        etc = state.host("host1").dir / "etc"
        cfg = config.parse((etc / "migrd.yaml").read_text())
        ssh = dataclasses.replace(cfg.ssh, op_timeout=300.0, remote_migrctl=(sys.executable, "-m", "migrd.cli"))
        (etc / "bench.yaml").write_text(config.dump(dataclasses.replace(cfg, ssh=ssh)))
        argv = [sys.executable, str(Path(__file__).resolve()), "--peer-config", "/etc/migrd/bench.yaml",
                "--peer", "host2", "--size", args.size, "--reps", str(args.reps), "--out", str(args.out.resolve()),
                *(["--knob-size", args.knob_size] if args.knob_size else []), *(["--no-knobs"] if args.no_knobs else [])]
        p = bed.exec_in(state, "host1", argv, check=False, timeout=7200)
        sys.stdout.write(p.stdout.decode(errors="replace"))
        sys.stderr.write(p.stderr.decode(errors="replace"))
        return p.returncode
    finally:
        bed.down(name, root)
        shutil.rmtree(root, ignore_errors=True)


def _cpu() -> float:
    """CPU seconds of this process (migrd's sender) plus waited-for children (scp, ssh)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CPU: dict[str, list[float]] = {}


def timed(fn: Callable[[], object], name: str) -> tuple[float, object]:
    """Wall seconds of fn(); the sending side's CPU seconds are kept in CPU[name]."""
    c0, t0 = _cpu(), time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    CPU.setdefault(name, []).append(_cpu() - c0)
    return seconds, out


def summarize(name: str, size: int, seconds: list[float], extra: dict | None = None) -> dict:
    rates = [size / s / 1e6 for s in seconds]
    cpu = CPU.get(name, [])
    return {"name": name, "seconds": [round(s, 3) for s in seconds], "mb_s": [round(r, 1) for r in rates],
            "median_mb_s": round(statistics.median(rates), 1),
            "sender_cpu_s_per_gb": round(statistics.median(cpu) / size * 1e9, 2) if cpu else None,
            **(extra or {})}


PARAMIKO_DEFAULTS = transport.Tuning(
    ciphers=tuple(paramiko.Transport._preferred_ciphers),
    window_size=paramiko.common.DEFAULT_WINDOW_SIZE,
    max_packet_size=paramiko.common.DEFAULT_MAX_PACKET_SIZE,
    chunk=1 << 15,
    pipeline=False,
)


def compression_row(peer: Peer, src: Path, dest: str, total: int, tuning: transport.Tuning, compression: str,
                    name: str, reps: int, scp_row: dict | None) -> dict:
    secs = []
    wire = 0
    for rep in range(reps):
        dst = f"{dest}/{compression}-{rep}"
        seconds, stats = timed(lambda: peer.migrd(src, dst, tuning, compression), name)
        secs.append(seconds)
        wire = stats.wire_bytes
        peer.remove(dst)
    row = summarize(name, total, secs, {"wire_bytes": wire})
    if scp_row:
        row["ratio_vs_scp"] = round(row["median_mb_s"] / scp_row["median_mb_s"], 2)
    return row


def knob_variants() -> list[tuple[str, transport.Tuning]]:
    d, best = PARAMIKO_DEFAULTS, transport.DEFAULT_TUNING
    gcm = dataclasses.replace(d, ciphers=best.ciphers)
    return [
        ("paramiko defaults (aes128-ctr+hmac-sha2-256, 2 MiB window, 32 KiB writes, no pipeline)", d),
        ("+ aes128-gcm", gcm),
        ("+ aes128-gcm + 1 MiB reads/writes (= migrd default)", best),
        ("migrd default + reader thread (pipeline)", dataclasses.replace(best, pipeline=True)),
        ("migrd default but 16 MiB window", dataclasses.replace(best, window_size=16 << 20)),
        ("migrd default but aes256-gcm", dataclasses.replace(best, ciphers=("aes256-gcm@openssh.com",))),
        ("migrd default but aes128-ctr", dataclasses.replace(best, ciphers=("aes128-ctr",))),
        ("migrd default but 4 MiB chunks", dataclasses.replace(best, chunk=4 << 20)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="image size for the main comparison (default 1G)")
    ap.add_argument("--knob-size", default=None, help="image size for the knob sweep (default size/4)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-knobs", action="store_true", help="skip the knob sweep")
    ap.add_argument("--bed", action="store_true", help="run between two hosts of a fresh embedded bed (host1 -> host2)")
    ap.add_argument("--tmpfs", action="store_true",
                    help="loopback only: receive into /dev/shm (transport only) instead of the disk")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer.json")
    # Set by --bed for the copy of this script it runs inside host1.
    ap.add_argument("--peer-config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--peer", default="peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/transfer.py needs root (it runs sshd, or a bed)", file=sys.stderr)
        return 2
    if args.bed:
        return run_in_bed(args)
    size = parse_size(args.size)
    knob_size = parse_size(args.knob_size) if args.knob_size else size // 4
    tmp = Path(tempfile.mkdtemp(prefix="migrd-bench-"))
    server = None
    try:
        if args.peer_config:
            from migrd import config

            cfg = config.load(args.peer_config)
            dest = f"/srv/migrd/{tmp.name}"
            me = cfg.peer(cfg.host) if cfg.host else None
            topology = (f"embedded bed: sender in {cfg.host} ({me.address if me else '?'}) -> sshd of {args.peer} "
                        f"({cfg.peer(args.peer).address}:22), separate network namespaces on a bridge; scp runs"
                        f" inside {cfg.host} too; receiving into {args.peer}'s /srv/migrd (ext4 disk)")
        else:
            cfg, server = loopback_sshd(tmp / "sshd")
            dest = tempfile.mkdtemp(prefix="migrd-bench-", dir="/dev/shm") if args.tmpfs else str(tmp / "dst")
            topology = ("loopback: sender in the root netns -> private sshd on 127.0.0.1; receiving into "
                        + ("tmpfs (/dev/shm)" if args.tmpfs else "ext4 disk (page cache, kernel writeback)"))
        peer = Peer(cfg, args.peer, tmp)
        with transport.Connection(cfg, peer.host) as conn:
            conn.run(["mkdir", "-p", "--", dest])
        try:
            return measure(args, peer, tmp, dest, size, knob_size, topology)
        finally:
            peer.remove(dest)
    finally:
        if server:
            stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, peer: Peer, tmp: Path, dest: str, size: int, knob_size: int,
            topology: str) -> int:
    print(f"generating a {size / 2**20:.0f} MiB image in {tmp} ...", file=sys.stderr)
    src = tmp / "image"
    total = make_image(src, size)
    best = transport.DEFAULT_TUNING
    modes: list[tuple[str, Callable[[str], object]]] = [
        ("migrd (compression none)", lambda dst: peer.migrd(src, dst, best, "none")),
        ("migrd (compression zstd)", lambda dst: peer.migrd(src, dst, best, "zstd")),
        ("scp -r (OpenSSH, SFTP protocol)", lambda dst: peer.scp(src, dst)),
        ("scp -r -O (OpenSSH, legacy SCP protocol)", lambda dst: peer.scp(src, dst, legacy=True)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    wire: dict[str, int] = {}
    for rep in range(args.reps):
        for name, fn in modes:
            dst = f"{dest}/dst-{rep}"
            seconds, out = timed(lambda: fn(dst), name)
            times[name].append(seconds)
            if isinstance(out, transport.TransferStats):
                wire[name] = out.wire_bytes
            peer.remove(dst)
            print(f"  rep {rep + 1}: {name}: {total / seconds / 1e6:.1f} MB/s", file=sys.stderr)
    main_rows = [summarize(n, total, times[n], {"wire_bytes": wire[n]} if n in wire else None) for n, _ in modes]
    scp_rate = main_rows[2]["median_mb_s"]
    for row in main_rows:
        row["ratio_vs_scp"] = round(row["median_mb_s"] / scp_rate, 2)

    knob_rows = []
    if not args.no_knobs:
        shutil.rmtree(src)
        ktotal = make_image(src, knob_size, seed=2)
        variants = knob_variants()
        ktimes: dict[str, list[float]] = {name: [] for name, _ in variants}
        kscp: list[float] = []
        for rep in range(args.reps):
            for name, tuning in variants:
                dst = f"{dest}/knob-{rep}"
                seconds, _ = timed(lambda: peer.migrd(src, dst, tuning, "none"), name)
                ktimes[name].append(seconds)
                peer.remove(dst)
                print(f"  knob rep {rep + 1}: {name}: {ktotal / seconds / 1e6:.1f} MB/s", file=sys.stderr)
            dst = f"{dest}/knob-scp-{rep}"
            seconds, _ = timed(lambda: peer.scp(src, dst), "scp -r (baseline for this sweep)")
            kscp.append(seconds)
            peer.remove(dst)
        scp_row = summarize("scp -r (baseline for this sweep)", ktotal, kscp)
        for name, tuning in variants:
            row = summarize(name, ktotal, ktimes[name], {"negotiated": peer.negotiated(tuning)})
            row["ratio_vs_scp"] = round(row["median_mb_s"] / scp_row["median_mb_s"], 2)
            knob_rows.append(row)
        knob_rows.append(scp_row)
        for level in (1, 3):
            knob_rows.append(compression_row(peer, src, dest, ktotal, dataclasses.replace(best, zstd_level=level),
                                             "zstd", f"migrd default + zstd level {level}", args.reps, scp_row))
        # The case against compressing: memory that is all random pages.
        shutil.rmtree(src)
        rtotal = make_image(src, knob_size, seed=3, zero_runs=False)
        for comp in ("none", "zstd"):
            knob_rows.append(compression_row(peer, src, dest, rtotal, best, comp,
                                             f"all-random image: migrd default, compression {comp}", args.reps, None))

    result = {
        "benchmark": "image transfer, migrd transport vs OpenSSH scp",
        "topology": topology,
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "paramiko": paramiko.__version__,
                    "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()},
        "image": {"bytes": total, "files": len(PAGE_FILES) + len(SMALL_FILES) + 1,
                  "content": "runs of 1-256 random pages alternating with runs of 1-256 zero pages"},
        "reps": args.reps,
        "timing": "wall clock per transfer including SSH connect, auth and remote start-up; MB = 1e6 bytes;"
                  " sender_cpu_s_per_gb: CPU of the sending side only (this process for migrd, scp+ssh"
                  " for scp), median, per 1e9 image bytes",
        "main": main_rows,
        "knob_sweep": {"image_bytes": knob_size, "rows": knob_rows} if knob_rows else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nimage {total / 2**20:.0f} MiB, {args.reps} reps; {topology}; medians:")
    for row in main_rows + knob_rows:
        ratio = f"x{row['ratio_vs_scp']:.2f} scp" if "ratio_vs_scp" in row else "         "
        print(f"  {row['median_mb_s']:7.1f} MB/s  {ratio}  sender CPU {row['sender_cpu_s_per_gb']:5.2f} s/GB"
              f"  {row['name']}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
