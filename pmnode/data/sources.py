"""Where documents come from: text files, .jsonl (plain, gzip, zstd), .parquet, or `stdlib`.

A document is one text file, one JSON line or one parquet row. Each has a key (its path relative
to the source, plus the record number) that decides its split, so the split of a document never
changes as the corpus grows. Files are visited in sorted relative-path order: the same order on
every machine. The default corpus is the Python standard library's own source, present wherever
Python is (its exact bytes depend on the Python version: compare runs on the same Python).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pmnode.errors import DataError

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
RECORD_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    key: str  # relative path, and '#record' for a record of a .jsonl or .parquet file
    text: str


@dataclass(frozen=True)
class SourceFile:
    path: Path
    relative: str

    @property
    def kind(self) -> str:
        name = self.path.name
        return next((ext for ext in RECORD_EXTENSIONS if name.endswith(ext)), "text")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _kinds() -> str:
    return ", ".join((*TEXT_EXTENSIONS, *RECORD_EXTENSIONS))


def _wanted(p: Path, stdlib: bool) -> bool:
    if stdlib:
        return p.suffix == ".py"
    return p.suffix in TEXT_EXTENSIONS or p.name.endswith(RECORD_EXTENSIONS)


def source_files(source: str) -> list[SourceFile]:
    """The files of one SOURCE (a file, a directory, or 'stdlib'), sorted by relative path."""
    stdlib = source == "stdlib"
    root = stdlib_root() if stdlib else Path(source)
    if not root.exists():
        raise DataError(f"data path not found: {root} (give a file or a directory of {_kinds()} files)")
    if root.is_file():
        return [SourceFile(root, root.name)]
    files = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # pruned, not walked (site-packages is big)
        for n in names:
            p = Path(here, n)
            if _wanted(p, stdlib) and p.is_file():
                files.append(SourceFile(p, p.relative_to(root).as_posix()))
    if not files:
        raise DataError(f"no {_kinds()} files under {root}")
    return sorted(files, key=lambda f: f.relative)


def all_files(sources: list[str]) -> list[SourceFile]:
    """Every source's files; with several sources, keys carry the source's position in the list."""
    if len(sources) == 1:
        return source_files(sources[0])
    return [
        SourceFile(f.path, f"{i}/{f.relative}") for i, src in enumerate(sources) for f in source_files(src)
    ]


def _jsonl_lines(f: SourceFile) -> Iterator[bytes]:
    if f.kind == ".jsonl.zst":
        import zstandard

        with f.path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
            yield from io.BufferedReader(z)
    elif f.kind == ".jsonl.gz":
        with gzip.open(f.path, "rb") as g:
            yield from g
    else:
        with f.path.open("rb") as fh:
            yield from fh


def _jsonl(f: SourceFile, field: str) -> Iterator[Document]:
    """Records whose `field` is a string; other lines (not JSON, no such field) are skipped."""
    for i, line in enumerate(_jsonl_lines(f)):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get(field), str):
            yield Document(f"{f.relative}#{i}", obj[field])


def _parquet(f: SourceFile, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    if field not in pf.schema_arrow.names:
        raise DataError(
            f"{f.path} has no column {field!r} (its columns: {', '.join(pf.schema_arrow.names)}); "
            "pass --text-field NAME"
        )
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield Document(f"{f.relative}#{row}", text)
            row += 1


def documents(f: SourceFile, field: str = "text") -> Iterator[Document]:
    """The documents of one file, in file order."""
    kind = f.kind
    if kind == ".parquet":
        yield from _parquet(f, field)
    elif kind != "text":
        yield from _jsonl(f, field)
    else:
        yield Document(f.relative, f.path.read_bytes().decode("utf-8", errors="replace"))


def is_heldout(key: str, fraction: float) -> bool:
    """A document's split depends only on its key: stable as the corpus grows."""
    h = int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest()[:8], 16)
    return h / 2**32 < fraction


def content_key(sources: list[str]) -> str:
    """A digest of the sources' file names and bytes: a prepared copy in the cache is reused exactly
    when the files are the same, wherever they are (a fresh temporary copy of a corpus included).
    The standard library is keyed by the Python that has it."""
    h = hashlib.blake2b(digest_size=16)
    if sources == ["stdlib"]:  # an installed standard library does not change under one Python
        h.update(f"{sys.version}|{stdlib_root()}".encode())
        return h.hexdigest()
    for f in all_files(sources):
        h.update(f.relative.encode() + b"\0")
        with f.path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
