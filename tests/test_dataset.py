"""Sources, tokenizers, and reading prepared shards: the seeded order, positions, the run's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import synthetic_text
from pydantic import ValidationError

from pmnode.config import DataConfig, RunConfig, load_config
from pmnode.data import resolve
from pmnode.data.manifest import check_data, read_manifest
from pmnode.data.prepare import prepare
from pmnode.data.resolve import load_run_config
from pmnode.data.shards import DataPosition, PreparedData
from pmnode.data.sources import is_heldout, source_files
from pmnode.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from pmnode.errors import ConfigError, DataError, DataMismatchError


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(resolve.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "toy"
    prepare([str(toy_corpus)], out, "byte", heldout=0.1, shard_tokens=100_000)
    return out


def test_byte_tokenizer_roundtrip() -> None:
    tok = ByteTokenizer()
    text = "déjà vu — λ x: x² ✓"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode_array([text])[0].tolist() == ids
    assert tok.decode([*ids, tok.separator]) == text  # the separator decodes to nothing


def test_stdlib_sources_and_split_are_deterministic() -> None:
    files = source_files("stdlib")
    assert len(files) > 500 and all(f.path.suffix == ".py" for f in files)
    assert not any("site-packages" in f.path.parts for f in files)
    rel = [f.relative for f in files]
    assert rel == sorted(rel)
    held = [r for r in rel if is_heldout(r, 0.05)]
    assert 0.025 * len(rel) < len(held) < 0.1 * len(rel)


def test_missing_sources_and_tokenizers(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        source_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"no \.txt"):
        source_files(str(tmp_path))
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match="bpe:N with N from 257"):
        prepare([str(tmp_path)], tmp_path / "out", "bpe:12")


def test_order_is_a_permutation_per_epoch_the_same_everywhere(toy_prepared: Path) -> None:
    data = PreparedData(toy_prepared, read_manifest(toy_prepared), seq_len=64)
    n = data.train.windows
    assert n == sum((s.tokens - 1) // 64 for s in data.manifest.train.shards) and n > 1000
    seen, pos = [], DataPosition()
    while pos.epoch == 0:
        idx, pos = data.train.take(pos, 7, seed=3)
        seen.extend(idx.tolist())
    first_epoch = seen[:n]
    assert sorted(first_epoch) == list(range(n))  # every window once: no repeat within an epoch
    assert pos == DataPosition(epoch=1, offset=len(seen) - n)
    assert seen[n:] == data.train.order(3, 1)[: len(seen) - n].tolist()  # the next epoch goes on
    assert data.train.order(3, 1).tolist() != first_epoch  # in another order
    fresh = PreparedData(toy_prepared, read_manifest(toy_prepared), seq_len=64)  # as another process
    assert fresh.train.take(DataPosition(), n, seed=3)[0].tolist() == first_epoch
    assert fresh.train.take(DataPosition(), 50, seed=4)[0].tolist() != first_epoch[:50]


def test_head_slots_split_the_order_disjointly(toy_prepared: Path) -> None:
    """Three heads of batch 7 each read their own blocks: over two epochs no window twice in an epoch,
    none skipped, and in lockstep their step-t batches are a single process's batch of 21 at step t."""
    from pmnode.data.shards import past_other_slots, slot_position

    data = PreparedData(toy_prepared, read_manifest(toy_prepared), seq_len=64)
    n, slots, batch = data.train.windows, 3, 7
    steps = 2 * n // (slots * batch) + 1
    per_slot: list[list[int]] = []
    for h in range(slots):
        pos, got = slot_position(h, slots, batch, n), []
        for _ in range(steps):
            idx, after = data.train.take(pos, batch, seed=3)
            got.append(idx.tolist())
            pos = past_other_slots(after, slots, batch, n)
        assert pos == slot_position(h, slots, batch, n, batches_done=steps)  # the position is its count
        per_slot.append(got)
    single, pos = [], DataPosition()
    for _ in range(steps):
        idx, pos = data.train.take(pos, slots * batch, seed=3)
        single.append(idx.tolist())
    for t in range(steps):
        assert [w for h in range(slots) for w in per_slot[h][t]] == single[t]
    flat = [w for t in range(steps) for h in range(slots) for w in per_slot[h][t]]
    assert sorted(flat[:n]) == list(range(n)) and sorted(flat[n : 2 * n]) == list(range(n))


