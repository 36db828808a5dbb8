"""The migration engine: the driver, its journal, checkpoints and the target's side."""
