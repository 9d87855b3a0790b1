"""The outer-loop sweep on tiny (batch 16, 400 steps, R = 4): held-out loss at the end of each run.

    python -m benchmarks.sweep_outer [R=1 | KEY=VALUE ...]

No arguments: exact sums (one pipeline on the whole batch). Otherwise the replica_sync overrides of one
R = 4 run, e.g. `compressor=none inner_steps=1 outer_lr_scale=none`.
"""

import sys

import torch
import yaml

from pmnode.config import load_config
from pmnode.core.train import train

torch.set_num_threads(1)
sync = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
cfg = load_config("tiny").with_overrides(
    train={"steps": 400, "eval_every": 400, "batch_size": 16}, replica_sync={"method": "outer", **sync}
)
s = train(cfg, cfg.codec_spec, replicas=4 if sync else 1)
print(sync or "exact sums", round(s.heldout_loss, 4), sum(s.sync_bytes_per_round))
