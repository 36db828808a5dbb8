"""The agent without root: its pure round logic, one round with fake inputs (load source,
peers, candidates, orchestrator), the admin protocol over a real unix socket, sd_notify over a
real datagram socket, and the daemon config section."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from migrd.agent import admin, loop as agent_mod
from migrd import config as config_mod
from migrd.adapters import exchange, registry, sdnotify, untrusted
from migrd.engine import migration as migrate
from migrd.core import step as step_mod
from migrd.core import dirtyrate, peerset
from migrd.config import Config, DaemonSettings, HostEntry
from migrd.model import PROCESS_TREE, Action, Decision, Level, Link, Mode, PolicyConfig
from migrd.errors import AgentNotRunning, ConfigError, InputError, MigrdError
from test_policy import NOW, cand, host, peer

FAST = Link(0.001, 100e6)
#: How the agent runs its moves by default (daemon.strategies).
AGENT_STRATEGIES = DaemonSettings().strategies


# --------------------------------------------------------------------------- pure core


def view(name: str, per_cpu: float, *, age: float = 0.0, link: Link | None = FAST) -> exchange.PeerView:
    snap = exchange.Snapshot(host(name, per_cpu, t=NOW - age), "normal", 1)
    return exchange.PeerView(name, snapshot=snap, link=link)


def test_keep_history_drops_old_samples():
    hist = tuple(host("a", 1.0, t=NOW - 40 + i * 10) for i in range(4))
    kept = step_mod.keep_history(hist, host("a", 1.0, t=NOW), 25.0)
    assert [h.time for h in kept] == [NOW - 20, NOW - 10, NOW]


def test_usable_peers_ignores_stale_and_unprobed():
    peers = agent_mod.usable_peers([view("c", 0.1, age=30), view("b", 0.2), view("d", 0.1, link=None),
                                    exchange.PeerView("e")], NOW, 20.0)
    assert [p.load.host for p in peers] == ["b"]
    # A target whose reservation slots are all taken (etcd registry) is left out too.
    assert agent_mod.usable_peers([view("b", 0.2), view("f", 0.2)], NOW, 20.0, full=frozenset({"b"})) == \
        agent_mod.usable_peers([view("f", 0.2)], NOW, 20.0)


def test_options_and_modes():
    stay = Decision(Action.STAY, Mode.OFFLOAD, Level.HIGH, "a")
    assert agent_mod.options_for(stay) is None
    move = replace(stay, action=Action.MIGRATE, pid=5, target="b")
    assert agent_mod.options_for(move, [cand(5)]) == migrate.Options(target="b", mode="move")
    assert agent_mod.options_for(replace(move, action=Action.RESTART_ELSEWHERE)).mode == "restart"
    assert step_mod.own_mode("fill") is None and step_mod.own_mode("consolidate") is Mode.CONSOLIDATE


def test_options_carry_the_data_exactly_when_it_was_priced():
    """"Migrate with its data" is priced with the data's bytes: the migration copies the files."""
    here = Decision(Action.MIGRATE_WITH_DATA, Mode.OFFLOAD, Level.HIGH, "a", pid=5, target="b")
    data = cand(5, files=50 * 2**20)
    assert agent_mod.options_for(here, [cand(4), data]) == migrate.Options(target="b", mode="move", with_files=True)
    # A plain move, and code going to data on another host, copy no files.
    assert not agent_mod.options_for(replace(here, action=Action.MIGRATE), [data]).with_files
    remote = cand(5, files=50 * 2**20, data_host="b")
    assert not agent_mod.options_for(replace(here, action=Action.MOVE_CODE_TO_DATA), [remote]).with_files
    # A restart is priced with code + the data here; with the data on its target, code only.
    restart = replace(here, action=Action.RESTART_ELSEWHERE)
    assert agent_mod.options_for(restart, [data]) == migrate.Options(target="b", mode="restart", with_files=True)
    assert not agent_mod.options_for(restart, [remote]).with_files


