"""`pmnode data prepare`: documents -> tokenizer -> token shards + manifest.json, once.

Documents are read in the sources' order and tokenized in chunks by a pool of processes (both
cores), whose results come back in order, so the shards are the same bytes on every run. A
document's split is decided by its key (sources.is_heldout). A bpe:N tokenizer is trained first,
on the training split only.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pmnode.data import sources
from pmnode.data.manifest import MANIFEST, DataManifest
from pmnode.data.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    parse_bpe,
    train_bpe,
)
from pmnode.data.writer import ShardWriter, shard_dtype, split_by_tokens
from pmnode.errors import DataError

CHUNK_BYTES = 1 << 20  # text per job sent to a worker
IN_PROCESS_BYTES = 8 << 20  # smaller corpora are tokenized here: starting workers would cost more
DEFAULT_SHARD_TOKENS = 100_000_000


@dataclass
class Chunk:
    texts: list[tuple[bool, str]] = field(default_factory=list)  # (held out, text)
    size: int = 0
    disk_bytes: int = 0  # of the files this chunk finishes, for the progress bar


@dataclass
class Encoded:
    tokens: tuple[np.ndarray, np.ndarray]  # train, held out
    documents: tuple[int, int]
    text_bytes: tuple[int, int]
    disk_bytes: int


_worker_tok: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(spec)


def _encode(chunk: Chunk, tok: Tokenizer | None = None) -> Encoded:
    tok = tok or _worker_tok
    assert tok is not None
    sep = np.array([] if tok.separator is None else [tok.separator], dtype=np.uint32)
    arrays = tok.encode_array([t for _, t in chunk.texts])
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    docs, nbytes = [0, 0], [0, 0]
    for (held, text), ids in zip(chunk.texts, arrays, strict=True):
        parts[held].extend((ids.astype(np.uint32), sep))
        docs[held] += 1
        nbytes[held] += len(text.encode("utf-8"))
    train_ids, held_ids = (np.concatenate(p) if p else np.zeros(0, np.uint32) for p in parts)
    return Encoded((train_ids, held_ids), (docs[0], docs[1]), (nbytes[0], nbytes[1]), chunk.disk_bytes)


def _chunks(files: list[sources.SourceFile], field: str, fraction: float) -> Iterator[Chunk]:
    chunk = Chunk()
    for f in files:
        for doc in sources.documents(f, field):
            chunk.texts.append((sources.is_heldout(doc.key, fraction), doc.text))
            chunk.size += len(doc.text)
            if chunk.size >= CHUNK_BYTES:
                yield chunk
                chunk = Chunk()
        chunk.disk_bytes += f.path.stat().st_size
    yield chunk


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _clear(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(f"--out {out} is not empty: pass --force to replace what is in it")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _tokenizer(
    spec: str,
    files: list[sources.SourceFile],
    field: str,
    fraction: float,
    out: Path,
    progress: Progress,
    total: int,
) -> tuple[Tokenizer, str]:
    """The tokenizer and the spec a worker loads it from."""
    if spec == "byte":
        return ByteTokenizer(), "byte"
    n = parse_bpe(spec)
    path = out / TOKENIZER_FILE
    if n is None:
        given = load_tokenizer(spec)  # checks the path
        shutil.copyfile(spec, path)
        return given, str(path)
    task = progress.add_task(f"training bpe:{n}", total=total)

    def texts() -> Iterator[str]:
        for chunk in _chunks(files, field, fraction):
            yield from (t for held, t in chunk.texts if not held)
            progress.advance(task, chunk.disk_bytes)

    return train_bpe(texts(), n, path), str(path)


def _encoded(chunks: Iterator[Chunk], spec: str, tok: Tokenizer, workers: int) -> Iterator[Encoded]:
    """Each chunk encoded, in order; at most 2 per worker in flight, so memory stays bounded."""
    if workers <= 1:
        yield from (_encode(c, tok) for c in chunks)
        return
    with mp.get_context("spawn").Pool(workers, _init_worker, (spec,)) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.apply_async(_encode, (c,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(
    source_list: list[str],
    out: Path,
    tokenizer: str = "byte",
    *,
    text_field: str = "text",
    heldout: float = 0.005,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    command: list[str] | None = None,
    console: Console | None = None,
    workers: int | None = None,
) -> DataManifest:
    """Prepare `source_list` into `out`; returns the manifest it wrote (last, so a directory with a
    manifest is whole)."""
    if not 0 < heldout < 1:
        raise DataError(f"--heldout must be between 0 and 1, got {heldout}")
    if shard_tokens < 1024:
        raise DataError(f"--shard-tokens must be at least 1024, got {shard_tokens}")
    parse_bpe(tokenizer)  # a bad bpe:N fails before any reading
    files = sources.all_files(source_list)
    _clear(out, force)
    total = sum(f.path.stat().st_size for f in files)
    if workers is None:
        workers = 1 if total < IN_PROCESS_BYTES else 2
    with _progress(console or Console(stderr=True)) as progress:
        tok, spec = _tokenizer(tokenizer, files, text_field, heldout, out, progress, total)
        dtype = shard_dtype(tok.vocab_size)
        writers = (
            ShardWriter(out, "train", dtype, shard_tokens),
            ShardWriter(out, "heldout", dtype, shard_tokens),
        )
        task = progress.add_task(f"tokenizing ({tokenizer})", total=total)
        for enc in _encoded(_chunks(files, text_field, heldout), spec, tok, workers):
            for i, w in enumerate(writers):
                w.add(enc.tokens[i], enc.documents[i], enc.text_bytes[i])
            progress.advance(task, enc.disk_bytes)
    train, held = (w.close() for w in writers)
    if train.tokens == 0 and held.tokens == 0:
        raise DataError(f"no text in {', '.join(source_list)} (is --text-field {text_field!r} right?)")
    if held.documents == 0 or train.documents == 0:  # everything on one side: split the tokens instead
        both = train if train.documents else held
        if both is held:
            for s in held.shards:
                (out / s.file).rename(out / s.file.replace("heldout", "train"))
                s.file = s.file.replace("heldout", "train")
        train, held = split_by_tokens(out, both, dtype, heldout, shard_tokens)
    man = DataManifest(
        tokenizer=tokenizer,
        tokenizer_file=None if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE,
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        dtype=dtype,
        separator=tok.separator,
        heldout_fraction=heldout,
        train=train,
        heldout=held,
        command=command or [],
    )
    (out / MANIFEST).write_text(man.model_dump_json(indent=2))
    return man
