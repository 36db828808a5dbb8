"""`migrctl bed up|status|exec|down`: the embedded multi-host test bed."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from migrbed import bed as bed_mod
from migrd.cli.common import emit, json_option, require_root

name_option = click.option("--name", default="bed", show_default=True,
                           help="Bed name (a-z, 0-9, '-'); parallel beds need different names.")


@click.group()
def bed() -> None:
    """Several migrd "hosts" on this machine: network + mount namespaces, a cgroup and a real
    sshd each, on the private subnet 198.18.0.0/24 (nothing routes outside it).

    The bed root (state, per-host directories) is $MIGRD_BED_ROOT, default /var/lib/migrd/bed.
    """


@bed.command()
@name_option
@click.option("--hosts", "count", type=click.IntRange(1, bed_mod.MAX_HOSTS), default=3, show_default=True,
              help="Number of hosts, named host1..hostN, host i at 198.18.0.i.")
@click.option("--cpu-quota", "quotas", multiple=True, metavar="HOST=FRACTION",
              help="Limit a host's cgroup to FRACTION of one CPU (repeatable), e.g. host2=0.5.")
@click.option("--link-rate", "rates", multiple=True, metavar="HOST=MBIT",
              help="Shape a host's link to MBIT Mbit/s each way (repeatable), e.g. host2=200: "
              "unshaped, the bed's links run at memory speed, faster than any network.")
@click.option("--config", "config_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the cluster config (host: null) to FILE (left in place by `bed down`).")
@click.option("--agents", is_flag=True, help="Also start a migrd agent in every host (log: the host's "
              "/var/lib/migrd/agent.log; stopped by `bed down`).")
@click.option("--registry", type=click.Choice(["ssh", "etcd"]), default="ssh", show_default=True,
              help="How agents share load: ssh (each reads its peers' snapshots over SFTP) or etcd "
              "(an etcd member on 198.18.0.254 in the bed's bridge namespace; stopped by `bed down`).")
def up(name: str, count: int, quotas: tuple[str, ...], rates: tuple[str, ...], config_out: Path | None,
       agents: bool, registry: str) -> None:
    """Create and start the bed NAME.

    Each host gets /etc/migrd/migrd.yaml (its config), /var/lib/migrd and /srv/migrd as its own
    private directories, and sshd on 198.18.0.i:22 (key-only root login; every host holds the
    bed's client key, so any host can ssh to any other).

    Not idempotent: if the bed already exists, `up` refuses (exit 4) and changes nothing; remove
    it first with `migrctl bed down --name NAME`. If `up` fails half-way it removes what it made.
    """
    require_root("migrctl bed up")
    state = bed_mod.up(name, count, cpu_quotas=bed_mod.parse_quotas(quotas),
                       config_out=config_out.absolute() if config_out else None,
                       link_mbits=bed_mod.parse_link_rates(rates))
    click.echo(f"bed {state.name} is up: {len(state.hosts)} hosts "
               f"({state.hosts[0].address}..{state.hosts[-1].address}); cluster config: {state.config_file}")
    click.echo(f"run commands in a host with: migrctl bed exec --name {state.name} host1 -- CMD")
    if registry == "etcd":
        url = bed_mod.start_registry(state)
        click.echo(f"etcd at {url} (PID {bed_mod.registry_pid(state)}); every host's daemon.registry is etcd")
    if agents:
        pids = bed_mod.start_agents(state)
        click.echo("agents: " + ", ".join(f"{h} PID {pid}" for h, pid in pids.items())
                   + f"; ask one with: migrctl bed exec --name {state.name} host1 -- "
                   f"{sys.executable} -m migrd.cli status")


@bed.command()
@name_option
@json_option
def status(name: str, as_json: bool) -> None:
    """Show the bed's hosts: address, namespaces, sshd, cgroup, CPU quota and use, link rate."""
    state = bed_mod.load_state(name)
    hosts = bed_mod.status(state)
    report = {"name": state.name, "dir": str(state.dir), "ready": state.ready,
              "config": str(state.config_file), "bridge_netns": state.bridge_netns, "hosts": hosts}

    def human(r) -> str:
        lines = [f"bed {r['name']} ({'ready' if r['ready'] else 'NOT READY: run bed down'}), "
                 f"config {r['config']}"]
        for h in r["hosts"]:
            quota = "none" if h.cpu_quota is None else f"{h.cpu_quota:g} CPU"
            link = "unshaped" if h.link_mbit is None else f"{h.link_mbit:g} Mbit/s"
            used = "?" if h.cpu_seconds is None else f"{h.cpu_seconds:.2f} s"
            sshd = f"pid {h.sshd_pid} {'up' if h.sshd_alive else 'DOWN'}" if h.sshd_pid else "not started"
            lines.append(f"  {h.name:7} {h.address:13} netns {h.netns}{'' if h.netns_exists else ' (MISSING)'}"
                         f"  sshd {sshd}  quota {quota}  link {link}  cpu {used}  processes {h.processes}")
            lines.append(f"          mount ns {h.mount_ns or 'GONE'}  cgroup {', '.join(h.cgroup)}")
        return "\n".join(lines)

    emit(report, as_json, human)


@bed.command("exec")
@name_option
@click.option("--detach", is_flag=True, help="Start in the background (own session, output discarded) and print its PID.")
@click.argument("host")
@click.argument("argv", nargs=-1, required=True, metavar="-- CMD...")
def exec_(name: str, detach: bool, host: str, argv: tuple[str, ...]) -> None:
    """Run CMD inside HOST's network and mount namespaces and cgroup. Put `--` before CMD
    so its own options are not taken for ours.

    In the foreground (default) CMD shares this terminal and its exit status is passed through
    (128+N when killed by signal N). The working directory inside the host is /.
    """
    require_root("migrctl bed exec")
    state = bed_mod.load_state(name)
    if detach:
        p = bed_mod.spawn_in(state, host, list(argv))
        click.echo(p.pid)
        return
    p = bed_mod.spawn_in(state, host, list(argv), stdin=None, stdout=None, stderr=None, new_session=False)
    while True:
        try:
            rc = p.wait()
            break
        except KeyboardInterrupt:
            continue  # the command got the same SIGINT; its exit status is what counts
    sys.exit(rc if rc >= 0 else 128 - rc)


@bed.command()
@name_option
def down(name: str) -> None:
    """Stop and remove the bed NAME: its processes (also any left by `bed exec`), namespaces,
    cgroups and files. Works from the state file after a crash; a second run is a no-op."""
    require_root("migrctl bed down")
    if bed_mod.down(name):
        click.echo(f"bed {name} removed")
    else:
        click.echo(f"no bed named {name}: nothing to do")
