"""The Protocol Model claims, checked exactly in fp32 on the CPU (issue: core, tests a-d)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from roundtrip import roundtrip

from pmnode.config import RunConfig
from pmnode.core.codecs import make_codec
from pmnode.core.stages import Stage, build_subspace
from pmnode.core.subspace import Subspace, fingerprint, make_basis, make_token_table
from pmnode.core.worker import StageWorker

D, K, V, T = 64, 8, 256, 16


def cfg_for(n_stages: int, mode: str = "projection", **sub) -> RunConfig:
    """The paper's constraint: every write in span(U), so a boundary's projection loses nothing and
    the split model is the unsplit one (the remedy projects where a stage ends: a different model)."""
    sub = {"preset": "paper", **sub}
    return RunConfig.model_validate(
        {
            "model": {
                "d_model": D,
                "n_layers": 4,
                "n_heads": 4,
                "n_kv_heads": 2,
                "vocab_size": V,
                "max_seq_len": 32,
            },
            "subspace": {"compression_rank": K, "mode": mode, "uncompressed_tail_layers": 1, **sub},
            "n_stages": n_stages,
            "train": {"seq_len": T, "batch_size": 4},
            "optim": {"warmup_steps": 0},
        }
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)


@pytest.mark.parametrize("mode", ["projection", "reparam"])
@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_split_equals_unsplit(mode: str, n_stages: int) -> None:
    """(a) subspace at every boundary: same loss and same parameter gradients as the unsplit model."""
    full_cfg, split_cfg = cfg_for(1, mode), cfg_for(n_stages, mode)
    sub = build_subspace(full_cfg)
    full = Stage(full_cfg, 0, sub)
    stages = [Stage(split_cfg, i, sub) for i in range(n_stages)]
    codec = make_codec("subspace", d_model=D, vocab_size=V, subspace=sub)
    tok, tgt = batch()

    loss_full = F.cross_entropy(full(None, tok).flatten(0, 1), tgt.flatten())
    loss_full.backward()
    x = None
    for s in stages:
        x = s(x, tok)
        if not s.is_last:
            x = roundtrip(codec, x, tok)
    loss_split = F.cross_entropy(x.flatten(0, 1), tgt.flatten())
    loss_split.backward()

    assert abs(loss_split.item() - loss_full.item()) / loss_full.item() <= 1e-5
    for s in [full, *stages]:  # what the optimizer sees (a no-op in reparam mode)
        s.project_grads_()
    ref = dict(full.named_parameters())
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(ref)  # a split covers every parameter exactly once
    for s in stages:
        for name, p in s.named_parameters():
            assert rel(p.grad, ref[name].grad) <= 1e-5, name


@pytest.mark.parametrize("mode", ["projection", "reparam"])
def test_invariant_survives_training(mode: str) -> None:
    """(b) after 20 AdamW steps the boundary reconstruction error stays <= 1e-5 relative."""
    cfg = cfg_for(4, mode).with_overrides(optim={"lr": 1e-2, "weight_decay": 0.1})
    sub = build_subspace(cfg)
    workers = [StageWorker(cfg, i, "subspace", subspace=sub) for i in range(4)]
    for step in range(20):
        tok, tgt = batch(step)
        p = workers[0].forward("m", tokens=tok)
        for w in workers[1:-1]:
            p = w.forward("m", p)
        _, g = workers[-1].forward_backward("m", p, tgt)
        for w in reversed(workers[:-1]):
            g = w.backward("m", g)
        for w in workers:
            w.step(20)
    tok, _ = batch(99)
    x = None
    with torch.no_grad():
        for s in (w.stage for w in workers[:-1]):
            x = s(x, tok)
            rebuilt = sub.decode(sub.encode(x, tok), tok)
            assert rel(rebuilt, x) <= 1e-5
            assert sub.residual_error(x, tok).item() <= 1e-4  # off-span part of x - F[tok] alone
    # The weights really moved: the check above is not vacuous.
    fresh = Stage(cfg, 1, sub)
    assert rel(workers[1].stage.layers["1"].attn.wo.weight, fresh.layers["1"].attn.wo.weight) > 1e-2


_BYTES_SNIPPET = """
import hashlib
from pmnode.core.subspace import make_basis, make_token_table
u, f = make_basis(7, 96, 12), make_token_table(7, 300, 96)
print(hashlib.sha256(u.numpy().tobytes() + f.numpy().tobytes()).hexdigest())
"""


def test_basis_bit_identical_across_processes() -> None:
    """(c) the same seed gives the same bytes in two processes; another seed another fingerprint."""
    outs = [
        subprocess.run([sys.executable, "-c", _BYTES_SNIPPET], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout.strip()) == 64
    u, f = make_basis(7, 96, 12), make_token_table(7, 300, 96)
    import hashlib

    assert hashlib.sha256(u.numpy().tobytes() + f.numpy().tobytes()).hexdigest() == outs[0].stdout.strip()
    assert torch.allclose(u.T @ u, torch.eye(12), atol=1e-6)
    assert torch.linalg.matrix_rank(f).item() == 96
    a = Subspace(seed=1, d_model=D, rank=K, vocab_size=V).fingerprint
    assert a == Subspace(seed=1, d_model=D, rank=K, vocab_size=V).fingerprint
    assert a != Subspace(seed=2, d_model=D, rank=K, vocab_size=V).fingerprint
    assert fingerprint(u, f) != fingerprint(u, make_token_table(8, 300, 96))


def test_gradient_crossing_boundary_has_k_numbers_per_token() -> None:
    """(d) what travels back is dL/dc: (B, T, k), and nothing else."""
    cfg = cfg_for(2)
    sub = build_subspace(cfg)
    head, tail = StageWorker(cfg, 0, subspace=sub), StageWorker(cfg, 1, subspace=sub)
    tok, tgt = batch()
    p = head.forward("m", tokens=tok)
    assert p.tensors["v"].shape == (4, T, K) and p.tensors["tokens"].dtype == torch.uint8
    _, g = tail.forward_backward("m", p, tgt)
    assert list(g.tensors) == ["v"] and g.tensors["v"].shape == (4, T, K)
    assert g.nbytes == 4 * T * K * 4
    assert head.backward("m", g) is None


def test_reparam_and_projection_start_identical() -> None:
    """Both modes realise the same function at init, so the mode comparison is fair."""
    tok, _ = batch()
    outs = []
    for mode in ("projection", "reparam"):
        cfg = cfg_for(1, mode)
        outs.append(Stage(cfg, 0)(None, tok))
    assert rel(outs[1], outs[0]) <= 1e-5