def test_options_bring_autos_measures_from_the_round():
    """`auto` decides on the link and dirty rate the policy priced the move with; what the
    round did not measure it measures itself. The journal keeps them (recovery reads it back)."""
    move = Decision(Action.MIGRATE, Mode.OFFLOAD, Level.HIGH, "a", pid=5, target="b")
    peers = [peer("c", 0.2), peer("b", 0.2)]
    opts = agent_mod.options_for(move, [replace(cand(5), dirty_rate=3e6)], peers=peers)
    assert opts is not None and opts.link == peers[1].link and opts.dirty_rate == 3e6
    bare = agent_mod.options_for(move, [cand(5)], peers=peers[:1])
    assert bare is not None and bare.link is None and bare.dirty_rate is None
    record = {"source": "a", "options": dataclasses.asdict(opts), "carry": [],
              "process": {"pid": 5, "cmdline": [], "exe": "x", "cwd": "/", "uid": 0, "rss": 1, "start_time": 0.0},
              "request": {"pid": 5, "start_time": 0.0, "target": "b", "mode": "move"}}
    back = untrusted.build(migrate.Recorded, json.loads(json.dumps(record)), MigrdError, "j")
    assert back.options == opts


def test_fill_source_only_when_idle_in_fill_mode():
    pc = PolicyConfig()
    idle, peers = host("a", 0.1), [peer("b", 2.0), peer("c", 3.0), peer("d", 0.2)]
    assert step_mod.fill_source("fill", idle, peers, pc, Level.LOW) == "c"
    assert step_mod.fill_source("offload", idle, peers, pc, Level.LOW) is None
    assert step_mod.fill_source("fill", idle, peers, pc, Level.NORMAL) is None


def test_take_offer_oldest_live_first():
    offers = {"b": NOW - 40, "c": NOW - 5, "d": NOW - 10}
    assert step_mod.take_offer(offers, NOW) == ("d", {"c": NOW - 5})  # b expired (TTL 30 s)
    assert step_mod.take_offer({}, NOW) == (None, {})


def test_step_carries_state_between_rounds():
    """The pure round: a move sets the host cooldown; pause keeps the decision but not the move;
    a LOW fill host asks the busiest peer, then not again within the host cooldown."""
    pc = PolicyConfig(hold_s=0.0)
    cands = (cand(101, age=600),)
    peers = (peer("b", 0.1),)
    offload = step_mod.Settings("a", "offload", 5.0, pc)
    paused = step_mod.step(step_mod.State(), step_mod.Inputs(host("a", 2.0), peers, cands, paused=True), offload)
    assert paused.decision.action is Action.MIGRATE and not paused.move and paused.skipped == "paused"
    assert paused.state.last_move_at is None and paused.state.level is Level.HIGH
    out = step_mod.step(step_mod.State(), step_mod.Inputs(host("a", 2.0), peers, cands), offload)
    assert out.move and out.state.last_move_at == NOW and len(out.state.history) == 1
    fill = step_mod.Settings("a", "fill", 5.0, pc)
    busy = (peer("b", 2.0), peer("c", 3.0))
    first = step_mod.step(step_mod.State(), step_mod.Inputs(host("a", 0.1), busy, ()), fill)
    assert first.ask == "c" and first.state.asked_at == NOW and not first.move
    again = step_mod.step(first.state, step_mod.Inputs(host("a", 0.1, t=NOW + 5), busy, ()), fill)
    assert again.ask is None and again.state.asked_at == NOW
    asked = step_mod.step(step_mod.State().offered("b", NOW), step_mod.Inputs(host("a", 2.0), peers, cands), fill)
    assert asked.decision.mode is Mode.FILL and asked.move and asked.state.offers == {}


def test_decision_log_is_bounded(tmp_path):
    log = agent_mod.DecisionLog(tmp_path / "d.jsonl", 10)
    for i in range(25):
        log.append({"i": i})
    recs = log.records()
    assert len(recs) <= 10 and recs[-1] == {"i": 24}
    assert [r["i"] for r in recs] == list(range(recs[0]["i"], 25))
    assert agent_mod.DecisionLog(tmp_path / "d.jsonl", 10).count == len(recs)


