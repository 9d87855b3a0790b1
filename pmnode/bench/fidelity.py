"""Long-run convergence per variant: token-matched held-out curves, steps to a target, diagnostics.

Each variant's run is written to OUT/runs/<variant>.json as soon as it ends, so variants can be
trained by several invocations (in parallel, or across sessions) into one directory, and the
report (results.json, results.md, plots) is rebuilt from every run found there.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from pmnode.bench.core import codec_bytes
from pmnode.bench.diagnostics import Diagnostics, diagnose
from pmnode.bench.variants import parse_variant, slug, variant_config
from pmnode.config import RunConfig
from pmnode.core.progress import train_with_progress
from pmnode.core.train import StepInfo


class RunResult(BaseModel):
    variant: str
    codec: str
    d_model: int
    rank: int | None
    constrain: str | None
    boundaries: int
    bytes_per_token: int
    bytes_per_token_backward: int
    steps: int
    tokens: int
    tokens_per_s: float
    heldout_loss: float
    curve: list[tuple[int, int, float]]  # (step, tokens seen, held-out loss)
    diagnostics: Diagnostics | None
    config_hash: str
    command: str
    complete: bool = True  # False: the run was cut short; the curve holds what it reached
    preset: str | None = None  # subspace.preset; None: before presets (bench.labels.preset_of)
    replicas: int = 1  # R replicas of every stage, joined by replica_sync (pmnode.core.replica_train)
    sync_bytes_per_round: list[int] = []  # per stage, what one replica sends per outer round
    outer_rounds: int = 0
    sync_params_per_stage: list[int] = []


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def with_tokens(cfg: RunConfig, tokens: int | None, eval_points: int) -> RunConfig:
    """Steps for a token budget, and an evaluation cadence giving about `eval_points` points."""
    t = cfg.train
    steps = math.ceil(tokens / (t.batch_size * t.seq_len)) if tokens else t.steps
    return cfg.with_overrides(train={"steps": steps, "eval_every": max(1, steps // eval_points)})


def run_name(spec: str, replicas: int = 1) -> str:
    return slug(spec) if replicas == 1 else f"{slug(spec)}+replicas_{replicas}"


def run_variant(
    cfg: RunConfig, spec: str, out: Path, device: str, console: Console, command: str, replicas: int = 1
) -> RunResult:
    """Train one variant; its JSON is rewritten at every evaluation (complete=False until the end),
    so a run cut short by the end of a session still leaves its curve."""
    run_cfg, codec = variant_config(cfg, spec)
    t = run_cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    sub = run_cfg.subspace
    wire = codec_bytes(run_cfg, codec)
    result = RunResult(
        variant=spec,
        codec=codec,
        d_model=run_cfg.model.d_model,
        rank=run_cfg.rank if sub.enabled else None,
        constrain=sub.constrain if sub.enabled else None,
        preset=sub.preset,
        boundaries=run_cfg.n_stages - 1,
        bytes_per_token=wire["bytes_per_token_forward"],
        bytes_per_token_backward=wire["bytes_per_token_backward"],
        steps=0,
        tokens=0,
        tokens_per_s=0.0,
        heldout_loss=math.nan,
        curve=[],
        diagnostics=None,
        config_hash=config_hash(run_cfg),
        command=command,
        complete=False,
        replicas=replicas,
    )
    path = out / "runs" / f"{run_name(spec, replicas)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def on_eval(info: StepInfo) -> None:
        assert info.heldout is not None
        result.curve.append((info.step, info.step * tokens_per_step, round(info.heldout, 4)))
        result.steps, result.tokens = info.step, info.step * tokens_per_step
        result.heldout_loss, result.tokens_per_s = round(info.heldout, 4), round(info.tokens_per_s, 1)
        path.write_text(result.model_dump_json(indent=1))

    found: list[Diagnostics] = []
    s = train_with_progress(
        run_cfg,
        codec,
        device,
        console,
        on_end=lambda pipe, batches: found.append(diagnose(pipe, batches)),
        on_eval=on_eval,
        replicas=replicas,
    )
    result.sync_bytes_per_round, result.outer_rounds = s.sync_bytes_per_round, s.outer_rounds
    result.sync_params_per_stage = s.sync_params_per_stage
    result.tokens_per_s = round(s.tokens_per_s, 1)
    result.diagnostics = found[0] if found else None
    result.complete = True
    path.write_text(result.model_dump_json(indent=1))
    return result


def load_runs(out: Path) -> list[RunResult]:
    return [RunResult.model_validate_json(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def steps_to(curve: list[tuple[int, int, float]], target: float) -> float | None:
    """The first step where the held-out curve reaches `target`, interpolated between evaluations."""
    prev_step, prev_loss = 0, math.inf
    for step, _, loss in curve:
        if loss <= target:
            if math.isinf(prev_loss):
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def loss_at(curve: list[tuple[int, int, float]], tokens: int) -> float | None:
    """Held-out loss at a token count, interpolated; None outside the curve."""
    for (_, t0, l0), (_, t1, l1) in itertools.pairwise(curve):
        if t0 <= tokens <= t1:
            return l0 + (l1 - l0) * (tokens - t0) / max(1, t1 - t0)
    return None


class Row(BaseModel):
    variant: str
    d_model: int
    rank: int | None
    constrain: str | None
    boundaries: int
    bytes_per_token: int
    tokens: int
    heldout_loss: float
    mid_loss: float | None
    baseline: str | None = None  # the unconstrained (k = d) run of the same architecture
    gap_end: float | None = None  # against that baseline, at equal tokens
    gap_mid: float | None = None  # the same at half the run's tokens
    gap_plain: float | None = None  # against the plain unconstrained model of the same shape
    gap_dense: float | None = None  # against the plain dense model, at equal tokens
    steps_to_target: float | None = None
    steps_ratio: float | None = None  # steps to the target over the unconstrained model's


def is_unconstrained(r: RunResult) -> bool:
    """k = d: U spans everything, so this is the subspace architecture with no constraint."""
    return r.codec == "subspace" and r.rank == r.d_model


# Settings that say how a model is compressed, not what model it is: variants that differ only in
# these are the same architecture, and the unconstrained (k = d) one among them is their baseline.
_COMPRESSION_KEYS = {
    "n_stages",
    "stage_layers",
    "subspace.constrain",
    "subspace.compression_rank",
    "subspace.compression_ratio",
    "subspace.uncompressed_tail_layers",
    "optim.write_lr_scale",
}


def architecture(variant: str, plain: bool = False) -> str:
    """The variant's model as a key: its overrides less the compression settings; `plain` keeps
    only the model's shape (model.*), the architecture without any remedy's extra parts."""
    _, overrides = parse_variant(variant)
    flat: dict[str, object] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)

    walk(overrides, "")
    # Stage tables come one per stage: with them, the stage count is part of the model.
    per_stage = bool(flat.get("subspace.stage_embeddings") or flat.get("subspace.stage_bigrams"))
    keep = {k: v for k, v in flat.items() if k not in _COMPRESSION_KEYS or (per_stage and "stage" in k)}
    if plain:
        keep = {k: v for k, v in keep.items() if k.startswith("model.")}
    return ",".join(f"{k}={keep[k]}" for k in sorted(keep))


def compare(runs: list[RunResult], target: float | None) -> list[Row]:
    """Each run against the unconstrained run of the same architecture, at equal tokens and in steps
    to a target held-out loss (None: that baseline's final loss); also against the plain
    unconstrained model of its shape and against plain dense."""
    bases: dict[str, RunResult] = {}
    plains: dict[str, RunResult] = {}
    dense: dict[str, RunResult] = {}
    for r in runs:
        if is_unconstrained(r):
            bases.setdefault(architecture(r.variant), r)
            # `default@d` is the shipped config at k = d, its extra parts (tables) included, which its
            # variant string does not name: it is a twin, never the plain model.
            if not r.variant.startswith("default"):
                plains.setdefault(architecture(r.variant), r)
        if r.codec == "dense" and r.rank is None:
            dense.setdefault(architecture(r.variant, plain=True), r)
    rows = []
    for r in runs:
        b = bases.get(architecture(r.variant))
        plain = plains.get(architecture(r.variant, plain=True))
        dn = dense.get(architecture(r.variant, plain=True))
        mid_tokens = r.tokens // 2
        mid = loss_at(r.curve, mid_tokens)
        row = Row(
            variant=r.variant,
            d_model=r.d_model,
            rank=r.rank,
            constrain=r.constrain,
            boundaries=r.boundaries,
            bytes_per_token=r.bytes_per_token,
            tokens=r.tokens,
            heldout_loss=r.heldout_loss,
            mid_loss=round(mid, 4) if mid is not None else None,
            baseline=b.variant if b is not None else None,
        )
        if dn is not None:
            row.gap_dense = _gap(r.heldout_loss, _end(dn, r.tokens))
        if plain is not None:
            row.gap_plain = _gap(r.heldout_loss, _end(plain, r.tokens))
        if b is not None:
            row.gap_end = _gap(r.heldout_loss, _end(b, r.tokens))
            row.gap_mid = _gap(mid, loss_at(b.curve, mid_tokens))
            goal = target if target is not None else b.heldout_loss
            mine, theirs = steps_to(r.curve, goal), steps_to(b.curve, goal)
            row.steps_to_target = round(mine, 1) if mine is not None else None
            row.steps_ratio = round(mine / theirs, 3) if mine and theirs else None
        rows.append(row)
    return rows


def _end(base: RunResult, tokens: int) -> float | None:
    return base.heldout_loss if base.tokens == tokens else loss_at(base.curve, tokens)


def _gap(mine: float | None, base: float | None) -> float | None:
    return round(mine / base - 1, 4) if mine is not None and base else None
