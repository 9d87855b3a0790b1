"""The run config (pydantic, loaded from YAML) and its loaders.

Every field has a description and unknown keys are an error. Precedence is: CLI flag > config file >
default declared in the sections (pmnode/config/sections.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

import pmnode.configs
from pmnode.config.presets import PRESET_CODEC, switch_preset
from pmnode.config.replica_sync import ReplicaSyncConfig
from pmnode.config.sections import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    SubspaceConfig,
    SwarmConfig,
    TrainConfig,
    _Strict,
)
from pmnode.config.split import free_layer_range
from pmnode.config.trust import TrustConfig
from pmnode.errors import ConfigError, DataError

MOVED = {("train", "autocast_bf16"): "--bf16", ("swarm", "threads"): "--threads"}


class RunConfig(_Strict):
    """Everything a swarm agrees on: model, subspace, stage split, optimizer, data."""

    name: str = Field("run", description="Run name; also the DHT prefix of a swarm.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Transformer architecture.")
    subspace: SubspaceConfig = Field(
        default_factory=SubspaceConfig, description="Protocol Models subspace: seed, rank k, write mode."
    )
    n_stages: int = Field(2, ge=1, description="Pipeline stages the layers are split over.")
    stage_layers: list[int] | None = Field(
        None, description="Explicit layers per stage; None splits as evenly as possible."
    )
    codec: str | None = Field(
        None,
        description="Boundary codec spec; None means the subspace preset's (remedy: subspace:int8, "
        "paper: subspace) if enabled, else dense.",
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="Optimizer and learning-rate schedule."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and tokenizer.")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Steps, batch shapes, seeds, evaluation."
    )
    swarm: SwarmConfig = Field(default_factory=SwarmConfig, description="Pipeline schedule of a swarm.")
    replica_sync: ReplicaSyncConfig = Field(
        default_factory=ReplicaSyncConfig, description="How the replicas of a stage stay one model."
    )
    trust: TrustConfig = Field(
        default_factory=TrustConfig, description="Spot checks of the compute of stage 1's replicas."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        for (section, key), flag in MOVED.items():
            if isinstance(data, dict) and isinstance(data.get(section), dict) and key in data[section]:
                raise ConfigError(f"{section}.{key} is this machine's choice now, not the run's: pass {flag}")
        if isinstance(data, dict) and "vocab_size" not in (data.get("model") or {}):
            vocab = spec_vocab_size(data.get("data") or {})
            data = {**data, "model": {**(data.get("model") or {}), "vocab_size": vocab}}
        return data

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        sub = self.subspace  # also validates the layer split:
        free_layer_range(
            self.model.n_layers,
            self.n_stages,
            self.stage_layers,
            sub.uncompressed_tail_layers,
            sub.enabled and sub.constrain == "layers",
        )
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len")
        return self

    @property
    def codec_spec(self) -> str:
        if self.codec:
            return self.codec
        return PRESET_CODEC[self.subspace.preset] if self.subspace.enabled else "dense"

    @property
    def rank(self) -> int:
        return self.subspace.rank(self.model.d_model)

    def with_overrides(self, **sections: Any) -> RunConfig:
        """A copy with some fields replaced, e.g. with_overrides(train={"steps": 5}); re-validated."""
        data = self.model_dump()
        for section, values in sections.items():
            if section == "subspace":  # a new preset refills what held the old one's values
                data[section] = switch_preset(data[section], values)
            elif isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        try:
            return RunConfig.model_validate(data)
        except ValidationError as e:  # overrides come from flags: say which field, not a traceback
            raise ConfigError(f"invalid setting:\n{format_validation_error(e)}") from e


def parse_bpe(spec: str) -> int | None:
    """'bpe:4096' -> 4096; None for any other spec."""
    if not spec.startswith("bpe:"):
        return None
    n = spec.removeprefix("bpe:")
    if not n.isdigit() or not 257 <= int(n) <= 2**20:
        raise DataError(f"tokenizer {spec!r}: give bpe:N with N from 257 to 1048576 (e.g. bpe:4096)")
    return int(n)


def spec_vocab_size(data: Any) -> int:
    """An unset model.vocab_size, from what data.tokenizer says without reading a file: bytes 256,
    bpe:N N. A tokenizer.json's size is in the file: the data layer reads it (load_config's
    `vocab_size`), so validating a config never touches the disk."""
    spec = str(data.get("tokenizer", "byte")) if isinstance(data, dict) else "byte"
    if spec == "byte":
        return 256
    if (n := parse_bpe(spec)) is not None:
        return n
    raise ConfigError(
        f"model.vocab_size is unset and data.tokenizer {spec!r} is a file: set model.vocab_size, or load "
        "the config with pmnode.data.resolve.load_run_config, which reads the tokenizer"
    )


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


SHIPPED_CONFIGS = Path(pmnode.configs.__file__).resolve().parent  # package data: configs/ in the repository


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or a shipped config by path or bare name ('tiny'), from any working directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        for cand in (SHIPPED_CONFIGS / p.name, SHIPPED_CONFIGS / f"{p.name}.yaml"):
            if cand.is_file() and (p.parent == Path(".") or p.parent.name == "configs"):
                return cand
    shipped = ", ".join(sorted(c.stem for c in SHIPPED_CONFIGS.glob("*.yaml"))) or "none found"
    raise ConfigError(f"config file not found: {p} (shipped configs: {shipped})")


def load_config(
    path: str | Path,
    data: dict[str, Any] | None = None,
    vocab_size: Callable[[dict[str, Any]], int] | None = None,
) -> RunConfig:
    """Load and validate a YAML run config; raises ConfigError with one line per bad field. `data`
    overrides the data section before validation, so an unset vocab_size is that data's tokenizer's:
    `vocab_size(data section)` reads it (pmnode.data.resolve.load_run_config passes the reader of
    tokenizer files and prepared directories); without it, only what the spec says (spec_vocab_size)."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of config sections")
    if data:
        raw["data"] = {**(raw.get("data") or {}), **data}
    model = raw.get("model") or {}
    if vocab_size is not None and isinstance(model, dict) and "vocab_size" not in model:
        section = raw.get("data") or {}
        raw["model"] = {**model, "vocab_size": vocab_size(section if isinstance(section, dict) else {})}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {p}:\n{format_validation_error(e)}") from e
