"""Pure pieces of the orchestrator: prechecks, opt-in rules, failpoints, journal summaries."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from migrd.engine import failpoints, target
from migrd.adapters import criu, netaddr, procfs
from migrd.core import precheck
from migrd.config import MigrateSettings
from migrd.errors import InputError, MigrdError
from migrd.engine.journal import Journal, summarize
from migrd.model import FileIdentity, ProcessInfo


ASK_KEYS = {f.name for f in dataclasses.fields(precheck.ProcessAsk)}
PROCESS_FACT_KEYS = {f.name for f in dataclasses.fields(precheck.ProcessFacts)}


def req(**kw) -> precheck.Request:
    """A process tree's request; keys of its ask go into the ask."""
    ask = dict(pid=10, start_time=1.0, tree_ids=(10,), own_pid_namespace=False, files=(("/srv/d", 5),))
    ask.update({k: kw.pop(k) for k in list(kw) if k in ASK_KEYS})
    base = dict(id="m1", mode="move", rss=100 << 20, ports=(8080,), carry=(), with_files=False,
                move_address=None, headroom=1.2, ask=precheck.ProcessAsk(**ask))
    base.update(kw)
    return precheck.Request(**base)


def facts_with(base: precheck.TargetFacts, **kw) -> precheck.TargetFacts:
    """base with kw replaced; keys of the process facts go into those."""
    sub = {k: kw.pop(k) for k in list(kw) if k in PROCESS_FACT_KEYS}
    return dataclasses.replace(base, subject=dataclasses.replace(base.subject, **sub), **kw)


GOOD = precheck.TargetFacts(criu_ok=True, criu_message="", cpu_ok=True, cpu_message="",
                            mem_available=8 << 30, disk_free=8 << 30,
                            subject=precheck.ProcessFacts(files={"/srv/d": 5}))


def test_journal_ids_sort_by_start_time():
    from migrd.engine.journal import new_id

    a = new_id()
    time.sleep(0.002)
    b = new_id()
    assert a < b and len(a) == len(b)


def test_all_good_means_go():
    assert precheck.evaluate(req(), GOOD) == []


def test_every_problem_is_named_at_once():
    facts = facts_with(GOOD, criu_ok=False, criu_message="criu check failed", cpu_ok=False,
                                cpu_message="no avx512", mem_available=1 << 20, disk_free=1 << 20,
                                pids_taken={10: "sleep (sleeping)"}, ports_taken=(8080,),
                                files={"/srv/d": None}, incoming_exists=True)
    problems = precheck.evaluate(req(), facts)
    for needle in ["CRIU does not work", "CPU not compatible", "memory available", "free disk",
                   "PID 10 is taken", "8080", "/srv/d does not exist", "already has an incoming"]:
        assert any(needle in p for p in problems), (needle, problems)


def test_own_pid_namespace_ignores_taken_pids_and_carried_files_are_not_required():
    facts = facts_with(GOOD, pids_taken={10: "x"}, files={"/srv/d": None})
    assert precheck.evaluate(req(own_pid_namespace=True, carry=("/srv/d",)), facts) == []


def test_open_file_with_other_size_needs_with_files():
    facts = facts_with(GOOD, files={"/srv/d": 6})
    assert "has size 6 on the target, 5 here" in precheck.evaluate(req(), facts)[0]


LOG = FileIdentity(fsid=7, inode=42, size=5, digest="ab")


def test_shared_growing_file_is_left_to_criu():
    """Same filesystem and inode there, the bytes read here there too: the file grew on shared
    storage between the two looks; CRIU checks its size after the freeze."""
    grown = facts_with(GOOD, files={"/srv/d": 6}, identities={"/srv/d": LOG})
    assert precheck.evaluate(req(identities={"/srv/d": LOG}), grown) == []
    assert precheck.shared(LOG, LOG) and not precheck.shared(LOG, None) and not precheck.shared(None, None)


def test_look_alike_files_are_not_shared():
    """Another inode, another filesystem, or other bytes (a disk cloned from one image, or a
    file rewritten or cut short): the sizes must match as before."""
    for other in (dataclasses.replace(LOG, inode=43), dataclasses.replace(LOG, fsid=8),
                  dataclasses.replace(LOG, digest="cd"), dataclasses.replace(LOG, digest=""), None):
        facts = facts_with(GOOD, files={"/srv/d": 6}, identities={"/srv/d": other})
        assert "has size 6 on the target, 5 here" in precheck.evaluate(req(identities={"/srv/d": LOG}), facts)[0]


