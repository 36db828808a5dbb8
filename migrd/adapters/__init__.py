"""Thin adapters over the outside world: CRIU, SSH, /proc, psutil, cgroups, files."""