def test_check_settings_names_the_key():
    for daemon, key in [(DaemonSettings(mode="push"), "daemon.mode"),
                        (DaemonSettings(load_source="cgroup"), "daemon.cgroup_dirs"),
                        (DaemonSettings(load_source="magic"), "daemon.load_source"),
                        (DaemonSettings(interval=0), "daemon.interval"),
                        (DaemonSettings(probe="random:0"), "daemon.probe"),
                        (DaemonSettings(probe="chord"), "daemon.probe")]:
        with pytest.raises(ConfigError, match=key):
            agent_mod.check_settings(Config(daemon=daemon))


def test_snapshot_round_trip(tmp_path):
    snap = exchange.Snapshot(host("a", 1.5), "high", 42)
    exchange.publish(tmp_path, snap)
    assert exchange.Snapshot.from_json((tmp_path / exchange.SNAPSHOT).read_bytes()) == snap
    assert exchange.backoff(1) == 1.0 and exchange.backoff(3) == 4.0 and exchange.backoff(30) == 60.0


# --------------------------------------------------------------------------- one round, fake inputs


class FakeSource:
    def __init__(self, per_cpu: float) -> None:
        self.per_cpu, self.t = per_cpu, NOW

    def sample(self):
        self.t += 1.0
        return host("a", self.per_cpu, t=self.t)


class FakeReader:
    def __init__(self, v: exchange.PeerView) -> None:
        self.view, self._conn = v, None

    def poll(self, now: float) -> None:
        self.view.snapshot = replace(self.view.snapshot, load=replace(self.view.snapshot.load, time=now))

    def close(self) -> None:
        pass


@pytest.fixture
def make_agent(tmp_path, monkeypatch):
    calls: list[tuple[int, migrate.Options]] = []

    def fake_migrate(cfg, ref, pid, opts, progress=None):
        assert ref == PROCESS_TREE
        calls.append((pid, opts))
        return migrate.Outcome(id=f"m{len(calls)}", mode="move", source="a", target=opts.target, pid=pid,
                               target_pid=900 + len(calls), bytes=1, phases={}, downtime=0.1, dry_run=False,
                               strategy="stop-copy")

    monkeypatch.setattr(agent_mod.migrate, "migrate_subject", fake_migrate)

    def make(local: float = 2.0, peer_load: float = 0.1, mode: str = "offload", share: float = 0.5,
             files: int = 0):
        cfg = Config(host="a", state_dir=tmp_path / "state",
                     hosts=(HostEntry("a", "198.18.0.1"), HostEntry("b", "198.18.0.2")),
                     policy=PolicyConfig(hold_s=0.0),
                     daemon=DaemonSettings(mode=mode, socket=tmp_path / "run" / "s.sock"))
        a = agent_mod.Agent(cfg, env={})
        a.source = FakeSource(local)
        a.peers.readers = {"b": FakeReader(view("b", peer_load))}
        a._candidates = lambda: (cand(101, age=600, share=share, files=files),  # type: ignore[method-assign]
                                 cand(102, age=1.0))
        a.calls = calls
        return a

    return make


def test_round_offloads_then_cools_down(make_agent):
    a = make_agent()
    d = a.round()
    assert d.action is Action.MIGRATE and d.pid == 101 and d.target == "b"
    # With the link the agent probed, for `auto` to decide on.
    assert a.calls == [(101, migrate.Options(target="b", preference=AGENT_STRATEGIES, link=FAST))]
    # The move was priced against the downtime the agent's migrations aim at.
    assert a.settings.policy.downtime_target == a.cfg.migrate.downtime_target
    assert a.settings.policy.precopy_rounds == a.cfg.migrate.precopy_rounds
    assert d.estimate is not None and d.estimate.strategy in a.settings.policy.strategies
    d2 = a.round()
    assert d2.action is Action.STAY and any("host cooldown" in r for r in d2.reasons)
    recs = a.decisions.records()
    assert recs[0]["migration"] == {"id": "m1", "outcome": "ok", "target_pid": 901, "downtime": 0.1}
    assert recs[0]["reasons"] and recs[1]["action"] == "stay"
    published = exchange.Snapshot.from_json((a.cfg.state_dir / exchange.SNAPSHOT).read_bytes())
    assert published.level == "high" and published.load.host == "a"


