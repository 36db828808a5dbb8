"""`migrctl`: the admin CLI. Subcommands live in one module per concept and are registered
here. MigrdError becomes one line on stderr and the error class's exit code."""

from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from ..errors import MigrdError

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
"""


class MigrdGroup(click.Group):
    """Turns MigrdError into a readable line and its exit code, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except MigrdError as e:
            click.echo(f"migrctl: error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=MigrdGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="migrctl")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: every command run).")
def main(verbose: int) -> None:
    """Administer migrd: checkpoint, restore and migrate running processes with CRIU over SSH."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


from .checkpoint import check, checkpoint, restore  # noqa: E402

main.add_command(check)
main.add_command(checkpoint)
main.add_command(restore)
from .demo import demo  # noqa: E402

main.add_command(demo)

from .bed import bed  # noqa: E402

main.add_command(bed)

from .transfer import receive, send  # noqa: E402
main.add_command(receive)
main.add_command(send)
from .hosts import hosts  # noqa: E402
main.add_command(hosts)
from .migrate import history, migrate, peer, ps, recover, run  # noqa: E402

for _cmd in (migrate, run, ps, history, recover, peer):
    main.add_command(_cmd)
from .agent import explain, offer, pause, resume, status  # noqa: E402

for _cmd in (status, explain, pause, resume):
    main.add_command(_cmd)
peer.add_command(offer)
