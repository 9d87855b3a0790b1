"""Incoming activations are checked against the run before they reach a stage's model."""

from __future__ import annotations

import pytest
import torch

from pmnode.config import load_config
from pmnode.core.codecs import Packet
from pmnode.core.stages import build_subspace
from pmnode.core.train import config_for
from pmnode.core.worker import StageWorker
from pmnode.net.checks import check_activation
from pmnode.net.wire import WireError

B, T, VOCAB = 4, 16, 256


def real_packet(spec: str) -> tuple[Packet, StageWorker]:
    """What a head really sends for `spec` (codec tensors + targets), and the stage that receives it."""
    cfg, codec = config_for(load_config("configs/tiny.yaml"), spec)
    cfg = cfg.with_overrides(train={"micro_batch_size": B, "seq_len": T})
    sub = build_subspace(cfg)
    head, body = StageWorker(cfg, 0, codec, "cpu", sub), StageWorker(cfg, 1, codec, "cpu", sub)
    x = torch.randint(0, 50, (B, T))  # low ids, so a test can shrink the vocabulary around them
    p = head.forward("mb", None, x, B)
    dtype = head.codec.token_dtype
    if "tokens" in p.tensors:
        p.tensors["last_target"] = x[:, -1:].to(dtype)
    else:
        p.tensors["targets"] = x.to(dtype)
    return p, body


def check(p: Packet, w: StageWorker, samples: int | None = B, vocab: int = VOCAB) -> None:
    check_activation(p, w.codec, vocab_size=vocab, max_batch=B, max_len=T, samples=samples)


@pytest.mark.parametrize(
    "spec", ["dense", "dense:bf16", "int8", "topk:4", "subspace", "subspace:int8", "subspace:int4"]
)
def test_real_packets_pass(spec: str) -> None:
    p, w = real_packet(spec)
    check(p, w)
    check(p, w, samples=None)


def longer(t: torch.Tensor) -> torch.Tensor:
    return t.repeat(1, 2, *([1] * (t.dim() - 2))) if t.shape[1] == T else t


def mutated(p: Packet, **changes: torch.Tensor | None) -> Packet:
    t = dict(p.tensors)
    for k, v in changes.items():
        if v is None:
            t.pop(k, None)
        else:
            t[k] = v
    return Packet(t)


@pytest.mark.parametrize("spec", ["dense", "subspace"])
def test_garbage_is_rejected(spec: str) -> None:
    p, w = real_packet(spec)
    key = "v"
    v = p.tensors[key]
    bad = [
        mutated(p, **{key: v.to(torch.float16)}),  # wrong dtype
        mutated(p, **{key: v[..., :-1]}),  # wrong width
        mutated(p, extra=torch.zeros(B, T)),  # a tensor the codec never sends
        mutated(p, **{key: None}),  # no activation at all
        mutated(p, targets=None, last_target=None),  # no targets
        Packet({k: t.repeat(2, *([1] * (t.dim() - 1))) for k, t in p.tensors.items()}),  # batch > micro
        Packet(
            {
                k: (t.repeat(1, 2, *([1] * (t.dim() - 2))) if t.shape[1] == T else t)
                for k, t in p.tensors.items()
            }
        ),
    ]
    if "tokens" in p.tensors:
        bad.append(mutated(p, tokens=p.tensors["tokens"].to(torch.int64)))  # ids as the wrong type
    for i, packet in enumerate(bad):
        with pytest.raises(WireError, match="bad payload"):
            check(packet, w)
            pytest.fail(f"mutation {i} passed")
    with pytest.raises(WireError, match="header says 3 samples"):
        check(p, w, samples=3)


@pytest.mark.parametrize("spec, key", [("dense", "targets"), ("subspace", "tokens")])
def test_token_ids_outside_the_vocabulary(spec: str, key: str) -> None:
    p, w = real_packet(spec)
    check(p, w, vocab=100)
    t = p.tensors[key].clone()
    t[0, 0] = 200  # the wire type holds it; a 100-token vocabulary does not
    with pytest.raises(WireError, match=r"outside 0\.\.99"):
        check(mutated(p, **{key: t}), w, vocab=100)