def test_round_moves_the_data_it_priced(make_agent):
    a = make_agent(files=4 << 20)
    d = a.round()
    assert d.action is Action.MIGRATE_WITH_DATA and d.pid == 101
    assert d.estimate is not None and d.estimate.transfer_bytes == 100 * 10**6 + (4 << 20)  # rss + the data
    assert a.calls == [(101, migrate.Options(target="b", with_files=True, preference=AGENT_STRATEGIES, link=FAST))]


def test_paused_agent_decides_but_does_not_move(make_agent):
    a = make_agent()
    a.handle({"op": "pause"})
    d = a.round()
    assert d.action is Action.MIGRATE and a.calls == []
    assert a.decisions.records()[-1]["skipped"] == "paused"
    assert a.handle({"op": "status"})["paused"] is True
    a.handle({"op": "resume"})
    a.round()
    assert len(a.calls) == 1


def test_fill_mode_waits_for_an_offer(make_agent):
    a = make_agent(local=2.0, peer_load=0.1, mode="fill")
    d = a.round()
    assert d.action is Action.STAY and "an idle peer asks" in d.reasons[-1] and not a.calls
    with pytest.raises(InputError):
        a.handle({"op": "offer", "requester": "zz"})
    assert a.handle({"op": "offer", "requester": "b"}) == {"queued": "b"}
    d = a.round()
    assert d.mode is Mode.FILL and d.action is Action.MIGRATE and d.target == "b"
    assert a.handle({"op": "status"})["offers"] == []


def test_round_reads_only_its_probe_set(tmp_path, monkeypatch):
    """daemon.probe fingers: the SSH registry polls only this host's finger set (plus a peer
    that offered to take work), and only those peers reach the policy."""
    names = [f"h{i:02d}" for i in range(32)]
    cfg = Config(host="h00", state_dir=tmp_path / "state",
                 hosts=tuple(HostEntry(n, f"198.18.0.{i + 1}") for i, n in enumerate(names)),
                 policy=PolicyConfig(hold_s=0.0),
                 daemon=DaemonSettings(probe="fingers", socket=tmp_path / "run" / "s.sock"))
    a = agent_mod.Agent(cfg, env={})
    a.source = FakeSource(2.0)
    polled: list[str] = []

    class Counting(FakeReader):
        def poll(self, now: float) -> None:
            polled.append(self.view.name)
            super().poll(now)

    a.peers.readers = {n: Counting(view(n, 0.1)) for n in names[1:]}
    a._candidates = lambda: (cand(101, age=1.0),)  # type: ignore[method-assign]
    fingers = peerset.Ring(names).fingers("h00")
    assert 3 <= len(fingers) <= 8  # ~ log2 32
    a.round()
    assert sorted(polled) == sorted(fingers)
    assert sorted(p.load.host for p in a.situation.peers) == sorted(fingers)
    asker = next(n for n in names[1:] if n not in fingers)
    a.handle({"op": "offer", "requester": asker})
    polled.clear()
    a.round()
    assert sorted(polled) == sorted([*fingers, asker])


def test_to_read_adds_askers_it_knows():
    """Both registries read this round's probe set plus known askers (etcd: and probe only
    their links)."""
    ps = peerset.PeerSet(peerset.Probe("random", 2), "a", ["b", "c", "d", "e"])
    read = registry.to_read(ps, random.Random(3), ("e", "zz"))
    assert "e" in read and "zz" not in read and "a" not in read and len(read - {"e"}) in (1, 2)


