"""`migrctl hosts`: can this host reach its peers over SSH, and how fast?"""

from __future__ import annotations

import json
from typing import Any

import click

from .. import config
from ..errors import TransportError


def _check(cfg: config.Config, host: config.HostEntry) -> dict[str, Any]:
    # Imported here: paramiko costs ~0.1 s of start-up, and `migrctl receive` (started by
    # every transfer) shares this package but never needs it.
    from .. import transport

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


@click.command("hosts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def hosts(as_json: bool) -> None:
    """Probe every configured peer: reachable, round-trip time, bandwidth (up to 32 MiB or 1 s sent)."""
    cfg = config.load()
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
