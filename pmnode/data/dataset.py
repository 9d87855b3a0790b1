"""Data: tokenizers, corpus files, a deterministic train/held-out split, seeded batches.

The default corpus is the Python standard library's own source, present on
every machine with Python, so the quickstart needs no download. Note that its
exact bytes depend on the Python version: compare runs on the same Python.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from pmnode.config import DataConfig
from pmnode.errors import DataError

EXTENSIONS = (".txt", ".md", ".py", ".jsonl")
_SEPARATOR = "\n\n"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, nothing to download, nothing out of vocabulary."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """Any `tokenizers` tokenizer.json from a local path."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_tensor(self, text: str) -> Tensor:
        return torch.tensor(self.encode(text), dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path} (use 'byte' or a path to a tokenizer.json)")
    return HFTokenizer(path)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(source: str) -> tuple[Path, list[Path]]:
    """(root, files sorted by path relative to root): the same order on every machine."""
    root = _stdlib_root() if source == "stdlib" else Path(source)
    if not root.exists():
        kinds = ", ".join(EXTENSIONS)
        raise DataError(f"data path not found: {root} (give a file or a directory of {kinds} files)")
    if root.is_file():
        return root.parent, [root]
    files = [
        p
        for p in root.rglob("*")
        if p.suffix in EXTENSIONS and p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    ]
    if source == "stdlib":
        files = [p for p in files if p.suffix == ".py"]
    if not files:
        raise DataError(f"no {', '.join(EXTENSIONS)} files under {root}")
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: Path) -> str:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for line in raw.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
    return _SEPARATOR.join(texts)


def is_heldout(relative: str, fraction: float) -> bool:
    """A file's split depends only on its relative path: stable as the corpus grows."""
    h = int(hashlib.blake2b(relative.encode(), digest_size=8).hexdigest()[:8], 16)
    return h / 2**32 < fraction


class TokenDataset:
    """One split as a flat 1-D tensor of token ids."""

    def __init__(self, tokens: Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.numel()

    @classmethod
    def from_config(cls, data: DataConfig, vocab_size: int) -> tuple[TokenDataset, TokenDataset]:
        """(train, held-out), split by file; a one-file corpus is split by tokens instead."""
        key = (data.source, data.tokenizer, data.heldout_fraction, data.max_bytes, vocab_size)
        if key not in _CACHE:
            _CACHE[key] = cls._build(data, vocab_size)
        return _CACHE[key]

    @classmethod
    def _build(cls, data: DataConfig, vocab_size: int) -> tuple[TokenDataset, TokenDataset]:
        tok = load_tokenizer(data.tokenizer)
        if tok.vocab_size > vocab_size:
            raise DataError(
                f"tokenizer {data.tokenizer!r} produces ids up to {tok.vocab_size - 1} but "
                f"model.vocab_size is {vocab_size}; raise model.vocab_size"
            )
        root, files = corpus_files(data.source)
        splits: dict[bool, list[Path]] = {False: [], True: []}
        for f in files:
            splits[is_heldout(f.relative_to(root).as_posix(), data.heldout_fraction)].append(f)
        if splits[False] and splits[True]:
            train, held = (_encode(splits[s], tok, data.max_bytes) for s in (False, True))
            return cls(train), cls(held)
        everything = _encode(files, tok, data.max_bytes)
        cut = int(len(everything) * (1 - data.heldout_fraction))
        return cls(everything[:cut]), cls(everything[cut:])

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
        """Seeded random windows: (inputs, targets) int64 (B, T), the same in any process."""
        n = len(self) - seq_len - 1
        if n < 1:
            raise DataError(f"corpus split has {len(self)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        # (0, 1): the one shard there is (the head is never replicated); kept so the data order stays
        g = torch.Generator().manual_seed(hash_seed(seed, step, 0, 1))
        starts = torch.randint(0, n + 1, (batch_size,), generator=g)
        idx = starts.unsqueeze(1) + torch.arange(seq_len + 1).unsqueeze(0)  # (B, T+1)
        window = self.tokens[idx].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def eval_batches(self, n: int, batch_size: int, seq_len: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed set of held-out batches, the same for every run."""
        return [self.batch(i, batch_size, seq_len, seed=0xE7A1) for i in range(n)]


# Building the stdlib corpus reads tens of MB; a process that trains twice reads it once.
_CACHE: dict[tuple, tuple[TokenDataset, TokenDataset]] = {}


def hash_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _encode(files: list[Path], tok: ByteTokenizer | HFTokenizer, max_bytes: int | None) -> Tensor:
    """Join files with a separator, cut at max_bytes of UTF-8, tokenize."""
    parts, total = [], 0
    for f in files:
        b = read_text(f).encode("utf-8") + _SEPARATOR.encode()
        parts.append(b)
        total += len(b)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(parts)[:max_bytes]
    if isinstance(tok, ByteTokenizer):
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return tok.encode_tensor(blob.decode("utf-8", errors="ignore"))
