"""manifest.json of a prepared data directory: what is in it, how it was made, and its hashes.

`data_sha256` digests everything that decides the token stream (tokenizer, dtype, every shard's
hash and counts) and nothing else: two machines that prepared the same corpus the same way agree
on it whatever their paths or command lines were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ValidationError

from pmnode.errors import DataError, DataMismatchError

if TYPE_CHECKING:
    from pmnode.config import DataConfig

MANIFEST = "manifest.json"
FORMAT = 1


class Shard(BaseModel):
    file: str
    tokens: int
    sha256: str


class Split(BaseModel):
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0  # UTF-8 bytes of its documents' text: bits per byte = nats/token * tokens/bytes/ln 2
    shards: list[Shard] = []

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / max(self.text_bytes, 1)


class DataManifest(BaseModel):
    format: int = FORMAT
    tokenizer: str  # the spec it was prepared with: byte, bpe:N or the path given
    tokenizer_file: str | None  # in the directory; None for bytes
    tokenizer_sha256: str
    vocab_size: int
    dtype: Literal["uint16", "uint32"]
    separator: int | None
    heldout_fraction: float
    train: Split
    heldout: Split
    command: list[str]

    def data_sha256(self) -> str:
        body = self.model_dump_json(
            include={"format", "tokenizer_sha256", "vocab_size", "dtype", "separator"}
        )
        body += "".join(s.model_dump_json() for s in (self.train, self.heldout))
        return hashlib.sha256(body.encode()).hexdigest()


def is_prepared(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(root: Path) -> DataManifest:
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a prepared data directory: no {MANIFEST}; run `pmnode data prepare`")
    try:
        man = DataManifest.model_validate_json(path.read_text())
    except ValidationError as e:
        raise DataError(f"{path} is not a pmnode data manifest ({e.error_count()} bad fields)") from e
    if man.format != FORMAT:
        raise DataError(f"{path} has format {man.format}; this pmnode reads {FORMAT}: prepare it again")
    return man


def check_data(run: DataConfig, local: DataManifest, where: Path) -> None:
    """Refuse local data the run did not pin: another tokenizer, or other shards. One line, saying which."""
    if run.tokenizer_sha256 and local.tokenizer_sha256 != run.tokenizer_sha256:
        raise DataMismatchError(
            f"tokenizer mismatch: the run's tokenizer is sha256 {run.tokenizer_sha256[:12]}, this node's "
            f"data at {where} has {local.tokenizer_sha256[:12]} ({local.tokenizer}); prepare it with the "
            "run's tokenizer.json (`pmnode data prepare ... --tokenizer PATH`)"
        )
    if run.manifest_sha256 and local.data_sha256() != run.manifest_sha256:
        raise DataMismatchError(
            f"data mismatch: the run's prepared data is sha256 {run.manifest_sha256[:12]}, this node's at "
            f"{where} is {local.data_sha256()[:12]}; prepare the run's corpus with the run's settings or "
            "pass --data DIR with a copy of the run's prepared directory"
        )
