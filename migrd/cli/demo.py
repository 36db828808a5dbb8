"""`migrctl demo`: a process moves across a 3-host bed and carries on counting."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil

import dataclasses

from migrbed import bed as bed_mod
from migrd.adapters import cgroup
from migrd import config as config_mod
from migrd.engine.journal import STEPS
from migrd.model import PolicyConfig, Watermarks
from migrbed.programs import BUSY, COUNTER, read_counts
from migrd.cli.common import human_bytes, require_root

ROUTE = ("host1", "host2", "host3", "host1")

#: Thresholds for a demo that should take seconds, not minutes (the defaults hold 30 s). A
#: process may move again 30 s after it arrived: a host that was sent too much can pass some on
#: within the demo's 90 s.
DEMO_POLICY = PolicyConfig(
    load=Watermarks(high=2.0, low=0.5), util=Watermarks(high=0.9, low=0.3),
    run_queue=Watermarks(high=1.5, low=0.5), hold_s=2.0, host_cooldown_s=4.0,
    process_cooldown_s=30.0, min_age_s=2.0, min_gain=0.5, min_gain_ratio=0.05)
BUSY_WORKLOADS = 4


def _wait_counts(path: Path, at_least: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(counts := read_counts(path)) < at_least:
        if time.monotonic() > deadline:
            raise click.ClickException(f"the demo counter stopped writing to {path}")
        time.sleep(0.05)
    return counts


def _live(marker: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline", "name"])
            if p.info["name"] != "unshare" and marker in (p.info["cmdline"] or [])]


CONTAINER_MARK = "migrd-demo-ticker"


def _container_counts() -> list[int]:
    """The counter file inside the container's rootfs, read through its one live process's root
    (bed hosts share one PID space); [] while there is not exactly one."""
    live = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(CONTAINER_MARK in a for a in p.info["cmdline"] or ())]
    try:
        return [int(x) for x in Path(f"/proc/{live[0]}/root/data/counter").read_text().split()] if len(live) == 1 else []
    except (OSError, ValueError):
        return []


def _container(migrctl, step) -> None:
    """A runc container moves host1 -> host2 -> host1 with the file it changed in its rootfs."""
    name = "ticker"
    step("host1: migrctl container run ticker (runc, busybox): counts into /data/counter in its rootfs")
    migrctl("host1", "container", "run", "--json", name, "--", "sh", "-c",
            f"i=0; while :; do i=$((i+1)); echo $i >> /data/counter; sleep 0.1; done # {CONTAINER_MARK}")
    try:
        deadline = time.monotonic() + 30
        while len(_container_counts()) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        for src, dst in (("host1", "host2"), ("host2", "host1")):
            step(f"{src}: migrctl migrate --container {name} --to {dst}")
            before = len(_container_counts())
            res = migrctl(src, "migrate", "--json", "--container", name, "--to", dst)
            deadline = time.monotonic() + 30
            while len(_container_counts()) < before + 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            got = _container_counts()
            # The image's /data/counter holds a 0; the container appends 1, 2, 3, ...
            if got != list(range(len(got))) or len(got) < before + 5:
                raise click.ClickException("the container's file or count did not carry on")
            click.echo(f"  downtime {res['downtime']:.2f} s, {human_bytes(res['bytes'])} moved (images and "
                       f"the rootfs changes: added, modified and deleted files, each checked by sha256)")
            click.echo(f"  /data/counter carries on inside the container: ... "
                       f"{', '.join(map(str, got[before - 2:before + 3]))} ...")
    finally:
        for host in ("host1", "host2"):
            with contextlib.suppress(click.ClickException):
                migrctl(host, "container", "rm", "--json", name)


def _automatic(state: bed_mod.BedState, migrctl, work: Path, step) -> None:
    """Act two: agents on every host, load on host1 only, and the agents spread it."""
    step("starting a migrd agent in every host (1 s rounds, demo thresholds)")
    for h in state.hosts:
        path = h.dir / "etc" / "migrd.yaml"
        cfg = config_mod.parse(path.read_text())
        path.write_text(config_mod.dump(dataclasses.replace(
            cfg, policy=DEMO_POLICY, daemon=dataclasses.replace(cfg.daemon, interval=1.0))))
    agents = bed_mod.start_agents(state)
    click.echo("agents: " + ", ".join(f"{h} PID {p}" for h, p in agents.items()))
    outs = [work / f"busy-{i}.txt" for i in range(BUSY_WORKLOADS)]
    try:
        step(f"host1: {BUSY_WORKLOADS} CPU-bound workloads (migrctl run), nothing on host2 and host3")
        deadline = time.time() + 150
        for i, out in enumerate(outs):
            migrctl("host1", "run", "--json", "--name", f"busy{i}", "--", sys.executable, "-c", BUSY,
                    str(out), str(deadline))

        def placement() -> dict[str, int]:
            where = {h.name: 0 for h in state.hosts}
            for out in outs:
                for pid in _live(str(out)):
                    for h in state.hosts:
                        if pid in cgroup.pids(h.cgroup):
                            where[h.name] += 1
            return where

        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < 90:
            now = placement()
            if now != last:
                click.echo(f"  t={time.monotonic() - t0:5.1f} s  " +
                           "  ".join(f"{h}: {'#' * n:4} {n}" for h, n in now.items()))
                last = now
            if now["host1"] <= 2 and now["host2"] and now["host3"]:
                break
            time.sleep(0.5)
        else:
            # What host1's agent saw, so that a failed run says why (peers' levels and errors,
            # and its last decision's reasons).
            for row in migrctl("host1", "hosts", "--json"):
                click.echo(f"  host1 sees {row['name']}: level {row.get('level')}, error {row.get('error')}")
            lines = (state.host("host1").dir / "state" / "decisions.jsonl").read_text().splitlines()
            if lines:
                last = json.loads(lines[-1])
                click.echo(f"  host1's last decision: {last.get('action')} -> {last.get('target')}")
                click.echo("\n".join(f"    - {reason}" for reason in last.get("reasons", [])))
            raise click.ClickException("the agents did not spread the load within 90 s")
        click.echo(f"balanced after {time.monotonic() - t0:.1f} s")
        # A move decided just now may still run (the source stopped, the copy restoring): the
        # copies are counted only once no agent has one in flight.
        for h in state.hosts:
            migrctl(h.name, "pause", "--json")
        settle = time.monotonic() + 120
        while any(migrctl(h.name, "status", "--json").get("in_flight") for h in state.hosts):
            if time.monotonic() > settle:
                raise click.ClickException("an agent's move was still in flight 120 s after pausing")
            time.sleep(0.5)

        step("why: host1's decision record for its last move (from state_dir/decisions.jsonl)")
        moves = [m for h in state.hosts for m in migrctl(h.name, "history", "--json")
                 if m["name"] and m["name"].startswith("busy") and m["outcome"] == "ok"]
        log = (state.host("host1").dir / "state" / "decisions.jsonl").read_text().splitlines()
        moved = [r for r in map(json.loads, log) if r.get("migration")]
        if moved:
            r = moved[-1]
            gain = (r.get("estimate") or {}).get("gain")
            click.echo(f"  {r['action']} PID {r['pid']} ({r['name']}) -> {r['target']}"
                       + (f", expected gain {gain:.1f}" if gain is not None else ""))
            click.echo("\n".join(f"    - {reason}" for reason in r["reasons"]))
        step("host1 now: migrctl explain")
        click.echo("\n".join("  " + line for line in migrctl("host1", "explain", "--json")["text"].splitlines()))
        step("automatic moves (migrctl history on each host)")
        for m in moves:
            click.echo(f"  {m['name']}: PID {m['pid']} -> {m['target']}, downtime {m['downtime']:.2f} s")
        for out in outs:
            counts = read_counts(out)
            if counts != list(range(1, len(counts) + 1)) or len(_live(str(out))) != 1:
                raise click.ClickException(f"{out.name}: state lost or not exactly one copy")
        click.secho(f"OK: {len(moves)} automatic moves, every workload kept its count, one copy each.",
                    fg="green")
    finally:
        for h in state.hosts:
            bed_mod.stop_agent(h)
        for out in outs:
            for pid in _live(str(out)):
                psutil.Process(pid).kill()


@click.command()
@click.option("--keep", is_flag=True, help="Leave the bed up afterwards (remove it with `migrctl bed down --name NAME`).")
@click.option("--manual-only", is_flag=True, help="Skip act two (the agents balancing load by themselves).")
def demo(keep: bool, manual_only: bool) -> None:
    """Move a running process around a 3-host bed and watch it keep its state.

    Builds an embedded bed (three network-namespace hosts, each with its own sshd, config,
    state and data directories), starts a counter on host1 with `migrctl run` (it appends
    1, 2, 3, ... to a file, 20 per second), then migrates it host1 -> host2 -> host3 -> host1
    with `migrctl migrate` run inside the source host, exactly as on real machines. After each
    move it shows the phases, downtime and bytes moved, and that the count went on from where
    it was frozen instead of starting again.

    Then a runc container (a local busybox image) moves host1 -> host2 -> host1 with a file it
    keeps changing inside its rootfs.

    Act two starts a migrd agent in every host and four CPU-bound workloads on host1 only; the
    agents notice the overload, move workloads to host2 and host3, and `migrctl explain` shows
    the numbers behind a decision. The bed is removed at the end.
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
                alive = _live(str(out))
                click.echo(f"  live copies: {len(alive)} (PID {', '.join(map(str, alive))})")

            step("migrctl history on each host (a migration is recorded where it started)")
            for host in ROUTE[:-1]:
                for h in migrctl(host, "history", "--json"):
                    click.echo(f"  {host}: {h['id']}  PID {h['pid']} -> {h['target']}: {h['outcome']}, "
                               f"downtime {h['downtime']:.2f} s")
            click.secho(f"\nOK: one process, three hosts, {len(read_counts(out))} counts without a gap.",
                        fg="green")
            for p in _live(str(out)):
                psutil.Process(p).kill()
            _container(migrctl, step)
            if not manual_only:
                _automatic(state, migrctl, Path(tmp), step)
        finally:
            for p in _live(str(out)):
                psutil.Process(p).kill()
            if keep:
                click.echo(f"\nbed {name!r} left up: `migrctl bed status --name {name}`, "
                           f"`migrctl bed down --name {name}`")
            else:
                bed_mod.down(name, root)