def test_consolidate_packs_onto_a_busier_peer(make_agent):
    a = make_agent(local=0.1, peer_load=0.4, mode="consolidate", share=0.2)
    d = a.round()
    assert d.mode is Mode.CONSOLIDATE and d.level is Level.LOW
    assert d.action is Action.MIGRATE and a.calls == [(101, migrate.Options(target="b", preference=AGENT_STRATEGIES, link=FAST))]


def test_admin_ops_after_a_round(make_agent):
    a = make_agent(local=0.6)  # between the watermarks: stays
    a.round()
    st = a.handle({"op": "status"})
    assert st["host"] == "a" and st["level"] == "normal" and st["last_decision"]["action"] == "stay"
    ps = {r["pid"]: r for r in a.handle({"op": "ps"})}
    assert set(ps) == {101, 102} and ps[101]["reason"]
    ex = a.handle({"op": "explain", "pid": 101})
    assert ex["text"].startswith("a (normal, offload)")
    with pytest.raises(InputError, match="PID 7 is not a migration candidate"):
        a.handle({"op": "explain", "pid": 7})
    hosts = a.handle({"op": "hosts"})
    assert [h["name"] for h in hosts] == ["a", "b"] and hosts[1]["link"]["rtt_s"] == FAST.rtt_s
    assert a.handle({"op": "history"}) == []
    with pytest.raises(InputError, match="unknown operation"):
        a.handle({"op": "nope"})


def test_ps_and_explain_show_the_measured_dirty_rate_and_its_age(make_agent):
    """A calm host reads no memory; the rates it measured before still price its candidates
    (until stale) and ps/explain show them with their age."""
    a = make_agent(local=0.6)
    a.dirty = dirtyrate.Tracker(rates={"pid 101": dirtyrate.Rate(3e6, time.monotonic() - 2.0, 2)})
    a.round()
    assert next(c for c in a.situation.candidates if c.proc.pid == 101).dirty_rate == 3e6
    ps = {r["pid"]: r for r in a.handle({"op": "ps"})}
    assert ps[101]["dirty_rate"] == 3000000 and 2.0 <= ps[101]["dirty_rate_age_s"] < 10
    assert ps[101]["dirty_rate_samples"] == 2 and ps[102]["dirty_rate"] is None
    ex = a.handle({"op": "explain", "pid": 101})
    assert ex["dirty"]["dirty_rate"] == 3000000 and "dirty rate: 3.00 MB/s, measured" in ex["text"]
    assert "dirty rate: not measured (priced as idle)" in a.handle({"op": "explain", "pid": 102})["text"]


# --------------------------------------------------------------------------- admin protocol


def test_admin_encode_decode():
    assert admin.decode_request(admin.encode({"op": "status"})) == {"op": "status"}
    for bad in (b"{", b"[1]", b'{"op": 3}'):
        with pytest.raises(InputError):
            admin.decode_request(bad)

    def handler(req):
        if req["op"] == "boom":
            raise InputError("no such thing")
        return {"echo": req}

    ok = admin.answer(handler, b'{"op": "x", "a": 1}\n')
    assert ok == {"ok": True, "result": {"echo": {"op": "x", "a": 1}}}
    assert admin.decode_response(admin.encode(ok)) == {"echo": {"op": "x", "a": 1}}
    err = admin.answer(handler, b'{"op": "boom"}')
    assert err == {"ok": False, "error": "no such thing", "code": 3}
    with pytest.raises(MigrdError) as e:
        admin.decode_response(admin.encode(err))
    assert e.value.exit_code == 3 and "no such thing" in str(e.value)


