"""Checks on a packet from the network before any of it reaches a stage's model.

The wire decoder already guarantees a well-formed message (sizes add up, known dtypes, finite
floats). This module checks it against the run: the tensors a codec would have produced for a
batch of that shape, token ids inside the vocabulary, a batch no larger than the run's micro-batch
and a sample count that matches it. The expected layout is derived by packing zeros with the
stage's own codec, so every codec is covered without a table to keep in sync.
"""

from __future__ import annotations

import torch

from pmnode.codecs import Codec, Packet
from pmnode.wire import WireError

DATA_KEYS = ("targets", "last_target")  # travel beside the codec's tensors, untouched, to the tail


def _layout(p: Packet) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (v.dtype, tuple(v.shape)) for k, v in p.tensors.items()}


def check_activation(
    packet: Packet,
    codec: Codec,
    *,
    vocab_size: int,
    max_batch: int,
    max_len: int,
    samples: int | None = None,
) -> None:
    """Raise WireError('bad payload', ...) unless `packet` is an activation this stage could be sent."""
    t = packet.tensors
    main = next((v for k, v in t.items() if k not in DATA_KEYS and v.dim() >= 2), None)
    if main is None:
        raise WireError("bad payload", f"no activation tensor among {sorted(t)}")
    b, n = int(main.shape[0]), int(main.shape[1])
    if not (1 <= b <= max_batch and 1 <= n <= max_len):
        raise WireError("bad payload", f"batch {b} x {n} tokens outside 1..{max_batch} x 1..{max_len}")
    if samples is not None and samples != b:
        raise WireError("bad payload", f"header says {samples} samples, the tensors hold {b}")
    dim = codec.fwd.dim  # type: ignore[attr-defined]
    want = _layout(codec.pack_activation(torch.zeros(b, n, dim), torch.zeros(b, n, dtype=torch.long)))
    if "tokens" in want:
        want_data = {"last_target": (codec.token_dtype, (b, 1))}
    else:
        want_data = {"targets": (codec.token_dtype, (b, n))}
    got = _layout(packet)
    got_codec = {k: v for k, v in got.items() if k not in DATA_KEYS}
    if got_codec != want:
        raise WireError("bad payload", f"tensors {got_codec} where the codec sends {want}")
    got_data = {k: v for k, v in got.items() if k in DATA_KEYS}
    if got_data != want_data:  # the head attaches targets to every micro-batch, training and eval
        raise WireError("bad payload", f"targets {got_data} where {want_data} were expected")
    for k in ("tokens", *DATA_KEYS):
        if k in t and t[k].numel():
            lo, hi = int(t[k].min()), int(t[k].max())
            if lo < 0 or hi >= vocab_size:
                raise WireError("bad payload", f"{k} span {lo}..{hi}, outside 0..{vocab_size - 1}")
