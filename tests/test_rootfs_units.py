"""Pure rules of container moves: what changed in a rootfs, what a target's facts refuse."""

from __future__ import annotations

import dataclasses

from migrd.core import precheck
from migrd.core.rootfs import Change, Entry, changes, safe_path
from migrd.engine.subjects import RuncContainer
from migrd.model import ContainerInfo, ProcessInfo

BASE = {
    "bin": Entry("dir", 0o755),
    "bin/sh": Entry("link", 0o777, target="/bin/busybox"),
    "etc": Entry("dir", 0o755),
    "etc/motd": Entry("file", 0o644, 5, "aa"),
    "etc/old": Entry("dir", 0o755),
    "etc/old/x": Entry("file", 0o644, 1, "bb"),
}


def test_added_modified_and_deleted_are_all_found_parents_first():
    now = {k: v for k, v in BASE.items() if not k.startswith("etc/old")}
    now["etc/motd"] = Entry("file", 0o644, 9, "cc")            # modified content
    now["bin/sh"] = Entry("link", 0o777, target="/bin/dash")     # modified link
    now["data"] = Entry("dir", 0o700)
    now["data/new"] = Entry("file", 0o600, 3, "dd")
    got = changes(BASE, now)
    assert [(c.path, c.change) for c in got] == [
        ("etc/old", "deleted"),  # only the top of a deleted subtree
        ("bin/sh", "modified"), ("data", "added"), ("data/new", "added"), ("etc/motd", "modified")]


def test_unchanged_tree_and_mode_change():
    assert changes(BASE, dict(BASE)) == ()
    now = dict(BASE, **{"etc/motd": Entry("file", 0o600, 5, "aa")})
    assert changes(BASE, now) == (Change("etc/motd", "modified", "file", 0o600, 5, "aa"),)


def test_paths_from_another_host_must_stay_inside():
    assert safe_path("etc/motd")
    assert not any(safe_path(p) for p in ("", "/etc/motd", "../x", "etc/../../x", "etc//x", "./x"))


INFO = ProcessInfo(pid=10, cmdline=("sh",), exe="/bin/busybox", cwd="/", uid=0, rss=1 << 20,
                   start_time=1.0, own_pid_namespace=True, tree_ids=(10, 11))
CT = ContainerInfo("web", "runc", "busybox", "d1", "/b/web", {}, True)
REQ = precheck.Request(id="m", mode="move", pid=10, start_time=1.0, rss=1 << 20, tree_ids=(10, 11),
                       own_pid_namespace=True, ports=(), files=(("/data/x", 1),), carry=(), with_files=False,
                       move_address=None, headroom=1.2)
FACTS = precheck.TargetFacts(criu_ok=True, criu_message="", cpu_ok=True, cpu_message="",
                             mem_available=1 << 30, disk_free=1 << 30)


def test_container_request_leaves_out_host_pids_and_files():
    req = RuncContainer(INFO, CT).precheck_request(REQ)
    assert req.tree_ids == () and req.files == ()
    assert req.container == precheck.ContainerAsk("web", "runc", "busybox", "d1")


def test_container_precheck_refusals():
    req = RuncContainer(INFO, CT).precheck_request(REQ)
    ok = precheck.ContainerFacts(runtime_ok=True, image_digest="d1")
    assert precheck.evaluate(req, dataclasses.replace(FACTS, container=ok)) == []
    bad = precheck.ContainerFacts(runtime_ok=False, runtime_message="no runc", image_digest="other",
                                  name_taken=True, loopback_up=False)
    problems = precheck.evaluate(req, dataclasses.replace(FACTS, container=bad))
    assert len(problems) == 4 and "differs" in problems[1] and "exists on the target" in problems[2]
    missing = precheck.evaluate(req, dataclasses.replace(FACTS, container=precheck.ContainerFacts(runtime_ok=True)))
    assert missing == ["image busybox is not on the target (run `make setup` there)"]
    assert precheck.evaluate(req, FACTS) == ["the target did not check container web"]


def test_container_moves_by_stop_copy_only():
    from migrd.config import Config, MigrateSettings
    from migrd.engine import strategies
    from migrd.engine.migration import Options

    def prefer(*names: str) -> Config:
        return Config(migrate=MigrateSettings(strategies=names))

    subject = RuncContainer(INFO, CT)
    s, skipped = strategies.choose(INFO, Options(target="h2"), prefer("stream-copy", "postcopy", "stop-copy"),
                                   refuses=lambda n: subject.refuses(n, "move"))
    assert s is not None and s.name == "stop-copy" and len(skipped) == 2
    s, skipped = strategies.choose(INFO, Options(target="h2", mode="clone"), prefer("stop-copy"),
                                   refuses=lambda n: subject.refuses(n, "clone"))
    assert s is None and "--mode clone" in skipped[0]


def test_podman_needs_the_very_image_id_there():
    from migrd.engine.subjects import PodmanContainer

    ct = dataclasses.replace(CT, runtime="podman", image_id="abc")
    req = PodmanContainer(INFO, ct).precheck_request(REQ)
    assert req.container == precheck.ContainerAsk("web", "podman", "busybox", "d1", "abc")
    same = precheck.ContainerFacts(runtime_ok=True, image_digest="d1", image_id="abc")
    assert precheck.evaluate(req, dataclasses.replace(FACTS, container=same)) == []
    other = dataclasses.replace(same, image_id="def")
    assert precheck.evaluate(req, dataclasses.replace(FACTS, container=other)) == [
        "podman's image busybox on the target has another ID than the source's"]
