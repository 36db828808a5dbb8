"""`migrctl container run|rm`: runc containers from a local image, migratable by default."""

from __future__ import annotations

import click

from migrd.cli.common import emit, json_option, load_config, require_root
from migrd.engine import containers


@click.group()
def container() -> None:
    """runc containers on this host (bundles in state_dir/containers, state in state_dir/runc)."""


@container.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--image", default="busybox", show_default=True, help="A local image (see scripts/build-image.sh).")
@click.option("--not-migratable", is_flag=True, help="Leave out the annotation io.migrd.migratable=true.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@json_option
def run(name: str, image: str, not_migratable: bool, command: tuple[str, ...], as_json: bool) -> None:
    """Start COMMAND in a new container NAME (a copy of IMAGE, the host's network).

    \b
    Example:  migrctl container run ticker -- sh -c 'while :; do date >> /data/log; sleep 1; done'
    """
    require_root("migrctl container run")
    st = containers.create(load_config(), name, list(command), image=image, migratable=not not_migratable)
    emit({"name": st.name, "pid": st.pid, "status": st.status, "bundle": st.bundle}, as_json,
         lambda d: f"started container {d['name']} (init PID {d['pid']}, bundle {d['bundle']})")


@container.command()
@click.argument("name")
@json_option
def rm(name: str, as_json: bool) -> None:
    """End container NAME and delete its bundle."""
    require_root("migrctl container rm")
    containers.remove(load_config(), name)
    emit({"removed": name}, as_json, lambda d: f"removed container {d['removed']}")
