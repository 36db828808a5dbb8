"""`python -m migrd.cli`: the same CLI without the installed script, for peers whose PATH lacks
migrctl (the bed runs the worktree's interpreter this way)."""

from migrd.cli import main

main(prog_name="migrctl")
