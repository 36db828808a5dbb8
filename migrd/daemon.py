"""`migrd`: the per-host agent."""

from __future__ import annotations

import click

from . import __version__
from .cli import MigrdGroup
from .cli.migrate import recover


@click.group(cls=MigrdGroup, invoke_without_command=True)
@click.version_option(__version__, prog_name="migrd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """The migrd agent (the automatic loop arrives with the policy work)."""
    if ctx.invoked_subcommand is None:
        click.echo(f"migrd {__version__}")


main.add_command(recover)

if __name__ == "__main__":
    main(prog_name="migrd")
