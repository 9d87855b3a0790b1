"""Reading a prepared split through numpy memory maps, in a seeded order, from a known position.

A split is cut into windows of seq_len + 1 tokens, one every seq_len tokens of each shard (inputs
and their next-token targets). Each epoch visits every window once, in a permutation seeded by
(seed, epoch): the same in every process. A `DataPosition` (epoch, windows of it already taken)
says where a run is; it is saved with the head's checkpoint, so a resumed run takes the windows
an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor

from pmnode.data.manifest import DataManifest, Split
from pmnode.data.writer import np_dtype
from pmnode.errors import DataError

EVAL_SEED = 0xE7A1


class DataPosition(BaseModel):
    """Where the next window comes from: `offset` windows of epoch `epoch` are taken."""

    epoch: int = 0
    offset: int = 0

    def windows_before(self, per_epoch: int) -> int:
        return self.epoch * per_epoch + self.offset

    @classmethod
    def after(cls, windows: int, per_epoch: int) -> DataPosition:
        return cls(epoch=windows // per_epoch, offset=windows % per_epoch)


def slot_position(slot: int, slots: int, batch: int, per_epoch: int, batches_done: int = 0) -> DataPosition:
    """Where head slot `slot` of `slots` reads its batch number `batches_done`.

    The heads split the seeded window order into blocks of `batch` windows and deal them out in turn:
    slot h takes blocks h, h + slots, h + 2 slots, ... So no window is read twice and none is skipped,
    whatever pace each slot keeps, and in lockstep the heads' batches of step t together are exactly
    the windows a single process at batch `slots x batch` reads at step t. One slot: the plain order.
    """
    return DataPosition.after((batches_done * slots + slot) * batch, per_epoch)


def past_other_slots(after: DataPosition, slots: int, batch: int, per_epoch: int) -> DataPosition:
    """The position after one of a slot's batches, moved past the other slots' blocks: its next batch."""
    return DataPosition.after(after.windows_before(per_epoch) + (slots - 1) * batch, per_epoch)


def hash_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardSplit:
    """One split of a prepared directory: its shards memory-mapped, nothing read until used."""

    def __init__(
        self, root: Path, split: Split, dtype: str, seq_len: int, name: str, limit: int | None = None
    ):
        self.name, self.seq_len = name, seq_len
        self.maps: list[np.ndarray] = []
        for s in split.shards:  # `limit`: only the split's first tokens
            if limit is None or limit > 0:
                m = np.memmap(root / s.file, dtype=np_dtype(dtype), mode="r")
                self.maps.append(m if limit is None else m[:limit])
                limit = None if limit is None else limit - m.size
        counts = np.array([max(0, (m.size - 1) // seq_len) for m in self.maps], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)])  # window index where each shard starts
        self.windows = int(self.first[-1])
        if self.windows == 0:
            raise DataError(
                f"the {name} split of {root} has {split.tokens} tokens, too few for one window of "
                f"seq_len + 1 = {seq_len + 1}; prepare more data or lower train.seq_len"
            )
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return sum(int(m.size) for m in self.maps)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's permutation of window indices (the last two epochs' are kept)."""
        key = (seed, epoch)
        if key not in self._orders:
            rng = np.random.Generator(np.random.PCG64(hash_seed(seed, epoch)))
            self._orders = {k: v for k, v in self._orders.items() if k[1] == epoch - 1}
            self._orders[key] = rng.permutation(self.windows)
        return self._orders[key]

    def take(self, pos: DataPosition, count: int, seed: int) -> tuple[np.ndarray, DataPosition]:
        """The next `count` window indices from `pos`, and the position after them."""
        got: list[np.ndarray] = []
        epoch, offset = pos.epoch, pos.offset
        while count:
            n = min(count, self.windows - offset)
            got.append(self.order(seed, epoch)[offset : offset + n])
            count, offset = count - n, offset + n
            if offset == self.windows:
                epoch, offset = epoch + 1, 0
        return np.concatenate(got), DataPosition(epoch=epoch, offset=offset)

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.first, index, side="right")) - 1
        start = (index - int(self.first[shard])) * self.seq_len
        return self.maps[shard][start : start + self.seq_len + 1]

    def batch(self, pos: DataPosition, batch_size: int, seed: int) -> tuple[Tensor, Tensor, DataPosition]:
        """(inputs, targets) int64 (B, T) from `pos`, and the position after them."""
        idx, after = self.take(pos, batch_size, seed)
        rows = np.stack([self.window(int(i)) for i in idx]).astype(np.int64)
        window = torch.from_numpy(rows)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous(), after

    def eval_batches(self, n: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed set of held-out batches, the same for every run of this data and seq_len."""
        out, pos = [], DataPosition()
        for _ in range(n):
            x, y, pos = self.batch(pos, batch_size, EVAL_SEED)
            out.append((x, y))
        return out


class PreparedData:
    """A prepared directory opened for one seq_len: its manifest and both splits."""

    def __init__(self, root: Path, manifest: DataManifest, seq_len: int, limit: int | None = None):
        self.root, self.manifest = root, manifest
        self.train = ShardSplit(root, manifest.train, manifest.dtype, seq_len, "train", limit)
        self.heldout = ShardSplit(root, manifest.heldout, manifest.dtype, seq_len, "held-out", limit)

    def bits_per_byte(self, heldout_loss: float) -> float:
        """A held-out loss in nats per token as bits per byte of text, comparable across tokenizers."""
        return heldout_loss / float(np.log(2)) * self.manifest.heldout.tokens_per_byte