def test_a_file_the_target_may_see_already_is_never_copied_onto_itself():
    carried = req(identities={"/srv/d": LOG}, carry=("/srv/d",), with_files=True)
    same = facts_with(GOOD, identities={"/srv/d": LOG})
    assert precheck.not_to_copy(carried, same) == ("/srv/d",) and precheck.evaluate(carried, same) == []
    # Same inode, other bytes: copying would overwrite what may be the very file: refused.
    rewritten = facts_with(same, files={"/srv/d": 6},
                           identities={"/srv/d": dataclasses.replace(LOG, digest="cd")})
    assert precheck.not_to_copy(carried, rewritten) == ("/srv/d",)
    assert "would overwrite it" in precheck.evaluate(carried, rewritten)[0]
    # Another file there: copied as asked.
    other = facts_with(GOOD, files={"/srv/d": None}, identities={"/srv/d": None})
    assert precheck.not_to_copy(carried, other) == () and precheck.evaluate(carried, other) == []


def test_file_identity_follows_the_file_not_its_name(tmp_path):
    log = tmp_path / "log"
    log.write_bytes(b"x" * 10_000)
    here = procfs.file_identity(str(log))
    with open(log, "ab") as f:
        f.write(b"more")
    assert procfs.file_identity(str(log), here.size) == here  # grew: same bytes up to here
    assert procfs.file_identity(str(log)).size == 10_004
    copy = tmp_path / "copy"
    copy.write_bytes(log.read_bytes())
    assert not precheck.same_inode(here, procfs.file_identity(str(copy), here.size))
    log.write_bytes(b"y" * 10_000)  # rewritten in place: same inode, other bytes
    again = procfs.file_identity(str(log), here.size)
    assert precheck.same_inode(here, again) and not precheck.shared(here, again)
    log.write_bytes(b"x" * 10)  # cut short
    assert procfs.file_identity(str(log), here.size).digest == ""
    os.mkfifo(tmp_path / "fifo")  # never blocks on a path that is no regular file there
    assert procfs.file_identity(str(tmp_path / "fifo")) is None
    assert procfs.file_identity(str(tmp_path / "absent")) is None


def _wire(r: precheck.Request) -> dict:
    """The request as the target reads it."""
    return json.loads(json.dumps(dataclasses.asdict(r)))


def _through_json(r: precheck.Request) -> precheck.Request:
    return target.parse_precheck(_wire(r))


def test_each_ask_round_trips_through_json():
    r = req(identities={"/srv/d": LOG}, cpuinfo="AA==")
    assert _through_json(r) == r and isinstance(_through_json(r).ask, precheck.ProcessAsk)
    c = req(ask=precheck.ContainerAsk("web", "podman", "busybox", "d1", "abc"))
    assert _through_json(c) == c and isinstance(_through_json(c).ask, precheck.ContainerAsk)


def _hostile(**ask_changes: object) -> dict:
    """A container's request with ask_changes made to its ask."""
    d = _wire(req(ask=precheck.ContainerAsk("web", "runc", "busybox", "d1")))
    d["ask"].update(ask_changes)
    return d


@pytest.mark.parametrize("ask, message", [
    ({"kind": "vm"}, "key 'ask.kind': expected one of 'process', 'container', got 'vm'"),
    ({"kind": ["container"]}, "key 'ask.kind': expected one of 'process', 'container', got a list"),
    ({"kind": None}, "key 'ask.kind': expected one of 'process', 'container', got null"),
    ({"pid": 1}, "key 'ask.pid' does not belong to kind 'container'"),
    ({"kind": "process", "pid": 1, "start_time": 0, "tree_ids": [1], "own_pid_namespace": False,
      "files": []}, "key 'ask.image' does not belong to kind 'process'"),
    ({"name": 7}, "key 'ask.name': expected a string, got 7"),
    ({"image_id": True}, "key 'ask.image_id': expected a string, got true"),
])
def test_a_hostile_ask_is_refused_with_one_line(ask, message):
    with pytest.raises(InputError) as e:
        target.parse_precheck(_hostile(**ask))
    assert str(e.value) == f"precheck request: {message}"


