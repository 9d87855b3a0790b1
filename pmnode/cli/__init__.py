"""The `pmnode` command line (typer): pmnode.cli.common (the app, shared options), pmnode.cli.commands
(train, status, generate), pmnode.cli.bench, pmnode.cli.swarm (join, local-swarm), pmnode.cli.data and
pmnode.cli.plan. The console script starts at pmnode.cli.entry, which makes Ctrl-C during start-up a
quiet exit."""

from typing import Any


def __getattr__(name: str) -> Any:  # `pmnode.cli.app`, without importing the commands up front
    if name == "app":
        from pmnode.cli import main

        return getattr(main, name)
    raise AttributeError(name)
