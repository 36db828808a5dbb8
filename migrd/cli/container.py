"""`migrctl container run|rm`: runc or Podman containers from a local image, migratable by default."""

from __future__ import annotations

import click

from migrd.cli.common import emit, json_option, load_config, require_root
from migrd.engine import containers, podman


@click.group()
def container() -> None:
    """Containers on this host: runc (bundles in state_dir/containers, state in state_dir/runc)
    or Podman with runc (storage and state in state_dir/podman)."""


@container.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--image", default="busybox", show_default=True, help="A local image (see scripts/build-image.sh).")
@click.option("--runtime", type=click.Choice(["runc", "podman"]), default="runc", show_default=True)
@click.option("--not-migratable", is_flag=True, help="Leave out the annotation io.migrd.migratable=true.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@json_option
def run(name: str, image: str, runtime: str, not_migratable: bool, command: tuple[str, ...], as_json: bool) -> None:
    """Start COMMAND in a new container NAME (a copy of IMAGE, the host's network).

    \b
    Example:  migrctl container run ticker -- sh -c 'while :; do date >> /data/log; sleep 1; done'
    """
    require_root("migrctl container run")
    # Not a dict lookup: mypy types a dict of the two functions as returning object, a
    # conditional as their union (click.Choice leaves only these two).
    create = containers.create if runtime == "runc" else podman.create
    st = create(load_config(), name, list(command), image=image, migratable=not not_migratable)
    emit({"name": st.name, "pid": st.pid, "status": st.status, "runtime": runtime}, as_json,
         lambda d: f"started {d['runtime']} container {d['name']} (init PID {d['pid']})")


@container.command()
@click.argument("name")
@json_option
def rm(name: str, as_json: bool) -> None:
    """End container NAME and delete its bundle."""
    require_root("migrctl container rm")
    cfg = load_config()
    containers.remove(cfg, name)  # also a stale bundle
    if podman.exists(cfg, name):
        podman.remove(cfg, name)
    emit({"removed": name}, as_json, lambda d: f"removed container {d['removed']}")
