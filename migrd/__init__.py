"""migrd: move running Linux processes between hosts with CRIU over SSH."""

__version__ = "0.1.0"
