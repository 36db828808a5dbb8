"""`migrctl hosts`: can this host reach its peers over SSH, and how fast?"""

from __future__ import annotations

import json
from typing import Any

import click

from migrd import config
from migrd.errors import TransportError


def _check(cfg: config.Config, host: config.HostEntry) -> dict[str, Any]:
    # Imported here: paramiko costs ~0.1 s of start-up, and `migrctl receive` (started by
    # every transfer) shares this package but never needs it.
    from migrd.adapters import transport

    row: dict[str, Any] = {"name": host.name, "address": f"{host.address}:{host.port}",
                           "reachable": False, "error": None, "rtt_ms": None, "bandwidth_mb_s": None}
    try:
        with transport.Connection(cfg, host) as conn:
            est = conn.probe()
    except TransportError as e:
        row["error"] = str(e)
        return row
    row.update(reachable=True, rtt_ms=round(est.rtt_s * 1000, 2),
               bandwidth_mb_s=round(est.bandwidth_bytes_per_s / 1e6, 1))
    return row


def _agent_rows(view: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in view:
        load, link = v.get("load") or {}, v.get("link") or {}
        cap = load.get("cpu_capacity") or load.get("cpus") or 1
        rows.append({"name": v["name"], "self": v["self"], "level": v.get("level"),
                     "age_s": v.get("age_s"),
                     "load_per_cpu": round(load["loadavg"][0] / cap, 2) if load else None,
                     "cpu_util": load.get("cpu_util"),
                     "rtt_ms": round(link["rtt_s"] * 1000, 2) if link else None,
                     "bandwidth_mb_s": round(link["bandwidth"] / 1e6, 1) if link else None,
                     "error": v.get("error")})
    return rows


@click.command("hosts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--probe", is_flag=True, help="Measure now over SSH even when an agent runs here.")
def hosts(as_json: bool, probe: bool) -> None:
    """This host's peers: with an agent running, its view (each peer's level, load and the
    age of its last snapshot, and the measured link); otherwise, or with --probe, a live probe
    over SSH (reachable, round-trip time, bandwidth; up to 32 MiB or 1 s sent per peer)."""
    from migrd.cli.agent import ask_if_running

    cfg = config.load()
    view = None if probe else ask_if_running(cfg, "hosts")
    if view is not None:
        rows = _agent_rows(view)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(f"{'HOST':<12} {'LEVEL':<7} {'AGE s':>6} {'LOAD/CPU':>9} {'UTIL':>5} {'RTT ms':>8} {'MB/s':>8}")
        for r in rows:
            cell = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
            name = r["name"] + (" *" if r["self"] else "")
            click.echo(f"{name:<12} {r['level'] or '-':<7} {cell(r['age_s'], '{:.1f}'):>6} "
                       f"{cell(r['load_per_cpu'], '{:.2f}'):>9} {cell(r['cpu_util'], '{:.2f}'):>5} "
                       f"{cell(r['rtt_ms'], '{:.2f}'):>8} {cell(r['bandwidth_mb_s'], '{:.1f}'):>8}")
            if r["error"]:
                click.echo(f"  {r['error']}")
        return
    rows = [_check(cfg, h) for h in cfg.hosts if h.name != cfg.host]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no peers configured")
        return
    click.echo(f"{'HOST':<12} {'ADDRESS':<22} {'REACHABLE':<10} {'RTT ms':>8} {'MB/s':>8}")
    for r in rows:
        reach = "yes" if r["reachable"] else "no"
        rtt = f"{r['rtt_ms']:.2f}" if r["rtt_ms"] is not None else "-"
        bw = f"{r['bandwidth_mb_s']:.1f}" if r["bandwidth_mb_s"] is not None else "-"
        click.echo(f"{r['name']:<12} {r['address']:<22} {reach:<10} {rtt:>8} {bw:>8}")
        if r["error"]:
            click.echo(f"  {r['error']}")
