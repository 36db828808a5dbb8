#!/usr/bin/env python3
"""Overhead of an idle migrd agent, and what its load exchange costs against the obvious
alternative.

1. A fresh 2-host bed with an agent in each host (its bed config: cgroup load source, default
   interval and probe settings). After a warm-up, host1's agent is watched for --seconds:
   CPU share of one core from /proc/PID/stat utime+stime deltas, and its peak RSS (VmHWM).
   The same window also reports the CPU of both host cgroups (sshd serving the SFTP reads is
   in there) and the number of rounds the agent ran.
2. Baseline, same run: one load read from host1 of host2's snapshot, repeated --reads times,
   (a) as the agent does it: one persistent SSH connection, SFTP read of load.json;
   (b) by spawning `migrctl` over SSH per read (what a naive agent would run each round; here
       `migrctl --version`, the cheapest migrctl call). CPU per read is counted on both ends:
       the reader's own CPU (getrusage) and host2's cgroup CPU (sshd, shell, python).
   Ratio = (b) / (a).

Needs root (the bed). Writes JSON (default bench/results/agent.json) and prints a summary.
Run: .venv/bin/python bench/agent.py [--seconds 60] [--reads 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK  # utime, stime


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reads(method: str, n: int) -> dict:
    """Inside a bed host: n reads of the peer's snapshot by `method`; our own CPU and wall."""
    from migrd import config
    from migrd.adapters import exchange, transport

    cfg = config.load()
    peer = next(h.name for h in cfg.hosts if h.name != cfg.host)
    with transport.connect(cfg, peer) as conn:
        sftp = conn._client.open_sftp()  # type: ignore[union-attr]
        path = str(cfg.state_dir / exchange.SNAPSHOT)

        def one() -> None:
            if method == "sftp":
                with sftp.open(path, "rb") as f:
                    exchange.Snapshot.from_json(f.read())
            else:
                r = conn.migrctl(["--version"])
                assert r.status == 0, r.stderr

        one()  # warm: the first SFTP open / first exec are not the steady state
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(n):
            one()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        sftp.close()
    return {"method": method, "n": n, "wall_s": wall,
            "reader_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--reads", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "agent.json")
    ap.add_argument("--inner", choices=["sftp", "exec"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(reads(args.inner, args.reads)))
        return 0

    from migrd.agent import admin
    from migrbed import bed
    from migrd.adapters import cgroup
    from migrd import config

    root = Path(tempfile.mkdtemp(prefix="migrd-bench-agent-"))
    name = bed.new_name("ba")
    state = bed.up(name, hosts=2, root=root)
    try:
        pids = bed.start_agents(state)
        h1, h2 = state.hosts
        pid = pids["host1"]
        time.sleep(args.warmup)  # start-up: recovery, first SSH connection, link probe
        st0 = admin.request(bed.agent_socket(h1), "status")
        c0, g0 = _cpu_s(pid), [cgroup.cpu_usage_ns(h.cgroup) for h in state.hosts]
        t0 = time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - t0
        c1, g1 = _cpu_s(pid), [cgroup.cpu_usage_ns(h.cgroup) for h in state.hosts]
        st1 = admin.request(bed.agent_socket(h1), "status")
        agent = {"pid": pid, "seconds": round(wall, 2), "cpu_s": round(c1 - c0, 3),
                 "cpu_percent_of_one_core": round(100 * (c1 - c0) / wall, 3),
                 "max_rss_bytes": _hwm(pid), "rounds": st1["rounds"] - st0["rounds"],
                 "interval_s": config.parse((h1.dir / "etc" / "migrd.yaml").read_text()).daemon.interval,
                 "host_cgroup_cpu_percent": {h.name: round(100 * (b - a) / 1e9 / wall, 3)
                                             for h, a, b in zip(state.hosts, g0, g1)}}
        base = {}
        for method in ("sftp", "exec"):
            a = cgroup.cpu_usage_ns(h2.cgroup)
            r = bed.exec_in(state, "host1", [sys.executable, str(Path(__file__).resolve()),
                                             "--inner", method, "--reads", str(args.reads)], timeout=600)
            peer_cpu = (cgroup.cpu_usage_ns(h2.cgroup) - a) / 1e9
            d = json.loads(r.stdout)
            base[method] = {"reads": d["n"], "ms_per_read": round(1000 * d["wall_s"] / d["n"], 3),
                            "reader_cpu_ms_per_read": round(1000 * d["reader_cpu_s"] / d["n"], 3),
                            "peer_cpu_ms_per_read": round(1000 * peer_cpu / d["n"], 3),
                            "total_cpu_ms_per_read": round(1000 * (d["reader_cpu_s"] + peer_cpu) / d["n"], 3)}
    finally:
        bed.down(name, root)
    ratio = base["exec"]["total_cpu_ms_per_read"] / max(base["sftp"]["total_cpu_ms_per_read"], 1e-9)
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "agent_idle": agent, "exchange_read": base,
           "exec_over_sftp_cpu_ratio": round(ratio, 1),
           "aims": {"cpu_percent": 1.0, "rss_bytes": 60 << 20},
           "meets_aims": agent["cpu_percent_of_one_core"] < 1.0 and agent["max_rss_bytes"] < 60 << 20}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"idle agent over {agent['seconds']:.0f} s ({agent['rounds']} rounds): "
          f"{agent['cpu_percent_of_one_core']:.3f} % of one core, max RSS {agent['max_rss_bytes'] / 2**20:.1f} MiB")
    for m, b in base.items():
        print(f"  load read by {m:5}: {b['ms_per_read']:.2f} ms, CPU {b['total_cpu_ms_per_read']:.2f} ms/read "
              f"(reader {b['reader_cpu_ms_per_read']:.2f}, peer {b['peer_cpu_ms_per_read']:.2f})")
    print(f"  spawning migrctl over SSH costs {ratio:.1f}x the CPU of the SFTP read; results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
