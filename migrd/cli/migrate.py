"""`migrctl migrate`, `run`, `ps`, `history` and `recover`."""

from __future__ import annotations

import dataclasses
import signal
from datetime import datetime

import click

from migrd.core import binding
from migrd.engine import containers, podman
from migrd.engine import journal as journal_mod
from migrd.engine import migration as mig
from migrd.engine.strategies import STRATEGIES
from migrd.adapters import untrusted, workloads
from migrd.adapters.procfs import parse_pid
from migrd.cli.progress import Progress
from migrd.cli.agent import ask_if_running
from migrd.cli.common import emit, human_bytes, json_option, load_config, require_root
from migrd.errors import MigrdError


@click.command()
@click.argument("pid", required=False)
@click.option("--container", metavar="NAME", help="Move the runc or Podman container NAME instead of a process "
              "(stop-copy, its rootfs changes included).")
@click.option("--to", "target", required=True, metavar="HOST", help="Target host (a name from the config's hosts).")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default=None,
              help="How memory moves (default: the first of migrate.strategies that can move it). "
                   + " ".join(f"{s.name}: {s.summary}." for s in STRATEGIES.values()))
@click.option("--mode", type=click.Choice(["move", "clone", "restart"]), default="move", show_default=True,
              help="move: the process continues there (strong mobility); clone: a copy starts there "
                   "and this one keeps running; restart: the same command starts fresh there (weak mobility).")
@click.option("--with-files", is_flag=True, help="Copy the regular files it has open to the same paths on the target.")
@click.option("--move-address", metavar="CIDR", help="Move this service address (e.g. 198.18.0.100/24) with the process.")
@click.option("--tcp-established", is_flag=True, help="Keep established TCP connections (use with --move-address).")
@click.option("--dry-run", is_flag=True, help="Run every precheck on both hosts, change nothing.")
@json_option
def migrate(pid: str | None, container: str | None, target: str, strategy: str | None, mode: str, with_files: bool,
            move_address: str | None, tcp_established: bool, dry_run: bool, as_json: bool) -> None:
    """Move process PID (or --container NAME) from this host to HOST.

    \b
    Steps (each journaled before it starts, so `migrd recover` can finish or undo it):
      precheck   CRIU and CPU on the target, memory, disk, PIDs, ports, open files, opt-in
      checkpoint CRIU dump here (stream-copy: the pages go to the target during the dump,
                 and the process stays stopped here until the commit)
      transfer   images (and --with-files data) over SSH, verified on arrival
      restore    CRIU restore there
      verify     alive, same command line, listening sockets back
      commit     only now are this host's copy and images gone
    Any failure before commit rolls back: the process runs here again, the target is cleaned.

    \b
    Example:
      migrctl run --name job -- python3 job.py      # a workload that can move anywhere
      migrctl migrate 4242 --to host2
      migrctl container run web -- sh -c 'while :; do date >> /data/log; sleep 1; done'
      migrctl migrate --container web --to host2
    """
    if (pid is None) == (container is None):
        raise click.UsageError("give a PID or --container NAME (one of them)")
    require_root("migrctl migrate")
    cfg = load_config()
    opts = mig.Options(target=target, mode=mode, strategy=strategy, with_files=with_files,
                       move_address=move_address, tcp_established=tcp_established, dry_run=dry_run)
    # Stop at the next step boundary and roll back, never in the middle of a CRIU call.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: mig.STOP.set())
    progress = Progress(f"sending to {target}", enabled=False if as_json else None)
    try:
        if container is not None:
            out = mig.migrate_container(cfg, container, opts, progress=progress)
        elif pid is not None:
            out = mig.migrate(cfg, parse_pid(pid), opts, progress=progress)
        else:  # excluded by the check above; mypy cannot follow the == of the two tests
            raise click.UsageError("give a PID or --container NAME (one of them)")
    finally:
        progress.close()

    what = f"container {container}" if container is not None else "PID"

    def human(o: mig.Outcome) -> str:
        if o.dry_run:
            rows = binding.table(tuple(binding.from_dict(r) for r in o.resources))
            return (f"dry run {o.id}: {what} {o.pid} can migrate from {o.source} to {o.target} "
                    f"with {o.strategy}\n" + "".join(f"  {why} (passed over)\n" for why in o.passed_over)
                    + "  resources (binding, attachment to the host, what the move does):\n"
                    + "\n".join(f"    {r}" for r in rows))
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in o.phases.items())
        down = f", downtime {o.downtime:.2f} s" if o.downtime is not None else ""
        rounds = f" ({o.rounds} rounds, changed pages found by {o.dirty_tracking})" if o.rounds else ""
        return (f"migrated {what} {o.pid} from {o.source} to {o.target} (now PID {o.target_pid}), "
                f"mode {o.mode}, strategy {o.strategy}{rounds}, {human_bytes(o.bytes)} moved{down}\n"
                f"  {phases}\n  id {o.id}" + "".join(f"\n  estimate {e}" for e in o.estimates))

    emit(out, as_json, human)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--name", help="Workload name (default: from the command).")
