"""Subspace presets: what a config's subspace section means when it leaves a setting unset.

remedy (the default) is the fidelity study's best boundary (docs/benchmarks/fidelity: full width
inside a stage, stage-local token/pair/triple tables, 8-bit coefficients at 4x the rank); paper is
arXiv 2506.01260's constraint, every write in span(U), fp32.
"""

from __future__ import annotations

# What a preset sets when the config leaves it unset.
PRESETS: dict[str, dict[str, object]] = {
    "remedy": {"constrain": "boundaries", "stage_embeddings": True, "stage_bigrams": 4096, "stage_ngrams": 3},
    "paper": {"constrain": "layers", "stage_embeddings": False, "stage_bigrams": 0, "stage_ngrams": 2},
}
PRESET_CODEC = {"remedy": "subspace:int8", "paper": "subspace"}  # the codec when `codec` is unset
PRESET_RATIO = {"remedy": 8, "paper": 16}  # d / k when neither compression_rank nor _ratio is set


def switch_preset(sub: dict, new: dict) -> dict:
    """`sub` (a dumped subspace section, every field filled) updated with `new`. When `new` changes
    the preset, the settings a preset governs are dropped unless `new` sets them, so the new preset
    fills them: `+subspace.preset=paper` is the paper's constraint exactly, whatever tables the
    loaded config had (a dump cannot tell a file's explicit choice from its preset's value)."""
    out = dict(sub)
    if new.get("preset", out.get("preset", "remedy")) != out.get("preset", "remedy"):
        out = {k: v for k, v in out.items() if k not in PRESETS["paper"]}
    out.update(new)
    return out


def value_text(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def name_setting(gov: dict[str, object], preset: str, extras: list[str]) -> str:
    """A preset's name when the governed settings are exactly one's, else the run's preset and what
    differs from it; then the other settings (n_stages=4)."""
    base = next((name for name, values in PRESETS.items() if values == gov), None)
    parts = [base or preset]
    if base is None:
        parts += [f"{k}={value_text(v)}" for k, v in gov.items() if v != PRESETS[preset][k]]
    return ", ".join([*parts, *extras])
