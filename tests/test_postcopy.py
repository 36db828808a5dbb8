"""Post-copy (lazy pages) between bed hosts with migrd.engine.lazy's pieces: real CRIU, real
sshd, every page inside the SSH session. Needs fs.pipe-max-size >= 4 MiB (`make setup`)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from migrbed.programs import COUNTER, read_counts
from migrd.adapters import criu as criu_mod
from migrd.engine.journal import Journal, all_journals
from workloads import copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 2
PY = sys.executable
DRIVER = str(Path(__file__).with_name("postcopy_drive.py"))


@pytest.fixture(scope="module", autouse=True)
def lazy_ready():
    why = criu_mod.lazy_unready_reason({"uffd-noncoop": True}, criu_mod.pipe_max_size())
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def mig(run_in):
    def call(host: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return run_in(host, *prefix, PY, *map(str, args), check=False, timeout=timeout)

    return call


@pytest.fixture
def counter(mig, bed, tmp_path):
    """Start counters with `migrctl run`; afterwards end every copy, and keep the hosts' CRIU
    logs in the test's temp dir (the bed's own go with it)."""
    started: list[Path] = []

    def start(host: str = "host1", *extra: str) -> tuple[int, Path]:
        out = tmp_path / f"count-{len(started)}"
        started.append(out)
        r = mig(host, "-m", "migrd.cli", "run", "--json", "--name", f"c{int(time.time() * 1000) % 10**8}",
                "--", PY, "-c", COUNTER, str(out), *extra)
        assert r.returncode == 0, r.stderr.decode()
        wait_for(lambda: len(read_counts(out)) >= 5, what="counter to start")
        return json.loads(r.stdout)["pid"], out

    yield start
    end_copies(*map(str, started))
    for h in ("host1", "host2"):
        shutil.copytree(bed.host(h).dir / "state" / "logs", tmp_path / f"logs-{h}", dirs_exist_ok=True)


def journal(bed, mid: str) -> Journal:
    return [j for j in all_journals(bed.host("host1").dir / "state") if j.id == mid][0]


def drive(mig, pid: int, env: dict[str, str] | None = None) -> tuple[int, dict]:
    r = mig("host1", DRIVER, pid, "host2", env=env)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"driver exited {r.returncode}: {r.stderr.decode()[-2000:]}") from None


def test_counter_moves_with_lazy_pages(mig, bed, counter):
    pid, out = counter()
    rc, res = drive(mig, pid)
    assert rc == 0, res
    before = len(read_counts(out))
    wait_for(lambda: len(read_counts(out)) >= before + 5, what="counter to go on")
    got = read_counts(out)
    assert got == list(range(1, len(got) + 1))
    assert copies(str(out)) == [res["target_pid"]]
    data = journal(bed, res["id"]).merged()
    assert data["last_page"] >= data["resumed"] - 1
    assert data["pushed_bytes"] + data["on_demand_bytes"] > 0
    assert not (bed.host("host2").dir / "state" / "incoming" / res["id"]).exists()
