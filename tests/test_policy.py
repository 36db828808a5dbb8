"""The policy and cost model: one scenario per factor (and some combinations), then properties
that must hold for any situation (hypothesis)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrd import costmodel
from migrd.load import HostLoad, ProcessLoad
from migrd.policy import (
    Action, Candidate, Decision, Level, Link, Mode, Peer, PolicyConfig, Situation, classify,
    decide, explain, pick_fill_source,
)

MB = 1_000_000
GB = 1000 * MB
NOW = 10_000.0
CFG = PolicyConfig()
FAST = Link(rtt_s=0.001, bandwidth=100 * MB)


def host(name: str, per_cpu: float, *, cpus: int = 2, speed: float = 1.0,
         mem_available: int = 8 * GB, t: float = NOW) -> HostLoad:
    """A host whose three load signals agree: `per_cpu` runnable tasks per CPU."""
    return HostLoad(
        host=name, time=t, source="system", cpus=cpus, cpu_capacity=float(cpus),
        cpu_speed=speed, loadavg=(per_cpu * cpus,) * 3, cpu_util=min(per_cpu, 1.0),
        run_queue=round(per_cpu * cpus), mem_total=16 * GB, mem_available=mem_available,
    )


def history(name: str, per_cpu: float, *, span: float = 40.0, **kw) -> tuple[HostLoad, ...]:
    return tuple(host(name, per_cpu, t=NOW - span + i * 10, **kw) for i in range(int(span // 10) + 1))


def proc(pid: int, *, share: float = 0.5, rss: int = 100 * MB, age: float = 600.0,
         files: int = 0, exe: int = 1 * MB) -> ProcessLoad:
    return ProcessLoad(pid=pid, name=f"job{pid}", cmdline=(f"job{pid}",), user="root",
                       cpu_share=share, cpu_seconds=share * age, rss_bytes=rss, age_s=age,
                       read_bytes_per_s=None, write_bytes_per_s=None, open_file_bytes=files,
                       exe_bytes=exe)


def cand(pid: int, opted_in: bool = True, **kw) -> Candidate:
    pkw = {k: kw.pop(k) for k in ("share", "rss", "age", "files", "exe") if k in kw}
    return Candidate(proc(pid, **pkw), opted_in=opted_in, **kw)


def peer(name: str, per_cpu: float, link: Link = FAST, **kw) -> Peer:
    compatible = kw.pop("cpu_compatible", True)
    return Peer(host(name, per_cpu, **kw), link, compatible)


def situation(*, local: float = 2.0, peers=(), cands=(), **kw) -> Situation:
    """Default: host 'a' with 2 CPUs at 2 tasks per CPU for 40 s (overloaded)."""
    hist = kw.pop("hist", None) or history("a", local)
    return Situation(now=NOW, history=hist, peers=tuple(peers), candidates=tuple(cands), **kw)


# A process wanting one CPU on a host where each task gets half of one: share 0.5.
BASE = dict(peers=[peer("b", 0.1)], cands=[cand(10)])

SCENARIOS: dict[str, tuple[dict, PolicyConfig, tuple[Action, int | None, str | None]]] = {
    "overloaded host, idle peer: migrate": (BASE, CFG, (Action.MIGRATE, 10, "b")),
    "huge remote data, small code: move code to data": (
        dict(peers=[peer("b", 0.1), peer("d", 0.2)],
             cands=[cand(10, rss=20 * MB, data_host="d", data_bytes=50 * GB)]),
        CFG, (Action.MOVE_CODE_TO_DATA, 10, "d")),
    "huge local data: shipping it does not pay, stay": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, rss=20 * MB, files=50 * GB)]),
        CFG, (Action.STAY, None, None)),
    "local data of moderate size travels with the process": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, files=1 * GB)]),
        CFG, (Action.MIGRATE_WITH_DATA, 10, "b")),
    "sensitive data, no peer cleared: stay": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, files=1 * GB, data_label="secret")]),
        dataclasses.replace(CFG, clearance={"secret": ("a",)}), (Action.STAY, None, None)),
    "sensitive data goes only to the cleared peer, though another is idler": (
        dict(peers=[peer("b", 0.1), peer("c", 0.4)],
             cands=[cand(10, files=1 * GB, data_label="secret")]),
        dataclasses.replace(CFG, clearance={"secret": ("a", "c")}),
        (Action.MIGRATE_WITH_DATA, 10, "c")),
    "sensitive data with no clearance rule at all never leaves": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, data_label="unlisted")]),
        CFG, (Action.STAY, None, None)),
    "sensitive remote data: the code moves to it": (
        dict(peers=[peer("b", 0.1), peer("d", 0.3)],
             cands=[cand(10, data_host="d", data_bytes=5 * GB, data_label="secret")]),
        dataclasses.replace(CFG, clearance={"secret": ("a",)}),
        (Action.MOVE_CODE_TO_DATA, 10, "d")),
    "slow link: stay": (
        dict(peers=[peer("b", 0.1, Link(0.2, 100_000))], cands=[cand(10, rss=1 * GB)]),
        CFG, (Action.STAY, None, None)),
    "faster remote CPU wins over an equally loaded one": (
        dict(local=1.2, peers=[peer("b", 0.1), peer("c", 0.1, speed=2.0)],
             cands=[cand(10, share=0.83)]),
        CFG, (Action.MIGRATE, 10, "c")),
    "recent process is filtered out": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, age=2.0)]),
        CFG, (Action.STAY, None, None)),
    "young process: expected remaining life too short to pay for the move": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, age=8.0)]),
        CFG, (Action.STAY, None, None)),
    "the old process is preferred over the young one": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, age=60.0), cand(11, age=3600.0)]),
        CFG, (Action.MIGRATE, 11, "b")),
    "not opted in: never chosen, even if the best": (
        dict(peers=[peer("b", 0.1)],
             cands=[cand(10, opted_in=False, age=3600.0), cand(11, age=600.0)]),
        CFG, (Action.MIGRATE, 11, "b")),
    "nobody opted in: stay": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10, opted_in=False)]),
        CFG, (Action.STAY, None, None)),
    "process in migration cooldown is not chosen": (
        dict(peers=[peer("b", 0.1)],
             cands=[cand(10, age=3600.0, last_migrated=NOW - 100), cand(11)]),
        CFG, (Action.MIGRATE, 11, "b")),
    "host cooldown: stay": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10)], last_move_at=NOW - 10),
        CFG, (Action.STAY, None, None)),
    "hysteresis: between watermarks does not trigger": (
        dict(local=0.8, peers=[peer("b", 0.1, speed=2.0)], cands=[cand(10)]),
        CFG, (Action.STAY, None, None)),
    "hysteresis: overloaded before, still above low: keeps offloading": (
        dict(hist=history("a", 2.0)[:-1] + (host("a", 0.8),), previous_level=Level.HIGH,
             peers=[peer("b", 0.1, speed=2.0)], cands=[cand(10)]),
        CFG, (Action.MIGRATE, 10, "b")),
    "over the high watermark too briefly: stay": (
        dict(hist=history("a", 2.0, span=10.0), peers=[peer("b", 0.1)], cands=[cand(10)]),
        CFG, (Action.STAY, None, None)),
    "memory too small on the idle peer: the other one": (
        dict(peers=[peer("b", 0.1, mem_available=100 * MB), peer("c", 0.4)], cands=[cand(10)]),
        CFG, (Action.MIGRATE, 10, "c")),
    "memory too small everywhere: stay": (
        dict(peers=[peer("b", 0.1, mem_available=100 * MB)], cands=[cand(10)]),
        CFG, (Action.STAY, None, None)),
    "CPU-incompatible peer is skipped": (
        dict(peers=[peer("b", 0.1, cpu_compatible=False), peer("c", 0.4)], cands=[cand(10)]),
        CFG, (Action.MIGRATE, 10, "c")),
    "overloaded peers are not targets": (
        dict(peers=[peer("b", 1.8)], cands=[cand(10)]),
        CFG, (Action.STAY, None, None)),
    "huge image, tiny code, restartable: restart elsewhere": (
        dict(local=3.0, peers=[peer("b", 0.1, mem_available=32 * GB)],
             cands=[cand(10, share=0.34, rss=20 * GB, age=60.0, restartable=True)]),
        CFG,
        (Action.RESTART_ELSEWHERE, 10, "b")),
    "cheaper CPU-seconds elsewhere win when time is equal": (
        dict(peers=[peer("b", 0.1), peer("c", 0.1)], cands=[cand(10)]),
        dataclasses.replace(CFG, cpu_second_cost={"b": 1.0, "c": 0.1}, default_cpu_second_cost=1.0),
        (Action.MIGRATE, 10, "c")),
    "expensive bytes: stay": (
        dict(peers=[peer("b", 0.1)], cands=[cand(10)]),
        dataclasses.replace(CFG, byte_cost=1e-5), (Action.STAY, None, None)),
    "fill: an idle requester gets work, even if another peer is idler and faster": (
        dict(local=1.5, hist=history("a", 1.5, span=10.0), mode=Mode.FILL, requester="b",
             peers=[peer("b", 0.2), peer("c", 0.0, speed=2.0)], cands=[cand(10, share=0.67)]),
        CFG, (Action.MIGRATE, 10, "b")),
    "fill: a requester that is not idle gets nothing": (
        dict(local=1.5, mode=Mode.FILL, requester="b", peers=[peer("b", 0.8)], cands=[cand(10)]),
        CFG, (Action.STAY, None, None)),
    "fill: an idle host has nothing to give": (
        dict(local=0.1, mode=Mode.FILL, requester="b", peers=[peer("b", 0.1)], cands=[cand(10)]),
        CFG, (Action.STAY, None, None)),
    "consolidate: pack onto the busiest peer that stays under the ceiling": (
        dict(local=0.1, mode=Mode.CONSOLIDATE,
             peers=[peer("b", 0.5), peer("c", 0.3), peer("d", 0.05)], cands=[cand(10, share=0.2)]),
        CFG, (Action.MIGRATE, 10, "b")),
    "consolidate: a peer the process would push over the ceiling is skipped": (
        dict(local=0.1, mode=Mode.CONSOLIDATE, peers=[peer("b", 0.65), peer("c", 0.3)],
             cands=[cand(10, share=0.2)]),
        CFG, (Action.MIGRATE, 10, "c")),
    "consolidate needs this host lightly loaded": (
        dict(local=0.8, mode=Mode.CONSOLIDATE, peers=[peer("b", 0.5)], cands=[cand(10, share=0.2)]),
        CFG, (Action.STAY, None, None)),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    kw, cfg, (action, pid, target) = SCENARIOS[name]
    d = decide(situation(**kw), cfg)
    assert (d.action, d.pid, d.target) == (action, pid, target), explain(d)
    assert d.reasons, "every decision carries its reasons"
    text = explain(d)
    assert d.source in text and action.value in text
    if action is not Action.STAY:
        assert d.estimate is not None and d.estimate.gain > -1e9
        assert f"PID {pid}" in text and "gain" in text
    # Pruned search and exhaustive search agree.
    full = decide(situation(**kw), cfg, prune=False)
    assert (full.action, full.pid, full.target) == (d.action, d.pid, d.target)


def test_migrate_estimate_numbers() -> None:
    """The base scenario by hand: R = 600 s, share 0.5 here, 1.0 there, so the computing
    process runs twice as fast; 100 MB over 100 MB/s."""
    d = decide(situation(**BASE), CFG)
    e = d.estimate
    assert e is not None
    assert e.transfer_bytes == 100 * MB
    assert e.transfer_s == pytest.approx(0.5 + 0.001 + 1.0)
    assert e.speedup == pytest.approx(2.0)
    assert e.here_s == pytest.approx(600.0)
    assert e.there_s == pytest.approx(1.501 + 300.0)
    assert e.gain == pytest.approx(600.0 - 301.501)


def test_classify_levels_and_reasons() -> None:
    level, why = classify(history("a", 2.0), CFG)
    assert level is Level.HIGH and "40 s" in why[0]
    level, why = classify(history("a", 0.1), CFG)
    assert level is Level.LOW
    level, why = classify(history("a", 0.8), CFG, Level.HIGH)
    assert level is Level.HIGH and "hysteresis" in why[0]
    level, _ = classify(history("a", 0.8), CFG, Level.LOW)
    assert level is Level.LOW
    level, _ = classify(history("a", 0.2)[:1], CFG, Level.HIGH)
    assert level is Level.NORMAL, "back below low leaves HIGH at once"


def test_pick_fill_source() -> None:
    peers = [peer("b", 1.2), peer("c", 2.5), peer("d", 0.6)]
    assert pick_fill_source(host("a", 0.1), peers, CFG) == "c"
    assert pick_fill_source(host("a", 0.8), peers, CFG) is None
    assert pick_fill_source(host("a", 0.1), [peer("d", 0.6)], CFG) is None


def test_policy_config_is_a_yaml_section() -> None:
    from migrd import config
    cfg = config.parse("policy:\n  hold_s: 10\n  load: {high: 1.5, low: 0.4}\n"
                       "  clearance: {secret: [a, c]}\n  cpu_second_cost: {b: 0.5}\n")
    assert cfg.policy.hold_s == 10.0
    assert cfg.policy.load.high == 1.5
    assert cfg.policy.cleared("secret", "c") and not cfg.policy.cleared("secret", "b")
    assert cfg.policy.cpu_price("b") == 0.5


# --------------------------------------------------------------------------- properties

NAMES = ["b", "c", "d", "e", "f"]


@st.composite
def situations(draw) -> tuple[Situation, PolicyConfig]:
    """Random situations, biased towards ones where a move is possible (busy here, idle
    peers, opted-in old processes), so the properties below see moves, not only `stay`."""
    def a_host(name: str) -> HostLoad:
        return host(name, draw(st.floats(*mostly((0.0, 0.3), (0.0, 2.0)))), cpus=draw(st.integers(1, 8)),
                    speed=draw(st.sampled_from([0.5, 1.0, 2.0])),
                    mem_available=mostly(8 * GB, draw(st.integers(0, 4 * GB))))

    def mostly(value, *others):
        return draw(st.sampled_from([value] * 3 + list(others)))

    mode = draw(st.sampled_from(list(Mode)))
    # The load range each mode acts in, most of the time.
    typical = {Mode.OFFLOAD: (1.0, 4.0), Mode.FILL: (0.5, 4.0), Mode.CONSOLIDATE: (0.0, 0.3)}
    local = draw(st.floats(*mostly(typical[mode], (0.0, 4.0))))
    hist = history("a", local, cpus=draw(st.integers(1, 8)))
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=5))
    peers = tuple(
        Peer(a_host(n), Link(draw(st.floats(1e-4, 0.5)), draw(st.floats(1e5, 1e9))),
             mostly(True, False))
        for n in names
    )
    cands = []
    for pid in draw(st.lists(st.integers(2, 99), unique=True, min_size=1, max_size=6)):
        cands.append(Candidate(
            proc(pid, share=draw(st.floats(0.0, 2.0)), rss=draw(st.integers(0, mostly(500 * MB, 4 * GB))),
                 age=draw(st.floats(*mostly((60.0, 5000.0), (0.0, 60.0)))),
                 files=mostly(0, draw(st.integers(0, 2 * GB)))),
            opted_in=mostly(True, False),
            last_migrated=mostly(None, draw(st.floats(NOW - 1000, NOW))),
            data_host=mostly(None, draw(st.sampled_from(NAMES))),
            data_label=mostly(None, "secret"),
            restartable=draw(st.booleans()),
        ))
    cfg = dataclasses.replace(
        CFG,
        clearance={"secret": tuple(draw(st.lists(st.sampled_from(NAMES), unique=True)))},
        byte_cost=draw(st.sampled_from([0.0, 1e-9])),
        default_cpu_second_cost=draw(st.sampled_from([0.0, 0.01])),
    )
    sit = Situation(now=NOW, history=hist, peers=peers, candidates=tuple(cands),
                    mode=mode,
                    previous_level=draw(st.sampled_from(list(Level))),
                    requester=draw(st.sampled_from(names)))
    return sit, cfg


def _key(d: Decision) -> tuple:
    return (d.action, d.pid, d.target, d.estimate if d.action is not Action.STAY else None)


@settings(max_examples=300, deadline=None)
@given(situations())
def test_properties(case: tuple[Situation, PolicyConfig]) -> None:
    sit, cfg = case
    d = decide(sit, cfg)
    local = sit.history[-1]
    # Deterministic, independent of input order, and the pruned search equals the full one.
    assert decide(sit, cfg) == d
    rng = random.Random(0)
    shuffled = dataclasses.replace(
        sit, peers=tuple(rng.sample(sit.peers, len(sit.peers))),
        candidates=tuple(rng.sample(sit.candidates, len(sit.candidates))))
    assert _key(decide(shuffled, cfg)) == _key(d)
    assert _key(decide(sit, cfg, prune=False)) == _key(d)
    if not any(c.opted_in for c in sit.candidates):
        assert d.action is Action.STAY
    if d.action is Action.STAY:
        assert d.pid is None and d.target is None
        return
    assert d.target != local.host and d.target in {p.load.host for p in sit.peers}
    c = next(c for c in sit.candidates if c.proc.pid == d.pid)
    assert c.opted_in
    assert c.last_migrated is None or sit.now - c.last_migrated >= cfg.process_cooldown_s
    assert cfg.cleared(c.data_label, d.target) or d.target == c.data_host
    if sit.mode is Mode.FILL:
        assert d.target == sit.requester
    if sit.mode is not Mode.CONSOLIDATE:
        # No move leaves the target more loaded than the source.
        tgt = next(p.load for p in sit.peers if p.load.host == d.target)
        src = costmodel.site(local, 0.0)
        w = costmodel.work(c, src, cfg)
        assert (costmodel.norm_after(costmodel.site(tgt, 0.0), w.wants)
                <= costmodel.norm_after(src, -w.wants) + 1e-9)
        assert d.estimate is not None and d.estimate.gain >= cfg.min_gain


def test_empty_history_is_refused_readably() -> None:
    from migrd.errors import InputError
    with pytest.raises(InputError, match="load sample"):
        decide(Situation(now=NOW, history=()), CFG)


def test_near_equal_gain_prefers_the_target_left_less_loaded() -> None:
    """The e2e act-two flake (both moves to host3 on a near tie): c's slightly faster CPU gains
    ~2 % more, but c would end at 0.95 load per CPU and b at 0.6, so the move goes to b. A
    clear winner still wins: at 1.5x speed c gains far more and gets the move."""
    b, c = peer("b", 0.1), peer("c", 0.7, cpus=4, speed=1.02)
    d = decide(situation(peers=[c, b], cands=[cand(10)]), CFG)
    assert d.action is Action.MIGRATE and d.target == "b"
    assert d == decide(situation(peers=[b, c], cands=[cand(10)]), CFG, prune=False)
    fast = peer("c", 0.7, cpus=4, speed=1.5)
    assert decide(situation(peers=[fast, b], cands=[cand(10)]), CFG).target == "c"
