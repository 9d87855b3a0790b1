"""`coordinator inspect`'s per-stage sizing: parameters, memory per precision, FLOPs, wire bytes."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from pmnode.core.sizing import HEADROOM, PRECISIONS, StageSize, human


def fits(size: StageSize, memory: int) -> dict[str, dict[str, bool]]:
    """Per precision option: whether the stage fits `memory` bytes, without and with checkpointing."""
    return {
        p: {"plain": size.required(p) <= memory, "checkpointed": size.required(p, True) <= memory}
        for p in PRECISIONS
    }


def sizes_json(sizes: list[StageSize], memory: int | None) -> list[dict[str, Any]]:
    out = []
    for s in sizes:
        row = s.model_dump()
        if memory is not None:
            row["fits"] = fits(s, memory)
        out.append(row)
    return out


def print_sizes(console: Console, sizes: list[StageSize], memory: int | None) -> None:
    params = Table(
        "stage",
        "layers",
        "trainable",
        "of which writes",
        "frozen U, F",
        "GFLOP/token fwd+bwd",
        "B/token fwd",
        "B/token bwd",
        title="per stage",
    )
    for s in sizes:
        params.add_row(
            str(s.stage),
            f"{s.layers[0]}..{s.layers[1] - 1}",
            f"{s.params_trainable / 1e6:,.1f}M",
            f"{s.params_writes / 1e6:,.1f}M",
            f"{s.params_frozen / 1e6:,.1f}M",
            f"{(s.flops_per_token_fwd + s.flops_per_token_bwd) / 1e9:.2f}",
            str(s.bytes_per_token_fwd or "-"),
            str(s.bytes_per_token_bwd or "-"),
        )
    console.print(params)
    mem = Table(
        "stage",
        "precision",
        "weights",
        "grads",
        "optimizer",
        "frozen",
        "activations",
        "act. ckpt",
        "total",
        "total ckpt",
        *(["fits"] if memory is not None else []),
        title="memory per stage, GiB (activations: one micro-batch; ckpt: per-layer checkpointing)",
    )
    for s in sizes:
        for m in s.memory:
            row = [
                str(s.stage),
                m.precision,
                *(
                    f"{b / 2**30:.2f}"
                    for b in (
                        m.weights,
                        m.grads,
                        m.optimizer,
                        m.frozen,
                        m.activations,
                        m.activations_checkpointed,
                        m.total,
                        m.total_checkpointed,
                    )
                ),
            ]
            if memory is not None:
                ok = fits(s, memory)[m.precision]
                row.append("yes" if ok["plain"] else "ckpt" if ok["checkpointed"] else "no")
            mem.add_row(*row)
    console.print(mem)
    if memory is not None:
        console.print(f"fits: the total x {HEADROOM:g} (headroom) within {human(memory)}")
