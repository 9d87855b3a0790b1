"""What a compression rank costs: bytes per token by the codec's formula, the learning cost the
fidelity study measured (docs/benchmarks/fidelity/, shipped as fidelity_costs.json), and the largest
k a link carries at a stage's token rate. `coordinator inspect` prints it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel

from pmnode.bench.fidelity import compare, is_unconstrained, load_runs
from pmnode.config import RunConfig
from pmnode.core.codecs import token_dtype

COSTS_FILE = Path(__file__).with_name("fidelity_costs.json")
RATIOS = (4, 8, 16, 32, 64)


class MeasuredCost(BaseModel):
    """One fidelity run's cost against the unconstrained model, at equal tokens."""

    d_over_k: float
    d_model: int
    rank: int
    variant: str
    corpus: str
    tokens: int
    complete: bool
    gap: float | None  # against the unconstrained model of the same architecture
    gap_plain: float | None  # against the plain unconstrained model of the same shape
    steps_ratio: float | None


class RankAdvice(BaseModel):
    rank: int
    d_over_k: float
    bytes_per_token: int  # forward, per boundary; the backward is the same without the token ids
    bytes_per_token_int8: int
    link_tokens_per_s: float | None  # what the link carries at this k, fp32 coefficients
    fits: bool | None  # the link carries the stage's token rate
    measured: list[MeasuredCost]


def token_bytes(vocab_size: int) -> int:
    return torch.empty(0, dtype=token_dtype(vocab_size)).element_size()


def costs_from_runs(out: Path, corpus: str) -> list[MeasuredCost]:
    """The compressed runs of a `bench convergence --tokens` directory, as shipped costs."""
    runs = {r.variant: r for r in load_runs(out)}
    costs = []
    for row in compare(list(runs.values()), None):
        run = runs[row.variant]
        if row.rank is None or is_unconstrained(run) or (row.gap_end is None and row.gap_plain is None):
            continue
        costs.append(
            MeasuredCost(
                d_over_k=round(row.d_model / row.rank, 2),
                d_model=row.d_model,
                rank=row.rank,
                variant=row.variant,
                corpus=corpus,
                tokens=row.tokens,
                complete=run.complete,
                gap=row.gap_end,
                gap_plain=row.gap_plain,
                steps_ratio=row.steps_ratio,
            )
        )
    return costs


def measured_costs() -> list[MeasuredCost]:
    if not COSTS_FILE.is_file():
        return []
    return [MeasuredCost.model_validate(c) for c in json.loads(COSTS_FILE.read_text())]


def advise(
    cfg: RunConfig, bandwidth: float | None = None, tokens_per_s: float | None = None
) -> list[RankAdvice]:
    """One row per k in d/4 .. d/64 and the config's own k; `bandwidth` in bytes/s per direction."""
    d, tb = cfg.model.d_model, token_bytes(cfg.model.vocab_size)
    ranks = sorted({max(1, d // r) for r in RATIOS} | ({cfg.rank} if cfg.subspace.enabled else set()))
    measured = measured_costs()
    rows = []
    for k in ranks:
        fwd = 4 * k + tb
        carried = bandwidth / fwd if bandwidth else None
        rows.append(
            RankAdvice(
                rank=k,
                d_over_k=round(d / k, 2),
                bytes_per_token=fwd,
                bytes_per_token_int8=k + 2 + tb,
                link_tokens_per_s=round(carried, 1) if carried is not None else None,
                fits=carried >= tokens_per_s if carried is not None and tokens_per_s else None,
                measured=[m for m in measured if abs(m.d_over_k - d / k) < 0.5],
            )
        )
    return rows


def recommended(rows: list[RankAdvice]) -> RankAdvice | None:
    """The largest k the link carries at the stage's rate: the measured cost falls as k grows."""
    fitting = [r for r in rows if r.fits]
    return max(fitting, key=lambda r: r.rank) if fitting else None
