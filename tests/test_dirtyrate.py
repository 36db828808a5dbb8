"""The agent's dirty-rate measurement: the pure planner and estimator (no root), and one root
test with real workloads whose memory the agent samples."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from migrd.adapters import memread
from migrd.errors import MigrdError
from migrd.cli.migrate import dirty_cell
from migrd.config import Config, DaemonSettings, DirtyRateSettings
from migrd.core import dirtyrate as dr
from migrd.core.policy import decide, explain
from migrbed.programs import SWEEPER
from migrd.model import CONTAINER_STRATEGIES, Level, PolicyConfig, SubjectRef
from test_policy import MB, SLOW, cand, host, peer, situation

B = dr.Budget(bytes=16 << 20, pages=1024, every=30.0)


def target(key: str, rss: int) -> dr.Target:
    return dr.Target(key, (int(key.split()[-1]),), rss)


def test_stride_keeps_a_read_within_its_pages():
    assert dr.stride_for(4 << 20, 1024) == 1
    assert dr.stride_for(512 << 20, 1024) == 128
    assert dr.stride_for(0, 1024) == 1


def test_plan_biggest_first_within_the_byte_budget():
    cands = [target("pid 1", 8 << 20), target("pid 2", 512 << 20), target("pid 3", 2 << 20)]
    reads = dr.plan(dr.Tracker(), cands, 100.0, dr.Budget(bytes=6 << 20, pages=1024, every=30.0))
    # 512 MiB at stride 128 reads 4 MiB; 8 MiB would read 4 MiB more (too much); 2 MiB fits.
    assert [(r.key, r.stride, r.completes) for r in reads] == [("pid 2", 128, False), ("pid 3", 1, False)]
    assert 0 <= reads[0].phase < 128 and reads[1].phase == 0


def test_plan_completes_pairs_first_then_refreshes_only_old_rates():
    t = dr.Tracker(baselines={"pid 3": dr.Baseline(95.0, 4, 3, {})},
                   rates={"pid 1": dr.Rate(1.0, 90.0, 1), "pid 2": dr.Rate(1.0, 60.0, 1)})
    cands = [target("pid 1", 100 << 20), target("pid 2", 50 << 20), target("pid 3", 1 << 20)]
    reads = dr.plan(t, cands, 100.0, B)
    # pid 3's pair is half done (its baseline's stride is kept); pid 2 is 40 s old; pid 1 is fresh.
    assert [(r.key, r.stride, r.phase, r.completes) for r in reads] == [("pid 3", 4, 3, True),
                                                                        ("pid 2", 13, 100_000 % 13, False)]


def test_the_sampled_page_of_each_stride_changes_between_measurements():
    """Page 0 of every stride is where aligned regions start (a heap, a stack): always reading
    it would overweight their busy first pages."""
    assert len({dr.phase_for(100.0 + i * 30.001, 128) for i in range(10)}) > 5


def test_a_pair_gives_the_rate_of_distinct_pages_rewritten():
    before = {(1, a * 4096): bytes([a % 7 + 1]) for a in range(100)}
    after = dict(before)
    for a in range(10):
        after[1, a * 4096] = b"x"
    after[1, 500 * 4096] = b"new"  # new memory, written
    after[1, 501 * 4096] = dr.ZERO  # new memory, never written
    assert dr.changed(before, after) == 11
    read = dr.Read("pid 1", (1,), 8, 0, False)
    t = dr.record(dr.Tracker(), read, before, 10.0)
    assert "pid 1" in t.baselines and not t.rates
    t = dr.record(t, dataclasses.replace(read, completes=True), after, 12.0)
    assert not t.baselines and t.rates["pid 1"] == dr.Rate(11 * 8 * 4096 / 2.0, 12.0, 1)


def test_rates_are_weighted_and_go_stale():
    read = dr.Read("pid 1", (1,), 1, 0, False)
    t = dr.Tracker(rates={"pid 1": dr.Rate(1000.0, 0.0, 1)})
    t = dr.record(dr.record(t, read, {(1, 0): b"a"}, 40.0), read, {(1, 0): b"b"}, 41.0)
    assert t.rates["pid 1"].bytes_per_s == pytest.approx(1000 + dr.WEIGHT * (4096 - 1000))
    assert t.rates["pid 1"].samples == 2
    # A stride change (the candidate grew) restarts the pair; an unreadable read changes nothing.
    t2 = dr.record(dr.record(t, read, {(1, 0): b"a"}, 50.0), dataclasses.replace(read, stride=2), {(1, 0): b"b"}, 51.0)
    assert t2.rates == t.rates and t2.baselines["pid 1"].stride == 2
    assert dr.record(t, read, {}, 60.0) == t
    assert dr.keep(t, ["pid 1"], 41.0 + dr.STALE_PERIODS * B.every - 1, B).rates
    assert not dr.keep(t, ["pid 1"], 41.0 + dr.STALE_PERIODS * B.every, B).rates
    assert not dr.keep(t, ["pid 2"], 42.0, B).rates


def test_targets_skip_opted_out_and_sum_a_container_over_its_processes():
    ref = SubjectRef("runc", "web", open_files=False, strategies=CONTAINER_STRATEGIES)
    got = dr.targets([cand(1), cand(2, opted_in=False), cand(3, subject=ref)], {"web": {9, 3}})
    assert [(t.key, t.pids) for t in got] == [("pid 1", (1,)), ("runc web", (3, 9))]


def test_measuring_only_when_the_policy_may_move():
    cfg = PolicyConfig()
    busy, calm, idle = host("a", 2.0), host("a", 0.7), host("a", 0.1)
    assert dr.worth_measuring("offload", Level.NORMAL, busy, False, cfg)  # crossed high: hold runs
    assert not dr.worth_measuring("offload", Level.NORMAL, calm, False, cfg)
    assert dr.worth_measuring("offload", Level.HIGH, calm, False, cfg)  # hysteresis: still HIGH
    assert not dr.worth_measuring("fill", Level.NORMAL, calm, False, cfg)
    assert dr.worth_measuring("fill", Level.NORMAL, calm, True, cfg)  # an idle peer asked
    assert dr.worth_measuring("consolidate", Level.NORMAL, idle, False, cfg)
    assert not dr.worth_measuring("consolidate", Level.NORMAL, busy, False, cfg)


def test_the_policy_prices_the_measured_rate():
    """A candidate measured rewriting faster than the link is priced with stop-copy (pre-copy
    diverges); unmeasured, the same candidate is priced as idle."""
    c = cand(10, rss=1 << 30, age=3600.0)
    t = dr.Tracker(rates={"pid 10": dr.Rate(20 * MB, 1.0, 2)})
    [measured] = dr.apply([c], t)
    assert measured.dirty_rate == 20 * MB and dr.apply([c], dr.Tracker()) == (c,)
    d = decide(situation(peers=[peer("b", 0.1, SLOW)], cands=[measured]), PolicyConfig())
    assert d.estimate is not None and "diverging" in explain(d)
    d0 = decide(situation(peers=[peer("b", 0.1, SLOW)], cands=[c]), PolicyConfig())
    assert d0.estimate is not None and "diverging" not in explain(d0)
    assert dr.describe(t.rates["pid 10"], 5.0) == "dirty rate: 20.00 MB/s, measured 4 s ago (2 samples)"
    assert dr.describe(None, 5.0) == "dirty rate: not measured (priced as idle)"


def test_ps_shows_the_rate_and_its_age():
    assert dirty_cell({"dirty_rate": 4_200_000, "dirty_rate_age_s": 3.4}) == "4.2MB/s (3s)"
    assert dirty_cell({"dirty_rate": None}) == dirty_cell({}) == "-"


def test_ps_reads_an_agent_of_another_release_and_refuses_a_malformed_one(tmp_path, monkeypatch):
    """Seen on the Vagrant VMs: an agent still running the release before (no dirty rates)
    answered a new `migrctl ps`, which failed with KeyError."""
    from click.testing import CliRunner

    from migrd.cli import migrate as cli_migrate

    monkeypatch.setattr(cli_migrate, "load_config", lambda: Config(host="a", state_dir=tmp_path))
    old = [{"pid": 7, "name": "busy", "cmdline": ["python3", "busy.py"], "action": "stay", "target": None,
            "gain": None, "reason": "host is not busy", "cpu_share": 0.5, "age_s": 3.0, "opted_in": True,
            "last_migrated": None}]
    monkeypatch.setattr(cli_migrate, "ask_if_running", lambda cfg, op: old)
    r = CliRunner().invoke(cli_migrate.ps, ["--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["pid"] == 7 and row["action"] == "stay" and row["dirty_rate"] is None
    assert CliRunner().invoke(cli_migrate.ps, []).exit_code == 0
    monkeypatch.setattr(cli_migrate, "ask_if_running", lambda cfg, op: [{"pid": "seven"}])
    r = CliRunner().invoke(cli_migrate.ps, ["--json"])
    # A MigrdError: the CLI's group prints it as one line with its exit code.
    assert isinstance(r.exception, MigrdError) and "the agent's ps: key '[0].name' is missing" in str(r.exception)


# --------------------------------------------------------------------------- root: real memory

@pytest.mark.root
def test_the_agent_measures_a_rewriting_candidate_and_an_idle_one(tmp_path):
    """Two real workloads of 64 MiB, one rewriting 4 MiB/s, one idle: within a few rounds of a
    busy host (a pair of reads each, as many as the round's time budget allows) the rewriting
    one's rate is within 25 % of the truth, the idle one's small, and no round read for longer
    than the budget."""
    from migrd.agent import loop as agent_mod

    procs = [subprocess.Popen([sys.executable, "-c", SWEEPER, "64", str(rate)], stdout=subprocess.PIPE)
             for rate in (4096, 0)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        cfg = Config(host="a", state_dir=tmp_path / "state",
                     daemon=DaemonSettings(socket=tmp_path / "run" / "s.sock", dirty_rate=DirtyRateSettings()))
        a = agent_mod.Agent(cfg, env={})
        cands = tuple(cand(p.pid, rss=64 << 20) for p in procs)
        busy = host("a", 2.0)
        spent = []
        for _ in range(8):
            began = time.process_time()
            got = a.measure(cands, busy)
            spent.append(time.process_time() - began)
            if all(c.dirty_rate is not None for c in got):
                break
            time.sleep(0.5)
        writer, idle = got
        assert writer.dirty_rate is not None and idle.dirty_rate is not None
        assert writer.dirty_rate == pytest.approx(4 << 20, rel=0.25), writer.dirty_rate
        # "Idle" still runs an interpreter loop 100 times a second: a few stack and heap pages
        # change, and each sampled page stands for 16.
        assert idle.dirty_rate < (4 << 20) / 8, idle.dirty_rate
        budget = cfg.daemon.dirty_rate.budget_s
        # CPU time, not wall: on this shared machine a round can be preempted mid-read, which
        # the budget cannot prevent; what it bounds is the reading.
        assert all(cpu < budget + 0.01 for cpu in spent), spent
        # ps and explain show it with its age.
        view = a._dirty_view(writer)
        assert view["dirty_rate"] == round(writer.dirty_rate) and 0 <= view["dirty_rate_age_s"] < 5
        # A calm host reads nothing: the rates stay as they were.
        before = a.dirty
        a.measure(cands, host("a", 0.6))
        assert a.dirty.rates == before.rates and not a.dirty.baselines
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.root
def test_sample_reads_only_the_strided_pages():
    p = subprocess.Popen([sys.executable, "-c", SWEEPER, "16", "0"], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        got = memread.sample([p.pid], 64, 5, time.monotonic() + 5)
        assert got and all(addr // 4096 % 64 == 5 for _, addr in got)
        assert len(got) >= (16 << 20) // (64 * 4096)
        assert memread.sample([p.pid], 1, 0, time.monotonic() - 1) is None  # past its deadline
        assert memread.sample([2 ** 22 + 7], 1, 0, time.monotonic() + 5) == {}  # no such task
    finally:
        p.kill()
        p.wait()
    assert os.geteuid() == 0


@pytest.mark.root
def test_autos_sample_measures_the_rate_a_workload_rewrites():
    from migrd.engine.precopy import sample_dirty_rate
    from migrd.engine.strategies import AUTO_SAMPLE_PAGES

    procs = [subprocess.Popen([sys.executable, "-c", SWEEPER, "64", str(kib)], stdout=subprocess.PIPE)
             for kib in (0, 16 << 10)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        stride = dr.stride_for(64 << 20, AUTO_SAMPLE_PAGES)
        idle, writer = (sample_dirty_rate([p.pid], 0.25, stride) for p in procs)
        # The idle one's interpreter still wakes 100 times a second: its stack and heap change.
        assert idle < (1 << 20), idle
        # 16 MiB/s written as 100 stripes a second; a preempted reader sees more or less of them.
        assert (6 << 20) < writer < (40 << 20), writer
    finally:
        for p in procs:
            p.kill()
            p.wait()
