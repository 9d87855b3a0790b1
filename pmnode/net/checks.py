"""Checks on a packet from the network before any of it reaches a stage's model.

The wire decoder already guarantees a well-formed message (sizes add up, known dtypes, finite
floats). This module checks it against the run: the tensors a codec would have produced for a
batch of that shape, token ids inside the vocabulary, a batch no larger than the run's micro-batch
and a sample count that matches it. The expected layout is derived by packing zeros with the
stage's own codec, so every codec is covered without a table to keep in sync.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping

import torch

from pmnode.core.codecs import Codec, Packet
from pmnode.net.envelope import LAST_TARGET, TARGET_KEYS, TARGETS, MicroBatchId, parse_eval_id
from pmnode.net.wire import MessageHeader, WireError

DATA_KEYS = TARGET_KEYS  # travel beside the codec's tensors, untouched, to the tail
# No honest activation coefficient, scale or boundary gradient comes near this; 3e38 passes the
# wire's finiteness check and would still wreck a stage, so a value beyond it is refused.
MAX_ABS = 1e6


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
    dim = codec.fwd.dim
    want = _layout(codec.pack_activation(torch.zeros(b, n, dim), torch.zeros(b, n, dtype=torch.long)))
    if "tokens" in want:
        want_data = {LAST_TARGET: (codec.token_dtype, (b, 1))}
    else:
        want_data = {TARGETS: (codec.token_dtype, (b, n))}
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
    _check_indices(t, dim)
    check_magnitude(t, "bad payload")


def check_magnitude(t: Mapping[str, torch.Tensor], reason: str) -> None:
    """Raise WireError(reason) if any floating-point value is beyond +-MAX_ABS."""
    for k, v in t.items():
        if v.is_floating_point() and v.numel():
            top = max(float(v.max()), -float(v.min()))  # no copy of a GB-sized sum, as abs() makes
            if not top <= MAX_ABS:  # NaN fails this too
                raise WireError(reason, f"{k} reaches {top:.3g}, beyond {MAX_ABS:g}")


def check_sum_part(part: torch.Tensor, like: torch.Tensor) -> None:
    """A replica's gradient sum must be exactly as ours (a one-element tensor must not broadcast over
    ours), finite and within MAX_ABS per entry; WireError('bad gradient') otherwise."""
    if part.dtype != like.dtype or part.shape != like.shape:
        got, ours = tuple(part.shape), tuple(like.shape)
        raise WireError("bad gradient", f"a {part.dtype} sum of shape {got}, ours is {like.dtype} {ours}")
    check_magnitude({"sum": part}, "bad gradient")


def check_samples(samples: object, most: int) -> int:
    """A sample count a replica reports with its sum: an int in 0..most (the step's whole batch)."""
    if not isinstance(samples, int) or isinstance(samples, bool) or not 0 <= samples <= most:
        raise WireError("bad payload", f"{samples!r} samples, outside 0..{most}")
    return samples


def _check_indices(t: dict[str, torch.Tensor], dim: int) -> None:
    """top-k packets carry coordinate indices: each must name a coordinate."""
    if "i" in t and t["i"].numel():
        lo, hi = int(t["i"].min()), int(t["i"].max())
        if lo < 0 or hi >= dim:
            raise WireError("bad payload", f"indices span {lo}..{hi}, outside 0..{dim - 1}")


class GradScale:
    """The running scale of the boundary gradients a stage has accepted (median of recent norms).

    A gradient far above it, `ratio` times the median, is dropped: a faulty or hostile downstream peer
    must not be able to blow up the weights with one reply.
    """

    def __init__(self, ratio: float = 100.0, warmup: int = 8, keep: int = 64):
        self.ratio, self.warmup = ratio, warmup
        self.norms: deque[float] = deque(maxlen=keep)

    def check(self, norm: float) -> None:
        if not math.isfinite(norm):
            raise WireError("bad gradient", f"norm {norm}")
        if len(self.norms) >= self.warmup:
            median = statistics.median(self.norms)
            if median > 0 and norm > self.ratio * median:
                raise WireError(
                    "bad gradient", f"norm {norm:.3g} is over {self.ratio:g}x the median {median:.3g}"
                )
        self.norms.append(norm)


def check_gradient(packet: Packet, codec: Codec, shape: tuple[int, int], scale: GradScale) -> None:
    """Raise WireError unless `packet` is the gradient of an activation of `shape` (batch, tokens)."""
    b, n = shape
    dim = codec.bwd.dim
    want = _layout(codec.pack_gradient(torch.zeros(b, n, dim)))
    got = _layout(packet)
    if got != want:
        raise WireError("bad gradient", f"tensors {got} where the codec sends {want}")
    _check_indices(packet.tensors, dim)
    check_magnitude(packet.tensors, "bad gradient")  # also while the median below is warming up
    g = codec.unpack_gradient(packet)
    scale.check(float(torch.linalg.vector_norm(g)))


def _for_us(header: MessageHeader, run: str, from_stage: int) -> None:
    if header.kind != "activation" or header.run != run or header.stage != from_stage:
        raise WireError(
            "bad payload", f"a {header.kind} of run {header.run!r} from stage {header.stage} is not for us"
        )


def check_micro_batch(
    header: MessageHeader,
    *,
    run: str,
    from_stage: int,
    n_micro: int,
    step: int,
    window: int,
    seen: Mapping[str, set[int]],
) -> int:
    """The step of a training micro-batch (MicroBatchId) this stage may take now; WireError otherwise.

    Ids are known in advance (the head numbers them by step and slot), so an id outside the steps
    a pipeline can have in flight, or an (id, try) this stage has already taken (a replay), is
    refused. A retry of the same id comes with a new random `try`; the stage then passes it through
    for its input gradient but never adds its gradient to the weights twice (StageWorker).
    """
    _for_us(header, run, from_stage)
    mb = MicroBatchId.parse(header)
    if not (0 <= mb.index < n_micro and abs(mb.step - step) <= window):
        raise WireError("unknown micro-batch", f"{header.micro_batch!r} while this stage is at step {step}")
    if mb.attempt in seen.get(mb.wire, ()):
        raise WireError("replay", f"micro-batch {mb.wire} (try {mb.attempt}) was already taken")
    return mb.step


def check_eval_batch(header: MessageHeader, *, run: str, from_stage: int, n_batches: int) -> None:
    _for_us(header, run, from_stage)
    i = parse_eval_id(header.micro_batch)
    if i is None or i >= n_batches:
        raise WireError("unknown micro-batch", repr(header.micro_batch[:40]))
