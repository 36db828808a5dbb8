"""The per-host agent: its loop, admin socket, metrics and the `migrd` daemon entry point."""
