"""Shard files: little-endian uint16/uint32 token ids, a fixed number per shard, hashed as written."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from pmnode.data.manifest import Shard, Split


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def np_dtype(name: str) -> np.dtype:
    return np.dtype("<u2" if name == "uint16" else "<u4")


class ShardWriter:
    """One split's shards: `{split}-00000.bin`, ... of `shard_tokens` tokens each (the last one fewer)."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int):
        self.root, self.name, self.dtype, self.shard_tokens = root, split, np_dtype(dtype), shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.split = Split()

    def add(self, tokens: np.ndarray, documents: int = 0, text_bytes: int = 0) -> None:
        self.split.documents += documents
        self.split.text_bytes += text_bytes
        if tokens.size:
            self.pending.append(tokens.astype(self.dtype, copy=False))
            self.pending_tokens += tokens.size
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        joined = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        head, rest = joined[:n], joined[n:]
        self.pending = [rest] if rest.size else []
        self.pending_tokens = int(rest.size)
        data = head.tobytes()
        shard = Shard(
            file=f"{self.name}-{len(self.split.shards):05d}.bin",
            tokens=int(head.size),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        (self.root / shard.file).write_bytes(data)
        self.split.shards.append(shard)
        self.split.tokens += shard.tokens

    def close(self) -> Split:
        if self.pending_tokens:
            self._flush(self.pending_tokens)
        return self.split


def split_by_tokens(
    root: Path, train: Split, dtype: str, fraction: float, shard_tokens: int
) -> tuple[Split, Split]:
    """A corpus whose documents all fell on one side (one file, say): the last `fraction` of its
    tokens become the held-out split instead."""
    total = train.tokens
    cut = total - max(1, math.ceil(total * fraction))
    new_train = ShardWriter(root, "train.tmp", dtype, shard_tokens)
    held = ShardWriter(root, "heldout", dtype, shard_tokens)
    seen = 0
    for shard in train.shards:
        tokens = np.fromfile(root / shard.file, dtype=np_dtype(dtype))
        k = min(max(cut - seen, 0), tokens.size)
        new_train.add(tokens[:k])
        held.add(tokens[k:])
        seen += tokens.size
        (root / shard.file).unlink()
    a, b = new_train.close(), held.close()
    for s in a.shards:  # back to the train-NNNNN names
        final = s.file.replace("train.tmp", "train")
        (root / s.file).rename(root / final)
        s.file = final
    share = cut / max(total, 1)
    a.documents, a.text_bytes = train.documents, round(train.text_bytes * share)
    b.documents, b.text_bytes = 0, train.text_bytes - a.text_bytes
    return a, b
