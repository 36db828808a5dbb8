"""Containers as candidates (issue 12): a container is one candidate (its cgroup's CPU and
memory, its rootfs changes as its data), opted in by its annotation or label or the allow
rules, priced like a process, named as a container in decisions, and moved through its own
subject; no process inside a container is ever a process candidate. Pure, no root."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from migrd.adapters import cgroup
from migrd.agent import loop as agent_mod
from migrd.config import Config, DaemonSettings, HostEntry, MigrateSettings
from migrd.core import candidates, precheck
from migrd.core.policy import decide, explain
from migrd.engine import census
from migrd.engine import migration as migrate
from migrd.engine.subjects import SUBJECTS
from migrd.errors import InputError, NotPermitted
from migrd.model import PROCESS_TREE, Action, Candidate, Decision, Level, Mode, PolicyConfig, ProcessLoad, SubjectRef
from test_policy import MB, NOW, cand, peer, proc, situation

INIT = 4000
WORKER = 4001


def init(pid: int = INIT, *, user: str = "root", cmdline: tuple[str, ...] = ("sh", "-c", "spin"),
         age: float = 600.0) -> ProcessLoad:
    return dataclasses.replace(proc(pid, share=0.0, rss=1 * MB, age=age, files=7 * MB, exe=2 * MB),
                               cmdline=cmdline, user=user, name="sh")


def sample(name: str = "web", *, pid: int = INIT, kind: str = "runc", labeled: bool = True,
           cpu_s: float = 100.0, mono: float = 50.0, memory: int = 80 * MB, rootfs: int | None = 3 * MB,
           members: tuple[int, ...] = (INIT, WORKER), **kw) -> candidates.ContainerSample:
    return candidates.ContainerSample(name, kind, init(pid, **kw), frozenset(members), labeled,
                                      (f"/migrd-host1-{name}",), mono, cpu_s, memory, rootfs)


def deny(cmdline, user, cgroups) -> str | None:
    return None


def rules(**kw) -> candidates.AllowFn:
    settings = MigrateSettings(**kw)
    return lambda cmdline, user, cgroups: precheck.allowed(settings, cmdline, user, list(cgroups), False)


# --------------------------------------------------------------------------- building candidates


def test_a_container_is_one_candidate_with_its_cgroup_and_rootfs():
    prev, cur = sample(cpu_s=100.0, mono=50.0), sample(cpu_s=101.5, mono=52.0)
    c = candidates.container_candidate(prev, cur, deny)
    assert c.subject == SubjectRef("runc", "web", open_files=False, strategies=("stop-copy",))
    assert c.opted_in  # the annotation
    p = c.proc
    assert (p.pid, p.name, p.user, p.age_s) == (INIT, "web", "root", 600.0)
    assert p.cpu_share == pytest.approx(0.75)  # 1.5 CPU-seconds of its cgroup in 2 s
    assert p.cpu_seconds == 101.5 and p.rss_bytes == 80 * MB
    # Its data are its rootfs changes, not its init's open files or executable.
    assert c.data_size == 3 * MB and p.open_file_bytes == 0 and p.exe_bytes == 0
    assert not c.restartable and c.data_host is None


def test_cpu_rate_without_a_usable_previous_sample_is_the_lifetime_average():
    cur = sample(cpu_s=300.0, mono=52.0)
    assert candidates.cpu_share(None, cur) == pytest.approx(0.5)  # 300 s over 600 s of age
    # The same name with another init (removed and started again) does not share a rate.
    assert candidates.cpu_share(sample(pid=77, cpu_s=0.0, mono=1.0), cur) == pytest.approx(0.5)
    assert candidates.container_candidate(None, sample(rootfs=None), deny).data_size == 0


def test_container_opt_in_by_label_or_allow_rules_applied_to_its_init():
    assert candidates.container_opt_in(sample(), deny) == "io.migrd.migratable=true"
    unlabeled = sample(labeled=False)
    assert candidates.container_opt_in(unlabeled, deny) is None
    assert not candidates.container_candidate(None, unlabeled, deny).opted_in
    assert "allow_users" in candidates.container_opt_in(unlabeled, rules(allow_users=("root",)))
    assert "allow_commands" in candidates.container_opt_in(unlabeled, rules(allow_commands=("spin",)))
    assert "allow_cgroups" in candidates.container_opt_in(unlabeled, rules(allow_cgroups=("/migrd-host1-web",)))
    assert candidates.container_opt_in(unlabeled, rules(allow_users=("alice",))) is None


def test_no_process_of_a_container_is_a_process_candidate():
    """The init and its workers of an opted-in container and of one that is not opted in,
    and of one seen but not measured (`inside`), never become process candidates, even when
    the allow rules (allow_users root) matched them as processes."""
    plain, job = proc(10), proc(11)
    procs = [plain, job, proc(INIT), proc(WORKER), proc(5000), proc(5001), proc(6000)]
    opted = sample("web")
    other = sample("db", pid=5000, labeled=False, members=(5000, 5001))
    out = candidates.build(procs, {11: 1234.0}, [opted, other], {}, rules(allow_users=("root",)),
                           inside=frozenset({6000}))
    as_process = [c.proc.pid for c in out if c.subject == PROCESS_TREE]
    assert as_process == [10, 11]
    assert [c.last_migrated for c in out if c.subject == PROCESS_TREE] == [None, 1234.0]
    containers = {c.subject.name: c for c in out if c.subject != PROCESS_TREE}
    assert set(containers) == {"web", "db"}
    # allow_users root opts the unlabeled container in as a whole (the same rule as
    # `migrctl migrate --container`); without a matching rule it stays a candidate that is not.
    assert containers["db"].opted_in
    alone = candidates.build(procs, {}, [other], {}, deny)
    assert [c.proc.pid for c in alone] == [10, 11, INIT, WORKER, 6000, 5000]
    assert not alone[-1].opted_in and alone[-1].subject.name == "db"
    assert candidates.members([opted, other], frozenset({6000})) == {INIT, WORKER, 5000, 5001, 6000}


def test_build_uses_last_rounds_sample_by_name_for_the_rate():
    prev = {"web": sample(cpu_s=10.0, mono=0.0)}
    (c,) = candidates.build([], {}, [sample(cpu_s=12.0, mono=4.0)], prev, deny)
    assert c.proc.cpu_share == pytest.approx(0.5)


# --------------------------------------------------------------------------- the policy


def container(name: str = "web", *, share: float = 0.9, memory: int = 80 * MB, rootfs: int = 3 * MB,
              labeled: bool = True, pid: int = INIT, age: float = 600.0) -> Candidate:
    cur = sample(name, pid=pid, cpu_s=share * 10.0, mono=10.0, memory=memory, rootfs=rootfs,
                 labeled=labeled, age=age, members=(pid,))
    return candidates.container_candidate(sample(name, pid=pid, cpu_s=0.0, mono=0.0), cur, deny)


def test_the_policy_prices_a_container_like_a_process_and_names_it():
    ct = container()
    d = decide(situation(peers=[peer("b", 0.1)], cands=[ct]), PolicyConfig())
    assert d.action is Action.MIGRATE_WITH_DATA and d.target == "b"
    assert d.subject == ct.subject and d.pid == INIT and d.name == "web"
    # Its memory and its rootfs changes are what travels.
    assert d.estimate is not None and d.estimate.transfer_bytes == 80 * MB + 3 * MB
    text = explain(d)
    assert "migrate_with_data container web (runc, init PID 4000) -> b" in text.splitlines()[0]
    # No rootfs changes: a plain migrate (only its memory travels).
    bare = decide(situation(peers=[peer("b", 0.1)], cands=[container(rootfs=0)]), PolicyConfig())
    assert bare.action is Action.MIGRATE and bare.estimate.transfer_bytes == 80 * MB


def test_the_policy_chooses_between_containers_and_processes_by_gain():
    busy_ct, idle_proc = container(share=0.9), cand(10, share=0.05)
    d = decide(situation(peers=[peer("b", 0.1)], cands=[idle_proc, busy_ct]), PolicyConfig())
    assert d.subject == busy_ct.subject
    busy_proc, idle_ct = cand(10, share=0.9), container(share=0.05)
    d = decide(situation(peers=[peer("b", 0.1)], cands=[busy_proc, idle_ct]), PolicyConfig())
    assert d.subject == PROCESS_TREE and d.pid == 10 and explain(d).splitlines()[0].endswith("PID 10 (job10) -> b")


def test_a_container_not_opted_in_stays_and_its_memory_must_fit_the_target():
    d = decide(situation(peers=[peer("b", 0.1)], cands=[container(labeled=False)]), PolicyConfig())
    assert d.action is Action.STAY and "1 not opted in" in d.reasons and d.subject is None
    # Its cgroup's memory, not its init's resident set, is what the target must hold.
    big = container(memory=8 * 1000 * MB)
    d = decide(situation(peers=[peer("b", 0.1)], cands=[big]), PolicyConfig())
    assert d.action is Action.STAY and any("target lacks memory" in r for r in d.reasons)


def test_best_rejected_names_the_container():
    d = decide(situation(peers=[peer("b", 0.1)], cands=[container(share=0.9, age=6.0)]), PolicyConfig())
    assert d.action is Action.STAY
    assert any("container web (runc, init PID 4000)" in r for r in d.reasons), d.reasons


# --------------------------------------------------------------------------- the agent


def test_a_containers_data_never_becomes_with_files():
    """Its rootfs changes travel with the container; --with-files is for processes."""
    ct = container()
    d = Decision(Action.MIGRATE_WITH_DATA, Mode.OFFLOAD, Level.HIGH, "a", pid=INIT, target="b", subject=ct.subject)
    assert agent_mod.options_for(d, [ct]) == migrate.Options(target="b", mode="move", with_files=False)


def config(tmp_path, **migrate_kw) -> Config:
    return Config(host="a", state_dir=tmp_path / "state",
                  hosts=(HostEntry("a", "198.18.0.1"), HostEntry("b", "198.18.0.2")),
                  policy=PolicyConfig(hold_s=0.0), migrate=MigrateSettings(**migrate_kw),
                  daemon=DaemonSettings(socket=tmp_path / "run" / "s.sock"))


def test_the_agent_moves_the_chosen_container_through_its_subject(tmp_path, monkeypatch):
    from test_agent import FAST, FakeReader, FakeSource, view

    calls = []

    def fake(cfg, ref, pid, opts, progress=None):
        calls.append((ref, pid, opts))
        return migrate.Outcome(id="m1", mode="move", source="a", target=opts.target, pid=pid, target_pid=9,
                               bytes=1, phases={}, downtime=0.1, dry_run=False, strategy="stop-copy")

    monkeypatch.setattr(agent_mod.migrate, "migrate_subject", fake)
    a = agent_mod.Agent(config(tmp_path), env={})
    a.source = FakeSource(2.0)
    a.peers.readers = {"b": FakeReader(view("b", 0.1))}
    ct = container()
    a._candidates = lambda: (ct, cand(10, share=0.05))  # type: ignore[method-assign]
    d = a.round()
    assert d.subject == ct.subject
    assert calls == [(ct.subject, INIT, migrate.Options(target="b", preference=("auto", "stop-copy"),
                                                              link=FAST))]
    (record,) = a.decisions.records()
    assert record["subject"] == {"kind": "runc", "name": "web", "open_files": False, "strategies": ["stop-copy"]}
    assert record["migration"]["outcome"] == "ok"
    rows = a.op_ps(agent_mod.Request("ps"))
    assert {r["subject"]["kind"] for r in rows} == {"runc", "process"}
    monkeypatch.setattr(a, "_resources", lambda d: ())
    text = a.op_explain(agent_mod.Request("explain", container="web"))["text"]
    assert "container web (runc, init PID 4000) -> b" in text.splitlines()[0]
    with pytest.raises(InputError, match="container db is not a candidate"):
        a.op_explain(agent_mod.Request("explain", container="db"))


def test_the_agents_candidates_leave_out_every_process_of_its_containers(tmp_path, monkeypatch):
    """The shell: allow_users root matches every process here, yet the container's members
    (from its census) are neither sampled nor candidates; the container is."""
    me = os.getpid()
    ct = sample("web", pid=me, members=(me, WORKER))
    monkeypatch.setattr(census.ContainerCensus, "take",
                        lambda self: census.Census((ct,), frozenset({6000})))
    a = agent_mod.Agent(config(tmp_path, allow_users=("root", os.environ.get("USER", "nobody"))), env={})
    monkeypatch.setattr(a, "_host_pids", lambda: [me, WORKER, 6000, 1234567])
    monkeypatch.setattr(a, "_allowed", lambda pid: True)
    sampled = []
    monkeypatch.setattr(a.monitor, "sample", lambda pids: sampled.extend(pids) or ())
    out = a._candidates()
    assert sampled == [1234567]
    assert [(c.subject.name, c.proc.pid) for c in out] == [("web", me)]


# --------------------------------------------------------------------------- the engine's side


def test_every_subject_kind_can_be_found_from_a_ref(tmp_path):
    for kind, cls in SUBJECTS.items():
        assert callable(cls.locate) and cls.kind == kind
    with pytest.raises(InputError, match="unknown subject kind 'lxc'"):
        migrate.migrate_subject(config(tmp_path), SubjectRef("lxc", "x"), None, migrate.Options(target="b"))
    with pytest.raises(InputError, match="--with-files is for processes"):
        migrate.migrate_subject(config(tmp_path), SubjectRef("runc", "x", open_files=False), None,
                                migrate.Options(target="b", with_files=True))


class FakeRuntime(census.Runtime):
    """A runtime whose one running container has this test's process as its init."""

    kind = "runc"

    def seen(self, cfg):
        return [census.Seen(self, "me", os.getpid(), True, True, None),
                census.Seen(self, "stopped", 0, False, True, None)]

    def rootfs(self, cfg, name):
        raise AssertionError("no image: not measured")


