"""Named model variants for benchmarks: a codec spec plus config overrides, in one string.

    dense                                   the plain model (no F, no branch norm)
    subspace@d                              the same architecture as subspace, unconstrained (k = d)
    subspace@8                              k = 8, every residual write in span(U) (the paper's)
    subspace@8+subspace.constrain=boundaries+n_stages=2
                                            k = 8, full width inside stages, projected where they end
    default                                 the config exactly as shipped (its codec and precision)
    default@d                               its same-architecture twin: k = d, fp32, nothing projected

Each `+key=value` sets one config field by its dotted path; the value is read as YAML
(`true`, `3e-3`, `[4, 4]`). Specs are separated by commas on the command line, so a value
holds no comma.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from pmnode.config import RunConfig
from pmnode.config.presets import switch_preset
from pmnode.core.train import config_for
from pmnode.errors import ConfigError


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """'subspace@8+optim.lr=1e-3' -> ('subspace@8', {'optim': {'lr': 0.001}})."""
    codec, *sets = spec.split("+")
    overrides: dict[str, Any] = {}
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"variant {spec!r}: {item!r} is not key=value")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _value(raw)
    return codec, overrides


def _value(raw: str) -> Any:
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def variant_config(cfg: RunConfig, spec: str) -> tuple[RunConfig, str]:
    """The run config and codec a variant trains with."""
    codec_spec, overrides = parse_variant(spec)
    if overrides:
        data = cfg.model_dump()
        _merge(data, overrides)
        try:
            cfg = RunConfig.model_validate(data)
        except Exception as e:  # pydantic's message names the field
            raise ConfigError(f"variant {spec!r}: {e}") from e
    if codec_spec in ("default", "default@d"):  # the config as shipped, or its twin at k = d
        if codec_spec == "default@d" and not cfg.subspace.enabled:
            raise ConfigError(f"variant {spec!r}: default@d needs subspace.enabled in the config")
        # The twin is the study's baseline: the same architecture unconstrained, full precision.
        codec_spec = cfg.codec_spec if codec_spec == "default" else "subspace@d"
    if codec_spec.endswith("@d"):  # k = d whatever d the overrides chose: the unconstrained model
        codec_spec = f"{codec_spec[:-2]}@{cfg.model.d_model}"
    return config_for(cfg, codec_spec)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if k == "subspace" and isinstance(v, dict) and "preset" in v:  # refill from the new preset
            into[k] = switch_preset(into[k], {"preset": v["preset"]})
            _merge(into[k], v)
        elif isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def slug(spec: str) -> str:
    """A file name for a variant: 'subspace@8+n_stages=2' -> 'subspace_8+n_stages_2'."""
    return re.sub(r"[^A-Za-z0-9+._-]", "_", spec)
