#!/usr/bin/env python3
"""Migration time: `migrctl migrate` against the manual pipeline, in one run.

On a fresh 2-host embedded bed, a workload with MEMORY of touched memory (started with
`migrctl run` on host1) is moved to host2, `--reps` times each way, alternating:

  migrd   `migrctl migrate PID --to host2` run inside host1 (prechecks on both hosts,
          CRIU dump, image stream over paramiko with the configured compression, CRIU restore
          on host2, verification, commit). Downtime is migrd's own figure: from the freeze to
          the copy on host2 running again.
  staged  the same with `--strategy stop-copy`: the whole image is dumped to disk here,
          then sent (what migrd did before it streamed pages during the dump).
  manual  what an operator would type without migrd, timed the same way, run inside host1:
          `criu dump -t PID -D DIR`, `scp -r DIR host2:DIR`,
          `ssh host2 criu restore -D DIR -d`. The process is frozen for all of it.

Memory contents (`--fill`): mixed (half random, half touched-zero pages: a typical heap),
random (incompressible: the worst case for wire compression), zero.

Prints a summary and writes JSON (default bench/results/migrate.json). Needs root.
Run: .venv/bin/python bench/migrate.py [--memory 1024] [--reps 3] [--fill mixed]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from migrbed import bed as bed_mod
from migrd import config
from migrd.adapters.criu import find_criu

PY = sys.executable

HOG = """
import os, sys, time  # migrd-workload
n, fill, ready = int(sys.argv[1]) << 20, sys.argv[2], sys.argv[3]
buf = bytearray(n)
if fill in ("random", "mixed"):
    end = n if fill == "random" else n // 2
    for off in range(0, end, 1 << 24):
        buf[off:min(end, off + (1 << 24))] = os.urandom(min(end, off + (1 << 24)) - off)
