"""runc and Podman containers move between bed hosts: real runtimes, real CRIU, real sshd.

Each bed host has its own runc state (state_dir/runc) and bundles (state_dir/containers), and
its own Podman storage and state (state_dir/podman), all under its private /var/lib/migrd; the
image is the shared local busybox (scripts/build-image.sh), loaded into each host's Podman
storage from one archive.
The container counts in memory and appends each count to /data/counter, a file of the image it
modifies: the file's lines are 0 (the image's content) then 1, 2, 3... without a gap or a
repeat only if both the memory and the rootfs change moved.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workloads import CLIENT, container_counts, container_inits, criu_tables, wait_for
from workloads import marker as run_marker

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed (make setup)"),
              pytest.mark.skipif(not Path("/var/cache/migrd/images/busybox/rootfs").is_dir(),
                                 reason="no busybox image (make setup)")]
BED_HOSTS = 3  # host3: the TCP client outside the hosts a container moves between
PY = sys.executable


@pytest.fixture(scope="module")
def mig(run_in):
    def call(host: str, *args: str, check: bool = True, timeout: float = 120):
        r = run_in(host, PY, "-m", "migrd.cli", *map(str, args), check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"migrctl {' '.join(map(str, args))} on {host} exited "
                                 f"{r.returncode}: {r.stderr.decode()}")
        return r

    return call


def jrun(mig, host: str, command: str, *args: str, **kw):
    return json.loads(mig(host, command, *args, "--json", **kw).stdout)


def running_on(mig, bed, name: str) -> list[str]:
    """The hosts whose `migrctl ps` shows container name running."""
    return [h.name for h in bed.hosts
            if any(r["name"] == name and r.get("kind") == "container" and r["alive"] for r in jrun(mig, h.name, "ps"))]


RUNTIMES = ["runc", pytest.param("podman", marks=pytest.mark.skipif(
    shutil.which("podman") is None or not Path("/var/cache/migrd/images/busybox/podman.tar").is_file(),
    reason="podman or its image not installed (make setup)"))]


@pytest.fixture
def container(mig, bed):
    """Start a counting container on host1; remove it from every host afterwards."""
    names: list[str] = []

    def start(migratable: bool = True, runtime: str = "runc", script: str | None = None) -> tuple[str, str]:
        """script: what the container runs instead of the counter (the caller waits for it)."""
        name = f"ct{int(time.time() * 1000) % 10**8}"
        marker = run_marker(name)
        names.append(name)
        body = script or "i=0; while :; do i=$((i+1)); echo $i >> /data/counter; sleep 0.1; done"
        mig("host1", "container", "run", "--runtime", runtime, *([] if migratable else ["--not-migratable"]),
            name, "--", "sh", "-c", f"{body} # {marker}")
        if script is None:
            wait_for(lambda: len(container_counts(marker)) >= 5, what="container to count")
        return name, marker

    yield start
    for name in names:
        for h in bed.hosts:
            mig(h.name, "container", "rm", name, check=False)


def continues(marker: str, n_new: int = 5) -> list[int]:
    before = len(container_counts(marker))
    wait_for(lambda: len(container_counts(marker)) >= before + n_new, what=f"{marker} to keep counting")
    got = container_counts(marker)
    assert got == list(range(len(got))), f"count went backwards, repeated or restarted: {got[-30:]}"
    return got


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_moves_there_and_back_with_its_rootfs(mig, bed, container, runtime):
    name, marker = container(runtime=runtime)
    assert [r["name"] for r in jrun(mig, "host1", "ps") if r.get("kind") == "container"] == [name]
    times = []
    for here, there in (("host1", "host2"), ("host2", "host1")):
        before = container_counts(marker)
        t0 = time.monotonic()
        res = jrun(mig, here, "migrate", "--container", name, "--to", there)
        times.append({"wall": round(time.monotonic() - t0, 2), "downtime": res["downtime"],
                      "dump": res["dump_seconds"], "transfer": res["transfer_seconds"],
                      "restore": res["restore_seconds"], "bytes": res["bytes"]})
        assert res["strategy"] == "stop-copy" and res["target"] == there
        assert running_on(mig, bed, name) == [there]
        assert not (bed.host(here).dir / "state" / "containers" / name).exists()  # source bundle gone
        got = continues(marker)
        assert got[:len(before)] == before  # the modified file's content came along
        wait_for(lambda: len(container_inits(marker)) == 1, what="exactly one copy")
        assert psutil.Process(container_inits(marker)[0]).status() != psutil.STATUS_STOPPED
        manifest_changes = res["resources"]
        assert any(r["kind"] == "rootfs changes" for r in manifest_changes)
    print(f"{runtime} container moves: {times}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_owners_modes_xattrs_and_special_files_move_with_the_rootfs(mig, bed, container, runtime):
    """A file given an owner, a mode and user.* attributes, a FIFO, a device node and a symlink
    made in the container's rootfs are the same after the move. The container has no
    CAP_CHOWN or CAP_MKNOD and busybox no setfattr, so the owner, the attributes and the
    device node are set from the host through /proc/PID/root: the same files."""
    import os

    name, marker = container(runtime=runtime, script=(
        "echo secret > /data/owned; chmod 0640 /data/owned; mkfifo -m 0620 /data/pipe; ln -s owned /data/link; "
        "i=0; while :; do i=$((i+1)); echo $i >> /data/counter; sleep 0.1; done"))
    wait_for(lambda: len(container_counts(marker)) >= 5, what="container to count")
    root = Path(f"/proc/{container_inits(marker)[0]}/root/data")
    os.chown(root / "owned", 1234, 2345)
    os.setxattr(root / "owned", "user.migrd", b"moved\x00\xff")
    os.chown(root / "pipe", 4321, 0)
    os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    jrun(mig, "host1", "migrate", "--container", name, "--to", "host2")
    assert running_on(mig, bed, name) == ["host2"]
    continues(marker, 3)
    root = Path(f"/proc/{container_inits(marker)[0]}/root/data")
    owned, pipe, null = (os.lstat(root / n) for n in ("owned", "pipe", "null"))
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1234, 2345, 0o640)
    assert os.getxattr(root / "owned", "user.migrd") == b"moved\x00\xff"
    assert (root / "owned").read_text() == "secret\n"
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o620 and pipe.st_uid == 4321
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o600
    assert os.readlink(root / "link") == "owned"


#: Changes no honest source writes, put into the manifest while the migration waits at
#: `transfer`: what the target must refuse before it writes anything.
HOSTILE = {
    "escape": {"path": "../../../../../../../../tmp/migrd-escape-{name}", "change": "added", "kind": "fifo",
               "mode": 0o644},
    "bogus uid": {"path": "data/evil", "change": "added", "kind": "dir", "mode": 0o755, "uid": 2**40},
    "huge xattr": {"path": "data/evil", "change": "added", "kind": "dir", "mode": 0o755,
                   "xattrs": [["user.big", "00" * (1 << 17)]]},
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_hostile_rootfs_changes_are_refused_and_the_container_runs_once(mig, bed, container, hostile, runtime):
    from migrbed import bed as bed_mod
    from migrd.engine.journal import all_journals

    name, marker = container(runtime=runtime)
    p = bed_mod.spawn_in(bed, "host1", ["env", "MIGRD_FAILPOINTS=transfer:delay", PY, "-m", "migrd.cli",
                                        "migrate", "--container", name, "--to", "host2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        state = bed.host("host1").dir / "state"
        journal = wait_for(lambda: next((j for j in all_journals(state) if j.last_state() == "transfer"
                                         and j.merged().get("container", {}).get("name") == name), None),
                           what="the migration to wait at transfer")
        path = journal.dir / "images" / "manifest.json"
        m = json.loads(path.read_text())
        change = {k: (v.format(name=name) if isinstance(v, str) else v) for k, v in HOSTILE[hostile].items()}
        m["rootfs"].append(change)
        path.write_text(json.dumps(m))
        _, err_b = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = err_b.decode()
    assert p.returncode != 0 and "Traceback" not in err and "refusing the container's rootfs changes" in err, err
    print(f"{runtime} {hostile}: {err.strip()}")
    assert not Path(f"/tmp/migrd-escape-{name}").exists()
    wait_for(lambda: running_on(mig, bed, name) == ["host1"], what="the container back on host1")
    wait_for(lambda: len(container_inits(marker)) == 1, what="exactly one copy")
    continues(marker, 3)
    assert not (bed.host("host2").dir / "state" / "containers" / name).exists()


def test_container_not_opted_in_is_refused(mig, bed, container):
    name, marker = container(migratable=False)
    r = mig("host1", "migrate", "--container", name, "--to", "host2", check=False)
    assert r.returncode == 4 and b"not opted in" in r.stderr, r.stderr
    assert running_on(mig, bed, name) == ["host1"]
    continues(marker, 3)


#: Something on host2 that the precheck does not see and the restore trips over: for runc a
#: stale state directory for the name (`runc state` does not see it, `runc restore` refuses:
#: "container ... exists"), for Podman a directory where the container's CRIU config goes.
SABOTAGE = {"runc": "/var/lib/migrd/runc/{}", "podman": "/var/lib/migrd/podman/criu/{}.conf"}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rollback_when_the_target_restore_fails(mig, bed, container, run_in, runtime):
    name, marker = container(runtime=runtime)
    sabotage = SABOTAGE[runtime].format(name)
    run_in("host2", "mkdir", "-p", sabotage)
    try:
        r = mig("host1", "migrate", "--container", name, "--to", "host2", check=False)
        assert r.returncode != 0 and b"restore" in r.stderr, r.stderr
        print(f"rollback after: {r.stderr.decode().strip()}")
        hist = jrun(mig, "host1", "history")
        assert hist[-1]["outcome"] == "rolled back", hist[-1]
        wait_for(lambda: running_on(mig, bed, name) == ["host1"], what="the container back on host1")
        wait_for(lambda: len(container_inits(marker)) == 1, what="exactly one copy")
        continues(marker, 3)
        assert not (bed.host("host2").dir / "state" / "containers" / name).exists()
    finally:
        run_in("host2", "rmdir", sabotage, check=False)


#: failpoint -> (where the one copy runs after, what `migrctl recover` reports after a crash)
FAILPOINTS = {
    ("restore", "error"): ("host1", None),
    ("dumped", "die"): ("host1", "rolled back"),
    ("transfer", "die"): ("host1", "rolled back"),
    ("restore", "die"): ("host1", "rolled back"),
    ("verify", "die"): ("host2", "rolled forward"),
    ("commit", "die"): ("host2", "committed"),
}


@pytest.mark.parametrize("point,kind", list(FAILPOINTS), ids=[f"{p}-{k}" for p, k in FAILPOINTS])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_failpoints_leave_exactly_one_copy(mig, bed, run_in, container, point, kind, runtime):
    where, recovered = FAILPOINTS[point, kind]
    name, marker = container(runtime=runtime)
    r = run_in("host1", "env", f"MIGRD_FAILPOINTS={point}:{kind}", PY, "-m", "migrd.cli", "migrate",
               "--container", name, "--to", "host2", check=False, timeout=120)
    if kind == "die":
        assert r.returncode in (-9, 137), r.stderr
        report = jrun(mig, "host1", "recover")
        assert [x["action"] for x in report if "from" in x][-1].startswith(recovered), report
    else:
        assert r.returncode == 1 and f"failpoint {point}:error".encode() in r.stderr, r.stderr
    wait_for(lambda: running_on(mig, bed, name) == [where], timeout=30, what=f"the container running on {where}")
    wait_for(lambda: len(container_inits(marker)) == 1, timeout=30, what="exactly one copy")
    continues(marker, 3)
    other = "host2" if where == "host1" else "host1"
    assert not (bed.host(other).dir / "state" / "containers" / name).exists()


# The service CLIENT asks (port 8080), in busybox sh: `nc -ll` forks a handler per connection
# that holds it; the count lives only in the init shell's memory. A handler asks for the next
# count by writing the name of its own reply FIFO into /tmp/ask, which the init reads; the FIFOs
# are in the container's rootfs, so they must move with it too.
SERVICE = ("n=0; mkfifo /tmp/ask; nc -ll -p 8080 -e sh -c 'while read x; do f=/tmp/re.$$; mkfifo $f; "
           "echo $f > /tmp/ask; cat $f; rm $f; done' & exec 3<>/tmp/ask; "
           "while read f <&3; do n=$((n+1)); echo $n > $f; done")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_service_keeps_its_address_connections_and_state(mig, bed, run_in, container, tmp_path,
                                                                   runtime):
    """--move-address: new connections reach the moved container at the same address;
    --tcp-established: a connection opened before the move carries on; the count the container
    keeps in memory continues on both."""
    from migrbed import bed as bed_mod

    # One address per runtime: host3's ARP entry for the other test's address still names the
    # host that test moved it to.
    vip = {"runc": "198.18.0.110", "podman": "198.18.0.111"}[runtime]
    run_in("host1", "ip", "addr", "add", f"{vip}/24", "dev", "eth0")
    go = tmp_path / "go"
    client = None
    try:
        name, marker = container(runtime=runtime, script=SERVICE)
        wait_for(lambda: run_in("host3", PY, "-c", CLIENT, vip, "1", "5", check=False).returncode == 0,
                 what="the container's service up")
        client = bed_mod.spawn_in(bed, "host3", [PY, "-c", CLIENT, vip, "3", "20", str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = eval(client.stdout.readline())
        tables_before = criu_tables(run_in, "host1")
        res = jrun(mig, "host1", "migrate", "--container", name, "--to", "host2", "--move-address", f"{vip}/24",
                   "--tcp-established")
        print(f"{runtime} service move: downtime {res['downtime']} s, dump {res['dump_seconds']} s, "
              f"restore {res['restore_seconds']} s, {res['bytes']} bytes")
        assert running_on(mig, bed, name) == ["host2"]
        assert criu_tables(run_in, "host1") <= tables_before  # the dump's network lock is gone
        assert vip.encode() not in run_in("host1", "ip", "-o", "addr", "show").stdout
        assert vip.encode() in run_in("host2", "ip", "-o", "addr", "show").stdout
        fresh = eval(run_in("host3", PY, "-c", CLIENT, vip, "2", "20").stdout)
        assert fresh[0] > first[-1] and fresh[1] == fresh[0] + 1, (first, fresh)
        go.touch()
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        held = eval(out.decode().strip().splitlines()[-1])
        assert held[:3] == first and len(held) == 6 and held == sorted(held) and held[3] > fresh[1], held
        assert len(container_inits(marker)) == 1
    finally:
        if client and client.poll() is None:
            client.kill()
        for host in ("host1", "host2"):
            run_in(host, "ip", "addr", "del", f"{vip}/24", "dev", "eth0", check=False)
