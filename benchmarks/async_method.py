r"""Async learning against sync at equal steps, in one process per run (pmnode.core.async_pipeline).

    python -m benchmarks.async_method --config configs/tiny.yaml --steps 300 --jobs 2 \
        --run sync --run "w8:window=8" --run "w8-none:window=8,swarm.async_correction=none" \
        --out docs/benchmarks/async/method/tiny

A run is `name:key=value,...`. `sync` is `pmnode train` (the reference). Every other run is the async
emulation: `window` (micro-batches in flight, default one step's), `hop` (latency between stages, in
forwards; default 0) and any config field by its dotted path (`swarm.async_correction=none`,
`optim.lr=0.001`). Writes results.json (curves) and prints one line per run; the report is made from
the JSON by `benchmarks.async_method_report`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel

from pmnode.config import RunConfig, load_config


class MethodRun(BaseModel):
    name: str
    spec: str
    window: int | None = None
    hop: float = 0.0
    delays: list[float] = []  # mean steps late of the gradients each stage applied
    evals: list[tuple[int, float]]  # (step, held-out)
    heldout: float
    seconds: float


def parse(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def configure(base: RunConfig, settings: dict[str, str]) -> RunConfig:
    sections: dict[str, dict] = {}
    for key, value in settings.items():
        if key in ("window", "hop"):
            continue
        section, _, fld = key.partition(".")
        sections.setdefault(section, {})[fld] = yaml.safe_load(value)
    return base.with_overrides(**sections) if sections else base


def one(args: tuple[str, str, int, int]) -> MethodRun:
    config, spec, steps, eval_every = args
    torch.set_num_threads(1)
    from pmnode.core.async_pipeline import AsyncPipeline
    from pmnode.core.train import train
    from pmnode.data.resolve import open_data
    from pmnode.data.shards import DataPosition

    name, settings = parse(spec)
    base = load_config(config).with_overrides(train={"steps": steps, "eval_every": eval_every})
    cfg = configure(base, settings)
    t0 = time.perf_counter()
    if name == "sync":
        s = train(cfg, cfg.codec_spec)
        curve = [(step, h) for step, _, h in s.evals]
        return MethodRun(
            name=name, spec=spec, evals=curve, heldout=s.heldout_loss, seconds=time.perf_counter() - t0
        )
    t = cfg.train
    n_micro = t.batch_size // t.micro
    window = int(settings.get("window", n_micro))
    hop = float(settings.get("hop", 0.0))
    data = open_data(cfg.data, t.seq_len, cfg.model.vocab_size)
    heldout = data.heldout.eval_batches(t.eval_batches, t.batch_size)
    order: list[tuple[torch.Tensor, torch.Tensor]] = []
    pos = DataPosition()
    for _ in range(steps):
        x, y, pos = data.train.batch(pos, t.batch_size, t.seed)
        order.append((x, y))
    pipe = AsyncPipeline(cfg, window, hop, cfg.codec_spec)
    evals: list[tuple[int, float]] = []

    def on_step(step: int, _losses: list[float]) -> None:
        if step % eval_every == 0 and step < steps:
            evals.append((step, pipe.eval_loss(heldout)))

    stats = pipe.run(lambda j: order[j], steps, on_step)
    evals.append((steps, pipe.eval_loss(heldout)))
    return MethodRun(
        name=name,
        spec=spec,
        window=window,
        hop=hop,
        delays=[round(d, 3) for d in stats.delays],
        evals=evals,
        heldout=evals[-1][1],
        seconds=time.perf_counter() - t0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--run", action="append", required=True, help="name:key=value,... (see above)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    done = {r["spec"]: r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}
    todo = [(a.config, spec, a.steps, a.eval_every) for spec in a.run if spec not in done]
    # A corpus is prepared once, here: the pool's workers are daemons and cannot start the tokenizers.
    from pmnode.data.resolve import open_data

    base = load_config(a.config)
    open_data(base.data, base.train.seq_len, base.model.vocab_size)
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, a.jobs)) as pool:
        for r in pool.imap_unordered(one, todo):
            done[r.spec] = r.model_dump()
            print(f"{r.name:>24} held-out {r.heldout:.4f}  delays {r.delays}  {r.seconds:.0f} s", flush=True)
            meta = {"config": a.config, "steps": a.steps, "eval_every": a.eval_every}
            path.write_text(json.dumps({**meta, "runs": list(done.values())}, indent=1))


if __name__ == "__main__":
    main()
