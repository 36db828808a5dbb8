"""Chaos on the bed: repeated migrations of live counters while the source orchestrator or the
target's sshd is SIGKILLed at a random moment, then `migrctl recover`. After every round each
workload must run exactly once, running (not stopped), with its count unbroken (its state
survived), registered on the host it runs on, every journal final and no images left behind.
At the end `migrctl recover` finds nothing to do on any host.

The schedule (which workload, where to, staged or streamed, what is killed, after how long) is
drawn from random.Random(seed), each kind of kill at each moment (before the journal, at
each step, after the end) once per 16 rounds: MIGRD_CHAOS_SEED overrides the seed (printed),
MIGRD_CHAOS_ROUNDS the number of rounds (`make chaos` runs a longer one with a fresh seed).
Timing on a shared machine still varies, so a seed replays the schedule, not every race.
MIGRD_CHAOS_REPORT=FILE writes the summary as JSON.

Kinds of kill:
* orchestrator: SIGKILL to the `migrctl migrate` process (a CRIU it started lives on with the
  migration's lock until it is done; recovery waits for it);
* sshd: SIGKILL to the target's sshd listener and its per-connection sshd processes, so every
  SSH session to the target drops at once (a crash or a network cut, as the source sees it);
  the commands those sessions ran are left to notice on their own. The sshd is started again
  before recovery, as an operator would.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from migrbed import bed as bed_mod
from migrd.adapters import cgroup, workloads
from migrd.engine.journal import FINAL, STEPS, Journal, all_journals, summarize
from migrbed.programs import COUNTER, read_counts
from workloads import copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 3
PY = sys.executable
SEED = int(os.environ.get("MIGRD_CHAOS_SEED", "20261129"))
#: One deck: each kind of kill at each moment once (about 4 minutes on 2 busy cores).
ROUNDS = int(os.environ.get("MIGRD_CHAOS_ROUNDS", "16"))
WORKLOADS = 3
KINDS = ("orchestrator", "sshd")
#: Where a kill lands: once the migration's journal reaches one of its steps (whatever the
#: machine's speed), or this early after the start, or after it ended; then a random offset.
MOMENTS = ("start", *STEPS, "end")
MAX_OFFSET = 0.4


@dataclass
class Counter:
    name: str
    out: Path
    host: str
    pid: int


def mig(state: bed_mod.BedState, host: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    r = bed_mod.exec_in(state, host, [PY, "-m", "migrd.cli", *args], check=False, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"migrctl {' '.join(args)} on {host} exited {r.returncode}: {r.stderr.decode()}")
    return r


def host_of(state: bed_mod.BedState, pid: int) -> str:
    for h in state.hosts:
        if pid in cgroup.pids(h.cgroup):
            return h.name
    raise AssertionError(f"PID {pid} is in no bed host's cgroup")


def journals(state: bed_mod.BedState, host: str) -> dict[str, Journal]:
    return {j.id: j for j in all_journals(state.host(host).dir / "state")}


def new_journal(state: bed_mod.BedState, host: str, before: dict[str, Journal]) -> Journal | None:
    """The journal of the one migration started on host since before was taken, if any yet."""
    new = [j for i, j in journals(state, host).items() if i not in before]
    assert len(new) <= 1, f"more than one new migration on {host}: {[j.id for j in new]}"
    return new[0] if new else None


def reaches(j: Journal | None, moment: str) -> bool:
    """Whether the migration journaled in j has got to moment (or past it)."""
    if moment == "start":
        return True
    if j is None or moment == "end":
        return False
    states = [r.state for r in j.records()]
    return moment in states or any(s in states for s in FINAL)


def _named(p: psutil.Process, name: str) -> bool:
    """False for a process that ended since it was listed (a session's sshd does at any time)."""
    try:
        return p.name() == name
    except psutil.NoSuchProcess:
        return False


def kill_sshd(ref: bed_mod.ProcRef) -> int:
    """SIGKILL an sshd listener and its per-connection sshd processes (not the commands its
    sessions run). Returns how many processes were killed."""
    if not bed_mod.alive(ref):
        return 0
    listener = psutil.Process(ref.pid)
    victims = [listener] + [c for c in listener.children(recursive=True) if _named(c, "sshd")]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        os.waitpid(ref.pid, 0)  # the bed's sshd is our child: no zombie left
    except ChildProcessError:
        pass
    return len(victims)


def recover(state: bed_mod.BedState, host: str, timeout: float = 180) -> list[dict]:
    """`migrctl recover --json` until nothing is skipped for being in progress (a CRIU a killed
    orchestrator started still holds the migration's lock). Returns every action taken."""
    done: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        report = json.loads(mig(state, host, "recover", "--json").stdout)
        failed = [r for r in report if r["action"].startswith("failed")]
        assert not failed, f"recover on {host} failed: {failed}"
        skipped = [r for r in report if r["action"].startswith("skipped")]
        done += [r for r in report if r not in skipped]
        if not skipped:
            return done
        assert time.monotonic() < deadline, f"recover on {host} still skips after {timeout} s: {report}"
        time.sleep(1)


def check_invariants(state: bed_mod.BedState, counters: list[Counter]) -> list[tuple[str, str]]:
    """Every broken invariant as (kind, what): exactly one running copy of each counter
    ("copies"), its count unbroken and going on ("state"), registered alive on its host only
    ("registry"); every journal final ("journal"); no images anywhere ("images")."""
    problems: list[tuple[str, str]] = []
    for c in counters:
        found = copies(str(c.out))
        if len(found) != 1:
            problems.append(("copies", f"{c.name} has {len(found)} live copies: {found}"))
            continue
        pid = found[0]
        if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
            problems.append(("copies", f"the only copy of {c.name} (PID {pid}) is stopped"))
        c.pid, c.host = pid, host_of(state, pid)
        registered = [(h.name, w.pid) for h in state.hosts
                      for w in workloads.Registry(h.dir / "state").all() if w.name == c.name and w.alive()]
        if registered != [(c.host, pid)]:
            problems.append(("registry", f"{c.name} runs as {pid} on {c.host}, registered {registered}"))
    for c in counters:
        before = len(read_counts(c.out))
        try:
            wait_for(lambda: len(read_counts(c.out)) >= before + 3, timeout=30, what=f"{c.name} to count on")
        except AssertionError as e:
            problems.append(("state", str(e)))
        got = read_counts(c.out)
        if got != list(range(1, len(got) + 1)):
            problems.append(("state", f"{c.name}'s count broke: ...{got[-30:]}"))
    for h in state.hosts:
        st = h.dir / "state"
        unfinished = [(j.id, j.last_state()) for j in all_journals(st) if j.last_state() not in FINAL]
        if unfinished:
            problems.append(("journal", f"not final on {h.name}: {unfinished}"))
        left = [str(p) for p in (st / "migrations").glob("*/images*")]
        left += [str(p) for p in (st / "incoming").iterdir()] if (st / "incoming").is_dir() else []
        if left:
            problems.append(("images", f"left on {h.name}: {left}"))
    return problems


def test_chaos_migrations_keep_exactly_one_copy_with_its_state(bed, tmp_path):
    rng = random.Random(SEED)
    print(f"\nchaos: seed {SEED} (MIGRD_CHAOS_SEED), {ROUNDS} rounds (MIGRD_CHAOS_ROUNDS)")
    state = bed_mod.load_state(bed.name, bed.root)  # current: another test may have restarted an sshd
    hosts = [h.name for h in state.hosts]
    counters: list[Counter] = []
    tally: collections.Counter[str] = collections.Counter()
    log: list[dict] = []
    failure = None
    deck: list[tuple[str, str]] = []
    try:
        for i in range(WORKLOADS):
            c = Counter(f"chaos{i}", tmp_path / f"count-{i}", "host1", 0)
            c.pid = json.loads(mig(state, "host1", "run", "--json", "--name", c.name, "--",
                                   PY, "-c", COUNTER, str(c.out)).stdout)["pid"]
            counters.append(c)
        for c in counters:
            wait_for(lambda: len(read_counts(c.out)) >= 5, what=f"{c.name} to start")
        assert check_invariants(state, counters) == []

        for n in range(1, ROUNDS + 1):
            c = rng.choice(counters)
            src = c.host
            dst = rng.choice([h for h in hosts if h != src])
            staged = rng.random() < 0.3
            if not deck:  # every (kill, moment) pair once per deck, in a random order
                deck = [(k, m) for k in KINDS for m in MOMENTS]
                rng.shuffle(deck)
            kind, moment = deck.pop()
            # verify and commit take a few tens of ms: only a short offset lands inside them.
            offset = rng.uniform(0, {"start": 1.5, "verify": 0.02, "commit": 0.02}.get(moment, MAX_OFFSET))
            argv = [PY, "-m", "migrd.cli", "migrate", str(c.pid), "--to", dst]
            argv += ["--tcp-established"] if staged else []  # the staged path (full local restore on rollback)
            before = journals(state, src)
            t0 = time.monotonic()
            p = bed_mod.spawn_in(state, src, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            wait_for(lambda: p.poll() is not None or reaches(new_journal(state, src, before), moment),
                     timeout=300, what=f"round {n}'s migration to reach {moment}")
            time.sleep(offset)
            j = new_journal(state, src, before)
            at = (j.last_state() or "empty") if j else "not started"
            landed = p.poll() is None
            if kind == "orchestrator":
                if landed:
                    p.send_signal(signal.SIGKILL)
            else:
                landed = kill_sshd(state.host(dst).sshd) > 0 and landed
            _, err = p.communicate(timeout=300)
            took = time.monotonic() - t0
            if kind == "sshd":
                state = bed_mod.restart_sshd(state, dst)
            recovered = recover(state, src)
            j = new_journal(state, src, before)
            outcome = summarize(j).outcome if j else "not started"
            event = {"round": n, "workload": c.name, "from": src, "to": dst, "staged": staged,
                     "kill": kind, "moment": moment, "offset": round(offset, 2), "phase": at if landed else "after the end",
                     "exit": p.returncode, "outcome": outcome, "recovered": [r["action"] for r in recovered],
                     "seconds": round(took, 2)}
            log.append(event)
            print(f"chaos: {json.dumps(event)}" + (f" stderr: {err.decode().strip()[-200:]}" if err else ""))
            tally["attempted"] += 1
            tally[f"outcome {outcome}"] += 1
            tally[f"kill {kind}" + ("" if landed else " (after the migration ended)")] += 1
            tally[f"at {at}"] += landed
            tally["recover actions"] += len(recovered)
            problems = check_invariants(state, counters)
            tally["copies counted"] += len(counters)
            tally["state lost"] += sum(k == "state" for k, _ in problems)
            assert not problems, f"seed {SEED} round {n} ({kind} at {at}): {problems}"

        for h in hosts:
            assert json.loads(mig(state, h, "recover", "--json").stdout) == [], f"recover on {h} still finds work"
    except AssertionError as e:
        failure = str(e).splitlines()[0]
        raise
    finally:
        end_copies(*(str(c.out) for c in counters))
        summary = {"seed": SEED, "rounds": ROUNDS, "attempted": tally["attempted"],
                   "completed": tally["outcome ok"], "rolled_back": tally["outcome rolled back"],
                   "refused": tally["outcome refused"],
                   "kills": {k.removeprefix("kill "): v for k, v in tally.items() if k.startswith("kill ")},
                   "kills_at": {k.removeprefix("at "): v for k, v in tally.items() if k.startswith("at ") and v},
                   "recover_actions": tally["recover actions"], "copies_counted": tally["copies counted"],
                   "state_lost": tally["state lost"], "failure": failure, "rounds_log": log}
        print("chaos summary: " + json.dumps({k: v for k, v in summary.items() if k != "rounds_log"}))
        if os.environ.get("MIGRD_CHAOS_REPORT"):
            Path(os.environ["MIGRD_CHAOS_REPORT"]).write_text(json.dumps(summary, indent=2) + "\n")


# --- found while reading a chaos round: a commit that fails half-way -------------------------

@pytest.mark.parametrize("staged", [False, True], ids=["streamed", "staged"])
def test_commit_failing_after_the_target_runs_is_finished_not_undone(bed, tmp_path, staged):
    """Once the copy on the target runs (and, streamed, the source is ended), a failure later
    in the commit (here a failpoint; in life `peer finish` timing out, nft or registry
    errors) must not roll back: that killed the running copy and restored the dump here (the
    count went backwards), or, streamed, found no pages to restore (no copy at all). The
    migration is left in doubt (exit 11) with the target copy running; recover finishes it."""
    out = tmp_path / "count"
    name = "commitfail" + ("-staged" if staged else "")
    pid = json.loads(mig(bed, "host1", "run", "--json", "--name", name, "--", PY, "-c", COUNTER,
                         str(out)).stdout)["pid"]
    try:
        wait_for(lambda: len(read_counts(out)) >= 5, what="counter to start")
        argv = ["env", "MIGRD_FAILPOINTS=resumed:error", PY, "-m", "migrd.cli", "migrate", str(pid),
                "--to", "host2", *(["--tcp-established"] if staged else [])]
        r = bed_mod.exec_in(bed, "host1", argv, check=False, timeout=180)
        err = r.stderr.decode()
        assert r.returncode == 11 and "failpoint resumed:error" in err and "migrd recover" in err, err
        c = Counter(name, out, "host2", 0)
        problems = [p for p in check_invariants(bed, [c]) if p[0] not in ("journal", "registry", "images")]
        assert problems == [] and c.host == "host2", problems
        recovered = json.loads(mig(bed, "host1", "recover", "--json").stdout)
        assert [r["action"] for r in recovered] == ["committed"], recovered
        assert check_invariants(bed, [c]) == [] and c.host == "host2"
    finally:
        end_copies(str(out))


def test_target_lost_before_restore_is_cleaned_by_recover(bed, tmp_path):
    """The target's SSH goes away after the pages were streamed there, before any restore:
    the source runs on, and the migration stays unfinished (`target_unclean`) until recover
    can remove the pages there. It used to be recorded rolled back at once, leaving the pages
    (up to the whole memory) in the target's incoming/ for good: nothing there ever looked."""
    state = bed_mod.load_state(bed.name, bed.root)
    out = tmp_path / "count"
    c = Counter("unclean", out, "host1", 0)
    c.pid = json.loads(mig(state, "host1", "run", "--json", "--name", c.name, "--", PY, "-c", COUNTER,
                           str(out)).stdout)["pid"]
    try:
        wait_for(lambda: len(read_counts(out)) >= 5, what="counter to start")
        source = c.pid
        before = journals(state, "host1")
        p = bed_mod.spawn_in(state, "host1", ["env", "MIGRD_FAILPOINTS=transfer:delay", PY, "-m", "migrd.cli",
                                              "migrate", str(c.pid), "--to", "host2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: reaches(new_journal(state, "host1", before), "transfer"), timeout=120,
                 what="the migration to reach transfer")
        incoming = state.host("host2").dir / "state" / "incoming"
        assert any(incoming.iterdir()), "no pages arrived on host2"
        kill_sshd(state.host("host2").sshd)
        _, err = p.communicate(timeout=180)
        assert p.returncode == 7, err
        j = new_journal(state, "host1", before)
        assert j is not None and j.last_state() == "target_unclean", [r.state for r in j.records()] if j else None
        assert copies(str(out)) == [c.pid]  # resumed here, the very process
        assert any(incoming.iterdir())
        state = bed_mod.restart_sshd(state, "host2")
        assert [r["action"] for r in recover(state, "host1")] == ["rolled back"]
        assert check_invariants(state, [c]) == [] and (c.host, c.pid) == ("host1", source)
    finally:
        end_copies(str(out))
