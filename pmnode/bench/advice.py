"""What a compression choice costs: bytes per token by the codec's formula, the learning cost the
fidelity study measured (docs/benchmarks/fidelity/, shipped as fidelity_costs.json), and what a link
carries at a stage's token rate. `coordinator inspect` prints it; `recommended` picks from it."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from pmnode.bench.fidelity import compare, is_unconstrained, load_runs
from pmnode.bench.variants import parse_variant
from pmnode.config import RunConfig
from pmnode.core.codecs import wire_bytes

COSTS_FILE = Path(__file__).with_name("fidelity_costs.json")
RATIOS = (4, 8, 16, 32, 64)
DEFAULT_SETTING = "default"


class MeasuredCost(BaseModel):
    """One fidelity run's cost against the unconstrained model, at equal tokens."""

    d_over_k: float
    d_model: int
    rank: int
    variant: str
    codec: str = "subspace"  # the spec without the rank: subspace, subspace:int8, ...
    setting: str = DEFAULT_SETTING  # what the run changes beyond k and the model's shape
    corpus: str
    tokens: int
    complete: bool
    gap: float | None  # against the unconstrained model of the same architecture
    gap_plain: float | None  # against the plain unconstrained model of the same shape
    steps_ratio: float | None


class RankAdvice(BaseModel):
    """One way to compress this config's boundaries, and what it was measured to cost."""

    rank: int
    d_over_k: float
    codec: str
    setting: str
    bytes_per_token: int  # forward, per boundary; the backward is the same without the token ids
    link_tokens_per_s: float | None  # what the link carries at these bytes
    fits: bool | None  # the link carries the stage's token rate
    measured: MeasuredCost | None  # the longest run of this codec, d/k and setting


def setting_of(variant: str) -> str:
    """The variant's overrides beyond the model's shape, short: 'constrain=boundaries, stage_bigrams=4096'."""
    _, overrides = parse_variant(variant)
    flat: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not prefix.startswith("model."):
                flat.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")

    walk(overrides, "")
    return ", ".join(flat) or DEFAULT_SETTING


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
                codec=run.codec,
                setting=setting_of(row.variant),
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


def _evidence(m: MeasuredCost) -> tuple[bool, bool, int, str]:
    """Prefer complete runs, then runs with their own twin (a gap, not only vs plain), then length."""
    return m.complete, m.gap is not None, m.tokens, m.corpus


def advise(
    cfg: RunConfig, bandwidth: float | None = None, tokens_per_s: float | None = None
) -> list[RankAdvice]:
    """The paper's constraint in fp32 at every k in d/4 .. d/64 and the config's own k, and every
    other codec and setting the study measured, at its d/k; `bandwidth` in bytes/s per direction."""
    d, vocab = cfg.model.d_model, cfg.model.vocab_size
    options: dict[tuple[str, str, int], list[MeasuredCost]] = {}
    for r in {max(1, d // r) for r in RATIOS} | ({cfg.rank} if cfg.subspace.enabled else set()):
        options[("subspace", DEFAULT_SETTING, r)] = []
    for m in measured_costs():
        k = max(1, round(d / m.d_over_k))
        options.setdefault((m.codec, m.setting, k), []).append(m)
    rows = []
    for (codec, setting, k), costs in options.items():
        fwd, _ = wire_bytes(codec, d_model=d, vocab_size=vocab, rank=k)
        carried = bandwidth / fwd if bandwidth else None
        rows.append(
            RankAdvice(
                rank=k,
                d_over_k=round(d / k, 2),
                codec=codec,
                setting=setting,
                bytes_per_token=fwd,
                link_tokens_per_s=round(carried, 1) if carried is not None else None,
                fits=carried >= tokens_per_s if carried is not None and tokens_per_s else None,
                measured=max(costs, key=_evidence) if costs else None,
            )
        )
    return sorted(rows, key=lambda a: (a.bytes_per_token, a.setting != DEFAULT_SETTING, a.setting))


def _reshapes(setting: str) -> bool:
    """Fewer stages is the operator's call (memory per volunteer): shown, never recommended."""
    return "n_stages=" in setting or "stage_layers=" in setting


def _bound(row: RankAdvice, rows: list[RankAdvice]) -> float | None:
    """The row's measured gap, or the best one of the same codec and setting at a smaller k: a
    larger k costs no more (every fidelity sweep agrees)."""
    known = [
        r.measured.gap
        for r in rows
        if r.codec == row.codec and r.setting == row.setting and r.rank <= row.rank
        if r.measured and r.measured.complete and r.measured.gap is not None
    ]
    return min(known) if known else None


def recommended(rows: list[RankAdvice]) -> RankAdvice | None:
    """Of what the link carries at the stage's rate with the config's stages, the lowest long-run
    cost measured at that k or at a smaller one (ties: the larger k); with nothing measured, the
    largest fp32 k, since the cost falls as k grows."""
    fitting = [r for r in rows if r.fits and not _reshapes(r.setting)]
    bounded = [(b, r) for r in fitting if (b := _bound(r, rows)) is not None]
    if bounded:
        return min(bounded, key=lambda br: (br[0], -br[1].rank))[1]
    plain = [r for r in fitting if r.codec == "subspace" and r.setting == DEFAULT_SETTING]
    return max(plain, key=lambda r: r.rank) if plain else None
