"""`migrctl`: the admin CLI. Subcommands live in one module per concept and are registered
here. MigrdError becomes one line on stderr and the error class's exit code."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from migrd import __version__
from migrd.errors import MigrdError

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  other migrd error
  2  usage error (bad option or argument)
  3  bad input: no such PID, host or directory
  4  not permitted: not root, PID 1, process not opted in
  5  CRIU failed (its error line and log path are printed)
  6  checkpoint image missing, altered or not a checkpoint
  7  SSH transport failed (unreachable, timeout, host key mismatch)
  8  configuration file invalid (key and line are printed)
  9  a helper program failed
  10 migration precheck failed (every reason is listed; nothing changed)
  11 migration in doubt: target unreachable after restore began; run `migrd recover`
  12 no migrd agent is running on this host (status, explain, pause, resume)
  13 post-copy: the pages stopped arriving after the switch; the workload is lost
  14 another CRIU dump on this host held the dump lock too long; nothing was frozen
"""


#: Subcommands, imported only when used: a remote `migrctl peer ...` step should not pay for
#: paramiko and the policy code (each import adds to every step of a migration).
COMMANDS = {
    "check": "checkpoint:check",
    "checkpoint": "checkpoint:checkpoint",
    "restore": "checkpoint:restore",
    "migrate": "migrate:migrate",
    "run": "migrate:run",
    "container": "container:container",
    "ps": "migrate:ps",
    "history": "migrate:history",
    "recover": "migrate:recover",
    "hosts": "hosts:hosts",
    "send": "transfer:send",
    "receive": "transfer:receive",
    "bed": "bed:bed",
    "demo": "demo:demo",
    "status": "agent:status",
    "explain": "agent:explain",
    "pause": "agent:pause",
    "resume": "agent:resume",
    "peer": "peer:peer",
    "sim": "sim:sim",
}


class MigrdGroup(click.Group):
    """Lazily loaded subcommands; MigrdError becomes a readable line and its exit code, never
    a traceback."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(f"{__name__}.{module}"), attr), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MigrdError as e:
            click.echo(f"migrctl: error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=MigrdGroup, lazy=COMMANDS, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="migrctl")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: every command run).")
def main(verbose: int) -> None:
    """Administer migrd: checkpoint, restore and migrate running processes with CRIU over SSH."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from migrd.cli.common import quiet_paramiko

    quiet_paramiko(verbose)

