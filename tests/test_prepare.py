"""`pmnode data prepare`: every source format gives the counts and hashes of its manifest; the same
source prepared twice (in one process or two) gives the same bytes; a user's mistakes get one line."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import synthetic_text
from launch import BIN, one_line_error

from pmnode.data.manifest import read_manifest
from pmnode.data.prepare import prepare
from pmnode.data.sources import is_heldout
from pmnode.data.tokenizer import HFTokenizer
from pmnode.errors import DataError

DOCS = [synthetic_text(100 + i, 300 + 40 * i) for i in range(30)]
HELDOUT = 0.2


def _jsonl(docs: list[str]) -> bytes:
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    return ("\n".join(lines) + "\n").encode()


def text_dir(tmp: Path) -> tuple[str, list[str]]:
    d = tmp / "texts"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"doc{i:02d}.txt").write_text(doc)
    (d / "skip.bin").write_bytes(b"\x00\x01")  # not a text kind: not read
    return str(d), [f"doc{i:02d}.txt" for i in range(len(DOCS))]


def jsonl(tmp: Path) -> tuple[str, list[str]]:
    f = tmp / "c.jsonl"
    f.write_bytes(_jsonl(DOCS))
    return str(f), [f"c.jsonl#{i}" for i in range(len(DOCS))]


def jsonl_gz(tmp: Path) -> tuple[str, list[str]]:
    f = tmp / "c.jsonl.gz"
    f.write_bytes(gzip.compress(_jsonl(DOCS), mtime=0))
    return str(f), [f"c.jsonl.gz#{i}" for i in range(len(DOCS))]


def jsonl_zst(tmp: Path) -> tuple[str, list[str]]:
    f = tmp / "c.jsonl.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(DOCS)))
    return str(f), [f"c.jsonl.zst#{i}" for i in range(len(DOCS))]


def parquet(tmp: Path) -> tuple[str, list[str]]:
    f = tmp / "c.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), f, row_group_size=7)
    return str(f), [f"c.parquet#{i}" for i in range(len(DOCS))]


FORMATS: dict[str, Callable[[Path], tuple[str, list[str]]]] = {
    "text-dir": text_dir,
    "jsonl": jsonl,
    "jsonl.gz": jsonl_gz,
    "jsonl.zst": jsonl_zst,
    "parquet": parquet,
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_gives_its_counts_and_hashes(fmt: str, tmp_path: Path) -> None:
    source, keys = FORMATS[fmt](tmp_path)
    out = tmp_path / "out"
    man = prepare([source], out, "bpe:512", heldout=HELDOUT, shard_tokens=4096, command=["x"])
    assert man == read_manifest(out) and man.command == ["x"]
    tok = HFTokenizer(out / "tokenizer.json")
    assert man.tokenizer_file == "tokenizer.json" and man.vocab_size == tok.vocab_size <= 512
    assert man.tokenizer_sha256 == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert man.dtype == "uint16" and man.separator == tok.separator == 0
    held = [is_heldout(k, HELDOUT) for k in keys]
    for split, side in ((man.train, False), (man.heldout, True)):
        docs = [d for d, h in zip(DOCS, held, strict=True) if h == side]
        assert split.documents == len(docs) > 0
        assert split.text_bytes == sum(len(d.encode()) for d in docs)
        want = [t for d in docs for t in (*tok.encode(d), tok.separator)]  # each document, then <|endoftext|>
        assert split.tokens == len(want) == sum(s.tokens for s in split.shards)
        got = b"".join((out / s.file).read_bytes() for s in split.shards)
        assert got == b"".join(int(t).to_bytes(2, "little") for t in want)
        for s in split.shards:
            data = (out / s.file).read_bytes()
            assert s.sha256 == hashlib.sha256(data).hexdigest() and len(data) == 2 * s.tokens
        assert all(s.tokens == 4096 for s in split.shards[:-1])
    assert len(man.train.shards) > 1


def test_the_same_source_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    source, _ = jsonl_zst(tmp_path)
    a = prepare([source], tmp_path / "a", "bpe:512", heldout=HELDOUT, shard_tokens=4096, workers=1)
    b = prepare([source], tmp_path / "b", "bpe:512", heldout=HELDOUT, shard_tokens=4096, workers=2)
    assert a.data_sha256() == b.data_sha256() and a.tokenizer_sha256 == b.tokenizer_sha256
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.model_dump() == b.model_dump()


def test_one_document_is_split_by_tokens(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("x" * 1000)
    man = prepare([str(f)], tmp_path / "out", "byte", heldout=0.1)
    assert (man.train.tokens, man.heldout.tokens) == (900, 101)  # 1000 bytes + the separator
    assert (tmp_path / "out" / "heldout-00000.bin").read_bytes()[-2:] == b"\x00\x00"


def test_a_given_tokenizer_json_is_copied(tmp_path: Path) -> None:
    source, _ = jsonl(tmp_path)
    first = prepare([source], tmp_path / "a", "bpe:300", heldout=HELDOUT)
    again = prepare([source], tmp_path / "b", str(tmp_path / "a" / "tokenizer.json"), heldout=HELDOUT)
    assert again.tokenizer_sha256 == first.tokenizer_sha256 and again.data_sha256() == first.data_sha256()


def test_parquet_without_the_field(tmp_path: Path) -> None:
    source, _ = parquet(tmp_path)
    with pytest.raises(DataError, match=r"no column 'body'.*--text-field"):
        prepare([source], tmp_path / "out", "byte", text_field="body")


def test_cli_prepare_and_its_one_line_errors(tmp_path: Path) -> None:
    source, _ = jsonl(tmp_path)
    out = tmp_path / "out"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "pmnode"), "data", "prepare", source, "--out", str(out), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    r = run("--tokenizer", "bpe:400", "--heldout", "0.2")
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    assert "prepared" in r.stderr and man.data_sha256()[:12] in r.stderr
    assert man.command[:3] == ["pmnode", "data", "prepare"] and "bpe:400" in man.command
    one_line_error(run("--tokenizer", "byte"), f"--out {out} is not empty", "--force")
    assert read_manifest(out) == man  # untouched
    assert run("--tokenizer", "byte", "--force").returncode == 0
    assert read_manifest(out).tokenizer == "byte" and not (out / "tokenizer.json").exists()
    one_line_error(run("--tokenizer", "bpe:x", "--force"), "bpe:N with N from 257")
