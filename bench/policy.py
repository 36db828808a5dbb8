#!/usr/bin/env python3
"""Decision time of the migration policy: 1000 candidate processes x 100 peer hosts.

For each workload, `decide` runs `--reps` times with its search pruning (candidates visited
best upper bound first, stop when none left can win) and as many times without it (every
candidate x every peer x every action priced: the baseline), alternating. Both must return
the same decision. Prints a summary and writes JSON (default bench/results/policy.json).

Workloads (seeded, so every run sees the same numbers):
* mixed:   processes of all ages, sizes and CPU shares; peers from idle to overloaded, some
           faster; some processes not opted in, in cooldown or with remote/sensitive data.
* uniform: 1000 identical processes: the bound cannot tell them apart (pruning's worst case).
* slowlinks: every link is slow (50 KB/s): little but moving code to its remote data pays.

Pure computation, no root. Run: .venv/bin/python bench/policy.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from migrd.model import Candidate, HostLoad, Link, Peer, PolicyConfig, ProcessLoad, Situation
from migrd.core.policy import decide

NOW = 1_000_000.0
MB = 1_000_000


def _host(name: str, per_cpu: float, cpus: int, speed: float, mem: int, t: float = NOW) -> HostLoad:
    return HostLoad(host=name, time=t, source="system", cpus=cpus, cpu_capacity=float(cpus),
                    cpu_speed=speed, loadavg=(per_cpu * cpus,) * 3, cpu_util=min(per_cpu, 1.0),
                    run_queue=round(per_cpu * cpus), mem_total=64 << 30, mem_available=mem)


def _proc(pid: int, share: float, rss: int, age: float, files: int) -> ProcessLoad:
    return ProcessLoad(pid=pid, name=f"job{pid}", cmdline=(f"job{pid}",), user="root",
                       cpu_share=share, cpu_seconds=share * age, rss_bytes=rss, age_s=age,
                       read_bytes_per_s=None, write_bytes_per_s=None, open_file_bytes=files,
                       exe_bytes=2 * MB)


def workload(kind: str, n_procs: int, n_hosts: int, seed: int = 7) -> tuple[Situation, PolicyConfig]:
    rng = random.Random(seed)
    names = [f"h{i:03d}" for i in range(n_hosts)]
    history = tuple(_host("src", 3.0, 16, 1.0, 8 << 30, NOW - 40 + 10 * i) for i in range(5))
    slow = kind == "slowlinks"
    peers = tuple(
        Peer(_host(n, rng.uniform(0.0, 1.5), rng.choice([4, 8, 16, 32]),
                   rng.choice([0.8, 1.0, 1.0, 1.5]), rng.randint(1, 64) << 30),
             Link(rng.uniform(2e-4, 0.05), 50_000 if slow else rng.uniform(10, 1000) * MB),
             cpu_compatible=rng.random() > 0.05)
        for n in names
    )
    cands = []
    for pid in range(1000, 1000 + n_procs):
        if kind == "uniform":
            cands.append(Candidate(_proc(pid, 0.2, 200 * MB, 600.0, 0), opted_in=True))
            continue
        age = 10 ** rng.uniform(0, 5)  # 1 s .. ~1 day: most processes are young
        # The source gives each runnable task 1/3 of a CPU, so a CPU hog measures 0.33.
        cands.append(Candidate(
            _proc(pid, rng.uniform(0.0, 1 / 3), int(10 ** rng.uniform(6, 9.5)),
                  age, rng.choice([0, 0, 0, int(10 ** rng.uniform(6, 10))])),
            opted_in=rng.random() < 0.8,
            last_migrated=NOW - rng.uniform(0, 600) if rng.random() < 0.1 else None,
            data_host=rng.choice(names) if rng.random() < 0.05 else None,
            data_label="pii" if rng.random() < 0.1 else None,
            restartable=rng.random() < 0.2,
        ))
    cfg = PolicyConfig(clearance={"pii": tuple(names[:10])},
                       cpu_second_cost={n: rng.uniform(0.0, 0.01) for n in names[::3]})
    return Situation(now=NOW, history=history, peers=peers, candidates=tuple(cands)), cfg


def _time(sit: Situation, cfg: PolicyConfig, prune: bool):
    t0 = time.perf_counter()
    d = decide(sit, cfg, prune=prune)
    return time.perf_counter() - t0, d


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3,
            "max_ms": max(xs) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "policy.json")
    args = ap.parse_args()

    results = {}
    for kind in ("mixed", "uniform", "slowlinks"):
        sit, cfg = workload(kind, args.procs, args.hosts)
        pruned: list[float] = []
        full: list[float] = []
        decisions = set()
        for _ in range(args.reps):
            t, d = _time(sit, cfg, True)
            pruned.append(t)
            decisions.add((d.action, d.pid, d.target))
            t, d = _time(sit, cfg, False)
            full.append(t)
            decisions.add((d.action, d.pid, d.target))
        if len(decisions) != 1:
            print(f"{kind}: pruned and full search disagree: {decisions}", file=sys.stderr)
            return 1
        (action, pid, target), = decisions
        ratio = statistics.median(full) / statistics.median(pruned)
        results[kind] = {"pruned": _stats(pruned), "baseline_full_search": _stats(full),
                         "speedup": ratio,
                         "decision": {"action": action.value, "pid": pid, "target": target}}
        print(f"{kind:9s} pruned {statistics.median(pruned) * 1e3:7.1f} ms "
              f"(min {min(pruned) * 1e3:.1f}, max {max(pruned) * 1e3:.1f})   "
              f"full {statistics.median(full) * 1e3:7.1f} ms   x{ratio:.1f}   "
              f"-> {action.value} {pid or ''} {target or ''}")

    out = {
        "bench": "policy", "procs": args.procs, "hosts": args.hosts, "reps": args.reps,
        "target_ms": 50, "machine": {"python": platform.python_version(),
                                     "cpus": os.cpu_count(), "kernel": platform.release()},
        "note": "median wall time of one decide(); the machine's 2 cores may be shared with "
                "other work, see min_ms for the least disturbed run",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
