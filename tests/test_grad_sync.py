"""replica_sync.method grads (pmnode.core.grad_sync): R replicas' gradient sums, compressed every step,
one optimizer step on the decoded total. Exact without compression; error feedback keeps what top-k
leaves out; swarms refuse it in one line."""

from __future__ import annotations

import pytest
import torch

from pmnode.config import load_config
from pmnode.config.replica_sync import check_for_swarm
from pmnode.core.grad_sync import GradShares
from pmnode.core.replica_train import ReplicatedPipeline
from pmnode.core.train import Pipeline
from pmnode.errors import ConfigError

CFG = load_config("configs/tiny.yaml")


def _weights(pipe: Pipeline | ReplicatedPipeline) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for w in pipe.workers for p in w.stage.parameters()])


def test_uncompressed_shares_are_the_single_pipeline_bit_for_bit() -> None:
    cfg = CFG.with_overrides(replica_sync={"method": "grads", "compressor": "none"})
    torch.manual_seed(0)
    grads = ReplicatedPipeline(cfg, cfg.codec_spec, "cpu", 4)
    torch.manual_seed(0)
    single = Pipeline(cfg.with_overrides(train={"micro_batch_size": 2}), cfg.codec_spec, "cpu")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = (torch.randint(0, cfg.model.vocab_size, (8, cfg.train.seq_len), generator=g) for _ in "xy")
        assert grads.train_step(x, y, 10) == single.train_step(x, y, 10)
    assert torch.equal(_weights(grads), _weights(single))
    assert grads.rounds == 3 and grads.bytes_per_round[0] == 4 * sum(
        p.numel() for p in grads.workers[0].stage.parameters() if p.requires_grad
    )


def test_top_k_keeps_what_it_leaves_out_for_the_next_step() -> None:
    rs = CFG.replica_sync.model_copy(
        update={"method": "grads", "compressor": "topk", "exact_below": 0, "error_feedback": 1.0}
    )
    p = torch.nn.Parameter(torch.zeros(64, 128))
    shares = GradShares([p], rs, seed=0)
    g1, g2 = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)), torch.randn(64, 128)
    (d1,) = shares.share([g1])
    assert d1 is not None and 0 < int((d1 != 0).sum()) <= 0.02 * g1.numel()  # 1% of each 4,096-chunk
    torch.testing.assert_close(d1 + shares.residual[0], g1)  # nothing lost: the rest waits
    (d2,) = shares.share([g2])
    torch.testing.assert_close(d1 + d2 + shares.residual[0], g1 + g2, rtol=0, atol=1e-5)
    assert shares.share([None]) == [None]  # a parameter without gradients sends none


def test_swarms_refuse_it() -> None:
    cfg = CFG.with_overrides(replica_sync={"method": "grads"})
    with pytest.raises(ConfigError, match=r"bench convergence --replicas` only so far"):
        check_for_swarm(cfg.replica_sync)
