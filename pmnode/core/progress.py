"""Rich progress for long training runs, the CLI's and the benchmarks'; plain lines off a terminal."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pmnode.config import RunConfig
from pmnode.core.train import StepInfo, TrainSummary, train


def train_with_progress(
    cfg: RunConfig,
    codec: str,
    device: str,
    console: Console,
    autocast_bf16: bool = False,
    on_end: Callable | None = None,
    on_eval: Callable[[StepInfo], None] | None = None,
    replicas: int = 1,
) -> TrainSummary:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  held-out {task.fields[held]}  {task.fields[tps]:,.0f} tok/s"
        ),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"train {cfg.name} [{codec}]", total=cfg.train.steps, loss=0.0, held="-", tps=0.0)

        def on_step(info: StepInfo) -> None:
            held = f"{info.heldout:.4f}" if info.heldout is not None else bar.tasks[task].fields["held"]
            bar.update(task, completed=info.step, loss=info.loss, held=held, tps=info.tokens_per_s)
            if not console.is_terminal and info.heldout is not None:
                console.print(
                    f"step {info.step}/{cfg.train.steps} loss {info.loss:.4f} "
                    f"held-out {info.heldout:.4f} {info.tokens_per_s:,.0f} tok/s",
                    highlight=False,
                )
            if on_eval is not None and info.heldout is not None:
                on_eval(info)

        return train(cfg, codec, device, on_step, on_end, autocast_bf16=autocast_bf16, replicas=replicas)
