"""The commands that run in one process: train, status, generate (`join` and `local-swarm` are in
pmnode.cli.swarm, `bench` in pmnode.cli.bench; what they share in pmnode.cli.common)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pmnode.cli.common import ConfigOpt, DataOpt, DeviceOpt, app, console, load_with_overrides, resolve_device
from pmnode.errors import PmnodeError


@app.command()
def train(
    config: ConfigOpt,
    codec: Annotated[
        str, typer.Option(help="Boundary codec: subspace[:int8|int4][@k], dense[:bf16], int8, topk:N.")
    ] = "",
    steps: Annotated[int | None, typer.Option(help="Override train.steps.")] = None,
    data: DataOpt = None,
    device: DeviceOpt = "cpu",
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast for the layers (for GPUs).")] = False,
    summary_json: Annotated[Path | None, typer.Option(help="Write the run summary here.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads for this process.", min=1)] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Save every stage here at the end, for `pmnode generate`.")
    ] = None,
) -> None:
    """Train every stage in one process with the codec at each boundary (the swarm's reference)."""
    import torch

    from pmnode.core import checkpoint
    from pmnode.core.progress import train_with_progress
    from pmnode.core.train import Pipeline, config_for

    if threads is not None:
        torch.set_num_threads(threads)

    cfg = load_with_overrides(config, steps=steps, data=data)
    if codec:  # the codec decides the model: constrained for subspace, plain otherwise
        cfg, codec = config_for(cfg, codec)
    else:
        codec = cfg.codec_spec

    def save(pipe: Pipeline, _batches: list) -> None:
        if checkpoint_dir is not None:
            for w in pipe.workers:
                checkpoint.save(w, checkpoint_dir, cfg.name)
            checkpoint.save_run_config(cfg, checkpoint_dir)

    summary = train_with_progress(
        cfg, codec, resolve_device(device), console, autocast_bf16=bf16, on_end=save
    )
    out = summary.model_dump(include={"steps", "final_train_loss", "heldout_loss", "tokens_per_s", "codec"})
    console.print(
        f"[bold]done[/]: {summary.steps} steps, train loss {summary.final_train_loss:.4f}, "
        f"held-out loss {summary.heldout_loss:.4f} ({summary.heldout_bits_per_byte:.4f} bits/byte), "
        f"{summary.tokens_per_s:,.0f} tokens/s"
    )
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary.model_dump(), indent=2))
    else:
        print(json.dumps(out))


@app.command()
def status(
    coordinator: Annotated[
        str | None, typer.Option(help="The multiaddr `coordinator serve` printed.")
    ] = None,
    coordinator_file: Annotated[
        Path | None, typer.Option(help="Read the address from the coordinator's STATE_DIR/coordinator.json.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator.", min=1)] = 15.0,
    http_token_file: Annotated[
        Path | None,
        typer.Option(help="The status page's token (mode 0600), for a coordinator started with one."),
    ] = None,
) -> None:
    """Show the swarm: stages x replicas, throughput, queues, last seen, global step and loss."""
    from pmnode.net.control import coordinator_from_file
    from pmnode.net.status import fetch_status, render
    from pmnode.net.tokens import read_token_file

    if (coordinator is None) == (coordinator_file is None):
        raise PmnodeError("give exactly one of --coordinator MULTIADDR or --coordinator-file PATH")
    if coordinator_file is not None:
        coordinator = coordinator_from_file(coordinator_file, local=True, timeout=0)
    token = read_token_file(http_token_file) if http_token_file is not None else ""
    assert coordinator is not None  # exactly one of the two was given (checked above)
    st = fetch_status(coordinator, timeout, token)
    if as_json:
        print(st.model_dump_json(indent=2))
    else:
        render(st, Console())


@app.command()
def generate(
    checkpoint: Annotated[
        Path, typer.Option(help="A swarm checkpoint: the --checkpoint-dir of local-swarm or join.")
    ],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to sample.")] = 200,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens only.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Sample text from a checkpoint: every stage in one process, the codec at each boundary."""
    from pmnode.core.generate import check_sampling, load_checkpoint
    from pmnode.core.generate import generate as generate_text

    if not prompt:
        raise PmnodeError("--prompt is empty: give some text to continue")
    check_sampling(max_new_tokens, temperature, top_k)  # before the (possibly slow) load
    model = load_checkpoint(checkpoint, resolve_device(device))
    lo, hi = min(model.steps), max(model.steps)
    console.print(
        f"loaded run {model.cfg.name} from {checkpoint}: {model.cfg.n_stages} stages, codec {model.codec}, "
        f"step {lo if lo == hi else f'{lo}..{hi} (stages saved at different steps)'}",
        highlight=False,
    )
    out = generate_text(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    print(out.text)  # stdout holds only the text, so it can be piped