def test_admin_socket_round_trip(tmp_path):
    path = tmp_path / "run" / "migrd.sock"
    with pytest.raises(AgentNotRunning):
        admin.request(path, "status")
    srv = admin.Server(path, lambda req: {"op": req["op"], "n": req.get("n")})
    srv.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert admin.request(path, "status", n=3) == {"op": "status", "n": 3}
        with socket.socket(socket.AF_UNIX) as s:  # several requests on one connection
            s.connect(str(path))
            s.sendall(b'{"op": "a"}\n{"op": "b"}\nnot json\n')
            s.shutdown(socket.SHUT_WR)
            lines = s.makefile("rb").read().splitlines()
        assert [json.loads(ln)["ok"] for ln in lines] == [True, True, False]
        with pytest.raises(MigrdError, match="already running"):
            admin.Server(path, lambda req: None)
    finally:
        srv.close()
    assert not path.exists()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: replaced
    srv = admin.Server(path, lambda req: "fresh")
    srv.start()
    try:
        assert admin.request(path, "x") == "fresh"
    finally:
        srv.close()


# --------------------------------------------------------------------------- sd_notify


def test_sdnotify_formatting():
    assert sdnotify.message(READY=1, STATUS="up and running") == "READY=1\nSTATUS=up and running"
    with pytest.raises(ValueError):
        sdnotify.message(STATUS="two\nlines")
    assert sdnotify.address({"NOTIFY_SOCKET": "@migrd/notify"}) == "\0migrd/notify"
    assert sdnotify.address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert sdnotify.address({}) is None
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "2"}, pid=2) == 3.0
    assert sdnotify.watchdog_seconds({}) is None
    assert sdnotify.notify({}, READY=1) is False


def test_sdnotify_sends_a_datagram(notify_socket):
    name, s = notify_socket
    s.settimeout(5)
    assert sdnotify.notify({"NOTIFY_SOCKET": name}, READY=1, STATUS="ok")
    assert s.recv(4096) == b"READY=1\nSTATUS=ok"


# --------------------------------------------------------------------------- config


def test_daemon_section_parses():
    cfg = config_mod.parse("daemon:\n  interval: 2\n  load_source: cgroup\n  cgroup_dirs: [/sys/fs/cgroup/cpu/x]\n"
                           "  socket: /var/lib/migrd/migrd.sock\n  mode: fill\n")
    assert cfg.daemon.interval == 2.0 and cfg.daemon.cgroup_dirs == (Path("/sys/fs/cgroup/cpu/x"),)
    assert cfg.daemon.mode == "fill" and cfg.daemon.socket == Path("/var/lib/migrd/migrd.sock")
    assert config_mod.parse(config_mod.dump(cfg)).daemon == cfg.daemon
    with pytest.raises(ConfigError, match=r"key 'daemon.interval' \(line 3\): expected a number"):
        config_mod.parse("host: a\ndaemon:\n  interval: often\n")


def _yaml_fields(cls: type) -> dict[str, object]:
    """A config dataclass's YAML keys: key -> the nested keys of a dataclass-typed field, else None."""
    hints = typing.get_type_hints(cls)
    return {f.name: _yaml_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}


def _missing_keys(want: dict[str, object], have: object, prefix: str = "") -> list[str]:
    have = have if isinstance(have, dict) else {}
    missing = []
    for key, sub in want.items():
        path = f"{prefix}{key}"
        if key not in have:
            missing.append(path)
        elif sub is not None:
            missing += _missing_keys(sub, have[key], f"{path}.")
    return missing


def test_example_config_is_complete():
    """configs/migrd.yaml lists every key (recursively) with its default: a new setting fails
    here until it is documented there."""
    text = (Path(__file__).parent.parent / "configs" / "migrd.yaml").read_text()
    cfg = config_mod.parse(text)
    defaults = Config()
    for f in dataclasses.fields(Config):  # every section and top-level key, except `source`
        if f.metadata.get("yaml", True):
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    assert _missing_keys(_yaml_fields(Config), yaml.safe_load(text)) == []
    # `hosts` is empty by default, so its entry's keys are documented in the commented example.
    example = [ln.lstrip("#").strip().removeprefix("- ") for ln in text.splitlines()
               if ln.startswith(("#   ", "# - "))]
    assert [f"hosts[].{k}" for k in _yaml_fields(HostEntry)
            if not any(ln.startswith(f"{k}:") for ln in example)] == []


