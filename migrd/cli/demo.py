"""`migrctl demo`: a process moves across a 3-host bed and carries on counting."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil

from .. import bed as bed_mod
from ..journal import STEPS
from ..workloads import COUNTER, read_counts
from .common import human_bytes, require_root

ROUTE = ("host1", "host2", "host3", "host1")


def _wait_counts(path: Path, at_least: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(counts := read_counts(path)) < at_least:
        if time.monotonic() > deadline:
            raise click.ClickException(f"the demo counter stopped writing to {path}")
        time.sleep(0.05)
    return counts


@click.command()
@click.option("--keep", is_flag=True, help="Leave the bed up afterwards (remove it with `migrctl bed down --name NAME`).")
def demo(keep: bool) -> None:
    """Move a running process around a 3-host bed and watch it keep its state.

    Builds an embedded bed (three network-namespace hosts, each with its own sshd, config,
    state and data directories), starts a counter on host1 with `migrctl run` (it appends
    1, 2, 3, ... to a file, 20 per second), then migrates it host1 -> host2 -> host3 -> host1
    with `migrctl migrate` run inside the source host, exactly as on real machines. After each
    move it shows the phases, downtime and bytes moved, and that the count went on from where
    it was frozen instead of starting again. The bed is removed at the end.
    """
    require_root("migrctl demo")
    step = lambda text: click.secho(f"\n==> {text}", bold=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="migrd-demo-") as tmp:
        root = bed_mod.default_root() if keep else Path(tmp) / "bed"
        name = bed_mod.new_name("demo")
        step(f"building bed {name!r}: 3 hosts on 198.18.0.1-3, each with its own sshd")
        t0 = time.monotonic()
        state = bed_mod.up(name, hosts=3, root=root)
        click.echo(f"up in {time.monotonic() - t0:.1f} s")
        out = Path(tmp) / "count.txt"
        try:
            def migrctl(host: str, *args: str) -> dict:
                r = bed_mod.exec_in(state, host, [sys.executable, "-m", "migrd.cli", *args],
                                    check=False, timeout=300)
                if r.returncode != 0:
                    raise click.ClickException(f"migrctl {args[0]} on {host}: "
                                               f"{r.stderr.decode(errors='replace').strip()}")
                return json.loads(r.stdout)

            step("host1: migrctl run -- python3 -c COUNTER (its own PID namespace)")
            w = migrctl("host1", "run", "--json", "--name", "counter", "--",
                        sys.executable, "-c", COUNTER, str(out))
            pid = w["pid"]
            counts = _wait_counts(out, 20)
            click.echo(f"PID {pid} on host1 is counting: ... {', '.join(map(str, counts[-5:]))}")

            for src, dst in zip(ROUTE, ROUTE[1:]):
                step(f"{src}: migrctl migrate {pid} --to {dst}")
                res = migrctl(src, "migrate", "--json", str(pid), "--to", dst)
                frozen = len(read_counts(out))
                for phase in STEPS:
                    if phase in res["phases"]:
                        click.echo(f"  {phase:10} {res['phases'][phase]:6.2f} s")
                click.echo(f"  moved {human_bytes(res['bytes'])}; downtime {res['downtime']:.2f} s; "
                           f"now PID {res['target_pid']} on {dst}")
                pid = res["target_pid"]
                counts = _wait_counts(out, frozen + 10)
                if counts != list(range(1, len(counts) + 1)):
                    raise click.ClickException("the count did not continue where it was frozen")
                click.echo(f"  the counter carries on: ... {', '.join(map(str, counts[frozen - 2:frozen + 4]))} ...")
                alive = [p.pid for p in psutil.process_iter(["cmdline", "name"])
                         if p.info["name"] != "unshare" and str(out) in (p.info["cmdline"] or [])]
                click.echo(f"  live copies: {len(alive)} (PID {', '.join(map(str, alive))})")

            step("migrctl history on each host (a migration is recorded where it started)")
            for host in ROUTE[:-1]:
                for h in migrctl(host, "history", "--json"):
                    click.echo(f"  {host}: {h['id']}  PID {h['pid']} -> {h['target']}: {h['outcome']}, "
                               f"downtime {h['downtime']:.2f} s")
            click.secho(f"\nOK: one process, three hosts, {len(read_counts(out))} counts without a gap.",
                        fg="green")
        finally:
            for p in psutil.process_iter(["cmdline"]):
                if str(out) in (p.info["cmdline"] or []):
                    p.kill()
            if keep:
                click.echo(f"\nbed {name!r} left up: `migrctl bed status --name {name}`, "
                           f"`migrctl bed down --name {name}`")
            else:
                bed_mod.down(name, root)
