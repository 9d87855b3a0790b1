"""docker-compose.yml runs the same CLIs as the local swarm: parse its commands with the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.main import get_command

import coordinator.cli
import pmnode.cli

ROOT = Path(__file__).parent.parent
APPS = {"pmnode": pmnode.cli.app, "coordinator": coordinator.cli.app}


def parse(program: str, args: list[str]) -> tuple[str, dict]:
    """Parse like the real CLI would, without running: unknown options or bad values raise."""
    group = get_command(APPS[program])
    ctx = group.make_context(program, list(args), resilient_parsing=False)
    # typer keeps the subcommand name apart from its arguments (click's "protected args").
    head = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
    name, cmd, rest = group.resolve_command(ctx, [*head, *ctx.args])
    sub = cmd.make_context(name, rest, parent=ctx)
    return name, sub.params


def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_has_coordinator_and_four_stages() -> None:
    s = services()
    assert set(s) == {"coordinator", "stage0", "stage1", "stage2", "stage3"}
    stages = []
    for name, svc in s.items():
        program = (svc.get("entrypoint") or ["pmnode"])[0]
        sub, params = parse(program, svc["command"])
        if name == "coordinator":
            assert (program, sub) == ("coordinator", "serve") and params["port"] == 31337
            assert (ROOT / params["config"]).is_file()
        else:
            assert (program, sub) == ("pmnode", "join")
            stages.append(params["stage"])
            assert str(params["coordinator_file"]).startswith("/swarm/coordinator")
    assert sorted(stages) == [0, 1, 2, 3]


def test_parser_rejects_bad_invocations() -> None:
    with pytest.raises(Exception, match="No such option"):
        parse("pmnode", ["join", "--stagez", "1"])
    with pytest.raises(Exception, match="valid integer"):
        parse("pmnode", ["join", "--stage", "one"])


def test_dockerfile_entrypoint_matches() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["pmnode"]' in text and "COPY configs ./configs" in text
