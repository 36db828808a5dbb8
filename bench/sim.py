#!/usr/bin/env python3
"""Sweep the simulator (migrctl sim) over offered load and cluster size; write JSON and a PNG
(mean slowdown against load, one line per policy, one panel per cluster size).

Every (N, load) point runs every policy on the same seeded cluster and jobs. The PNG needs
matplotlib (`pip install -e '.[bench]'`); without it only the JSON is written.

Run: .venv/bin/python bench/sim.py [--hosts 100 1000] [--loads 0.5 0.7 0.9] [--duration 3600]
     .venv/bin/python bench/sim.py --plot bench/results/sim-100.json bench/results/sim-1000.json
     .venv/bin/python bench/sim.py --table bench/results/sim-100.json   (Markdown for docs/sim.md)
Pure computation, no root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from migrd.adapters import pypy
from migrd.sim import POLICIES, SimConfig

RESULTS = Path(__file__).parent / "results"


def sweep(hosts: list[int], loads: list[float], duration: float, seed: int, probe: str,
          names: list[str], jobs: int, interpreter: str) -> list[dict]:
    points = []
    for n in hosts:
        for load in loads:
            t0 = time.perf_counter()
            cfg = SimConfig(hosts=n, load=load, seed=seed, duration=duration, probe=probe)
            ran_on, res = pypy.runner(interpreter, cfg).run(cfg, names, jobs)
            points.append({"hosts": n, "load": load, "interpreter": ran_on,
                           "policies": {k: {f: v for f, v in dataclasses.asdict(r).items() if f != "policy"}
                                        for k, r in res.items()}})
            line = "  ".join(f"{k} {r.mean_slowdown:.2f}" for k, r in res.items())
            print(f"N={n} load={load:g} ({time.perf_counter() - t0:.0f} s): {line}", flush=True)
    return points


def plot(points: list[dict], png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no PNG", file=sys.stderr)
        return False
    sizes = sorted({p["hosts"] for p in points})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        pts = sorted((p for p in points if p["hosts"] == n), key=lambda p: p["load"])
        for name in pts[0]["policies"]:
            # migrd's other modes dashed: consolidate lies on top of none.
            ax.plot([p["load"] for p in pts], [p["policies"][name]["mean_slowdown"] for p in pts],
                    marker="o", label=name, linestyle="--" if name.startswith("migrd_") else "-",
                    color=f"C{POLICIES.index(name)}")  # one colour per policy in every panel
        ax.set_title(f"{n} hosts")
        ax.set_xlabel("offered load")
        ax.set_ylabel("mean slowdown")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def tables(points: list[dict]) -> str:
    """Markdown for docs/sim.md, one pair of tables per cluster size: mean slowdown (p99) /
    migrations per job / herd events; then the mean's change against `none`, bytes moved and
    idle host-rounds."""
    out = []
    for n in sorted({p["hosts"] for p in points}):
        pts = sorted((p for p in points if p["hosts"] == n), key=lambda p: p["load"])
        head = "| policy | " + " | ".join(f"load {p['load']:g}" for p in pts) + " |"
        rule = "| --- |" + " --- |" * len(pts)
        names = list(pts[0]["policies"])
        first = [f"N = {n}", "", head, rule]
        second = [head, rule]
        for name in names:
            cells, more = [], []
            for p in pts:
                r = p["policies"].get(name)
                if r is None:
                    cells.append("")
                    more.append("")
                    continue
                cells.append(f"{r['mean_slowdown']:.2f} ({r['p99_slowdown']:.0f}) / "
                             f"{r['migrations_per_job']:.4f} / {r['herd_events']}")
                none = p["policies"].get("none")
                pct = round(100 * (r['mean_slowdown'] / none['mean_slowdown'] - 1)) if none else None
                change = "" if pct is None else f"{pct:+d} %, " if pct else "0 %, "
                more.append(f"{change}{r['bytes_moved'] / 1e9:.0f} GB, idle {r['idle_hosts']:.0%}")
            first.append(f"| {name} | " + " | ".join(cells) + " |")
            second.append(f"| {name} | " + " | ".join(more) + " |")
        out += [*first, "", *second, ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--duration", type=float, default=3600.0, help="simulated seconds per point")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--probe", default="fingers", help="all, fingers, random or random:D")
    ap.add_argument("--policy", nargs="+", default=list(POLICIES))
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="policies simulated at once, each in its own process (default: the usable CPUs)")
    ap.add_argument("--interpreter", choices=pypy.CHOICES, default="auto",
                    help="as migrctl sim's: pypy, python or auto (PyPy for long runs when installed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "sim.json")
    ap.add_argument("--plot", type=Path, nargs="+", metavar="JSON",
                    help="only draw the PNG (next to --out) from these earlier results")
    ap.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                    help="only print these earlier results as Markdown tables (docs/sim.md)")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    png = a.out.with_suffix(".png")
    if a.table:
        print(tables([p for f in a.table for p in json.loads(f.read_text())["points"]]))
        return
    if a.plot:
        points = [p for f in a.plot for p in json.loads(f.read_text())["points"]]
        print(f"wrote {png}" if plot(points, png) else "no PNG")
        return
    t0 = time.perf_counter()
    points = sweep(a.hosts, a.loads, a.duration, a.seed, a.probe, a.policy, a.jobs, a.interpreter)
    out = {"command": " ".join(sys.argv), "machine": {"python": platform.python_version(),
                                                      "cpus": os.cpu_count()},
           "duration": a.duration, "seed": a.seed, "probe": a.probe,
           "wall_s": round(time.perf_counter() - t0, 1), "points": points}
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}" + (f" and {png}" if plot(points, png) else ""))


if __name__ == "__main__":
    main()
