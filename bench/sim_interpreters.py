#!/usr/bin/env python3
"""How long one policy's simulation takes run by CPython in this process against a PyPy child
(`migrctl sim --interpreter python|pypy`), at a few sizes; writes JSON with PyPy's speed-up.

Each size runs both ways, the order alternating between repeats (freed memory is slow to touch
again here); the wall time is the whole call, the draw of the jobs and PyPy's start included, as
`migrctl sim` spends it. The results must agree field by field (the script fails otherwise).

Run: .venv/bin/python bench/sim_interpreters.py [--sizes 100:3600 1000:600 1000:3600]
     [--policy migrd] [--repeats 2] [--out bench/results/sim-interpreters.json]
Pure computation, no root; PyPy from `make setup` (scripts/install-pypy.sh) or $MIGRD_PYPY.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from migrd.adapters import pypy
from migrd.sim import SimConfig

RESULTS = Path(__file__).parent / "results"


def timed(runner: pypy.Runner, cfg: SimConfig, policy: str) -> tuple[float, str, dict]:
    """(the call's wall time, what ran it, the policy's result as a dict)."""
    t0 = time.perf_counter()
    label, res = runner.run(cfg, [policy], 1)
    return time.perf_counter() - t0, label, dataclasses.asdict(res[policy])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100:3600", "1000:600", "1000:3600"],
                    help="HOSTS:SECONDS of cluster time")
    ap.add_argument("--policy", default="migrd")
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "sim-interpreters.json")
    a = ap.parse_args()
    began, points = time.perf_counter(), []
    for size in a.sizes:
        hosts, seconds = (float(x) for x in size.split(":"))
        cfg = SimConfig(hosts=int(hosts), load=a.load, duration=seconds)
        runners = {"python": pypy.runner("python", cfg), "pypy": pypy.runner("pypy", cfg)}
        walls: dict[str, list[float]] = {"python": [], "pypy": []}
        cpus: dict[str, list[float]] = {"python": [], "pypy": []}
        labels, seen = {}, {}
        for rep in range(a.repeats):
            order = ["python", "pypy"] if rep % 2 == 0 else ["pypy", "python"]
            for name in order:
                wall, labels[name], r = timed(runners[name], cfg, a.policy)
                walls[name].append(wall)
                cpus[name].append(r.pop("cpu_s"))
                del r["wall_s"]  # what is left describes the simulated cluster: it must agree
                seen.setdefault(name, r)
                print(f"N={int(hosts)} {seconds:g} s {name}: {wall:.1f} s", file=sys.stderr, flush=True)
        if seen["python"] != seen["pypy"]:
            print(f"N={int(hosts)}: the interpreters disagree: {seen}", file=sys.stderr)
            return 1
        med = {k: statistics.median(v) for k, v in walls.items()}
        points.append({"hosts": int(hosts), "duration": seconds, "policy": a.policy, "load": a.load,
                       "interpreters": labels, "wall_s": walls, "cpu_s": cpus, "median_wall_s": med,
                       "speedup": med["python"] / med["pypy"],
                       "mean_slowdown": seen["python"]["mean_slowdown"]})
    out = {"command": " ".join(["bench/sim_interpreters.py", *sys.argv[1:]]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "wall_s": time.perf_counter() - began, "points": points}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    for p in points:
        print(f"N={p['hosts']} {p['duration']:g} s: python {p['median_wall_s']['python']:.1f} s, "
              f"pypy {p['median_wall_s']['pypy']:.1f} s, x{p['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
