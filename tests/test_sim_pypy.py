"""`migrctl sim --interpreter`: the choice of where a simulation runs, and that a real PyPy child
(`make setup` installs one) gives exactly the results this process gives. No root."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from migrd.adapters import pypy
from migrd.errors import CommandError, InputError
from migrd.sim import POLICIES, SimConfig

SMALL = SimConfig(hosts=20, load=0.9, seed=5, duration=300.0)
LONG = SimConfig(hosts=1000, duration=3600.0)
NOWHERE = Path("/nonexistent/pypy3")


def _installed() -> Path:
    path = pypy.find()
    if path is None:
        pytest.skip(f"no PyPy at {pypy.PREFIX_PYPY} and no $MIGRD_PYPY: run scripts/install-pypy.sh")
    return path


def _numbers(results: dict) -> dict:
    return {n: {k: v for k, v in dataclasses.asdict(r).items() if k not in ("wall_s", "cpu_s")}
            for n, r in results.items()}


def test_the_interpreter_is_chosen_by_name_what_is_installed_and_the_run_s_length(monkeypatch):
    monkeypatch.setattr(pypy, "PREFIX_PYPY", NOWHERE)
    there = {"MIGRD_PYPY": "/x/pypy3"}
    assert isinstance(pypy.runner("python", LONG, there), pypy.InProcess)
    assert pypy.runner("pypy", SMALL, there) == pypy.PyPy(Path("/x/pypy3"))
    if platform.python_implementation() == "CPython":
        assert pypy.runner("auto", LONG, there) == pypy.PyPy(Path("/x/pypy3"))
    assert isinstance(pypy.runner("auto", SMALL, there), pypy.InProcess)  # too short for the JIT
    assert isinstance(pypy.runner("auto", LONG, {}), pypy.InProcess)  # nothing installed
    assert pypy.pays_off(SimConfig(hosts=100, duration=3600.0))  # migrctl sim's default
    assert not pypy.pays_off(SimConfig(hosts=100, duration=600.0))
    with pytest.raises(InputError, match="no PyPy at /nonexistent/pypy3.*install-pypy.sh"):
        pypy.runner("pypy", LONG, {})
    with pytest.raises(InputError, match="one of auto, python, pypy"):
        pypy.runner("jython", LONG, {})


def test_a_pypy_child_gives_the_results_this_process_gives():
    """Every policy, two forked workers inside the child: field for field the same floats."""
    label, there = pypy.PyPy(_installed()).run(SMALL, POLICIES, 2)
    here_label, here = pypy.InProcess().run(SMALL, POLICIES, 1)
    assert label.startswith("PyPy ") and "Python 3." in label
    assert here_label.startswith(platform.python_implementation())
    assert list(there) == list(POLICIES)
    assert _numbers(there) == _numbers(here)


def test_a_child_that_fails_or_answers_nonsense_is_one_clear_error(tmp_path):
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\ncat >/dev/null\necho 'Traceback (most recent call last):' >&2\n"
                       "echo 'SyntaxError: invalid syntax' >&2\nexit 1\n")
    garbage = tmp_path / "garbage"
    garbage.write_text("#!/bin/sh\ncat >/dev/null\necho not a pickle\n")
    for script in (failing, garbage):
        script.chmod(0o700)
    with pytest.raises(CommandError, match="exited 1: SyntaxError: invalid syntax"):
        pypy.PyPy(failing).run(SMALL, ["none"], 1)
    with pytest.raises(CommandError, match="answered the simulation with something unreadable"):
        pypy.PyPy(garbage).run(SMALL, ["none"], 1)
    with pytest.raises(CommandError, match="program not found"):
        pypy.PyPy(NOWHERE).run(SMALL, ["none"], 1)
    with pytest.raises(InputError, match="--load 7"):  # the operator's mistake, said before starting
        pypy.PyPy(garbage).run(dataclasses.replace(SMALL, load=7.0), ["none"], 1)


def test_cli_says_which_interpreter_ran_it():
    _installed()
    argv = [sys.executable, "-m", "migrd.cli", "sim", "--hosts", "10", "--duration", "120",
            "--policy", "migrd", "--jobs", "1", "--json"]
    outs = {}
    for choice in ("python", "pypy"):
        r = subprocess.run([*argv, "--interpreter", choice], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs[choice] = json.loads(r.stdout)
    assert outs["python"]["config"]["interpreter"].startswith("CPython ")
    assert outs["pypy"]["config"]["interpreter"].startswith("PyPy ")
    for out in outs.values():
        del out["config"]["interpreter"]
        for r in out["policies"].values():
            del r["wall_s"], r["cpu_s"]
    assert outs["python"] == outs["pypy"]
