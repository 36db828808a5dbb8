"""Failpoints for testing crash safety: MIGRD_FAILPOINTS="transfer:error,restore:die".

`STEP:error` makes that step raise before it does anything; `STATE:die` makes the process
SIGKILL itself right after the journal recorded STATE (so nothing after it ran, and nothing
got to clean up); `STEP:delay` waits DELAY_SECONDS before the step (a window for tests that
signal a migration in flight). Two points inside the checkpoint step reach where a step
boundary cannot: `dumping:die` kills the orchestrator while CRIU dumps (CRIU carries on,
orphaned, holding the migration's lock), `dumped:die` once CRIU finished but before the
manifest is written. `resumed:error` fails the commit right after the copy on the
target runs. `relay:delay` holds every piece of post-copy page traffic the source relays, so
that pages are still to come after the switch. Unset, they cost one dict lookup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator


from migrd.adapters import procfs
from migrd.errors import MigrdError

ENV = "MIGRD_FAILPOINTS"
KINDS = ("error", "die", "delay")
DELAY_SECONDS = 5.0


def parse(spec: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, kind = item.partition(":")
        if kind not in KINDS:
            raise MigrdError(f"{ENV}: {item!r}: kind must be one of {', '.join(KINDS)}")
        points[name] = kind
    return points


def _active() -> dict[str, str]:
    return parse(os.environ.get(ENV, ""))


def step(name: str) -> None:
    """Call at the start of a step."""
    kind = _active().get(name)
    if kind == "error":
        raise MigrdError(f"failpoint {name}:error triggered")
    if kind == "delay":
        time.sleep(DELAY_SECONDS)


def after_state(name: str) -> None:
    """Call right after a journal state was made durable."""
    if _active().get(name) == "die":
        os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
    """Call at a named point inside a step: any kind acts there."""
    kind = _active().get(name)
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    step(name)


@contextlib.contextmanager
def dying_while(name: str) -> Iterator[None]:
    """Around a call that runs one program as our child: `NAME:die` SIGKILLs this process as
    soon as that child runs the program, so it carries on without us."""
    if _active().get(name) == "die":
        threading.Thread(target=_die_once_child_runs, daemon=True).start()
    yield


def _die_once_child_runs() -> None:
    me = os.getpid()
    ours = procfs.cmdline(me)
    while True:
        for child in procfs.children(me):
            if procfs.cmdline(child) not in (ours, []):  # past exec, not a fork of us any more
                os.kill(me, signal.SIGKILL)
        time.sleep(0.001)