@click.option("--user", help="Run it as this user (name or number), as a service manager would.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@json_option
def run(name: str | None, user: str | None, command: tuple[str, ...], as_json: bool) -> None:
    """Start COMMAND as a migratable workload on this host and print its PID.

    The workload runs detached as the init of its own PID namespace (so it can be restored on
    any host without needing its old PID), with stdout and stderr appended to a log under the
    state directory. It is opted in to migration by construction.

    A service that runs as an unprivileged user must be started with --user (not by dropping
    its rights itself): it then runs as that user in the host's PID space, which CRIU can dump.

    \b
    Example:  migrctl run --name counter -- python3 -u counter.py
              migrctl run --user nobody --name cache -- python3 cache.py
    """
    require_root("migrctl run")
    cfg = load_config()
    w = workloads.start(cfg.state_dir, tuple(command), name=name, host=cfg.host, user=user)
    emit({"pid": w.pid, "name": w.name, "host": w.host, "log": w.stdout}, as_json,
         lambda d: f"started {d['name']} as PID {d['pid']} (log: {d['log']})")


@dataclasses.dataclass(frozen=True)
class AgentRow:
    """One candidate as the agent's `ps` shows it. Read as untrusted: an agent of another
    release (still running after an upgrade) may lack a key, which then shows as unknown."""

    name: str | None
    pid: int
    cmdline: tuple[str, ...] = ()
    action: str | None = None
    target: str | None = None
    gain: float | None = None
    reason: str | None = None
    cpu_share: float | None = None
    age_s: float | None = None
    opted_in: bool | None = None
    last_migrated: float | None = None
    dirty_rate: float | None = None
    dirty_rate_age_s: float | None = None


def dirty_cell(row: dict) -> str:
    """The agent's measured dirty rate and its age, '-' when it has none."""
    if row.get("dirty_rate") is None:
        return "-"
    return f"{row['dirty_rate'] / 1e6:.1f}MB/s ({row['dirty_rate_age_s']:.0f}s)"


@click.command()
@json_option
def ps(as_json: bool) -> None:
    """List the migratable workloads on this host, with the agent's view when it runs.

    Without an agent: the workloads started here with `migrctl run`, and the containers runc
    and Podman run here (state_dir/runc, state_dir/podman). With one: also every
    other candidate its opt-in rules allow, and for each what the policy would do with it
    alone (action, target, expected gain, the deciding reason) and the dirty rate it measured
    (bytes per second the candidate rewrites, and how old that measurement is).
    """
    cfg = load_config()
    rows = [{"kind": "process", "name": w.name, "pid": w.pid, "alive": w.alive(), "command": " ".join(w.cmdline),
             "log": w.stdout} for w in workloads.Registry(cfg.state_dir).all()]
    rows += [{**c, "command": f"container ({c['runtime']}, image {c['image']})", "log": None}
             for c in containers.listing(cfg) + podman.listing(cfg)]
    answer = ask_if_running(cfg, "ps")
    scored = None if answer is None else untrusted.build(list[AgentRow], answer, MigrdError, "the agent's ps")
    if scored is not None:
        by_pid = {r["pid"]: r for r in rows}
        for c in scored:
            row = by_pid.get(c.pid)
            if row is None:
                row = {"name": c.name, "pid": c.pid, "alive": True, "command": " ".join(c.cmdline), "log": None}
                rows.append(row)
            row.update({k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "pid", "cmdline")})

    def human(rs) -> str:
        if not rs:
            return "no workloads (start one with `migrctl run -- CMD`)"
        lines = [f"{'NAME':20} {'PID':>8} {'STATE':7} {'POLICY':28} {'DIRTY (AGE)':16} COMMAND"]
        for r in rs:
            policy_view = (f"{r['action']}" + (f" -> {r['target']}" if r.get("target") else "")
                           + (f" (gain {r['gain']:.1f})" if r.get("gain") is not None else "")
                           if r.get("action") is not None else "-")
            lines.append(f"{r['name']:20} {r['pid']:>8} {'running' if r['alive'] else 'gone':7} "
                         f"{policy_view:28} {dirty_cell(r):16} {r['command'][:50]}")
        if scored is None:
            lines.append("(no agent running here: policy view unavailable)")
        return "\n".join(lines)

    emit(rows, as_json, human)


