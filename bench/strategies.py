#!/usr/bin/env python3
"""Migration strategies measured from outside, in one run (issue 10).

On a fresh 2-host embedded bed, workloads of `--sizes` MiB (default 64, 256, 1024), each idle
and rewriting its memory at `--rate` MiB/s, are moved host1 -> host2 with every strategy
`migrctl migrate --strategy` offers, and with the manual pipeline as the baseline (`criu dump`,
`scp -r`, `ssh host2 criu restore`, one shell script run in host1, as bench/migrate.py does).
The order of the methods rotates from one case and repetition to the next: memory freed on these
machines is slow to touch again (../shared/criu-notes.md), so whoever runs after a big restore
pays for it.

What is measured, per run:
  downtime_seen_s   what the workload sees: it appends "count wall-time net-namespace" to a file
                    in /tmp (shared by the bed's hosts) every 10 ms, reopening it each time; the
                    longest gap between consecutive lines, up to the state check. Includes up to
                    one 10 ms period. switch_gap_s is the gap at the change of network namespace
                    (host1 -> host2); after_switch_max_gap_s the longest one after it (post-copy
                    page faults).
  criu_frozen_s     CRIU's own frozen time, from its dump log (first "Seized task" to "Writing
                    stats"); the manual run also reads it from CRIU's stats-dump file (they agree
                    within 0.2 ms). It is the dump's view: stream-copy's includes the page stream
                    and leaves out the stopped wait for the restore; post-copy's runs until the
                    source has served its last page, while the copy already runs there.
  migrd_downtime_s  what migrctl reports (freeze to the copy there running).
  total_s           the migrating command's wall time, measured inside host1 (migrctl's Python
                    start included; the manual script from the dump's start to the restore's end).
  wire_bytes        host1 eth0 received + sent bytes across the move (/proc/net/dev in host1's
                    network namespace): everything the move put on the wire, SSH included.
  cpu_s             CPU time the whole machine spent busy across the move (/proc/stat): both
                    bed hosts' sides, SSH, CRIU and the workload itself. On N cores no way of
                    doing the same work can take less than cpu_s / N of wall time.
  figures           what a strategy records beyond stop-copy's (its journal on host1 and its
                    JSON): post-copy's bytes pushed and fetched on demand and when the last page
                    arrived (seconds after the freeze), pre-copy's rounds. migrctl's JSON is
                    kept whole in the row (bytes, phases, ...).
  state             the workload checks every 256 KiB chunk of its memory against the CRC of the
                    block it last wrote there, and its count must run on without a gap or repeat
                    and change namespace once.

The small process: migrbed.programs.COUNTER (the demo's counter, 50 ms period); its downtime is
seen by a 5 ms poller of its count file, so it carries the 50 ms granularity.

Writes JSON (per-run rows, per-case medians, ratios against the manual pipeline of the same
invocation, the issue's aims) and, with matplotlib (the optional extra `bench`), a PNG beside it.
Needs root.

  .venv/bin/python bench/strategies.py                      # the full sweep (minutes; see notes)
  .venv/bin/python bench/strategies.py --sizes 16 --reps 1  # a quick check
  .venv/bin/python bench/strategies.py --link-mbit 500      # on a link slower than memory (tc tbf)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import psutil
import yaml

from migrbed import bed as bed_mod
from migrbed.programs import COUNTER, MARK, read_counts
from migrd import config
from migrd.adapters import load, private
from migrd.adapters.criu import find_criu
from migrd.core.precopy import STOP_RULES
from migrd.engine.journal import Journal
from migrd.engine.strategies import STRATEGIES as OFFERED

PY = sys.executable

#: The strategies measured by default: every one `--strategy` offers (precopy, hybrid and auto
#: among them, issue 11), and post-copy (issue 10), reported as left out while a checkout lacks it.
STRATEGIES = tuple(dict.fromkeys([*OFFERED, "postcopy", "precopy", "hybrid", "auto"]))

#: The memory workload. argv: MiB, rewrite MiB/s, fill (mixed|random|zero), base path in /tmp.
#: Memory is 256 KiB chunks, each a copy of one block of a small pool (random blocks, and
#: zero pages touched with a marker byte) with every page stamped with its own place and the
#: number of times its chunk was rewritten, so no two pages are alike, now or earlier (a copy by
#: content finds nothing to share, as with real memory: with the place alone, the pool's blocks
#: came back every 8 rewrites, and pre-copy's content-addressed rounds found the final dump
#: already sent once they had run that long) and a chunk's expected CRC follows from its block,
#: place and generation; rewriting copies another block of the same kind over the next chunk,
#: stamped again, at a steady rate. Every 10 ms it
#: appends "count wall-time netns-inode" to BASE.ticks (reopened each time: CRIU never sees a
#: growing open file). When BASE.verify appears it checks every chunk and writes BASE.verified.
TICKER = f"""
import array, json, os, struct, sys, time, zlib  # {MARK}
mib, rate, fill, base = int(sys.argv[1]), float(sys.argv[2]) * (1 << 20), sys.argv[3], sys.argv[4]
CH, POOL, PAGE = 1 << 18, 8, 4096
STAMP = struct.Struct(">Q")
chunks = max(1, (mib << 20) // CH)
blocks = [os.urandom(CH) for _ in range(POOL)]
for k in range(POOL):
    z = bytearray(CH)
    z[::4096] = bytes([k + 1]) * (CH // 4096)
    blocks.append(bytes(z))
def stamped(k, i, g):
    b = bytearray(blocks[k])
    for p in range(CH // PAGE):
        STAMP.pack_into(b, p * PAGE + 8, i * (CH // PAGE) + p)
        STAMP.pack_into(b, p * PAGE + 16, g)
    return b
zero_from = {{"random": chunks, "zero": 0}}.get(fill, chunks // 2)
buf = bytearray(chunks * CH)
view = memoryview(buf)
idx = array.array("H", [0]) * chunks
gen = array.array("L", [0]) * chunks
for i in range(chunks):
    k = i % POOL + (POOL if i >= zero_from else 0)
    view[i * CH:(i + 1) * CH] = stamped(k, i, 0)
    idx[i] = k
with open(base + ".ready", "w") as f:
    f.write(str(os.getpid()))
n, cursor, credit, verified = 0, 0, 0.0, False
period = 0.01
last = due = time.monotonic()
deadline = time.time() + 3600
while time.time() < deadline:
    now = time.monotonic()
    if now < due:
        time.sleep(due - now)
        now = time.monotonic()
    due = max(due + period, now)
    n += 1
    with open(base + ".ticks", "a") as f:
        f.write(f"{{n}} {{time.time():.6f}} {{os.stat('/proc/self/ns/net').st_ino}}\\n")
    # A stall (the move) does not become a burst of rewriting afterwards.
    credit = min(credit + rate * (now - last), CH + 2 * period * rate)
    last = now
    while credit >= CH:
        k = idx[cursor]
        k = (k + 1) % POOL + (POOL if k >= POOL else 0)
        gen[cursor] += 1
        view[cursor * CH:(cursor + 1) * CH] = stamped(k, cursor, gen[cursor])
        idx[cursor] = k
        cursor = (cursor + 1) % chunks
        credit -= CH
    if not verified and os.path.exists(base + ".verify"):
        bad = sum(zlib.crc32(view[i * CH:(i + 1) * CH]) != zlib.crc32(stamped(idx[i], i, gen[i])) for i in range(chunks))
        with open(base + ".verified.tmp", "w") as f:
            json.dump({{"chunks": chunks, "bad_chunks": bad, "count": n}}, f)
        os.rename(base + ".verified.tmp", base + ".verified")
        verified = True
"""


# ---- pure: what the files and logs say -----------------------------------------------------

@dataclass(frozen=True)
class Tick:
    n: int
    t: float
    net: int


def parse_ticks(text: str) -> list[Tick]:
    """The ticker's lines; a torn last line (read while being written) is left out."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                out.append(Tick(int(parts[0]), float(parts[1]), int(parts[2])))
            except ValueError:
                pass
    return out


@dataclass(frozen=True)
class Seen:
    """A move as the workload lived it."""
    max_gap_s: float
    switch_gap_s: float | None
    after_switch_max_gap_s: float | None
    ticks: int
    problems: tuple[str, ...]


def seen_by_ticks(ticks: Sequence[Tick], source_net: int, target_net: int) -> Seen:
    problems = []
    if len(ticks) < 2:
        return Seen(0.0, None, None, len(ticks), ("fewer than 2 ticks",))
    gaps = [b.t - a.t for a, b in zip(ticks, ticks[1:])]
    if any(b.n != a.n + 1 for a, b in zip(ticks, ticks[1:])):
        problems.append("the count skipped or repeated (a lost tick, an older state, or two copies)")
    if any(g < 0 for g in gaps):
        problems.append("time went backwards between ticks")
    nets = [t.net for t in ticks]
    switches = [i for i in range(1, len(nets)) if nets[i] != nets[i - 1]]
    if nets[0] != source_net:
        problems.append("the first tick is not from the source host")
    if nets[-1] != target_net:
        problems.append("the last tick is not from the target host")
    if len(switches) != 1:
        problems.append(f"changed host {len(switches)} times (expected once)")
    sw = switches[0] if len(switches) == 1 else None
    after = gaps[sw:] if sw is not None else []
    return Seen(max(gaps), gaps[sw - 1] if sw is not None else None,
                max(after) if after else None, len(ticks), tuple(problems))


def counter_problems(counts: Sequence[int], at_move: int) -> list[str]:
    problems = []
    if list(counts) != list(range(1, len(counts) + 1)):
        problems.append("the count skipped or repeated")
    if len(counts) <= at_move:
        problems.append("the count did not go on after the move")
    return problems


def max_gap(times: Sequence[float]) -> float | None:
    return max((b - a for a, b in zip(times, times[1:])), default=None)


_TS = re.compile(r"^\((\d+)\.(\d+)\) (.*)$")


def frozen_from_log(text: str) -> float | None:
    """CRIU's frozen time read from a dump log written with -v4: from the first task seized to
    the stats being written (CRIU stops its frozen timer just before). None if either is
    missing (a failed dump, another verbosity)."""
    seized = written = None
    for line in text.splitlines():
        m = _TS.match(line)
        if not m:
            continue
        t = int(m.group(1)) + int(m.group(2)) / 10 ** len(m.group(2))
        if seized is None and m.group(3).startswith("Seized task"):
            seized = t
        elif m.group(3).startswith("Writing stats"):
            written = t
    return written - seized if seized is not None and written is not None else None


_STATS_MAGIC = (0x55105940, 0x57093306)  # CRIU's service-image magic, then STATS


def _varint(data: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        v |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return v, i
        shift += 7


def _fields(msg: bytes) -> dict[int, int | bytes]:
    out: dict[int, int | bytes] = {}
    i = 0
    while i < len(msg):
        key, i = _varint(msg, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            out[num], i = _varint(msg, i)
        elif wire == 2:
            n, i = _varint(msg, i)
            out[num], i = msg[i:i + n], i + n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


#: DumpStatsEntry fields (CRIU images/stats.proto), times in microseconds.
_DUMP_STATS = {1: "freezing_us", 2: "frozen_us", 3: "memdump_us", 4: "memwrite_us",
               5: "pages_scanned", 7: "pages_written", 9: "pages_lazy"}


def parse_dump_stats(data: bytes) -> dict[str, int]:
    """CRIU's stats-dump file: two magics, a length, a StatsEntry whose field 1 is the dump's."""
    if len(data) < 12 or struct.unpack_from("<II", data) != _STATS_MAGIC:
        raise ValueError("not a CRIU stats image")
    (size,) = struct.unpack_from("<I", data, 8)
    dump = _fields(data[12:12 + size]).get(1)
    if not isinstance(dump, bytes):
        raise ValueError("no dump statistics in the stats image")
    return {name: v for num, v in _fields(dump).items() if (name := _DUMP_STATS.get(num)) and isinstance(v, int)}


def eth_bytes(proc_net_dev: str, iface: str = "eth0") -> int:
    """Received + sent bytes of iface in a /proc/net/dev text."""
    for line in proc_net_dev.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == iface:
            f = rest.split()
            return int(f[0]) + int(f[8])
    raise ValueError(f"no {iface} in /proc/net/dev")


def busy_seconds() -> float:
    """Seconds every CPU of the machine has spent busy since boot (the agent's reader of
    /proc/stat: idle and iowait left out)."""
    times, _ = load.parse_proc_stat(Path("/proc/stat").read_text())
    return times.busy / os.sysconf("SC_CLK_TCK")


def rotated(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


#: What a strategy records beyond stop-copy's figures: pre-copy rounds, post-copy bytes pushed
#: and fetched on demand, when the last page arrived.
FIGURE = re.compile(r"round|demand|push|fetch|lazy|fault|last_page|final_|predicted|dirty_rate|link_")


def strategy_figures(journal: dict[str, Any], outcome: dict[str, Any]) -> dict[str, float]:
    """The numbers a strategy adds, from its journal and its JSON (the JSON wins). An epoch time
    of the last page becomes seconds after the freeze: how long the copy needed the source."""
    out = {k: v for src in (journal, outcome) for k, v in src.items()
           if FIGURE.search(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in [k for k in out if "last_page" in k]:
        if out[key] > 1e9 and isinstance(journal.get("freeze"), (int, float)):
            out[f"{key}_after_freeze_s"] = out.pop(key) - journal["freeze"]
    return out


def median_or_none(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


MEASURES = ("total_s", "downtime_seen_s", "switch_gap_s", "after_switch_max_gap_s", "criu_frozen_s",
            "migrd_downtime_s", "wire_bytes", "image_bytes", "cpu_s")


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per case, per method: medians of the good runs, failures counted, and ratios to the
    manual pipeline's medians in the same case."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["case"], {}).setdefault(r["method"], {"runs": 0, "failed": 0})
    for case, methods in out.items():
        for method, s in methods.items():
            mine = [r for r in rows if r["case"] == case and r["method"] == method]
            good = [r for r in mine if r["ok"]]
            s["runs"], s["failed"] = len(mine), len(mine) - len(good)
            if ran := sorted({r["ran"] for r in good if r.get("ran")}):
                s["ran"] = ran  # auto: the strategies it picked
            for key in MEASURES:
                m = median_or_none(r.get(key) for r in good)
                if m is not None:
                    s[key] = m
            for key in sorted({k for r in good for k in r.get("figures", {})}):
                s.setdefault("figures", {})[key] = median_or_none(r["figures"].get(key) for r in good)
        base = methods.get("manual", {})
        for method, s in methods.items():
            for key in ("total_s", "downtime_seen_s"):
                if key in s and base.get(key):
                    s[f"{key}_vs_manual"] = s[key] / base[key]
    return out


def aims(summary: dict[str, dict[str, dict[str, Any]]], sizes: Sequence[int],
         rates: Sequence[float]) -> list[dict[str, Any]]:
    """The issues' aims, where this run measured what they need (downtime as the workload saw it)."""
    out = []
    big, small = max(sizes), min(sizes)
    pc_big = summary.get(case_name(big, 0.0), {}).get("postcopy", {}).get("downtime_seen_s")
    pc_small = summary.get(case_name(small, 0.0), {}).get("postcopy", {}).get("downtime_seen_s")
    if pc_big is not None:
        out.append({"aim": f"postcopy downtime at {big} MiB (idle) < 0.3 s", "value": pc_big, "met": pc_big < 0.3})
    if pc_big is not None and pc_small and big != small:
        out.append({"aim": f"postcopy downtime {big} MiB <= 1.5x {small} MiB (idle)",
                    "value": pc_big / pc_small, "met": pc_big / pc_small <= 1.5})
    for r in rates:
        ms = summary.get(case_name(big, r), {})
        ratios = {m: s["total_s_vs_manual"] for m, s in ms.items() if m != "manual" and "total_s_vs_manual" in s}
        if ratios:
            best = min(ratios, key=ratios.__getitem__)
            out.append({"aim": f"best total at {case_name(big, r)} <= 0.8x manual", "best": best,
                        "value": ratios[best], "met": ratios[best] <= 0.8})
    for size in sizes:
        for r in rates:
            out += precopy_and_auto_aims(summary.get(case_name(size, r), {}), case_name(size, r),
                                         0.25 if r == 0 else 0.5 if r == max(rates) else None)
    for m, s in summary.get("counter", {}).items():
        if m != "manual" and "downtime_seen_s" in s:
            out.append({"aim": f"counter downtime with {m} <= 0.3 s", "value": s["downtime_seen_s"],
                        "met": s["downtime_seen_s"] <= 0.3})
    return out


#: migrate.downtime_target's default: `auto` takes the quickest strategy whose freeze meets it.
DOWNTIME_TARGET = 0.5


def precopy_and_auto_aims(ms: dict[str, dict[str, Any]], case: str, precopy_factor: float | None) -> list[dict[str, Any]]:
    """Issue 11's aims in one case: pre-copy's freeze against stop-copy's (0.25x idle, 0.5x at the
    highest rewriting rate), and `auto` within 10 % of the best strategy by auto's own rule (the
    quickest total among those whose downtime met the target, else the shortest downtime)."""
    out: list[dict[str, Any]] = []
    seen = {m: s for m, s in ms.items() if "downtime_seen_s" in s and "total_s" in s}
    pre, stop = seen.get("precopy"), seen.get("stop-copy")
    if precopy_factor is not None and pre and stop:
        ratio = pre["downtime_seen_s"] / stop["downtime_seen_s"]
        out.append({"aim": f"precopy downtime at {case} <= {precopy_factor}x stop-copy's", "value": ratio,
                    "met": ratio <= precopy_factor})
    others = {m: s for m, s in seen.items() if m not in ("auto", "manual")}
    if "auto" in seen and others:
        meets = {m: s for m, s in others.items() if s["downtime_seen_s"] <= DOWNTIME_TARGET}
        pool, key = (meets, "total_s") if meets else (others, "downtime_seen_s")
        best = min(pool, key=lambda m: pool[m][key])
        ratio = seen["auto"][key] / pool[best][key]
        out.append({"aim": f"auto at {case} within 10 % of the best ({best}, by {key})", "value": ratio,
                    "chose": seen["auto"].get("ran"), "met": ratio <= 1.1})
    return out


def case_name(size_mib: int, rate: float) -> str:
    return f"{size_mib}MiB-idle" if rate == 0 else f"{size_mib}MiB-rewrite{rate:g}"


# ---- the shell: a bed, workloads, methods -------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    size_mib: int | None  # None: the counter
    rate: float
    fill: str

    def argv(self, base: Path) -> list[str]:
        if self.size_mib is None:
            return [PY, "-c", COUNTER, f"{base}.count"]
        return [PY, "-c", TICKER, str(self.size_mib), f"{self.rate:g}", self.fill, str(base)]


@dataclass
class Started:
    case: Case
    base: Path
    pid: int
    start_time: float
    launcher: subprocess.Popen[bytes] | None = None  # the manual pipeline's unshare, waited for after the dump


@dataclass
class Moved:
    total_s: float
    t0: float
    t1: float
    target_pid: int | None
    row: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Bench:
    def __init__(self, state: bed_mod.BedState, tmp: Path, settle: float) -> None:
        self.bed = state
        self.tmp = tmp
        self.settle = settle
        self.criu = find_criu(config.Config()).path
        self.ours: list[tuple[int, float]] = []  # every workload PID we started or restored
        self.h1, self.h2 = state.host("host1"), state.host("host2")
        self.nets = {h: int(bed_mod.exec_in(state, h, ["stat", "-Lc", "%i", "/proc/self/ns/net"]).stdout)
                     for h in ("host1", "host2")}

    def sh(self, host: str, script: str, timeout: float) -> tuple[int, str, str]:
        r = bed_mod.exec_in(self.bed, host, ["sh", "-c", script], check=False, timeout=timeout)
        return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")

    def track(self, pid: int) -> None:
        try:
            self.ours.append((pid, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            pass

    def end_all(self) -> None:
        """SIGKILL every workload we started or restored that still runs, and wait until each is
        gone or a zombie: orphans wait for PID 1 here, which reaps them lazily."""
        for pid, start in self.ours:
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - start) >= 0.05:
                    continue  # a recycled PID: not ours
                p.kill()
                deadline = time.monotonic() + 10
                while p.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                    time.sleep(0.02)
            except psutil.NoSuchProcess:
                pass
        self.ours.clear()

    def wire(self) -> int:
        return eth_bytes(bed_mod.exec_in(self.bed, "host1", ["cat", "/proc/net/dev"]).stdout.decode())

    def wait_ready(self, w: Started, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = (lambda: len(read_counts(f"{w.base}.count")) >= 3) if w.case.size_mib is None \
            else (lambda: Path(f"{w.base}.ready").exists())
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{w.case.name}: the workload did not get ready in {timeout:g} s")
            time.sleep(0.05)

    def run(self, method: Method, case: Case, rep: int, pos: int) -> dict[str, Any]:
        base = self.tmp / f"{case.name}-{method.name}-{rep}"
        row: dict[str, Any] = {"case": case.name, "method": method.name, "rep": rep, "position": pos,
                               "size_mib": case.size_mib, "rate_mib_s": case.rate, "fill": case.fill}
        poller = None
        began = time.monotonic()
        try:
            w = method.start(self, case, base)
            self.wait_ready(w, 60 + (case.size_mib or 0) / 8)
            time.sleep(0.3)  # some ticks before the move
            row["rss"] = psutil.Process(w.pid).memory_info().rss
            poller = CountPoller(Path(f"{base}.count")) if case.size_mib is None else None
            wire0, busy0 = self.wire(), busy_seconds()
            moved = method.move(self, w)
            cpu_s = busy_seconds() - busy0
            time.sleep(self.settle)
            row.update(moved.row, total_s=moved.total_s, wire_bytes=self.wire() - wire0, cpu_s=round(cpu_s, 2))
            if moved.error:
                row.update(ok=False, error=moved.error)
                return row
            problems = self.check(w, moved, row, poller)
            row.update(ok=not problems, problems=problems)
        except Exception as e:  # one broken run is a failed row, not a lost sweep
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        finally:
            if poller is not None:
                poller.stop()
            self.end_all()
            row["wall_s"] = round(time.monotonic() - began, 2)  # the whole run, to plan sweeps
        return row

    def check(self, w: Started, moved: Moved, row: dict[str, Any], poller: CountPoller | None) -> list[str]:
        problems = []
        if moved.target_pid is None or not psutil.pid_exists(moved.target_pid):
            problems.append("no restored process on host2")
        elif int(Path(f"/proc/{moved.target_pid}/ns/net").stat().st_ino) != self.nets["host2"]:
            problems.append("the restored process is not in host2's network namespace")
        if psutil.pid_exists(w.pid) and psutil.Process(w.pid).status() != psutil.STATUS_ZOMBIE:
            problems.append("the source process still exists")
        if poller is not None:
            times = poller.stop()
            row["downtime_seen_s"] = max_gap(times)
            counts = read_counts(f"{w.base}.count")
            problems += counter_problems(counts, poller.count_at(moved.t1))
            return problems
        Path(f"{w.base}.verify").touch()
        deadline = time.monotonic() + 30 + (w.case.size_mib or 0) / 32
        verified = Path(f"{w.base}.verified")
        while not verified.exists():
            if time.monotonic() > deadline:
                problems.append("the workload did not answer the memory check")
                break
            time.sleep(0.05)
        else:
            v = json.loads(verified.read_text())
            row["memory_check"] = v
            if v["bad_chunks"]:
                problems.append(f"{v['bad_chunks']} of {v['chunks']} memory chunks changed by the move")
        ticks = parse_ticks(Path(f"{w.base}.ticks").read_text())
        ticks = [t for t in ticks if t.t <= moved.t1 + self.settle]
        seen = seen_by_ticks(ticks, self.nets["host1"], self.nets["host2"])
        row.update(downtime_seen_s=seen.max_gap_s, switch_gap_s=seen.switch_gap_s,
                   after_switch_max_gap_s=seen.after_switch_max_gap_s, ticks=seen.ticks)
        return problems + list(seen.problems)


class CountPoller:
    """Notes when the counter's file grows (every 5 ms), from the bench's side."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        size = -1
        while not self._stop.is_set():
            try:
                s = self.path.stat().st_size
            except FileNotFoundError:
                s = 0
            if s != size:
                size = s
                self.events.append((time.time(), s))
            time.sleep(0.005)

    def stop(self) -> list[float]:
        """The times the file grew (idempotent)."""
        self._stop.set()
        self._thread.join()
        return [t for t, _ in self.events]

    def count_at(self, t: float) -> int:
        sizes = [s for ts, s in self.events if ts <= t]
        return len(self.path.read_text()[:sizes[-1]].split()) if sizes else 0


# ---- methods: each strategy, and the manual pipeline ---------------------------------------

class Method(ABC):
    name: str

    def describe(self) -> dict[str, str]:
        return {"name": self.name}

    @abstractmethod
    def start(self, b: Bench, case: Case, base: Path) -> Started: ...

    @abstractmethod
    def move(self, b: Bench, w: Started) -> Moved: ...


def _timed(script: str) -> str:
    """script, with the wall time before and after it printed on a last line."""
    return f't0=$(date +%s.%N); {script}; rc=$?; echo "TIMES $t0 $(date +%s.%N) $rc"'


def _times(out: str) -> tuple[str, list[float], int]:
    """(output before the TIMES line, [start, end], exit status of the timed script)."""
    body, _, last = out.rstrip("\n").rpartition("\n")
    if not last.startswith("TIMES"):
        raise RuntimeError(f"the timed script did not finish: {out.strip()[-200:]!r}")
    parts = last.split()
    return body, [float(x) for x in parts[1:-1]], int(parts[-1])


#: A method name's suffix (`precopy.lxd`, `stop-copy.uncompressed`): host1's config for that
#: method's runs, as (section, key, value), and what it means.
VARIANTS: dict[str, tuple[str, str, str, str]] = {
    **{rule: ("migrate", "precopy_stop_rule", rule, f"stop rule: {STOP_RULES[rule].summary}") for rule in STOP_RULES},
    "uncompressed": ("ssh", "compression", "none", "images, streamed and pre-copied pages sent without zstd"),
}


class MigrdStrategy(Method):
    """`migrctl migrate --strategy NAME`, on a workload started with `migrctl run`; with a
    variant (`precopy.phaul`, `precopy.lxd`, `NAME.uncompressed`: VARIANTS), under host1's
    config with that setting changed."""

    def __init__(self, strategy: str, variant: str | None = None) -> None:
        self.strategy, self.variant = strategy, variant
        self.name = f"{strategy}.{variant}" if variant else strategy

    def describe(self) -> dict[str, str]:
        if self.variant is None:
            return {"name": self.name, "invocation": f"migrctl migrate PID --to host2 --strategy {self.strategy} --json",
                    "summary": OFFERED[self.strategy].summary}
        section, key, value, meaning = VARIANTS[self.variant]
        return {"name": self.name,
                "invocation": f"migrctl migrate PID --to host2 --strategy {self.strategy} --json "
                              f"(MIGRD_CONFIG: {section}.{key} {value})",
                "summary": f"{OFFERED[self.strategy].summary}; {meaning}"}

    def config_env(self, b: Bench) -> str:
        """The environment assignment that runs migrctl under this method's variant."""
        if self.variant is None:
            return ""
        section, key, value, _ = VARIANTS[self.variant]
        path = b.tmp / f"migrd-{self.variant}.yaml"
        doc = yaml.safe_load((b.h1.dir / "etc" / "migrd.yaml").read_text()) or {}
        doc.setdefault(section, {})[key] = value
        private.write_atomic(path, yaml.safe_dump(doc), durable=False)
        return f"MIGRD_CONFIG={shlex.quote(str(path))} "

    def start(self, b: Bench, case: Case, base: Path) -> Started:
        r = bed_mod.exec_in(b.bed, "host1", [PY, "-m", "migrd.cli", "run", "--json", "--name", base.name,
                                             "--", *case.argv(base)], timeout=60)
        pid = int(json.loads(r.stdout)["pid"])
        b.track(pid)
        return Started(case, base, pid, psutil.Process(pid).create_time())

    def move(self, b: Bench, w: Started) -> Moved:
        argv = [PY, "-m", "migrd.cli", "migrate", "--json", str(w.pid), "--to", "host2", "--strategy", self.strategy]
        rc, out, err = b.sh("host1", _timed(self.config_env(b) + shlex.join(argv)), timeout=900)
        body, (t0, t1), status = _times(out)
        dump_logs = sorted((b.h1.dir / "state" / "logs").glob(f"dump-{w.pid}-*.log"),
                           key=lambda p: p.stat().st_mtime)
        row: dict[str, Any] = {"criu_frozen_s": frozen_from_log(dump_logs[-1].read_text(errors="replace"))
                               if dump_logs else None}
        if status != 0:
            return Moved(t1 - t0, t0, t1, None, row, error=(err.strip().splitlines() or [f"exit {status}"])[-1])
        res = json.loads(body)
        b.track(res["target_pid"])
        if res.get("strategy") != self.strategy and self.strategy != "auto":
            return Moved(t1 - t0, t0, t1, res["target_pid"], row,
                         error=f"migrctl ran strategy {res.get('strategy')!r}, not {self.strategy!r}")
        journal = Journal(b.h1.dir / "state" / "migrations" / res["id"]).merged()
        # auto runs another strategy: which one, for the "never more than 10 % worse" aim.
        row.update(migrd=res, ran=res.get("strategy"), migrd_downtime_s=res.get("downtime"), image_bytes=res.get("bytes"),
                   phases=res.get("phases"), figures=strategy_figures(journal, res),
                   stop_reason=journal.get("stop_reason"))
        return Moved(t1 - t0, t0, t1, res["target_pid"], row)


class Manual(Method):
    """What an operator would type: one shell script in host1, the process frozen throughout."""

    name = "manual"

    def start(self, b: Bench, case: Case, base: Path) -> Started:
        launcher = bed_mod.spawn_in(b.bed, "host1", ["unshare", "--pid", "--fork", "--", "setsid", "--",
                                                     *case.argv(base)])
        deadline = time.monotonic() + 20
        while not (kids := psutil.Process(launcher.pid).children()):
            if time.monotonic() > deadline:
                raise RuntimeError("the manual workload did not start")
            time.sleep(0.01)
        pid = kids[0].pid
        b.track(pid)
        return Started(case, base, pid, kids[0].create_time(), launcher)

    def move(self, b: Bench, w: Started) -> Moved:
        d = f"/var/lib/migrd/manual-{w.base.name}"
        cfg2 = config.parse((b.h2.dir / "etc" / "migrd.yaml").read_text())
        (b.h1.dir / "state" / "bench_known_hosts").write_text("\n".join(cfg2.peer("host2").host_keys) + "\n")
        ssh = ["-i", "/etc/migrd/id_ed25519", "-o", "UserKnownHostsFile=/var/lib/migrd/bench_known_hosts",
               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
        dest = f"root@{b.h2.address}"
        steps = [
            [b.criu, "dump", "-t", str(w.pid), "-D", d, "-o", "dump.log", "-v4", "--network-lock", "nftables"],
            ["scp", "-q", "-r", *ssh, d, f"{dest}:{d}"],
            ["ssh", *ssh, dest, b.criu, "restore", "-D", d, "-d", "-o", "restore.log",
             "--manage-cgroups=ignore", "--pidfile", f"{d}/restored.pid"],
        ]
        script = " && ".join(f"{shlex.join(s)} && date +%s.%N" for s in steps)
        rc, out, err = b.sh("host1", f"mkdir -m 700 {shlex.quote(d)} && " + _timed(script), timeout=900)
        marks, (t0, t1), status = _times(out)
        local, there = b.h1.dir / "state" / d.rsplit("/", 1)[1], b.h2.dir / "state" / d.rsplit("/", 1)[1]
        try:
            if w.launcher is not None:
                w.launcher.wait(timeout=30)
            row: dict[str, Any] = {"image_bytes": sum(p.stat().st_size for p in local.glob("*.img"))}
            if (local / "dump.log").exists():
                row["criu_frozen_s"] = frozen_from_log((local / "dump.log").read_text(errors="replace"))
            if (local / "stats-dump").exists():
                stats = parse_dump_stats((local / "stats-dump").read_bytes())
                row.update(criu_stats=stats, criu_frozen_stats_s=stats["frozen_us"] / 1e6)
            if status != 0:
                return Moved(t1 - t0, t0, t1, None, row, error=(err.strip().splitlines() or [f"exit {status}"])[-1])
            ts = [t0, *map(float, marks.split())]
            row["phases"] = {"dump": ts[1] - ts[0], "scp": ts[2] - ts[1], "restore": ts[3] - ts[2]}
            target = int((there / "restored.pid").read_text())
            b.track(target)
            return Moved(ts[3] - t0, t0, ts[3], target, row)
        finally:
            bed_mod.exec_in(b.bed, "host1", ["rm", "-rf", d])
            bed_mod.exec_in(b.bed, "host2", ["rm", "-rf", d])


def methods_for(names: Sequence[str]) -> tuple[list[Method], dict[str, str]]:
    """The strategies asked for that `migrctl migrate --strategy` offers (pre-copy and hybrid
    also as NAME.RULE, under another stop rule), plus the manual pipeline, and why the others
    are left out."""
    methods: list[Method] = []
    missing: dict[str, str] = {}
    for n in names:
        strategy, _, variant = n.partition(".")
        if strategy not in OFFERED:
            missing[n] = f"not offered by this checkout's migrctl (it has: {', '.join(OFFERED)})"
        elif variant and variant not in VARIANTS:
            missing[n] = f"no variant {variant!r} (known: {', '.join(VARIANTS)})"
        elif variant in STOP_RULES and strategy not in ("precopy", "hybrid"):
            missing[n] = f"a stop rule ({', '.join(STOP_RULES)}) applies to precopy and hybrid only"
        else:
            methods.append(MigrdStrategy(strategy, variant or None))
    return [*methods, Manual()], missing


# ---- plot and main --------------------------------------------------------------------------

def plot(doc: dict[str, Any], png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no PNG", file=sys.stderr)
        return False
    summary, sizes, rates = doc["summary"], doc["sizes_mib"], doc["rates_mib_s"]
    methods = [m["name"] for m in doc["methods"]]
    counter = summary.get("counter", {})
    fig, axes = plt.subplots(len(rates) + bool(counter), 2, figsize=(11, 4 * (len(rates) + bool(counter))),
                             squeeze=False)
    for row, r in enumerate(rates):
        for col, (key, label) in enumerate((("downtime_seen_s", "downtime seen by the workload (s)"),
                                            ("total_s", "total time (s)"))):
            ax = axes[row][col]
            for m in methods:
                pts = [(s, summary[c][m][key]) for s in sizes
                       if (c := case_name(s, r)) in summary and key in summary[c].get(m, {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_xlabel("memory (MiB)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{'idle' if r == 0 else f'rewriting {r:g} MiB/s'}: {label.split(' (')[0]}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    for col, (key, label) in enumerate((("downtime_seen_s", "counter: downtime seen (s)"),
                                        ("criu_frozen_s", "counter: CRIU frozen (s)")) if counter else ()):
        ax = axes[len(rates)][col]
        names = [m for m in methods if key in counter.get(m, {})]
        ax.bar(names, [counter[m][key] for m in names])
        ax.tick_params(axis="x", labelrotation=30)  # the names overlap side by side
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    link = f", links shaped to {doc['link_mbit']:g} Mbit/s" if doc.get("link_mbit") else ""
    fig.suptitle(f"host1 -> host2 on the embedded bed{link}, medians of {doc['reps']} ({doc['fill']} memory)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return True


def _rates(text: str) -> list[float]:
    return sorted({float(x) for x in text.split(",") if x.strip()})


def _sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("comma-separated positive MiB, e.g. 64,256,1024")
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_sizes, default=[64, 256, 1024], help="MiB, comma-separated (default 64,256,1024)")
    ap.add_argument("--rate", type=float, default=32.0,
                    help="MiB/s the rewriting workloads rewrite (default 32: about a tenth of the bed's "
                         "SSH throughput, so pages keep changing while they are copied)")
    ap.add_argument("--modes", default="idle,rewrite", help="idle, rewrite or both (default both)")
    ap.add_argument("--rates", type=_rates, default=None,
                    help="MiB/s the workloads rewrite, comma-separated, 0 for idle; replaces --modes "
                         "and --rate (issue 11's sweep: --sizes 512,1024 --rates 0,40,400)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"default {','.join(STRATEGIES)}; precopy.phaul, precopy.lxd (and hybrid.*) run "
                         "pre-copy under P.Haul's or LXD's stop rule instead of migrd's; NAME.uncompressed "
                         "runs a strategy with ssh.compression none")
    ap.add_argument("--no-counter", action="store_true", help="skip the small process (migrbed's COUNTER)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill", choices=["mixed", "random", "zero"], default="mixed",
                    help="memory contents: half random, half touched zero pages (default), all random, all zero")
    ap.add_argument("--link-mbit", type=float, default=None,
                    help="shape host1's and host2's links to this many Mbit/s each way (tc tbf; default "
                    "unshaped: the bed's veth runs at memory speed, faster than any real network)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds watched after the move (default 1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "strategies.json")
    args = ap.parse_args()
    modes = {m.strip() for m in args.modes.split(",")}
    rates = args.rates or [r for m, r in (("idle", 0.0), ("rewrite", args.rate)) if m in modes]
    cases = [Case(case_name(s, r), s, r, args.fill) for s in args.sizes for r in rates]
    cases += [] if args.no_counter else [Case("counter", None, 0.0, args.fill)]
    # A SIGTERM ends the run through the same finally blocks as an error: bed down, PIDs ended.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    rows: list[dict[str, Any]] = []
    started = time.time()
    methods: list[Method] = []
    missing: dict[str, str] = {}

    def document() -> dict[str, Any]:
        summary = summarize(rows)
        return {
            "benchmark": "strategies", "sizes_mib": args.sizes, "rate_mib_s": args.rate, "rates_mib_s": rates,
            "fill": args.fill,
            "reps": args.reps, "settle_s": args.settle, "seconds": round(time.time() - started, 1),
            "machine": {"cpus": psutil.cpu_count(), "kernel": platform.release()},
            "topology": "2-host embedded bed, host1 -> host2, both on this machine's cores",
            "link_mbit": args.link_mbit,
            "methods": [m.describe() for m in methods], "left_out": missing,
            "rows": rows, "summary": summary, "aims": aims(summary, args.sizes, rates),
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="migrd-strategies-") as tmp:
        bed = bed_mod.new_name("bs")
        links = {} if args.link_mbit is None else {"host1": args.link_mbit, "host2": args.link_mbit}
        state = bed_mod.up(bed, hosts=2, root=Path(tmp) / "bed", link_mbits=links)
        try:
            b = Bench(state, Path(tmp), args.settle)
            methods, missing = methods_for([s.strip() for s in args.strategies.split(",") if s.strip()])
            for name, why in missing.items():
                print(f"{name}: left out, {why}", flush=True)
            by_name = {m.name: m for m in methods}
            try:
                for rep in range(args.reps):
                    for ci, case in enumerate(cases):
                        for pos, name in enumerate(rotated(list(by_name), rep + ci)):
                            rows.append(b.run(by_name[name], case, rep, pos))
                            print(_line(rows[-1]), flush=True)
                            # Written after every run: a sweep cut short still leaves its rows.
                            args.out.write_text(json.dumps(document(), indent=2))
            finally:
                b.end_all()
        finally:
            bed_mod.down(bed, Path(tmp) / "bed")

    doc = document()
    args.out.write_text(json.dumps(doc, indent=2))
    png = args.out.with_suffix(".png")
    plotted = plot(doc, png)
    _print_summary(doc)
    print(f"written to {args.out}" + (f" and {png}" if plotted else ""))
    return 0 if all(r["ok"] for r in rows) else 1


def _fmt(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else (f"{v / 2**20:.1f} MiB" if unit == "B" else f"{v:.3f} s")


def _line(r: dict[str, Any]) -> str:
    state = "ok" if r["ok"] else f"FAILED: {r.get('error') or '; '.join(r.get('problems', []))}"
    return (f"rep {r['rep'] + 1} {r['case']:18} {r['method']:12} total {_fmt(r.get('total_s'))}  "
            f"seen {_fmt(r.get('downtime_seen_s'))}  criu frozen {_fmt(r.get('criu_frozen_s'))}  "
            f"migrd {_fmt(r.get('migrd_downtime_s'))}  wire {_fmt(r.get('wire_bytes'), 'B')}  "
            f"cpu {_fmt(r.get('cpu_s'))}  {state}")


def _print_summary(doc: dict[str, Any]) -> None:
    print(f"\nmedians of {doc['reps']}:")
    for case, methods in doc["summary"].items():
        for m, s in methods.items():
            ratio = f"  total {s['total_s_vs_manual']:.2f}x manual" if "total_s_vs_manual" in s and m != "manual" else ""
            print(f"  {case:18} {m:12} total {_fmt(s.get('total_s'))}  seen {_fmt(s.get('downtime_seen_s'))}  "
                  f"criu frozen {_fmt(s.get('criu_frozen_s'))}  wire {_fmt(s.get('wire_bytes'), 'B')}"
                  f"{ratio}{'  (' + str(s['failed']) + ' failed)' if s['failed'] else ''}")
    for a in doc["aims"]:
        print(f"  aim: {a['aim']}: {a['value']:.3f} {'met' if a['met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