start = 0 if fill == "zero" else (n if fill == "random" else n // 2)
buf[start::4096] = b"\\x01" * len(range(start, n, 4096))   # touch every remaining page
open(ready, "w").write("1")
deadline = time.time() + 900
while time.time() < deadline:
    time.sleep(0.2)
"""


class Bench:
    def __init__(self, state: bed_mod.BedState, memory_mib: int, fill: str, tmp: Path) -> None:
        self.bed = state
        self.memory = memory_mib
        self.fill = fill
        self.tmp = tmp
        self.criu = find_criu(config.Config()).path
        self.launchers: list = []

    def sh(self, host: str, *argv: str, timeout: float = 600):
        return bed_mod.exec_in(self.bed, host, list(argv), timeout=timeout)

    def migrctl(self, host: str, *args: str, timeout: float = 600) -> dict:
        r = self.sh(host, PY, "-m", "migrd.cli", *args, timeout=timeout)
        return json.loads(r.stdout)

    def start_hog(self, name: str, with_migrctl: bool) -> int:
        """The same process either way: init of its own PID namespace on host1. migrd's is
        started with `migrctl run` (stdio to a log migrd carries along); the manual one with
        stdio on /dev/null, as an operator would for a CRIU-friendly process."""
        ready = self.tmp / f"{name}.ready"
        hog = [PY, "-c", HOG, str(self.memory), self.fill, str(ready)]
        if with_migrctl:
            pid = int(self.migrctl("host1", "run", "--json", "--name", name, "--", *hog)["pid"])
        else:
            launcher = bed_mod.spawn_in(self.bed, "host1", ["unshare", "--pid", "--fork", "--",
                                                             "setsid", "--", *hog])
            pid = 0
        deadline = time.monotonic() + 300
        while not ready.exists():
            if time.monotonic() > deadline:
                raise SystemExit("the memory hog did not get ready in 300 s")
            time.sleep(0.1)
        if not with_migrctl:
            pid = psutil.Process(launcher.pid).children()[0].pid
            self.launchers.append(launcher)
        return pid

    def end(self, pid: int) -> None:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass

    def run_migrd(self, name: str, staged: bool = False) -> dict:
        pid = self.start_hog(name, with_migrctl=True)
        rss = psutil.Process(pid).memory_info().rss
        t0 = time.monotonic()
        out = self.migrctl("host1", "migrate", "--json", str(pid), "--to", "host2",
                           *(["--strategy", "stop-copy"] if staged else []))
        assert out["streamed"] != staged, out
        total = time.monotonic() - t0
        self.end(out["target_pid"])
        return {"total_s": total, "downtime_s": out["downtime"], "rss": rss,
                "bytes": out["bytes"], "phases": out["phases"],
                "criu_dump_s": out["dump_seconds"], "transfer_s": out["transfer_seconds"],
                "criu_restore_s": out["restore_seconds"]}

    def run_manual(self, name: str) -> dict:
        pid = self.start_hog(name, with_migrctl=False)
        rss = psutil.Process(pid).memory_info().rss
        d = f"/var/lib/migrd/manual-{name}"
        h2 = self.bed.host("host2")
        known = "/var/lib/migrd/bench_known_hosts"
        cfg2 = config.parse((h2.dir / "etc" / "migrd.yaml").read_text())
        (self.bed.host("host1").dir / "state" / "bench_known_hosts").write_text(
            "\n".join(cfg2.peer("host2").host_keys) + "\n")
        ssh_opts = ["-i", "/etc/migrd/id_ed25519", "-o", f"UserKnownHostsFile={known}",
                    "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
        t0 = time.monotonic()
        self.sh("host1", "mkdir", d)
        self.sh("host1", self.criu, "dump", "-t", str(pid), "-D", d, "-o", "dump.log",
                "--network-lock", "nftables")
        t_dump = time.monotonic()
        self.sh("host1", "scp", "-q", "-r", *ssh_opts, d, f"root@{h2.address}:{d}")
        t_copy = time.monotonic()
        self.sh("host1", "ssh", *ssh_opts, f"root@{h2.address}", self.criu, "restore", "-D", d, "-d",
                "-o", "restore.log", "--manage-cgroups=ignore", "--pidfile", f"{d}/restored.pid")
        total = time.monotonic() - t0
        restored = int((h2.dir / "state" / f"manual-{name}" / "restored.pid").read_text())
        self.end(restored)
        for launcher in self.launchers:
            launcher.wait(timeout=30)
        self.launchers.clear()
        self.sh("host1", "rm", "-rf", d)
        self.sh("host2", "rm", "-rf", d)
        return {"total_s": total, "downtime_s": total, "rss": rss,
                "phases": {"dump": t_dump - t0, "scp": t_copy - t_dump, "restore": total - (t_copy - t0)}}


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", type=int, default=1024, help="MiB of touched memory (default 1024)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill", choices=["mixed", "random", "zero"], default="mixed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "migrate.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="migrd-bench-") as tmp:
        name = bed_mod.new_name("bm")
        state = bed_mod.up(name, hosts=2, root=Path(tmp) / "bed")
        try:
            b = Bench(state, args.memory, args.fill, Path(tmp))
            kinds = ("migrd", "staged", "manual")
            results: dict[str, list[dict]] = {k: [] for k in kinds}
            runs = {"migrd": b.run_migrd, "staged": lambda n: b.run_migrd(n, staged=True),
                    "manual": b.run_manual}
            for i in range(args.reps):
                for kind in kinds[i % 3:] + kinds[:i % 3]:  # each kind first once per 3 reps
                    r = runs[kind](f"{kind}{i}")
                    results[kind].append(r)
                    print(f"rep {i + 1} {kind:6}: total {r['total_s']:.2f} s, downtime {r['downtime_s']:.2f} s, "
                          f"RSS {r['rss'] >> 20} MiB", flush=True)
        finally:
            bed_mod.down(name, Path(tmp) / "bed")

    summary = {
        kind: {"total_s_median": med(rows, "total_s"), "downtime_s_median": med(rows, "downtime_s")}
        for kind, rows in results.items()
    }
    ratio_total = summary["migrd"]["total_s_median"] / summary["manual"]["total_s_median"]
    ratio_down = summary["migrd"]["downtime_s_median"] / summary["manual"]["downtime_s_median"]
    ratio_staged = summary["staged"]["total_s_median"] / summary["manual"]["total_s_median"]
    doc = {
        "benchmark": "migrate", "memory_mib": args.memory, "fill": args.fill, "reps": args.reps,
        "machine": {"cpus": psutil.cpu_count(), "kernel": platform.release()},
        "topology": "2-host embedded bed, host1 -> host2, both on this machine's cores",
        "runs": results, "summary": summary,
        "ratio_total_migrd_over_manual": ratio_total, "ratio_downtime_migrd_over_manual": ratio_down,
        "ratio_total_staged_over_manual": ratio_staged,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"\n{args.memory} MiB ({args.fill}), median of {args.reps}:")
    for kind, s in summary.items():
        print(f"  {kind:6} total {s['total_s_median']:.2f} s   downtime {s['downtime_s_median']:.2f} s")
    print(f"  migrd / manual: total {ratio_total:.2f}x, downtime {ratio_down:.2f}x   (aim: total <= 0.8x)")
    print(f"  staged / manual: total {ratio_staged:.2f}x")
    print(f"  written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
