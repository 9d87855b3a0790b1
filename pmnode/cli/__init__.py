"""The `pmnode` command line (typer). The commands are in pmnode.cli.commands; the console script
starts at pmnode.cli.entry, which makes Ctrl-C during start-up a quiet exit."""

from typing import Any


def __getattr__(name: str) -> Any:  # `pmnode.cli.app`, without importing the commands up front
    if name in ("app", "main"):
        from pmnode.cli import commands

        return getattr(commands, name)
    raise AttributeError(name)
