"""`migrctl receive DIR`: the target end of an image transfer (the sender starts it over SSH)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import receive as receiver


@click.command("receive")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--manifest-sha256", required=True, metavar="HEX",
              help="sha256 of the manifest.json the sender streams; a different one is refused.")
@click.option("--compression", type=click.Choice(receiver.COMPRESSIONS), default="none", show_default=True)
def receive(directory: Path, manifest_sha256: str, compression: str) -> None:
    """Read a checkpoint image stream from stdin into DIRECTORY, verifying every file.

    DIRECTORY must not exist; it appears only when all files arrived intact."""
    m = receiver.receive_fd(0, directory, manifest_sha256, compression)
    click.echo(json.dumps({"directory": str(directory), "files": len(m.files), "bytes": m.image_bytes}))
