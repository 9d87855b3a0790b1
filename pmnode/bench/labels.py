"""Names for fidelity variants: the setting a run trained with (what `coordinator inspect` matches
measured costs by) and the short label its curve carries in a plot's legend.

A variant string says only what it changes. Which preset it changed it from is recorded in each run
(RunResult.preset); runs from before presets existed trained under the paper's constraint, the
default then, unless the variant is `default`/`default@d`, which only exist since.
"""

from __future__ import annotations

from pmnode.bench.variants import parse_variant
from pmnode.config.presets import PRESETS, name_setting, value_text

# Short names of the settings a preset governs, for legends: what each adds to the paper's.
_SHORT = {
    ("constrain", "boundaries"): "full width",
    ("stage_embeddings", True): "tok",
    ("stage_bigrams", None): "pairs",
    ("stage_ngrams", 3): "triples",
    ("stage_ngrams", 4): "4-grams",
}


def _flat(variant: str) -> dict[str, object]:
    _, overrides = parse_variant(variant)
    flat: dict[str, object] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)

    walk(overrides, "")
    return flat


def preset_of(variant: str, recorded: str | None) -> str:
    """The preset a run trained under: what it recorded, else what its variant and era imply."""
    if recorded is not None:
        return recorded
    explicit = _flat(variant).get("subspace.preset")
    if isinstance(explicit, str):
        return explicit
    return "remedy" if variant.split("+")[0] in ("default", "default@d") else "paper"


def governed(variant: str, preset: str) -> dict[str, object]:
    """The preset-governed subspace settings the run trained with."""
    flat = _flat(variant)
    out = dict(PRESETS[preset])
    for key, value in flat.items():
        if key.removeprefix("subspace.") in out:
            out[key.removeprefix("subspace.")] = value
    return out


def setting_of(variant: str, preset: str) -> str:
    """What the run changes beyond k, the codec and the model's shape: 'remedy', 'paper', or one of
    them with the settings that differ ('paper, constrain=boundaries, stage_bigrams=4096')."""
    skip = {"subspace.preset", "subspace.compression_rank", "subspace.compression_ratio"}
    skip |= {f"subspace.{k}" for k in PRESETS["paper"]}
    extras = [
        f"{k.split('.')[-1]}={value_text(v)}"
        for k, v in _flat(variant).items()
        if k not in skip and not k.startswith("model.")
    ]
    return name_setting(governed(variant, preset), preset, extras)


def short_setting(setting: str) -> str:
    """'paper, constrain=boundaries, stage_embeddings=true, stage_bigrams=4096' -> 'full width+tok+pairs'."""
    head, *rest = setting.split(", ")
    named = []
    extra = []
    for item in rest:
        key, _, raw = item.partition("=")
        value: object = {"true": True, "false": False}.get(raw, int(raw) if raw.isdigit() else raw)
        short = _SHORT.get((key, value)) or (_SHORT.get((key, None)) if key == "stage_bigrams" else None)
        if short:
            named.append(short)
        elif (key, value) not in (("stage_ngrams", 2), ("stage_embeddings", False)):
            extra.append(item)
    if head == "remedy":  # what it drops from the remedy
        return ", ".join([head, *rest])
    body = "+".join(named) if named else head
    return ", ".join([body, *extra])


def label(variant: str, codec: str, rank: int | None, d_model: int, preset: str) -> str:
    """A legend's name: 'int8 k=d/8, remedy', 'fp32 k=d (twin), remedy', 'dense'."""
    if rank is None:
        return "dense"
    precision = codec.partition(":")[2] or "fp32"
    k = "d (twin)" if rank == d_model else f"d/{d_model // rank}" if d_model % rank == 0 else str(rank)
    return f"{precision} k={k}, {short_setting(setting_of(variant, preset))}"