def test_daemon_refuses_a_malformed_config(tmp_path):
    bad = tmp_path / "migrd.yaml"
    bad.write_text(f"state_dir: {tmp_path / 'x'}\ndaemon:\n  mode: offload\n  intervall: 3\n")
    r = subprocess.run([sys.executable, "-m", "migrd.agent.daemon", "--once"], capture_output=True, text=True,
                       env={**os.environ, "MIGRD_CONFIG": str(bad)}, timeout=60)
    assert r.returncode == 8
    assert "daemon.intervall" in r.stderr and "line 4" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.root
def test_cli_without_an_agent_exits_12(tmp_path):
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ndaemon:\n  socket: {tmp_path / 'none.sock'}\n")
    for cmd in (["status"], ["explain", "1"], ["pause", "--json"]):
        r = subprocess.run([sys.executable, "-m", "migrd.cli", *cmd], capture_output=True, text=True,
                           env={**os.environ, "MIGRD_CONFIG": str(cfg)}, timeout=60)
        assert r.returncode == 12 and "no migrd agent answers" in r.stderr, r.stderr


# --------------------------------------------------------------------------- metrics, registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics for real and parse it with the client library's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_after_a_move_and_a_refused_reservation(make_agent):
    """The agent's Prometheus endpoint, scraped over HTTP: rounds, decisions by action,
    migrations by outcome and strategy, downtime and total time, bytes, load per host, and a
    move the registry refused (target full) counted as not_reserved, not as a migration."""
    from migrd.adapters import registry
    from migrd.config import MetricsSettings

    a = make_agent()
    port = _free_port()
    a.metrics.serve(MetricsSettings(enabled=True, address="127.0.0.1", port=port))
    try:
        a.round()  # moves PID 101 to b (fake orchestrator: 1 byte, 0.1 s downtime, stop-copy)
        a.round()  # host cooldown: stays
        m = _scrape(port)
        assert m[("migrd_rounds_total", ())] == 2
        assert m[("migrd_decisions_total", (("action", "migrate"),))] == 1
        assert m[("migrd_decisions_total", (("action", "stay"),))] == 1
        assert m[("migrd_migrations_total", (("outcome", "ok"), ("strategy", "stop-copy")))] == 1
        assert m[("migrd_migration_bytes_total", ())] == 1
        assert m[("migrd_migration_downtime_seconds_count", ())] == 1
        assert m[("migrd_migration_downtime_seconds_sum", ())] == pytest.approx(0.1)
        assert m[("migrd_migration_seconds_count", ())] == 1
        assert m[("migrd_host_load_per_cpu", (("host", "a"),))] == pytest.approx(2.0)
        assert ("migrd_host_load_per_cpu", (("host", "b"),)) in m
        assert m[("migrd_registry_errors_total", ())] == 0

        def full(target: str, ident: str):
            raise registry.ReservationRefused(f"target {target} already receives 1 migration(s)")

        b = make_agent()
        b.metrics = a.metrics
        b.peers.reserve = full  # type: ignore[method-assign]
        b.round()
        assert b.decisions.records()[-1]["migration"]["outcome"] == "not_reserved"
        assert len(b.calls) == 1  # the orchestrator ran only for a's move
        m = _scrape(port)
        assert m[("migrd_migrations_total", (("outcome", "not_reserved"), ("strategy", "move")))] == 1
    finally:
        a.metrics.close()
    with pytest.raises(OSError):
        _scrape(port)  # closed with the agent


