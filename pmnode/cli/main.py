"""`pmnode`: every command module registers its commands on the app; this runs it."""

from pmnode.cli import bench, commands, data, plan, swarm  # noqa: F401  (their commands register on `app`)
from pmnode.cli.common import app
from pmnode.errors import run_cli


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
