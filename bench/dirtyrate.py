#!/usr/bin/env python3
"""What the agent's dirty-rate sampling costs a round, and how close it comes to the truth.

Starts one SWEEPER workload (migrbed/programs.py) of --mib MiB rewriting --rate KiB/s, then
runs --rounds of the agent's measurement (`Agent.measure`, daemon.dirty_rate at its defaults
unless told) on a host that looks busy, --interval seconds apart, and prints each round's
CPU time and wall time and the rate it measured. Root (it reads /proc/PID/mem).

Run: setsid -w nice -n 5 .venv/bin/python bench/dirtyrate.py [--mib 512] [--rate 8192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from migrbed.programs import SWEEPER
from migrd.agent.loop import Agent
from migrd.config import Config, DaemonSettings, DirtyRateSettings
from migrd.model import Candidate, HostLoad, ProcessLoad


def busy_host() -> HostLoad:
    return HostLoad(host="a", time=time.time(), source="system", cpus=2, cpu_capacity=2.0, cpu_speed=1.0,
                    loadavg=(4.0, 4.0, 4.0), cpu_util=1.0, run_queue=4, mem_total=1 << 34, mem_available=1 << 33)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rate", type=int, default=8192, help="KiB/s the workload rewrites")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--budget-s", type=float, default=DirtyRateSettings().budget_s)
    args = ap.parse_args()
    work = subprocess.Popen([sys.executable, "-c", SWEEPER, str(args.mib), str(args.rate)], stdout=subprocess.PIPE)
    try:
        assert work.stdout is not None and work.stdout.readline() == b"ready\n"
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Config(host="a", state_dir=Path(tmp) / "state",
                         daemon=DaemonSettings(socket=Path(tmp) / "s.sock",
                                               dirty_rate=DirtyRateSettings(budget_s=args.budget_s)))
            agent = Agent(cfg, env={})
            proc = ProcessLoad(pid=work.pid, name="sweeper", cmdline=("sweeper",), user="root", cpu_share=0.1,
                               cpu_seconds=1.0, rss_bytes=args.mib << 20, age_s=600.0, read_bytes_per_s=None,
                               write_bytes_per_s=None, open_file_bytes=0, exe_bytes=0)
            cands = (Candidate(proc, opted_in=True),)
            rows = []
            for n in range(args.rounds):
                # Each measurement is a pair of reads: forget the rate so every round reads.
                agent.dirty = replace(agent.dirty, rates={})
                cpu, wall = time.process_time(), time.monotonic()
                [c] = agent.measure(cands, busy_host())
                rows.append({"round": n, "cpu_s": time.process_time() - cpu, "wall_s": time.monotonic() - wall,
                             "rate": c.dirty_rate})
                time.sleep(args.interval)
    finally:
        work.kill()
        work.wait()
    truth = args.rate << 10
    rates = [r["rate"] for r in rows if r["rate"] is not None]
    out = {"mib": args.mib, "truth_bytes_per_s": truth, "budget_s": args.budget_s, "rounds": rows,
           "median_cpu_s": statistics.median(r["cpu_s"] for r in rows),
           "max_wall_s": max(r["wall_s"] for r in rows),
           "rate_over_truth": [round(r / truth, 3) for r in rates]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
