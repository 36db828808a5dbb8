"""`migrctl status|explain|pause|resume`: ask this host's migrd agent over its admin socket
(exit 12 when no agent runs), and `migrctl peer offer`, by which an idle peer asks for work."""

from __future__ import annotations

import json
from typing import Any

import click

from migrd.agent import admin
from migrd.errors import AgentNotRunning
from migrd.adapters.procfs import parse_pid
from migrd.cli.common import emit, json_option, load_config, require_root


def ask(op: str, **args: Any) -> Any:
    require_root(f"migrctl {op}")
    return admin.request(load_config().daemon.socket, op, **args)


def ask_if_running(cfg: Any, op: str, **args: Any) -> Any | None:
    """The agent's answer, or None when no agent runs here (read commands then fall back to
    what they can see locally)."""
    try:
        return admin.request(cfg.daemon.socket, op, **args)
    except AgentNotRunning:
        return None


def _status_text(s: dict[str, Any]) -> str:
    lines = [f"migrd agent on {s['host']} (PID {s['pid']}), mode {s['mode']}, level {s['level']}"
             f"{', PAUSED' if s['paused'] else ''}, {s['rounds']} rounds in {s['uptime_s']:.0f} s"]
    reg = s.get("registry") or {}
    if reg.get("registry") == "etcd":
        lines.append("load registry: etcd, " + ("answering" if reg["ok"] else
                                                 f"UNREACHABLE ({reg['error']}); {reg['note']}"))
    if s["in_flight"]:
        f = s["in_flight"]
        lines.append(f"migrating {f['what']} to {f['target']}")
    if s["explain"]:
        lines.append("last decision: " + s["explain"])
    return "\n".join(lines)


@click.command()
@json_option
def status(as_json: bool) -> None:
    """The agent's state: level, paused or not, last decision, migration in flight."""
    emit(ask("status"), as_json, _status_text)


@click.command()
@click.argument("pid", required=False)
@click.option("--container", metavar="NAME", help="Explain the container NAME (a runc or Podman container here).")
@json_option
def explain(pid: str | None, container: str | None, as_json: bool) -> None:
    """Why the agent decided what it did last round; with PID (or --container NAME), what it
    would decide about that candidate alone (its cost estimate and every reason)."""
    if pid is not None and container is not None:
        raise click.UsageError("give a PID or --container NAME, not both")
    r = ask("explain", **({"pid": parse_pid(pid)} if pid else {}), **({"container": container} if container else {}))
    emit(r, as_json, lambda r: r["text"])


@click.command()
@json_option
def pause(as_json: bool) -> None:
    """Stop automatic migrations (the agent keeps sampling and explaining)."""
    emit(ask("pause"), as_json, lambda r: "agent paused: it samples and explains but does not migrate")


@click.command()
@json_option
def resume(as_json: bool) -> None:
    """Allow automatic migrations again."""
    emit(ask("resume"), as_json, lambda r: "agent resumed")


@click.command("offer")
@click.argument("requester")
@json_option
def offer(requester: str, as_json: bool) -> None:
    """(Run by a peer's agent over SSH.) REQUESTER is idle and asks this host for work."""
    click.echo(json.dumps(ask("offer", requester=requester)))
