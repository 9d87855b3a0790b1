"""Tokenizers: UTF-8 bytes, a byte-level BPE trained on the corpus, or any tokenizer.json.

Each one has a document separator id that prepared shards put between documents: byte 0 (NUL,
which text does not contain) for bytes, the special token <|endoftext|> for BPE.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pmnode.config.run import parse_bpe  # the spec is the config's; its files are ours
from pmnode.errors import DataError

END_OF_TEXT = "<|endoftext|>"
BYTE_SHA256 = hashlib.sha256(b"pmnode byte tokenizer v1").hexdigest()  # bytes have no file to hash
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, nothing to download, nothing out of vocabulary."""

    vocab_size = 256
    separator = 0
    sha256 = BYTE_SHA256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Any `tokenizers` tokenizer.json from a local path."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        sep = self._tok.token_to_id(END_OF_TEXT)
        self.separator: int | None = sep
        self.sha256 = file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | HFTokenizer


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' or a path to a tokenizer.json (a bpe:N is trained by `pmnode data prepare`)."""
    if spec == "byte":
        return ByteTokenizer()
    if parse_bpe(spec) is not None:
        raise DataError(f"tokenizer {spec!r} is trained by `pmnode data prepare`; load its tokenizer.json")
    path = Path(spec)
    if not path.is_file():
        raise DataError(
            f"tokenizer file not found: {path} (use 'byte', 'bpe:N' or a path to a tokenizer.json)"
        )
    return HFTokenizer(path)


def train_bpe(texts: Iterator[str], vocab_size: int, out: Path) -> HFTokenizer:
    """A byte-level BPE of `vocab_size` ids (the separator included) trained on `texts`, saved at `out`."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))
    return HFTokenizer(out)


def tokenizer_vocab_size(data: dict[str, Any]) -> int:
    """model.vocab_size when a config leaves it unset: the tokenizer's, read from its file or the
    prepared directory's manifest (what load_config's `vocab_size` is given by load_run_config)."""
    from pmnode.data.manifest import is_prepared, read_manifest

    source, spec = str(data.get("source", "stdlib")), str(data.get("tokenizer", "byte"))
    if source != "stdlib" and is_prepared(Path(source)):
        return read_manifest(Path(source)).vocab_size
    if (n := parse_bpe(spec)) is not None:
        return n
    if spec != "byte" and Path(spec).is_file():
        return HFTokenizer(spec).vocab_size
    return 256
