"""Tokenizers, corpus discovery, the by-file split and seeded batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmnode.config import DataConfig
from pmnode.data.dataset import ByteTokenizer, TokenDataset, corpus_files, is_heldout, load_tokenizer
from pmnode.errors import DataError


def test_byte_tokenizer_roundtrip() -> None:
    tok = ByteTokenizer()
    text = "déjà vu — λ x: x² ✓"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode_tensor(text).tolist() == ids


def test_stdlib_corpus_split_is_deterministic_and_disjoint() -> None:
    root, files = corpus_files("stdlib")
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    rel = [f.relative_to(root).as_posix() for f in files]
    held = [r for r in rel if is_heldout(r, 0.05)]
    assert 0.025 * len(rel) < len(held) < 0.1 * len(rel)
    assert held == [r for r in rel if is_heldout(r, 0.05)]  # pure function of the path


def test_stdlib_dataset_sizes() -> None:
    train, held = TokenDataset.from_config(DataConfig(max_bytes=2_000_000), 256)
    assert len(train) == 2_000_000 and 0 < len(held) <= 2_000_000
    assert train.tokens.dtype == torch.uint8


def test_batches_are_seeded(toy_corpus: Path) -> None:
    train, _ = TokenDataset.from_config(DataConfig(source=str(toy_corpus)), 256)
    x, y = train.batch(3, 4, 32, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, train.batch(3, 4, 32, seed=1)[0])
    assert not torch.equal(x, train.batch(4, 4, 32, seed=1)[0])


def test_directory_corpus_kinds(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "gamma", "id": 1}) + "\nnot json\n" + json.dumps({"x": 1})
    )
    (tmp_path / "d.bin").write_bytes(b"\x00\x01")
    root, files = corpus_files(str(tmp_path))
    assert [f.relative_to(root).as_posix() for f in files] == ["a.txt", "c.jsonl", "sub/b.md"]
    train, held = TokenDataset.from_config(DataConfig(source=str(tmp_path), heldout_fraction=0.5), 256)
    text = ByteTokenizer().decode(torch.cat([train.tokens, held.tokens]).tolist())
    for word in ("alpha", "beta", "gamma"):
        assert word in text
    assert '"id"' not in text and "not json" not in text


def test_single_file_is_split_by_tokens(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("x" * 1000)
    train, held = TokenDataset.from_config(DataConfig(source=str(f), heldout_fraction=0.1), 256)
    assert (len(train), len(held)) == (901, 101)  # 1000 bytes + the 2-byte separator


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        corpus_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"no \.txt"):
        corpus_files(str(tmp_path))
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "tok.json"))


def test_hf_tokenizer_and_vocab_check(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == 3 and tok.encode("hello world") == [1, 2]
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 50)
    train, _ = TokenDataset.from_config(DataConfig(source=str(corpus), tokenizer=str(path)), 8)
    assert set(train.tokens.tolist()) <= {0, 1, 2}
    with pytest.raises(DataError, match=r"raise model\.vocab_size"):
        TokenDataset.from_config(DataConfig(source=str(corpus), tokenizer=str(path), max_bytes=77), 2)
