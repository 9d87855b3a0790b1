"""What a compression choice costs: bytes per token by the codec's formula, the learning cost the
fidelity study measured (docs/benchmarks/fidelity/, shipped as fidelity_costs.json beside this
module; pmnode.bench.fidelity_report.costs_from_runs builds it), and what a link
carries at a stage's token rate. `coordinator inspect` prints it; `recommended` picks from it."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from pmnode.config import RunConfig
from pmnode.config.presets import PRESETS, name_setting
from pmnode.core.codecs import wire_bytes

COSTS_FILE = Path(__file__).with_name("fidelity_costs.json")
RATIOS = (4, 8, 16, 32, 64)
PAPER = "paper"  # the paper's constraint, nothing else: what the fp32 rows at every d/k are


class MeasuredCost(BaseModel):
    """One fidelity run's cost against the unconstrained model, at equal tokens."""

    d_over_k: float
    d_model: int
    rank: int
    variant: str
    codec: str = "subspace"  # the spec without the rank: subspace, subspace:int8, ...
    setting: str = PAPER  # what the run trained with beyond k and the model's shape (config.presets)
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
    spread: list[MeasuredCost] = []  # every complete run of it with a twin, one per corpus
    shipped: bool = False  # the config's own codec, k and setting


def config_setting(cfg: RunConfig) -> str:
    """The shipped config's own setting, named like a run's: 'remedy', 'paper' or one of them with
    what differs ('remedy, stage_embeddings=false, stage_bigrams=16384')."""
    sub = cfg.subspace
    gov = {k: getattr(sub, k) for k in PRESETS["paper"]}
    return name_setting(gov, sub.preset, [])


def measured_costs() -> list[MeasuredCost]:
    if not COSTS_FILE.is_file():
        return []
    return [MeasuredCost.model_validate(c) for c in json.loads(COSTS_FILE.read_text())]


def _evidence(m: MeasuredCost) -> tuple[bool, bool, int, int, str]:
    """Prefer complete runs, then runs with their own twin (a gap, not only vs plain), then length,
    then the wider model (nearer real ones)."""
    return m.complete, m.gap is not None, m.tokens, m.d_model, m.corpus


def advise(
    cfg: RunConfig, bandwidth: float | None = None, tokens_per_s: float | None = None
) -> list[RankAdvice]:
    """The paper's constraint in fp32 at every k in d/4 .. d/64 and the config's own k, and every
    other codec and setting the study measured, at its d/k; `bandwidth` in bytes/s per direction."""
    d, vocab = cfg.model.d_model, cfg.model.vocab_size
    options: dict[tuple[str, str, int], list[MeasuredCost]] = {}
    for r in {max(1, d // r) for r in RATIOS}:
        options[("subspace", PAPER, r)] = []
    shipped = None
    if cfg.subspace.enabled:  # the config as shipped leads
        shipped = (cfg.codec_spec.partition("@")[0], config_setting(cfg), cfg.rank)
        options[shipped] = []
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
                spread=_spread(costs),
                shipped=(codec, setting, k) == shipped,
            )
        )
    return sorted(rows, key=lambda a: (not a.shipped, a.bytes_per_token, a.setting != PAPER, a.setting))


def _spread(costs: list[MeasuredCost]) -> list[MeasuredCost]:
    """The best-evidenced complete run with a twin per corpus, lowest gap first."""
    best: dict[str, MeasuredCost] = {}
    for m in costs:
        if not m.complete or m.gap is None:
            continue
        if m.corpus not in best or _evidence(m) > _evidence(best[m.corpus]):
            best[m.corpus] = m
    return sorted(best.values(), key=lambda m: m.gap or 0.0)


def spread_text(row: RankAdvice) -> str | None:
    """'+0.9% (stdlib-v2, 5.0M) to +3.0% (prose-v2, 5.0M), 3 corpora', or None with under two."""
    s = row.spread
    if len(s) < 2:
        return None
    lo, hi = s[0], s[-1]
    return (
        f"{100 * (lo.gap or 0):+.1f}% ({lo.corpus}, {lo.tokens / 1e6:.1f}M) to "
        f"{100 * (hi.gap or 0):+.1f}% ({hi.corpus}, {hi.tokens / 1e6:.1f}M), {len(s)} corpora"
    )


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
    plain = [r for r in fitting if r.codec == "subspace" and r.setting == PAPER]
    return max(plain, key=lambda r: r.rank) if plain else None
