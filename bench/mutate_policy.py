#!/usr/bin/env python3
"""Mutation test of the policy: delete or negate one policy rule at a time and see whether
tests/test_policy.py notices.

Each mutant is one hand-written textual edit of migrd/core/policy.py or migrd/core/costmodel.py that
removes (or inverts, or loosens at its boundary) exactly one rule that docs/policy.md states.
For each, the package and the policy tests are copied to a temporary directory, the edit is
applied there (the worktree is never touched) and pytest runs the tests against the copy. A
mutant is *killed* when some test fails, *survived* when all pass. First the unmutated copy
must pass, or the run is meaningless.

Hand-written rather than mutmut/cosmic-ray: the question is "does removing any one policy rule
fail a test", which operator-level mutation answers only indirectly and with hundreds of
equivalent mutants; each mutant here names the rule it removes.

Pure computation, no root. Prints one line per mutant and JSON (default
bench/results/mutate_policy.json). Run:
    .venv/bin/python bench/mutate_policy.py [-k properties] [--only ID ...]
`-k` is passed to pytest (e.g. `-k properties` scores the hypothesis properties alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_policy.py", "tests/conftest.py", "tests/workloads.py")


@dataclass(frozen=True)
class Mutant:
    id: str
    rule: str
    file: str
    old: str
    new: str


P, C = "migrd/core/policy.py", "migrd/core/costmodel.py"

MUTANTS = (
    # -- when
    Mutant("host-cooldown", "a host decides at most one move per host_cooldown_s", P,
           "return last_move_at is not None and now - last_move_at < cfg.host_cooldown_s",
           "return False"),
    Mutant("offload-needs-high", "offload acts only when this host is HIGH", P,
           "if sit.mode is Mode.OFFLOAD and level is not NEEDS[Mode.OFFLOAD]:",
           "if False:"),
    Mutant("consolidate-needs-low", "consolidate acts only when this host is LOW", P,
           "if sit.mode is Mode.CONSOLIDATE and level is not NEEDS[Mode.CONSOLIDATE]:",
           "if False:"),
    Mutant("fill-requester-low", "fill gives work only to a LOW requester", P,
           "if not _is_low(req.load, cfg):", "if False:"),
    Mutant("fill-not-when-low", "a LOW host has no work to give in fill mode", P,
           'if level is Level.LOW:\n            return "fill:', 'if False:\n            return "fill:'),
    Mutant("hold-time-high", "HIGH is entered only after hold_s", P,
           "if high_for >= cfg.hold_s:", "if high_for >= 0:"),
    Mutant("hold-time-low", "LOW is entered only after hold_s", P,
           "if low_for >= cfg.hold_s:", "if low_for >= 0:"),
    Mutant("hysteresis-high", "a HIGH host stays HIGH until every signal is at/below low", P,
           "if previous is Level.HIGH and not _is_low(latest, cfg):", "if False:"),
    Mutant("hysteresis-low", "a LOW host stays LOW until some signal reaches high", P,
           "if previous is Level.LOW and not _is_high(latest, cfg):", "if False:"),
    Mutant("high-is-any-signal", "HIGH when SOME signal is at/above high", P,
           "return (h.loadavg[0] / cap >= cfg.load.high or h.cpu_util >= cfg.util.high\n"
           "            or h.run_queue / cap >= cfg.run_queue.high)",
           "return (h.loadavg[0] / cap >= cfg.load.high and h.cpu_util >= cfg.util.high\n"
           "            and h.run_queue / cap >= cfg.run_queue.high)"),
    Mutant("low-is-every-signal", "LOW only when EVERY signal is at/below low", P,
           "return (h.loadavg[0] / cap <= cfg.load.low and h.cpu_util <= cfg.util.low\n"
           "            and h.run_queue / cap <= cfg.run_queue.low)",
           "return (h.loadavg[0] / cap <= cfg.load.low or h.cpu_util <= cfg.util.low\n"
           "            or h.run_queue / cap <= cfg.run_queue.low)"),
    Mutant("near-tie", "near-equal gains tie and go to the target left least loaded", P,
           "NEAR_TIE = 0.05", "NEAR_TIE = 0.0"),
    # -- which
    Mutant("opted-in", "only opted-in processes move", P,
           "if not c.opted_in:", "if False:"),
    Mutant("process-cooldown", "a process that moved stays put for process_cooldown_s", P,
           "elif c.last_migrated is not None and sit.now - c.last_migrated < cfg.process_cooldown_s:",
           "elif False:"),
    Mutant("min-age", "processes younger than min_age_s never move", P,
           "elif c.proc.age_s < cfg.min_age_s:", "elif False:"),
    Mutant("min-age-boundary", "a process exactly min_age_s old is eligible", P,
           "elif c.proc.age_s < cfg.min_age_s:", "elif c.proc.age_s <= cfg.min_age_s:"),
    # -- where
    Mutant("not-self", "this host is never its own target", P,
           "if h.host == source.host:\n            continue", "if False:\n            continue"),
    Mutant("fill-only-requester", "fill moves only to the requester", P,
           "if sit.mode is Mode.FILL and h.host != sit.requester:", "if False:"),
    Mutant("offload-not-to-high", "offload never targets a HIGH peer", P,
           "if sit.mode is Mode.OFFLOAD and _is_high(h, cfg):", "if False:"),
    Mutant("consolidate-not-to-high", "consolidate never targets a HIGH peer", P,
           "_is_high(h, cfg) or costmodel.demand(h) / h.cpu_capacity < src_norm",
           "costmodel.demand(h) / h.cpu_capacity < src_norm"),
    Mutant("consolidate-onto-busier", "consolidate packs only onto hosts at least as busy", P,
           "_is_high(h, cfg) or costmodel.demand(h) / h.cpu_capacity < src_norm",
           "_is_high(h, cfg)"),
    Mutant("memory", "the target keeps min_free_memory after taking the RSS", P,
           "if t.mem_available - c.proc.rss_bytes < cfg.min_free_memory:", "if False:"),
    Mutant("memory-ignores-rss", "the process's RSS counts against the target's memory", P,
           "if t.mem_available - c.proc.rss_bytes < cfg.min_free_memory:",
           "if t.mem_available < cfg.min_free_memory:"),
    Mutant("cpu-compatible", "checkpoints go only to CPU-compatible targets", P,
           "if action is not Action.RESTART_ELSEWHERE and not t.cpu_compatible:", "if False:"),
    Mutant("restart-ignores-cpu", "a restart does not need a compatible CPU", P,
           "if action is not Action.RESTART_ELSEWHERE and not t.cpu_compatible:",
           "if not t.cpu_compatible:"),
    Mutant("clearance", "labelled data goes only to cleared hosts", P,
           "if t.site.host != data_host and not cfg.cleared(c.data_label, t.site.host):",
           "if False:"),
    Mutant("clearance-data-host", "the host already holding the data needs no clearance", P,
           "if t.site.host != data_host and not cfg.cleared(c.data_label, t.site.host):",
           "if not cfg.cleared(c.data_label, t.site.host):"),
    Mutant("consolidate-ceiling", "consolidate never pushes a target over the ceiling", P,
           "if after > cfg.consolidate_ceiling:", "if False:"),
    Mutant("no-more-loaded", "offload/fill never leave the target more loaded than the source", P,
           "return costmodel.norm_after(there, wants) > costmodel.norm_after(here, -wants)",
           "return False"),
    Mutant("no-room-lightest", "the search leaves out only peers where even the lightest process does not fit", P,
           "lightest = min(wants)", "lightest = max(wants)"),
    Mutant("code-goes-to-data", "remote data: only the data's host is a target", P,
           "if target != data_host:\n            return []", "if False:\n            return []"),
    Mutant("restart-only-restartable", "only restartable processes are restarted elsewhere", P,
           "if c.restartable:\n        acts.append", "if True:\n        acts.append"),
    # -- how
    Mutant("min-gain", "a move must gain at least min_gain", P,
           "return max(cfg.min_gain, cfg.min_gain_ratio * est.stay_score)",
           "return cfg.min_gain_ratio * est.stay_score"),
    Mutant("min-gain-ratio", "a move must gain at least min_gain_ratio of staying", P,
           "return max(cfg.min_gain, cfg.min_gain_ratio * est.stay_score)",
           "return cfg.min_gain"),
    Mutant("consolidate-max-loss", "consolidate tolerates at most consolidate_max_loss_ratio loss", P,
           "return -cfg.consolidate_max_loss_ratio * est.stay_score",
           "return -float('inf')"),
    Mutant("best-gain-wins", "offload/fill pick the largest gain", P,
           "return after if mode is Mode.CONSOLIDATE else est.gain",
           "return after if mode is Mode.CONSOLIDATE else -est.gain"),
    Mutant("consolidate-fullest", "consolidate picks the fullest target (best fit)", P,
           "return after if mode is Mode.CONSOLIDATE else est.gain",
           "return -after if mode is Mode.CONSOLIDATE else est.gain"),
    Mutant("lower-pid-tie", "ties fall to the lower PID", P,
           "return (_primary(est, mode, after), est.gain, -pid,",
           "return (_primary(est, mode, after), est.gain, pid,"),
    # -- cost model
    Mutant("horizon-cap", "expected remaining life is capped at max_horizon_s", C,
           "remaining = min(c.proc.age_s, cfg.max_horizon_s)", "remaining = c.proc.age_s"),
    Mutant("strategy-freeze", "a move stops the process for its strategy's forecast freeze", C,
           "downtime_s = chosen.freeze + data_s", "downtime_s = data_s"),
    Mutant("precopy-rounds-at-home", "pre-copy's rounds run at home's pace, before the switch", C,
           "before = min(chosen.running_before, w.remaining_s)", "before = 0.0"),
    Mutant("restart-redoes-work", "a restart redoes the work done so far", C,
           "run_s = (w.done_s + w.remaining_s) * pace", "run_s = w.remaining_s * pace"),
    Mutant("data-travels", "migrate_with_data sends the data files too", C,
           "data = c.data_size if data_travels(c, action, here.host) else 0", "data = 0"),
    Mutant("remote-data-read", "staying with remote data reads it over the link", C,
           "time_s += links[c.data_host].send_s(c.data_size)", "time_s += 0.0"),
    Mutant("io-does-not-speed-up", "only the computing fraction of wall time speeds up", C,
           "return (1.0 - w.busy) + w.busy * k_here / k_there", "return k_here / k_there"),
    Mutant("fair-share", "a task gets capacity/demand of what it wants on a full host", C,
           "return 1.0 if demand_cpus <= capacity else capacity / demand_cpus", "return 1.0"),
    Mutant("arrival-counts", "the process's own demand is added on the target", C,
           "k_there = effective_speed(there, w.wants)", "k_there = effective_speed(there, 0.0)"),
    Mutant("byte-cost", "bytes sent cost byte_cost each", C,
           "transfer_cost = nbytes * cfg.byte_cost", "transfer_cost = 0.0"),
    Mutant("cpu-price-there", "CPU-seconds there cost the target's price", C,
           "there_cost = transfer_cost + cpu_s * there.cpu_price", "there_cost = transfer_cost"),
)


def _copy(dst: Path) -> None:
    shutil.copytree(ROOT / "migrd", dst / "migrd", ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "tests").mkdir()
    for f in TEST_FILES:
        shutil.copy2(ROOT / f, dst / f)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    # Killing needs one failing example, not a minimal one: no shrinking (the slow part).
    with open(dst / "tests/conftest.py", "a") as f:
        f.write("\nfrom hypothesis import Phase as _Phase, settings as _settings\n"
                "_settings.register_profile('mutate', phases=[_Phase.explicit, _Phase.reuse, "
                "_Phase.generate])\n")


def _apply(dst: Path, m: Mutant) -> None:
    path = dst / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutant {m.id}: expected the text exactly once in {m.file}, "
                         f"found {text.count(m.old)} (update MUTANTS after editing the policy)")
    path.write_text(text.replace(m.old, m.new))


def _run(dst: Path, select: str | None, timeout: float) -> tuple[bool, str]:
    """(all tests passed, the last line pytest printed)."""
    # `python -m pytest` from dst puts dst first on sys.path: the copy shadows the editable
    # install of the worktree.
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "--hypothesis-seed=0", "--hypothesis-profile=mutate", "tests/test_policy.py"]
    if select:
        argv += ["-k", select]
    try:
        r = subprocess.run(argv, cwd=dst, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s"
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    return r.returncode == 0, (lines[-1] if lines else r.stderr.strip()[-200:])


def _one(m: Mutant | None, select: str | None, timeout: float) -> tuple[bool, str, float]:
    with tempfile.TemporaryDirectory(prefix="migrd-mutant-") as tmp:
        dst = Path(tmp)
        _copy(dst)
        if m is not None:
            _apply(dst, m)
        t0 = time.monotonic()
        ok, last = _run(dst, select, timeout)
        return ok, last, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", dest="select", help="pytest -k expression (default: every policy test)")
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/mutate_policy.json")
    a = ap.parse_args()
    mutants = [m for m in MUTANTS if not a.only or m.id in a.only]
    unknown = set(a.only or ()) - {m.id for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant ids: {', '.join(sorted(unknown))}")

    ok, last, secs = _one(None, a.select, a.timeout)
    if not ok:
        raise SystemExit(f"the unmutated policy fails its tests ({last}): fix that first")
    print(f"baseline: tests pass ({last}, {secs:.1f} s)", flush=True)
    results = []
    for m in mutants:
        ok, last, secs = _one(m, a.select, a.timeout)
        status = "survived" if ok else "killed"
        print(f"{status:8} {m.id:26} {m.rule}  [{secs:.1f} s]", flush=True)
        results.append({"id": m.id, "rule": m.rule, "file": m.file, "status": status,
                        "pytest": last, "seconds": round(secs, 1)})
    killed = sum(r["status"] == "killed" for r in results)
    report = {"select": a.select, "killed": killed, "total": len(results),
              "score": f"{killed}/{len(results)}",
              "survived": [r["id"] for r in results if r["status"] == "survived"],
              "mutants": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("select", "score", "survived")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