def test_census_measures_a_containers_cgroup(tmp_path, monkeypatch):
    """The census reads the cgroup of a container's init (here this test's own process, v1
    or v2 alike): its members, CPU and memory."""
    monkeypatch.setattr(census, "RUNTIMES", (FakeRuntime(),))
    got = census.ContainerCensus(config(tmp_path)).take()
    (s,) = got.samples
    assert s.name == "me" and s.kind == "runc" and s.labeled and s.rootfs_bytes is None
    assert os.getpid() in s.members and s.members <= got.inside
    assert s.cpu_seconds > 0 and s.memory_bytes > 0
    assert set(cgroup.pids(cgroup.of_process(os.getpid()))) >= {os.getpid()}


def test_the_process_path_refuses_a_process_of_a_container(tmp_path, monkeypatch):
    """`migrctl migrate PID` (and the agent's process path) never moves a container's init or
    another of its processes on its own."""
    monkeypatch.setattr(census, "RUNTIMES", (FakeRuntime(),))
    cfg = config(tmp_path)
    with subprocess.Popen(["sleep", "30"]) as child:
        try:
            for pid in (os.getpid(), child.pid):
                with pytest.raises(NotPermitted, match=f"PID {pid} belongs to the runc container me: "
                                                       "move the container"):
                    SUBJECTS[PROCESS_TREE.kind].locate(cfg, PROCESS_TREE, pid)
            assert census.container_of(cfg, 2**22 + 1) is None  # no such process
        finally:
            child.kill()