@pytest.mark.parametrize("raw, message", [
    ({"kind": "process"}, "key 'ask.pid' is missing"),
    ({"pid": 1}, "key 'ask.kind' is missing"),
    ([], "key 'ask': expected an object, got a list"),
    (None, "key 'ask': expected an object, got null"),
    ({"kind": "process", "pid": "1", "start_time": 0, "tree_ids": [], "own_pid_namespace": False, "files": []},
     "key 'ask.pid': expected an integer, got '1'"),
    ({"kind": "process", "pid": 1, "start_time": 0, "tree_ids": [], "own_pid_namespace": False,
      "files": [["/a", "big"]]}, "key 'ask.files[0][1]': expected an integer, got 'big'"),
])
def test_a_malformed_ask_is_refused_with_one_line(raw, message):
    with pytest.raises(InputError) as e:
        target.parse_precheck(_wire(req()) | {"ask": raw})
    assert str(e.value) == f"precheck request: {message}"


def test_a_cpuinfo_that_is_not_base64_is_refused_with_one_line():
    with pytest.raises(InputError) as e:
        target.parse_precheck(_wire(req(cpuinfo="A=")))
    assert str(e.value) == "precheck request: key 'cpuinfo': not base64"


def test_the_target_gathers_facts_by_the_kind_of_ask(tmp_path):
    from migrd.config import Config

    cfg = Config()
    unknown = target.subject_facts(precheck.ContainerAsk("web", "lxc", "busybox", "d1"), cfg, "move")
    assert unknown == precheck.ContainerFacts(runtime_ok=False, runtime_message="unknown runtime 'lxc'")
    # A process tree is no container runtime, whatever the request says.
    assert not target.subject_facts(precheck.ContainerAsk("web", "process", "busybox", "d1"), cfg, "move").runtime_ok
    held = tmp_path / "held"
    held.write_bytes(b"12345")
    me = os.getpid()
    ask = precheck.ProcessAsk(pid=me, start_time=procfs.start_time(me), tree_ids=(me,), own_pid_namespace=False,
                              files=((str(held), 5), (str(tmp_path / "absent"), 1)))
    moved = target.subject_facts(ask, cfg, "move")
    # This very process holds its PIDs here (hosts sharing one PID space): free once it moved.
    assert moved == precheck.ProcessFacts(files={str(held): 5, str(tmp_path / "absent"): None})
    assert me in target.subject_facts(ask, cfg, "clone").pids_taken


def test_restart_mode_needs_no_criu():
    facts = facts_with(GOOD, criu_ok=False, cpu_ok=False, disk_free=0)
    assert precheck.evaluate(req(mode="restart"), facts) == []


def test_move_address_must_be_free_and_routable_on_target():
    facts = facts_with(GOOD, address_present=True, address_interface=None)
    problems = precheck.evaluate(req(move_address="198.18.0.100/24"), facts)
    assert len(problems) == 2


INFO = ProcessInfo(pid=10, cmdline=("python3", "batch.py"), exe="/usr/bin/python3", cwd="/",
                   uid=1000, rss=1, start_time=1.0)


@pytest.mark.parametrize("settings, user, cgroups, registered, allowed", [
    (MigrateSettings(), "alice", [], False, False),
    (MigrateSettings(), "alice", [], True, True),
    (MigrateSettings(allow_users=("alice",)), "alice", [], False, True),
    (MigrateSettings(allow_commands=(r"batch\.py$",)), "bob", [], False, True),
    (MigrateSettings(allow_commands=(r"^nginx",)), "bob", [], False, False),
    (MigrateSettings(allow_cgroups=("/batch.slice",)), "bob", ["/batch.slice/job1"], False, True),
    (MigrateSettings(allow_cgroups=("/batch.slice",)), "bob", ["/batch.slicer"], False, False),
])
def test_opt_in_rules(settings, user, cgroups, registered, allowed):
    assert (precheck.opt_in(settings, INFO, user, cgroups, registered) is not None) == allowed


def test_failpoint_parsing_and_error(monkeypatch):
    assert failpoints.parse("transfer:error, commit:die, verify:delay") == \
        {"transfer": "error", "commit": "die", "verify": "delay"}
    with pytest.raises(MigrdError, match="kind must be one of"):
        failpoints.parse("transfer:boom")
    monkeypatch.setenv(failpoints.ENV, "restore:error")
    failpoints.step("transfer")
    with pytest.raises(MigrdError, match="failpoint restore:error"):
        failpoints.step("restore")