@click.command()
@click.option("--limit", type=int, default=50, show_default=True, help="Show the newest N migrations.")
@json_option
def history(limit: int, as_json: bool) -> None:
    """Every migration started on this host: outcome, phase times, bytes, downtime, and, for
    moves the agent decided, the policy's reasons."""
    cfg = load_config()
    rows = ask_if_running(cfg, "history", limit=limit)
    if rows is None:
        rows = [dataclasses.asdict(journal_mod.summarize(j))
                for j in journal_mod.all_journals(cfg.state_dir)][-limit:]

    def human(rs) -> str:
        if not rs:
            return "no migrations yet"
        lines = [f"{'ID':25} {'WHEN':8} {'PID':>7} {'TO':8} {'MODE':7} {'STRATEGY':11} {'BYTES':>10} "
                 f"{'DOWN':>7}  OUTCOME"]
        for r in rs:
            when = datetime.fromtimestamp(r["started"]).strftime("%H:%M:%S") if r["started"] else "-"
            down = f"{r['downtime']:.2f}s" if r["downtime"] is not None else "-"
            outcome = r["outcome"] + (f": {r['reason']}" if r["reason"] and r["outcome"] != "ok" else "")
            lines.append(f"{r['id']:25} {when:8} {r['pid'] or '-':>7} {r['target'] or '-':8} "
                         f"{r['mode'] or '-':7} {r.get('strategy') or '-':11} {human_bytes(r['bytes']):>10} "
                         f"{down:>7}  {outcome[:80]}")
            lines += [f"{'':26}why: {reason}" for reason in r.get("decision_reasons") or ()]
        return "\n".join(lines)

    emit(rows, as_json, human)


@click.command()
@json_option
def recover(as_json: bool) -> None:
    """Finish or undo migrations a crash left unfinished (also run by `migrd` at start).

    For each unfinished journal: before the checkpoint, nothing changed; once the target copy
    is confirmed running, the migration is committed; otherwise the target is cleaned and the
    process is restored here from its own images. A target that cannot be asked leaves the
    migration in doubt (nothing is restarted), and a later run settles it.
    """
    require_root("migrctl recover")
    report = mig.recover(load_config())
    for r in report:
        if "corrupt" in r:
            click.echo(f"migrctl: warning: {r['corrupt']}; migration {r['id']} left alone", err=True)
    emit(report, as_json, lambda rs: "\n".join(f"{r['id']}: {r['action']}" for r in rs)
         or "nothing to recover")
