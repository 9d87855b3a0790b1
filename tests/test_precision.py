"""The memory options of a machine: 8-bit AdamW moments, per-layer activation checkpointing, fused
AdamW. Each trains what the plain stage trains (within what 8 bits keep), and survives a state copy."""

from __future__ import annotations

import torch

from pmnode.config import load_config
from pmnode.core.adam8 import AdamW8bit, dequantize_v, quantize_m, quantize_v
from pmnode.core.codecs import Packet
from pmnode.core.replica_state import load_state_tensors, state_tensors
from pmnode.core.worker import StageWorker
from pmnode.net.bulk import pack, unpack

CFG = load_config("configs/tiny.yaml")


def _train(worker: StageWorker, steps: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    loss = 0.0
    for s in range(steps):
        tokens = torch.randint(0, CFG.model.vocab_size, (2, 16), generator=g)
        out = worker.forward(f"mb{s}", tokens=tokens)
        grad = torch.randn(out.tensors["v"].shape, generator=g)
        worker.backward(f"mb{s}", Packet({"v": grad}))
        loss = float(sum(p.detach().square().sum() for p in worker.stage.parameters()))
        worker.step()
    return loss


def test_checkpointed_layers_give_the_same_step() -> None:
    plain, ckpt = StageWorker(CFG, 0), StageWorker(CFG, 0, checkpoint_layers=True)
    _train(plain), _train(ckpt)
    for a, b in zip(plain.stage.parameters(), ckpt.stage.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fused_adamw_matches_the_loop() -> None:
    plain, fused = StageWorker(CFG, 0), StageWorker(CFG, 0, fused_adam=True)
    _train(plain), _train(fused)
    for a, b in zip(plain.stage.parameters(), fused.stage.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_int8_moments_follow_adamw() -> None:
    plain, int8 = StageWorker(CFG, 0), StageWorker(CFG, 0, optimizer_state="int8")
    assert isinstance(int8.optimizer, AdamW8bit)
    _train(plain), _train(int8)
    for a, b in zip(plain.stage.parameters(), int8.stage.parameters(), strict=True):
        step_a = a.detach() - StageWorker(CFG, 0).stage.state_dict()[_name(plain, a)]
        step_b = b.detach() - StageWorker(CFG, 0).stage.state_dict()[_name(int8, b)]
        assert torch.linalg.vector_norm(step_a - step_b) <= 0.1 * torch.linalg.vector_norm(step_a) + 1e-7


def _name(worker: StageWorker, p: torch.Tensor) -> str:
    return next(n for n, q in worker.stage.named_parameters() if q is p)


def test_quantizers_keep_their_promised_precision() -> None:
    x = torch.randn(4, 256)
    q, s = quantize_m(x)
    assert q.dtype == torch.int8 and (q.float() * s[:, None] - x).abs().max() <= s.max() / 2 + 1e-7
    v = torch.rand(4, 256) * 10.0 ** torch.randint(-6, 0, (4, 256))
    code, top = quantize_v(v)
    rel = (dequantize_v(code, top) - v).abs() / v
    assert code.dtype == torch.uint8 and rel.max() < 0.045  # 2^(1/16) - 1


def test_int8_state_survives_a_state_copy_bit_for_bit() -> None:
    src = StageWorker(CFG, 0, optimizer_state="int8")
    _train(src)
    dst = StageWorker(CFG.with_overrides(train={"seed": 5}), 0, optimizer_state="int8")
    snap = pack(*state_tensors(src), chunk=4096)  # what a state copy moves, byte for byte
    load_state_tensors(dst, unpack(snap.manifest, bytearray(snap.buffer)), snap.manifest.meta)
    for p, q in zip(src.optimizer.state.values(), dst.optimizer.state.values(), strict=True):
        for k in p:
            assert p[k].dtype == q[k].dtype and torch.equal(p[k], q[k]), k
    assert _train(src, 1) == _train(dst, 1)
