"""A one-line progress bar on stderr for long transfers: bytes, rate, ETA.

It appears only after the transfer has run for a second (short ones stay silent) and only when
stderr is a terminal; `--json` callers pass enabled=False.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render(label: str, done: int, total: int, elapsed: float, width: int = 24) -> str:
    """The bar line (pure): label [#####.....]  42%  120.0 MiB/300.0 MiB  95.3 MB/s  ETA 2 s"""
    frac = min(done / total, 1.0) if total > 0 else 1.0
    filled = int(frac * width)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else "      "
    return (f"{label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:3.0f}%  "
            f"{human_bytes(done)}/{human_bytes(total)}  {rate / 1e6:.1f} MB/s  {eta}")


class Progress:
    """Callable as progress(done, total); close() ends the line."""

    def __init__(self, label: str, enabled: bool | None = None, stream: TextIO | None = None,
                 delay: float = 1.0, interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.delay = delay
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        elapsed = now - self.start
        if elapsed < self.delay or (now - self._last < self.interval and done < total):
            return
        self._last = now
        self.stream.write("\r" + render(self.label, done, total, elapsed))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
