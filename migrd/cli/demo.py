"""`migrctl demo`: watch a real process being checkpointed and restored with its state."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil

from .. import checkpoint as cp
from ..workloads import COUNTER, MARK, read_counts
from .common import human_bytes, load_config, require_root


def _wait_counts(path: Path, at_least: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(counts := read_counts(path)) < at_least:
        if time.monotonic() > deadline:
            raise click.ClickException(f"the demo counter stopped writing to {path}")
        time.sleep(0.05)
    return counts


def _end(pid: int) -> None:
    """End the demo's own counter (checked by its marker, never a stranger's PID)."""
    try:
        p = psutil.Process(pid)
        if any(MARK in part for part in p.cmdline()):
            p.kill()
    except psutil.NoSuchProcess:
        pass


@click.command()
def demo() -> None:
    """Checkpoint a counting process with CRIU, restore it, and show it counting on.

    Starts a small counter (it appends 1, 2, 3, ... to a file, 20 per second), checkpoints it
    (the process is gone afterwards), shows the image and its manifest, restores it from the
    image, and shows the count continuing from the checkpointed value instead of from 1.
    """
    require_root("migrctl demo")
    cfg = load_config()
    step = lambda text: click.secho(f"\n==> {text}", bold=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="migrd-demo-") as tmp:
        work = Path(tmp)
        out = work / "count.txt"
        step("starting a counter process")
        p = subprocess.Popen([sys.executable, "-c", COUNTER, str(out)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        restored: int | None = None
        try:
            counts = _wait_counts(out, 20)
            click.echo(f"PID {p.pid} is counting: ... {', '.join(map(str, counts[-5:]))}")

            step(f"checkpointing PID {p.pid} with CRIU")
            result = cp.checkpoint(cfg, p.pid, work / "images")
            p.wait(timeout=10)  # CRIU ended it; collect the zombie so its PID is free again
            frozen = read_counts(out)[-1]
            m = result.manifest
            click.echo(f"dump took {result.dump_seconds:.2f} s; the process is gone "
                       f"(last value written: {frozen})")
            click.echo(f"image: {len(m.files)} files, {human_bytes(m.image_bytes)} in {result.images}")
            click.echo(f"manifest: CRIU {m.criu_version} on {m.host}; process {m.process.pid} "
                       f"{' '.join(m.process.cmdline[:2])[:40]}..., RSS {human_bytes(m.process.rss)}")
            for name, entry in sorted(m.files.items(), key=lambda kv: -kv[1].size)[:3]:
                click.echo(f"  {name:24} {human_bytes(entry.size):>10}  sha256 {entry.sha256[:16]}...")
            time.sleep(1)
            if read_counts(out)[-1] != frozen:
                raise click.ClickException("the checkpointed process kept running")
            click.echo(f"one second later the file still ends at {frozen}: nothing is running")

            step("restoring from the image")
            r = cp.restore(cfg, result.images)
            restored = r.pid
            click.echo(f"restored as PID {r.pid} in {r.seconds:.2f} s")
            counts = _wait_counts(out, len(read_counts(out)) + 20)
            after = counts[counts.index(frozen) + 1:][:5] if frozen in counts else counts[-5:]
            click.echo(f"the counter carries on: {frozen} -> {', '.join(map(str, after))} ...")
            if counts != list(range(1, len(counts) + 1)):
                raise click.ClickException("the count did not continue from the checkpoint")
            click.secho(f"\nOK: the restored process continued from {frozen}, not from 1.", fg="green")
        finally:
            _end(p.pid)
            if restored:
                _end(restored)
            p.poll()
