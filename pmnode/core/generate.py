"""Sampling text from a swarm checkpoint: every stage in one process, the codec at each boundary.

The chain is the reference trainer's `Pipeline`, so the samples come from exactly the
function the swarm trained: activations cross every boundary in the codec's form, as on
the wire. There is no KV cache: each new token reruns the context, cropped to
model.max_seq_len (RoPE tables go no further), which is cheap at these model sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pmnode.config import RunConfig
from pmnode.core import checkpoint
from pmnode.core.train import Pipeline
from pmnode.data.resolve import run_tokenizer
from pmnode.data.tokenizer import Tokenizer
from pmnode.errors import PmnodeError

LogitsFn = Callable[[Tensor], Tensor]  # (B, T) token ids -> (B, T, V) logits


@dataclass
class CheckpointModel:
    """Every stage of a checkpoint, loaded and chained."""

    root: Path
    cfg: RunConfig
    pipe: Pipeline
    tokenizer: Tokenizer
    codec: str
    steps: list[int]  # per stage; they differ only if the swarm stopped mid-step

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, V) fp32 logits, through each stage and boundary codec."""
        workers = self.pipe.workers
        packet = None
        for w in workers[:-1]:
            packet = w.evaluate(packet, tokens=tokens)
        return workers[-1].logits(packet, tokens=tokens)


def load_checkpoint(root: Path, device: str = "cpu") -> CheckpointModel:
    """Rebuild the run from DIR/run.json and load every stage (checkpoint.load checks the basis)."""
    hint = f"run `pmnode local-swarm --checkpoint-dir {root}` first"
    if not root.is_dir():
        raise PmnodeError(f"{root} is not a pmnode checkpoint: no such directory; {hint}")
    cfg = checkpoint.load_run_config(root)
    manifests = []
    for i in range(cfg.n_stages):
        man = checkpoint.load_manifest(root, i)
        if man is None:
            raise PmnodeError(
                f"{root} is not a complete pmnode checkpoint: {checkpoint.stage_dir(root, i)} has no "
                f"manifest.json and the run has {cfg.n_stages} stages; {hint}"
            )
        if man.run != cfg.name:
            raise PmnodeError(
                f"{checkpoint.stage_dir(root, i)} belongs to run {man.run!r}, run.json to {cfg.name!r}"
            )
        manifests.append(man)
    codecs = sorted({m.codec for m in manifests})
    if len(codecs) > 1:
        raise PmnodeError(f"the stages under {root} were saved with different codecs: {', '.join(codecs)}")
    pipe = Pipeline(cfg, codecs[0], device)
    for w in pipe.workers:
        checkpoint.load(w, root)
    return CheckpointModel(root, cfg, pipe, run_tokenizer(cfg.data), codecs[0], [m.step for m in manifests])


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One id from a (V,) logit vector: argmax at temperature 0, else a draw from the (top-k) softmax."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.numel():
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 0:
        raise PmnodeError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise PmnodeError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise PmnodeError(f"--top-k must be >= 1, got {top_k}")


def sample(
    logits_fn: LogitsFn,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    max_seq_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
) -> list[int]:
    """The prompt ids followed by exactly max_new_tokens sampled ids.

    vocab_size masks logits the tokenizer could not decode (the model's vocab may be larger).
    """
    if not prompt:
        raise PmnodeError("the prompt encodes to no tokens: give a non-empty --prompt")
    check_sampling(max_new_tokens, temperature, top_k)
    # Draws happen on the CPU from one seeded generator, so a seed gives the same text on any device.
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_seq_len:]], dtype=torch.long)
        last = logits_fn(context)[0, -1].float().cpu()
        if vocab_size is not None:
            last[vocab_size:] = float("-inf")
        ids.append(next_token(last, temperature, top_k, gen))
    return ids


@dataclass
class Generation:
    ids: list[int]  # prompt ids, then the new ones
    n_prompt: int
    text: str  # the prompt exactly as given, then the decoded continuation


def generate(
    model: CheckpointModel,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> Generation:
    tok = model.tokenizer
    prompt_ids = tok.encode(prompt)
    ids = sample(
        model.logits,
        prompt_ids,
        max_new_tokens,
        max_seq_len=model.cfg.model.max_seq_len,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        vocab_size=tok.vocab_size,
    )
    # Decode all ids together (a subword may merge across the seam), then swap the decoded prompt for
    # the given one, since a tokenizer need not round-trip it exactly.
    full, head = tok.decode(ids), tok.decode(prompt_ids)
    tail = full[len(head) :] if full.startswith(head) else tok.decode(ids[len(prompt_ids) :])
    return Generation(ids, len(prompt_ids), prompt + tail)
