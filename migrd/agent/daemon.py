"""`migrd`: the per-host agent (see migrd.agent). `migrd` or `migrd run` starts the loop,
`migrd --once` runs one round and exits, `migrd recover` only recovers."""

from __future__ import annotations

import logging
import sys

import click

from migrd import __version__
from migrd.cli import MigrdGroup
from migrd.cli.common import load_config, quiet_paramiko, require_root
from migrd.cli.migrate import recover

once_option = click.option("--once", is_flag=True, help="Run one round (sample, decide, maybe act) and exit.")
verbose_option = click.option("-v", "--verbose", count=True, help="More log output on stderr.")


def _run(once: bool, verbose: int) -> None:
    from migrd.agent.loop import Agent

    logging.basicConfig(level=max(logging.WARNING - 10 * verbose, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s migrd %(name)s %(levelname)s: %(message)s")
    quiet_paramiko(verbose)
    cfg = load_config()  # a malformed config is reported (exit 8) before anything starts
    require_root("migrd")
    Agent(cfg).run(once=once)


@click.group(cls=MigrdGroup, invoke_without_command=True)
@click.version_option(__version__, prog_name="migrd")
@once_option
@verbose_option
@click.pass_context
def main(ctx: click.Context, once: bool, verbose: int) -> None:
    """The migrd agent: watches this host's and its peers' load and migrates opted-in
    processes when the policy says a move pays off. Config: /etc/migrd/migrd.yaml
    ($MIGRD_CONFIG); admin: `migrctl status|explain|pause|resume`."""
    if ctx.invoked_subcommand is None:
        _run(once, verbose)


@main.command("run")
@once_option
@verbose_option
def run(once: bool, verbose: int) -> None:
    """Start the agent loop (the same as plain `migrd`)."""
    _run(once, verbose)


main.add_command(recover)

if __name__ == "__main__":
    main(prog_name="migrd")
