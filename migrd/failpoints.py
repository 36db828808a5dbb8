"""Failpoints for testing crash safety: MIGRD_FAILPOINTS="transfer:error,restore:die".

`STEP:error` makes that step raise before it does anything; `STATE:die` makes the process
SIGKILL itself right after the journal recorded STATE (so nothing after it ran, and nothing
got to clean up); `STEP:delay` waits DELAY_SECONDS before the step (a window for tests that
signal a migration in flight). `resumed:error` fails the commit right after the copy on the
target runs. Unset, they cost one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

from .errors import MigrdError

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
