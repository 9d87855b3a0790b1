"""From a run's DataConfig to a prepared directory, preparing unprepared sources once into a cache.

`stdlib` and plain text paths are prepared on first use into $PMNODE_CACHE (default
~/.cache/pmnode) under a key of their bytes, tokenizer and held-out fraction, so every process and
every later run reads the same shards, and a fresh copy of the same files finds them too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from pmnode.config import DataConfig, RunConfig, load_config
from pmnode.data.manifest import FORMAT, DataManifest, check_data, is_prepared, read_manifest
from pmnode.data.shards import PreparedData
from pmnode.data.sources import content_key
from pmnode.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    file_sha256,
    load_tokenizer,
    parse_bpe,
    tokenizer_vocab_size,
)
from pmnode.errors import DataError

CACHE_ENV = "PMNODE_CACHE"


def load_run_config(path: str | Path, data: dict[str, Any] | None = None) -> RunConfig:
    """load_config, with an unset model.vocab_size read from the data's tokenizer file or prepared
    directory (what a config's validation does not read: it never touches the disk)."""
    return load_config(path, data, vocab_size=tokenizer_vocab_size)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pmnode")


def _tokenizer_key(spec: str) -> str:
    if spec == "byte" or parse_bpe(spec) is not None:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise DataError(
            f"tokenizer file not found: {path} (use 'byte', 'bpe:N' or a path to a tokenizer.json)"
        )
    return file_sha256(path)


def prepared_dir(data: DataConfig, console: Console | None = None) -> Path:
    """The prepared directory of `data.source`: itself, or its copy in the cache (made now if missing)."""
    src = Path(data.source)
    if data.source != "stdlib" and src.is_dir() and is_prepared(src):
        return src
    key = hashlib.blake2b(
        f"{FORMAT}|{content_key([data.source])}|{_tokenizer_key(data.tokenizer)}|{data.heldout_fraction}".encode(),
        digest_size=12,
    ).hexdigest()
    name = "stdlib" if data.source == "stdlib" else "text"  # not the path: a copy elsewhere is the same data
    root = cache_dir() / "prepared" / f"{name}-{key}"
    if is_prepared(root):
        return root
    from pmnode.data.prepare import prepare

    console = console or Console(stderr=True)
    console.print(f"preparing {data.source} ({data.tokenizer}) once into {root}")
    tmp = root.with_name(f"{root.name}.{os.getpid()}.tmp")
    try:
        prepare(
            [data.source],
            tmp,
            data.tokenizer,
            heldout=data.heldout_fraction,
            force=True,
            command=["pmnode", "data", "prepare", data.source, "--tokenizer", data.tokenizer],
            console=console,
        )
        try:
            os.replace(tmp, root)  # atomic: another process preparing the same key may have won
        except OSError:
            if not is_prepared(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def open_data(data: DataConfig, seq_len: int, vocab_size: int) -> PreparedData:
    """The run's data for this process: prepared, checked against the run's pins and vocabulary."""
    root = prepared_dir(data)
    man = read_manifest(root)
    check_data(data, man, root)
    if man.vocab_size > vocab_size:
        raise DataError(
            f"the tokenizer of {root} has {man.vocab_size} ids but model.vocab_size is {vocab_size}; "
            "raise model.vocab_size or leave it unset"
        )
    return PreparedData(root, man, seq_len, data.max_bytes)


def pin(cfg: RunConfig, console: Console | None = None) -> tuple[RunConfig, DataManifest]:
    """cfg with its data's hashes filled in (what a coordinator hands out); checks any already set."""
    root = prepared_dir(cfg.data, console)
    man = read_manifest(root)
    check_data(cfg.data, man, root)
    pinned = {"manifest_sha256": man.data_sha256(), "tokenizer_sha256": man.tokenizer_sha256}
    return cfg.with_overrides(data=pinned), man


def run_tokenizer(data: DataConfig) -> Tokenizer:
    """The tokenizer a run's tokens mean: its prepared directory's, else what data.tokenizer names."""
    src = Path(data.source)
    if data.source != "stdlib" and is_prepared(src):
        man = read_manifest(src)
        return ByteTokenizer() if man.tokenizer_file is None else HFTokenizer(src / man.tokenizer_file)
    if parse_bpe(data.tokenizer) is None:
        return load_tokenizer(data.tokenizer)
    root = prepared_dir(data)  # a bpe:N trained on first use lives beside its shards
    return run_tokenizer(data.model_copy(update={"source": str(root)}))
