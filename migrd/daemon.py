"""`migrd`: the per-host agent. For now it only reports its version."""

from __future__ import annotations

import click

from . import __version__


@click.command()
@click.version_option(__version__, prog_name="migrd")
def main() -> None:
    """The migrd agent (the automatic loop arrives with the policy work)."""
    click.echo(f"migrd {__version__}")