def test_agent_runs_on_local_decisions_when_etcd_is_unreachable(tmp_path):
    """registry: etcd with nobody listening: rounds go on (no peer is a target, so nothing
    moves), and `status` says the registry is unreachable."""
    from migrd.config import EtcdSettings

    closed = _free_port()
    cfg = Config(host="a", state_dir=tmp_path / "state",
                 hosts=(HostEntry("a", "127.0.0.1", port=closed), HostEntry("b", "127.0.0.1", port=closed)),
                 policy=PolicyConfig(hold_s=0.0),
                 daemon=DaemonSettings(socket=tmp_path / "s.sock", registry="etcd",
                                       etcd=EtcdSettings(endpoints=(f"http://127.0.0.1:{closed}",), timeout=1)))
    a = agent_mod.Agent(cfg, env={})
    a.source = FakeSource(2.0)
    a._candidates = lambda: (cand(101, age=600),)  # type: ignore[method-assign]
    try:
        for _ in range(2):
            d = a.round()
        assert d.level is Level.HIGH and d.action is Action.STAY
        st = a.handle({"op": "status"})["registry"]
        assert st["registry"] == "etcd" and st["ok"] is False
        assert f"127.0.0.1:{closed}" in st["error"] and "local load only" in st["note"]
        assert a.handle({"op": "hosts"})[1]["error"].startswith("registry unreachable")
    finally:
        a.close()


def test_registry_settings_refused():
    from migrd.config import EtcdSettings, MetricsSettings

    for daemon, key in ((DaemonSettings(registry="etcd", etcd=EtcdSettings(ttl=1)), "daemon.etcd.ttl"),
                        (DaemonSettings(registry="etcd", etcd=EtcdSettings(target_slots=0)), "target_slots"),
                        (DaemonSettings(metrics=MetricsSettings(port=0)), "daemon.metrics.port")):
        with pytest.raises(ConfigError, match=key):
            agent_mod.check_settings(Config(daemon=daemon))
    with pytest.raises(ConfigError, match="expected one of ssh, etcd"):
        config_mod.parse("daemon:\n  registry: zookeeper\n")


def test_metrics_port_taken_is_a_config_error():
    from migrd.agent import metrics
    from migrd.config import MetricsSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match=r"daemon.metrics': cannot listen on 127.0.0.1:\d+"):
            metrics.Metrics().serve(MetricsSettings(enabled=True, port=s.getsockname()[1]))


def test_status_text_says_when_the_registry_is_unreachable():
    from migrd.cli.agent import _status_text

    base = {"host": "a", "pid": 1, "mode": "offload", "level": "high", "paused": False, "rounds": 3,
            "uptime_s": 3.0, "in_flight": None, "explain": None}
    assert "registry" not in _status_text({**base, "registry": {"registry": "ssh", "ok": True}})
    assert "load registry: etcd, answering" in _status_text(
        {**base, "registry": {"registry": "etcd", "ok": True, "error": None, "note": None}})
    text = _status_text({**base, "registry": {"registry": "etcd", "ok": False, "error": "etcd at http://x:1: down",
                                              "note": "deciding on local load only"}})
    assert "UNREACHABLE (etcd at http://x:1: down); deciding on local load only" in text


def test_an_admin_request_naming_both_a_pid_and_a_container_is_refused():
    with pytest.raises(InputError, match="a PID or a container, not both"):
        agent_mod.parse_request({"op": "explain", "pid": 7, "container": "web"})
    assert agent_mod.parse_request({"op": "explain", "container": "web"}).container == "web"


def test_a_failed_move_cools_the_process_down_so_others_get_their_turn(make_agent, monkeypatch):
    """Seen on the Vagrant VMs: CRIU could not dump one process (a configfs mount), and the
    agent tried it again every round while the busy ones it could move waited."""
    a = make_agent()

    def failing(cfg, ref, pid, opts, progress=None):
        a.calls.append((pid, opts))
        raise MigrdError("criu dump failed: mnt: FS mnt ./sys/kernel/config unsupported")

    monkeypatch.setattr(agent_mod.migrate, "migrate_subject", failing)
    a.settings = dataclasses.replace(a.settings, policy=dataclasses.replace(a.settings.policy, host_cooldown_s=0.0))
    d = a.round()
    assert d.action is Action.MIGRATE and d.pid == 101 and 101 in a.failed
    assert a.decisions.records()[-1]["migration"]["outcome"] == "failed"
    d2 = a.round()
    assert d2.action is Action.STAY and [c for c in a.calls if c[0] == 101] == a.calls[:1]
    assert any("since last move or failed move" in r for r in d2.reasons), d2.reasons
