"""The `pmnode` command line (typer)."""

from pmnode.cli.main import app, main

__all__ = ["app", "main"]
