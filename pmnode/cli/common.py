"""The `pmnode` app and what its commands share: the console, common options, config loading.

Every command module (commands, bench, data, plan, swarm) registers on `app`; pmnode.cli.main imports
them all and runs it, so no command module imports another."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError

app = typer.Typer(
    help="pmnode: decentralized model-parallel training with Protocol Models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Run config YAML (see configs/).")]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Prepared data dir, corpus file/dir or 'stdlib'; overrides data.source."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PmnodeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise PmnodeError(f"unknown --device {device!r}: use auto, cpu or cuda")
    return device


def load_with_overrides(
    config: Path, *, steps: int | None = None, data: str | None = None, **sections: Any
) -> RunConfig:
    from pmnode.data.resolve import load_run_config  # an unset vocab_size is the tokenizer's: read it

    cfg = load_run_config(config, data={"source": data} if data is not None else None)
    if steps is not None:
        sections.setdefault("train", {})["steps"] = steps
    return cfg.with_overrides(**sections) if sections else cfg