@pytest.mark.root
def test_the_process_path_refuses_when_migrd_has_mounts_of_its_own(tmp_path):
    """migrd in a mount namespace of its own (as a systemd sandbox setting makes it) refuses a
    process of the host's with one line, instead of letting CRIU dump the host's mount tree."""
    try:
        if os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt"):
            pytest.skip("this test runs outside PID 1's mount namespace")
    except PermissionError:
        pytest.skip("PID 1's mount namespace cannot be read here (run it as CI does, in a PID namespace)")
    cfg = config(tmp_path)
    probe = ("import sys\nfrom pathlib import Path\nsys.path.insert(0, 'tests')\n"
             "from test_candidates import config\nfrom migrd.engine.subjects import SUBJECTS\n"
             "from migrd.model import PROCESS_TREE\nfrom migrd.errors import NotPermitted\n"
             "try:\n    SUBJECTS[PROCESS_TREE.kind].locate(config(Path(sys.argv[2])), PROCESS_TREE, int(sys.argv[1]))\n"
             "except NotPermitted as e:\n    print(e)\n")
    with subprocess.Popen(["sleep", "30"], start_new_session=True) as child:
        try:
            assert SUBJECTS[PROCESS_TREE.kind].locate(cfg, PROCESS_TREE, child.pid).info.pid == child.pid
            r = subprocess.run(["unshare", "--mount", "--propagation", "slave", sys.executable, "-c", probe,
                                str(child.pid), str(tmp_path)], capture_output=True, text=True, timeout=60)
            assert r.stdout.startswith("migrd runs in a mount namespace of its own, not the host's that "
                                       f"PID {child.pid} runs in"), r.stdout + r.stderr
        finally:
            child.kill()