def test_batches_are_the_windows_at_the_position(toy_prepared: Path) -> None:
    data = PreparedData(toy_prepared, read_manifest(toy_prepared), seq_len=32)
    x, y, after = data.train.batch(DataPosition(epoch=2, offset=5), 4, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and after == DataPosition(epoch=2, offset=9)
    flat = np.fromfile(toy_prepared / "train-00000.bin", dtype="<u2")
    for row, w in zip(x, data.train.order(1, 2)[5:9], strict=True):
        if w < data.train.first[1]:  # windows of the first shard start at w * seq_len
            assert row.tolist() == flat[w * 32 : w * 32 + 32].tolist()
    assert DataPosition.after(9 + 2 * data.train.windows, data.train.windows) == after
    assert after.windows_before(data.train.windows) == 2 * data.train.windows + 9
    ev = data.heldout.eval_batches(3, 2)
    again = data.heldout.eval_batches(3, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev, again, strict=True))


def test_max_bytes_reads_the_first_tokens(toy_prepared: Path) -> None:
    data = PreparedData(toy_prepared, read_manifest(toy_prepared), seq_len=64, limit=6400)
    assert len(data.train) == 6400 and data.train.windows == 99


def test_raw_source_is_prepared_once_into_the_cache(cache: Path, toy_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(toy_corpus), heldout_fraction=0.1)
    data = resolve.open_data(cfg, 64, 256)
    [made] = (cache / "prepared").iterdir()
    assert data.root == made and data.manifest.train.documents + data.manifest.heldout.documents == 40
    stamp = (made / "manifest.json").stat().st_mtime_ns
    copy = tmp_path / "copy"  # the same files elsewhere: the same prepared copy
    copy.mkdir()
    for f in toy_corpus.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    again = resolve.open_data(DataConfig(source=str(copy), heldout_fraction=0.1), 64, 256)
    assert again.root == made and (made / "manifest.json").stat().st_mtime_ns == stamp
    assert resolve.open_data(DataConfig(source=str(made)), 64, 256).root == made  # a prepared dir: itself


def test_vocabulary_and_pins_are_checked(toy_prepared: Path) -> None:
    man = read_manifest(toy_prepared)
    with pytest.raises(DataError, match=r"raise model\.vocab_size"):
        resolve.open_data(DataConfig(source=str(toy_prepared)), 64, 200)
    pinned = DataConfig(source=str(toy_prepared), tokenizer_sha256="ab" * 32)
    with pytest.raises(DataMismatchError, match="tokenizer mismatch") as e:
        check_data(pinned, man, toy_prepared)
    line = str(e.value)
    assert "\n" not in line and "abababababab" in line and man.tokenizer_sha256[:12] in line
    with pytest.raises(DataMismatchError, match="data mismatch"):
        check_data(DataConfig(manifest_sha256="cd" * 32), man, toy_prepared)
    ok = DataConfig(manifest_sha256=man.data_sha256(), tokenizer_sha256=man.tokenizer_sha256)
    check_data(ok, man, toy_prepared)


def test_an_unset_vocabulary_is_read_from_files_by_the_data_layer_only(tmp_path: Path) -> None:
    """Validating a config never reads the disk: the spec says 256 or N, a tokenizer file is refused;
    load_run_config (the data layer) reads the file's size."""
    assert RunConfig.model_validate({}).model.vocab_size == 256
    assert RunConfig.model_validate({"data": {"tokenizer": "bpe:300"}}).model.vocab_size == 300
    tok = train_bpe(iter([synthetic_text(i, 2000) for i in range(8)]), 300, tmp_path / "tokenizer.json")
    with pytest.raises(ValidationError, match="is a file"):
        RunConfig.model_validate({"data": {"tokenizer": str(tok.path)}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data": {"tokenizer": str(tok.path)}}))
    assert 257 <= load_run_config(path).model.vocab_size == tok.vocab_size <= 300
    with pytest.raises(ConfigError, match="is a file"):
        load_config(path)
