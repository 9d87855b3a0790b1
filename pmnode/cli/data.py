"""`pmnode data prepare`: tokenize a corpus once into shards that every run reads by memory map."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pmnode.cli.common import app, console

data_app = typer.Typer(help="Prepare training data: tokenizer, shards, manifest.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def prepare_cmd(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files or directories: text (.txt .md .py .rst), .jsonl, .jsonl.gz, .jsonl.zst, .parquet; "
            "or 'stdlib'."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the shards and manifest.json.")],
    tokenizer: Annotated[
        str, typer.Option(help="byte, bpe:N (train a byte-level BPE of N tokens here) or a tokenizer.json.")
    ] = "byte",
    text_field: Annotated[
        str, typer.Option(help="The text field of .jsonl records / .parquet rows.")
    ] = "text",
    heldout: Annotated[float, typer.Option(help="Fraction of documents held out for evaluation.")] = 0.005,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 100_000_000,
    force: Annotated[bool, typer.Option("--force", help="Replace what is in a non-empty --out.")] = False,
) -> None:
    """Tokenize SOURCE... into --out: uint16/uint32 shards, a held-out split by document, manifest.json."""
    import time

    from pmnode.data.prepare import prepare

    start = time.perf_counter()
    man = prepare(
        sources,
        out,
        tokenizer,
        text_field=text_field,
        heldout=heldout,
        shard_tokens=shard_tokens,
        force=force,
        command=["pmnode", *sys.argv[1:]],
        console=console,
    )
    secs = time.perf_counter() - start
    text_mb = (man.train.text_bytes + man.heldout.text_bytes) / 1e6
    console.print(
        f"[bold]prepared[/] {out}: {man.train.tokens:,} train / {man.heldout.tokens:,} held-out tokens "
        f"({man.train.documents:,} / {man.heldout.documents:,} documents), vocabulary {man.vocab_size}, "
        f"{text_mb:.1f} MB of text in {secs:.1f} s ({text_mb / max(secs, 1e-9):.2f} MB/s); "
        f"data sha256 {man.data_sha256()[:12]}, tokenizer {man.tokenizer_sha256[:12]}",
        highlight=False,
    )