@pytest.mark.parametrize("version,files", [
    (1, {"cpuacct": {"cpuacct.usage": "2500000000"}, "memory": {"memory.usage_in_bytes": "4096"}}),
    (2, {"unified": {"cpu.stat": "usage_usec 2500000\nuser_usec 1\n", "memory.current": "4096"}}),
])
def test_a_containers_cpu_and_memory_on_cgroup_v1_and_v2(tmp_path, version, files):
    """The files the census reads, as cgroup v1 (one directory per hierarchy) and v2 lay them out."""
    dirs = []
    for d, content in files.items():
        (tmp_path / d).mkdir()
        for name, text in content.items():
            (tmp_path / d / name).write_text(text)
        dirs.append(tmp_path / d)
    group = cgroup.Group(version, tuple(dirs))
    assert cgroup.cpu_usage_ns(group) == 2_500_000_000 and cgroup.memory_bytes(group) == 4096


def test_a_container_that_arrived_by_migration_is_in_cooldown(tmp_path):
    """The target's commit records the arrival with the init's PID; the census gives it to the
    candidate as last_migrated, and the policy's migration cooldown holds it."""
    from migrd.engine import arrivals
    from migrd.engine.subjects import RuncContainer

    cfg = config(tmp_path)
    RuncContainer.committed_there(cfg, {"subject": "runc", "container": "web", "pid": INIT})
    when = arrivals.arrived(cfg, "runc", "web", INIT)
    assert when is not None and abs(when - time.time()) < 60
    assert arrivals.arrived(cfg, "runc", "web", 77) is None  # another init of that name never moved
    assert arrivals.arrived(cfg, "podman", "web", INIT) is None
    with pytest.raises(InputError):
        arrivals.record(cfg, "runc", "../x", 1, 0.0)

    cur = dataclasses.replace(sample(cpu_s=9.0, mono=10.0), arrived=NOW - 10)
    c = candidates.container_candidate(sample(cpu_s=0.0, mono=0.0), cur, deny)
    assert c.last_migrated == NOW - 10
    d = decide(situation(peers=[peer("b", 0.1)], cands=[c]), PolicyConfig())
    assert d.action is Action.STAY and any("in migration cooldown" in r for r in d.reasons), d.reasons
