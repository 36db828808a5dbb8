from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import workloads
from workloads import Procs

# Fuzz tests (tests/test_fuzz.py): a quick, reproducible run in `make test`, and many more
# random examples with HYPOTHESIS_PROFILE=fuzz (`make fuzz`).
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("quick", max_examples=100, derandomize=True, database=None, deadline=None,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=5_000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for CRIU and namespaces")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(requires_root)
    if os.getpid() == 1 and os.geteuid() == 0 and any(item.get_closest_marker("root") for item in items):
        # `unshare --pid --fork bash -c 'pytest ...'`: bash execs its last command, and pytest
        # does not reap the orphans a PID namespace's init must, so every process CRIU ends
        # stays a zombie holding its PID, and a bed host restoring that PID fails.
        raise pytest.UsageError(
            "pytest is PID 1 of its PID namespace and would leave the processes CRIU ends as "
            "zombies holding their PIDs (restores on the bed would fail): run it under a shell "
            "that stays PID 1, e.g. unshare --pid --fork --mount-proc bash .ci/run, or "
            "bash -c 'pytest ...; true'")


@pytest.fixture(scope="session", autouse=True)
def _claim_run_dir(tmp_path_factory) -> None:
    """Markers under this run's own temporary directory are this run's (workloads.copies)."""
    workloads.claim_run_dir(tmp_path_factory.getbasetemp())


@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def migrd_config(tmp_path: Path, monkeypatch) -> Path:
    """A config whose state (CRIU logs) lives in the test's temp dir."""
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    monkeypatch.setenv("MIGRD_CONFIG", str(cfg))
    return cfg


@pytest.fixture(scope="module")
def bed(request, tmp_path_factory):
    """A live bed for the test module: real namespaces, cgroups and sshds, torn down at the
    end even on failure. 3 hosts unless the module sets BED_HOSTS; BED_CPU_QUOTAS
    ({"host2": 0.5}) sets quotas. Its root is a temp dir, its name random (parallel runs)."""
    from migrbed import bed as bed_mod

    root = tmp_path_factory.mktemp("bed")
    name = bed_mod.new_name()
    try:
        yield bed_mod.up(name, hosts=getattr(request.module, "BED_HOSTS", 3), root=root,
                         cpu_quotas=getattr(request.module, "BED_CPU_QUOTAS", None))
    finally:
        bed_mod.down(name, root)


@pytest.fixture(scope="module")
def run_in(bed):
    """run_in("host1", "ip", "addr") runs a command inside a bed host; returns the
    CompletedProcess (stdout/stderr as bytes). check=False to look at a failure."""
    from migrbed import bed as bed_mod

    def run(host: str, *argv: str, check: bool = True, timeout: float = 60, input: bytes | None = None):
        return bed_mod.exec_in(bed, host, list(argv), check=check, timeout=timeout, input=input)

    return run


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify_socket(request, tmp_path: Path):
    """(NOTIFY_SOCKET value, the datagram socket bound to it), as systemd sets one up: a
    filesystem path, or an abstract name written with a leading '@'."""
    abstract = request.param
    name = f"@migrd-notify-{os.getpid()}-{os.urandom(4).hex()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name[1:] if abstract else name)
        yield name, s
