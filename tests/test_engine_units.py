"""The engine's pure parts without root: strategy choice, the resource-binding model, the
peer client's reading of answers, and the ground floor's freedom from I/O imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from migrd.core import binding
from migrd.core.binding import Mechanism
from migrd.config import Config, DaemonSettings, MigrateSettings
from migrd.engine import strategies
from migrd.engine.migration import Options
from migrd.model import Connection, Listener, OpenFile, ProcessInfo

def prefer(*names: str) -> Config:
    return Config(migrate=MigrateSettings(strategies=names))


INFO = ProcessInfo(pid=42, cmdline=("python3", "srv.py"), exe="/usr/bin/python3.11", cwd="/srv", uid=0,
                   rss=10 << 20, start_time=1.0,
                   open_files=(OpenFile("/srv/data", 3, "r", 100), OpenFile("/var/log/srv.log", 4, "a", 5)),
                   listening=(Listener("inet", "198.18.0.100", 8080), Listener("inet", "0.0.0.0", 9090)),
                   own_pid_namespace=True, tree_ids=(42, 43),
                   established=(Connection("198.18.0.100", 8080, "198.18.0.3", 50000),),
                   devices=("/dev/null",))


def by_kind(rs, kind):
    return [r for r in rs if r.kind == kind]


def test_preference_list_picks_the_first_strategy_that_can_move_the_process():
    s, skipped = strategies.choose(INFO, Options(target="h2"), prefer("stream-copy", "stop-copy"))
    assert s.name == "stream-copy" and skipped == []
    plain = ProcessInfo(**{**INFO.__dict__, "own_pid_namespace": False})
    s, skipped = strategies.choose(plain, Options(target="h2"), prefer("stream-copy", "stop-copy"))
    assert s.name == "stop-copy" and "own PID namespace" in skipped[0]
    s, skipped = strategies.choose(INFO, Options(target="h2", tcp_established=True), prefer("stream-copy", "stop-copy"))
    assert s.name == "stop-copy" and "--tcp-established" in skipped[0]


def test_the_agents_preference_runs_auto_and_a_container_falls_through_to_stop_copy():
    agent = DaemonSettings().strategies
    s, skipped = strategies.choose(INFO, Options(target="h2", preference=agent), prefer("stream-copy"))
    assert s.name == "auto" and skipped == []
    container_refuses = {"stop-copy": None}.get  # what a container subject says: stop-copy only
    s, skipped = strategies.choose(INFO, Options(target="h2", preference=agent), prefer("stream-copy"),
                                   refuses=lambda n: container_refuses(n, "stop-copy only"))
    assert s.name == "stop-copy" and skipped == ["auto: stop-copy only"]


def test_a_pinned_strategy_that_cannot_run_is_refused_with_its_reason():
    s, skipped = strategies.choose(INFO, Options(target="h2", mode="clone", strategy="stream-copy"), prefer("stop-copy"))
    assert s is None and skipped == ["stream-copy: it moves, and --mode clone keeps or restarts the source"]


def test_restart_mode_is_its_own_strategy_whatever_the_preference():
    s, _ = strategies.choose(INFO, Options(target="h2", mode="restart"), prefer("stream-copy"))
    assert s.name == "restart" and "restart" not in strategies.STRATEGIES


def test_journals_without_a_strategy_name_map_to_the_path_they_took():
    assert strategies.recorded(None, True).name == "stream-copy"
    assert strategies.recorded(None, False).name == "stop-copy"
    assert strategies.recorded("stop-copy", True).name == "stop-copy"
    assert strategies.ALL["stream-copy"].keeps_source_stopped and not strategies.ALL["stop-copy"].keeps_source_stopped


def test_binding_model_of_a_plain_move():
    rs = binding.resources(INFO, binding.MoveShape(mode="move", carried=("/var/log/srv.log",)))
    assert by_kind(rs, "memory")[0].mechanism is Mechanism.MOVE
    files = {r.name: r.mechanism for r in by_kind(rs, "file")}
    assert files == {"/srv/data": Mechanism.GLOBAL_REF, "/var/log/srv.log": Mechanism.COPY}
    assert {r.mechanism for r in by_kind(rs, "listening socket")} == {Mechanism.REBIND}
    assert by_kind(rs, "pids")[0].mechanism is Mechanism.REBIND  # own PID namespace
    assert by_kind(rs, "device")[0].binding is binding.Binding.TYPE
    # An established connection cannot follow a plain move: the precheck refuses it.
    assert binding.refusals(rs) == [
        "tcp connection 198.18.0.100:8080 -> 198.18.0.3:50000: an established connection moves only "
        "with --tcp-established (and --move-address of its local address)"]


def test_binding_model_with_the_address_and_connections_moving():
    rs = binding.resources(INFO, binding.MoveShape(mode="move", move_address="198.18.0.100/24",
                                                   tcp_established=True))
    assert binding.refusals(rs) == []
    sockets = {r.name: r.mechanism for r in by_kind(rs, "listening socket")}
    assert sockets == {"198.18.0.100:8080": Mechanism.MOVE, "0.0.0.0:9090": Mechanism.REBIND}
    assert by_kind(rs, "address")[0].mechanism is Mechanism.MOVE
    assert by_kind(rs, "tcp connection")[0].mechanism is Mechanism.MOVE


def test_binding_model_of_a_restart_and_a_clone():
    restart = binding.resources(INFO, binding.MoveShape(mode="restart"))
    assert by_kind(restart, "memory")[0].mechanism is Mechanism.DISCARD
    assert by_kind(restart, "tcp connection")[0].mechanism is Mechanism.DISCARD and not by_kind(restart, "pids")
    clone = binding.resources(INFO, binding.MoveShape(mode="clone"))
    assert by_kind(clone, "memory")[0].mechanism is Mechanism.COPY


def test_binding_rows_survive_the_journal():
    rs = binding.resources(INFO, binding.MoveShape())
    import dataclasses
    assert tuple(binding.from_dict(dataclasses.asdict(r)) for r in rs) == rs
    assert len(binding.table(rs)) == len(rs)


@pytest.mark.parametrize("module", ["migrd.model", "migrd.core.policy", "migrd.core.costmodel",
                                    "migrd.core.binding", "migrd.core.step"])
def test_the_pure_core_imports_nothing_with_io(module):
    code = (f"import sys, {module}; bad = {{'psutil', 'paramiko', 'yaml', 'zstandard', 'subprocess', 'socket'}} "
            f"& set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_target_side_does_not_import_paramiko_psutil_or_the_policy():
    code = ("import sys, migrd.cli.peer, migrd.engine.target; print(sorted({'paramiko', 'psutil', "
            "'migrd.core.policy', 'migrd.core.costmodel'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("spec, message", [
    ({"cmdline": ["true"], "user": "root; rm -rf /"}, "not a user number"),
    ({"cmdline": ["true"], "user": "nobody"}, "not a user number"),
    ({"cmdline": ["true"], "user": 0}, "key 'user'"),
    ({"cmdline": ["true"], "user": ["0"]}, "key 'user'"),
    ({"cmdline": []}, "the command line is empty"),
    ({"cmdline": "true"}, "key 'cmdline'"),
    ({"cmdline": ["true"], "env": {"A": 1}}, "key 'env.A'"),
    ({}, "cmdline"),
    (["true"], "start request"),
    (None, "start request"),
])
def test_a_restart_there_refuses_a_malformed_request_in_one_line(tmp_path, spec, message):
    from migrd.engine import target
    from migrd.errors import InputError

    cfg = Config(state_dir=tmp_path)
    with pytest.raises(InputError, match=message) as e:
        target.start(cfg, "20261130-000000000-abcdef", spec)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "incoming").exists()
