"""Helpers shared by the CLI modules: config loading, root check, JSON-or-human output."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from migrd import config as config_mod
from migrd.adapters import private
from migrd.errors import NotPermitted
from migrd.cli.progress import human_bytes

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def load_config() -> config_mod.Config:
    """The config, with its state directory's modes repaired: every migrctl and migrd command
    passes here before touching the state directory."""
    cfg = config_mod.load()
    private.secure_state_dir(cfg.state_dir)
    return cfg


def quiet_paramiko(verbose: int) -> None:
    """paramiko logs a failed handshake with a traceback from its own thread; migrd reports the
    same failure as one line, so paramiko's own log shows only with -vv."""
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL + 1)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotPermitted(f"{what} needs root (CRIU and namespaces need CAP_SYS_ADMIN); run it with sudo")


def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)  # type: ignore[arg-type]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_default, indent=2, sort_keys=True)


def emit(obj: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    click.echo(to_json(obj) if as_json else human(obj))
