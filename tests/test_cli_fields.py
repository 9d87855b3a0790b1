"""Flags made from model fields (pmnode.cli.fields): name, type, bounds, default and help come from the
field; unset flags leave the model's default; a refused value is one line naming the flag."""

from __future__ import annotations

from typing import Any, Literal

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from pmnode.cli.fields import Flag, FlagValues, with_flags
from pmnode.errors import PmnodeError


class Opts(BaseModel):
    count: int = Field(3, ge=1, le=9, description="How many.")
    mode: Literal["a", "b"] = Field("a", description="Which mode.")
    quiet: bool = Field(False, description="Say less.")
    fused: bool | None = Field(None, description="Fuse, or not.")
    peers: list[str] = Field(default_factory=list, description="Whom to dial.")
    rate: float | None = Field(None, gt=0, description="Bytes a second.")


FLAGS = (
    Flag(Opts, "count"),
    Flag(Opts, "mode"),
    Flag(Opts, "quiet"),
    Flag(Opts, "fused"),
    Flag(Opts, "peers", name="peer"),
    Flag(Opts, "rate", text=lambda t: float(t.removesuffix("bps")), default="unlimited"),
)
got: list[Opts] = []
app = typer.Typer()


@app.command()
@with_flags(*FLAGS)
def run(name: str = "x", **flags: Any) -> None:
    got.append(FlagValues(FLAGS, flags).build(Opts))


def invoke(*args: str) -> Opts:
    got.clear()
    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return got[0]


def test_unset_flags_keep_the_model_defaults() -> None:
    assert invoke() == Opts()


def test_each_flag_sets_its_field_with_its_type() -> None:
    o = invoke(
        "--count",
        "5",
        "--mode",
        "b",
        "--quiet",
        "--no-fused",
        "--peer",
        "p1",
        "--peer",
        "p2",
        "--rate",
        "8bps",
    )
    assert o == Opts(count=5, mode="b", quiet=True, fused=False, peers=["p1", "p2"], rate=8.0)


def test_bounds_and_choices_come_from_the_field() -> None:
    r = CliRunner().invoke(app, ["--count", "10"])
    assert r.exit_code == 2 and "--count" in r.output  # typer's range check
    with pytest.raises(
        PmnodeError, match=r"^--mode: Input should be 'a' or 'b'$"
    ):  # one line, from the model
        CliRunner().invoke(app, ["--mode", "c"], catch_exceptions=False)
    assert " a|b " in CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output


def test_help_is_the_fields_description_with_its_default() -> None:
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for line in (
        "How many. (default: 3)",
        "Which mode. (default: a)",
        "Say less.",
        "--no-fused",
        "Whom to dial.",
    ):
        assert line in out, out
    assert "Bytes a second. (default: unlimited)" in out


def test_a_refused_value_is_one_line_naming_the_flag() -> None:
    with pytest.raises(PmnodeError, match=r"^--rate: Input should be greater than 0$"):
        FlagValues(FLAGS, {"rate": "0"}).build(Opts)
    with pytest.raises(PmnodeError, match=r"^--rate fast: could not convert"):
        FlagValues(FLAGS, {"rate": "fast"}).build(Opts)


def test_join_and_local_swarm_flags_are_their_fields() -> None:
    """Every generated flag of join and local-swarm names a field its model has (a renamed field fails
    here, not at a volunteer's command line)."""
    from pmnode.cli.swarm import JOIN_FLAGS, SWARM_FLAGS

    for f in (*JOIN_FLAGS, *SWARM_FLAGS):
        assert f.info().description, f
