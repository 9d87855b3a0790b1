"""The GPU table shipped with pmnode plan (gpus.json): bf16 dense peak and memory, with sources."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

from pydantic import BaseModel

from pmnode.errors import ConfigError


class Gpu(BaseModel):
    name: str
    label: str
    bf16_tflops: float
    memory_gb: float
    source: str


@cache
def gpu_table() -> dict[str, Gpu]:
    data = json.loads(files("pmnode.plan").joinpath("gpus.json").read_text())
    return {g["name"]: Gpu.model_validate(g) for g in data["gpus"]}


def gpu_named(name: str) -> Gpu:
    key = name.strip().lower().replace(" ", "").removeprefix("geforce")
    table = gpu_table()
    if key not in table:
        raise ConfigError(f"unknown --gpu {name!r}: use one of {', '.join(table)}, or --tflops X")
    return table[key]