def test_journal_summary_and_torn_last_line(tmp_path):
    j = Journal(tmp_path / "20260101-000000-abc")
    j.record("precheck", request={"pid": 7, "target": "h2", "mode": "move"}, source="h1")
    j.record("checkpoint")
    j.record("transfer", dump_seconds=0.1)
    j.record("restore", bytes=1234)
    j.record("verify", target_pid=9)
    j.record("commit")
    j.record("resumed", downtime=0.5)
    j.record("done", outcome="ok")
    with open(j.path, "a") as f:
        f.write('{"state": "tor')  # a crash mid-write must not hide what came before
    s = summarize(j)
    assert (s.pid, s.source, s.target, s.outcome, s.bytes, s.downtime, s.target_pid) == \
        (7, "h1", "h2", "ok", 1234, 0.5, 9)
    assert set(s.phases) == {"precheck", "checkpoint", "transfer", "restore", "verify", "commit"}
    assert j.last_state() == "done"
    json.dumps(dataclasses.asdict(s))


def test_journal_lock_is_exclusive(tmp_path):
    import os

    j = Journal(tmp_path / "m")
    fd = j.lock()
    assert fd is not None
    assert j.lock(blocking=False) is None
    os.close(fd)
    fd2 = j.lock(blocking=False)
    assert fd2 is not None
    os.close(fd2)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ""])
def test_peer_restore_refuses_a_workload_name_that_is_a_path(tmp_path, monkeypatch, name):
    """`peer restore --name ../x` would register the workload outside workloads/: refused with
    the workload-name rule (exit 3) before anything is restored or written."""
    from click.testing import CliRunner

    from migrd.cli import main

    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    monkeypatch.setenv("MIGRD_CONFIG", str(cfg))
    r = CliRunner().invoke(main, ["peer", "restore", "m1", "--name", name, "--json"])
    assert r.exit_code == 3, r.output
    assert f"workload name {name!r}" in r.output
    assert not (tmp_path / "state").exists() and not (tmp_path / "x.json").exists()


def test_dump_tables_are_found_by_the_run_id_in_the_inventory():
    """Only the table named after this dump's run id is ours: another migration's CRIU table
    and every other table stay (a before/after difference would take them all)."""
    ours, theirs = "4b1f0c1e-8a52-4d5e-9c55-0e2f2b7f3a10", "9d0e6a2c-1c1b-4f7e-8a0d-5b2c3d4e5f60"
    inventory = b"\x08\x02\x12$" + ours.encode() + b"\x18\x01"
    tables = {f"inet CRIU-{ours}", f"inet CRIU-{theirs}", "inet filter", "inet CRIU-"}
    assert netaddr.tables_of_dump(tables, inventory) == [f"inet CRIU-{ours}"]
    assert netaddr.tables_of_dump(tables, b"") == []


NOBODY = (65534,) * 6


def test_criu_dumps_as_the_service_user_only_when_root_cannot_read_its_limits():
    no_sys_resource = 0x1fffeffffff  # root in a container: every capability but CAP_SYS_RESOURCE
    assert criu.dump_user([NOBODY, NOBODY], no_sys_resource) == (65534, 65534)
    assert criu.dump_user([NOBODY], no_sys_resource | 1 << criu.CAP_SYS_RESOURCE) is None  # root can
    assert criu.dump_user([(0,) * 6], no_sys_resource) is None
    assert criu.dump_user([NOBODY, (0,) * 6], no_sys_resource) is None  # two users: no one ID fits
    assert criu.dump_user([(1000, 1000, 0, 1000, 1000, 1000)], no_sys_resource) is None  # saved root
    assert criu.dump_user([], no_sys_resource) is None


def test_criu_as_user_keeps_the_capabilities_root_has():
    prefix = criu.as_user_prefix(65534, 65534, 0b1011, 3)
    assert prefix[:4] == ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    assert "--inh-caps=+all,-cap_2" in prefix and "--ambient-caps=+all,-cap_2" in prefix
    assert prefix[-1] == "--"


def test_unprivileged_pid_namespace_init_cannot_get_a_proc():
    def status(nspid: str, caps: int) -> str:
        return f"Name:\tpython3\nNSpid:\t{nspid}\nCapEff:\t{caps:016x}\n"

    assert procfs.proc_unreachable(status("4242\t1", 0))
    assert not procfs.proc_unreachable(status("4242\t1", 1 << procfs.CAP_SYS_ADMIN))  # root init
    assert not procfs.proc_unreachable(status("4242", 0))  # host PID space: /proc is its own
    assert not procfs.proc_unreachable(status("4242\t7", 0))  # not the init
