"""Where `migrctl sim` runs a simulation: in this process, or in a PyPy child process.

The simulator is pure Python and spends its time in migrd's own policy code; PyPy's JIT runs
those same modules, unchanged, a few times faster over a long run (docs/sim.md, "Speed"). The
child imports migrd from the same tree as this process, gets the configuration pickled on
stdin and answers with the results pickled on stdout: the same `Result` objects, the same
floats, as an in-process run gives (tests/test_sim_pypy.py compares them).

Run as `pypy3 -m migrd.adapters.pypy` only by `PyPy.run`.
"""

from __future__ import annotations

import os
import pickle
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import migrd
from migrd.adapters import command
from migrd.errors import CommandError, InputError
from migrd.sim import engine
from migrd.sim.engine import Result, SimConfig

#: Where scripts/install-pypy.sh (`make setup`) puts PyPy; $MIGRD_PYPY overrides it.
PREFIX_PYPY = Path("/opt/migrd/pypy/bin/pypy3")
#: --interpreter's choices.
CHOICES = ("auto", "python", "pypy")
#: The JIT compiles a side exit after it has been taken this many times (PyPy's default: 200).
#: The policy's code is branchy (every round takes a different way through a decision), so most
#: of a run is spent in side exits; compiled sooner, the N = 1000 hour ran faster in every
#: alternated pair (bench/sim_interpreters.py, docs/sim.md "Speed"). It changes no result.
JIT_OPTIONS = ("--jit", "trace_eagerness=20")


class Runner(Protocol):
    def run(self, cfg: SimConfig, names: Sequence[str], jobs: int) -> tuple[str, dict[str, Result]]:
        """(what ran the simulation, e.g. "CPython 3.11.2", and each policy's result)."""
        ...


def _this_interpreter() -> str:
    impl = platform.python_implementation()
    if impl == "PyPy":
        pypy = ".".join(map(str, sys.pypy_version_info[:3]))  # type: ignore[attr-defined]
        return f"PyPy {pypy} (Python {platform.python_version()})"
    return f"{impl} {platform.python_version()}"


class InProcess:
    """This interpreter, this process (and its forked workers with jobs > 1)."""

    def run(self, cfg: SimConfig, names: Sequence[str], jobs: int) -> tuple[str, dict[str, Result]]:
        return _this_interpreter(), engine.run(cfg, names, jobs)


@dataclass(frozen=True)
class PyPy:
    """A PyPy interpreter at `path`, for Python >= 3.11 (scripts/install-pypy.sh proves one)."""

    path: Path

    def run(self, cfg: SimConfig, names: Sequence[str], jobs: int) -> tuple[str, dict[str, Result]]:
        cfg.check()  # a bad setting is the operator's, said here rather than from the child
        # Only migrd's own tree on the child's path: this interpreter's site-packages hold
        # CPython builds the simulator does not need.
        env = {**os.environ, "PYTHONPATH": str(Path(migrd.__file__).resolve().parent.parent)}
        cp = command.run([str(self.path), *JIT_OPTIONS, "-m", __name__],
                         input=pickle.dumps((cfg, tuple(names), jobs)), env=env, timeout=None)
        try:
            label, results = pickle.loads(cp.stdout)
        except Exception as e:  # unpickling garbage fails with whatever it hits
            raise CommandError(f"{self.path} answered the simulation with something unreadable "
                               f"({type(e).__name__})") from None
        if not (isinstance(label, str) and isinstance(results, dict)
                and all(isinstance(r, Result) for r in results.values())):
            raise CommandError(f"{self.path} answered the simulation with something other than results")
        return label, results


def find(env: Mapping[str, str] = os.environ) -> Path | None:
    """$MIGRD_PYPY if set, else the prefix install-pypy.sh writes, if there."""
    if given := env.get("MIGRD_PYPY"):
        return Path(given)
    return PREFIX_PYPY if PREFIX_PYPY.exists() else None


#: Rounds of one policy's run (hosts x duration / interval) from which PyPy's JIT has made up
#: for its start and warm-up (bench/sim_interpreters.py measures both sides).
JIT_PAYS_OFF_ROUNDS = 50_000


def pays_off(cfg: SimConfig) -> bool:
    """Is cfg's run long enough for PyPy to finish it sooner than this process?"""
    return cfg.hosts * cfg.duration / cfg.interval >= JIT_PAYS_OFF_ROUNDS


def runner(choice: str, cfg: SimConfig, env: Mapping[str, str] = os.environ) -> Runner:
    """--interpreter: "python" (this process), "pypy" (a PyPy child; an error without one) or
    "auto" (PyPy when there is one, this is not already PyPy and the run is long enough for
    its JIT to pay off, else this process)."""
    if choice not in CHOICES:
        raise InputError(f"--interpreter {choice!r}: one of {', '.join(CHOICES)}")
    if choice == "python" or (choice == "auto" and (platform.python_implementation() == "PyPy"
                                                    or not pays_off(cfg))):
        return InProcess()
    path = find(env)
    if path is not None:
        return PyPy(path)
    if choice == "pypy":
        raise InputError(f"--interpreter pypy: no PyPy at {PREFIX_PYPY} (run `make setup` or "
                         f"scripts/install-pypy.sh, or set MIGRD_PYPY)")
    return InProcess()


def _child() -> None:
    cfg, names, jobs = pickle.load(sys.stdin.buffer)
    results = engine.run(cfg, names, jobs)
    pickle.dump((_this_interpreter(), results), sys.stdout.buffer)


if __name__ == "__main__":
    _child()
