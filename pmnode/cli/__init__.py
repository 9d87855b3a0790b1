"""The `pmnode` command line (typer): pmnode.cli.commands (shared options, train, status,
generate), pmnode.cli.bench, pmnode.cli.swarm (join, local-swarm), pmnode.cli.data and
pmnode.cli.plan. The console script starts at pmnode.cli.entry, which makes Ctrl-C during start-up a
quiet exit."""

from typing import Any


def __getattr__(name: str) -> Any:  # `pmnode.cli.app`, without importing the commands up front
    if name in ("app", "main"):
        from pmnode.cli import bench, commands, data, plan, swarm  # noqa: F401  (their commands register on the app)

        return getattr(commands, name)
    raise AttributeError(name)
