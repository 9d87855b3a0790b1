r"""Generate docs/configs.md, the run-config reference, from the pydantic models in pmnode/config/.

    python scripts/config_reference.py            # (re)write docs/configs.md
    python scripts/config_reference.py --check    # exit 1 if docs/configs.md is stale

Every section of RunConfig (a field whose type is a pydantic model) gets a table of its fields with
type, constraints, default and description; the shipped configs/*.yaml are summarised at the end.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pmnode.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configs.md"
CONFIGS = ROOT / "configs"
COMMAND = "python scripts/config_reference.py"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted path, model) for `model` and every nested model field, depth first, in declaration order."""
    yield prefix, model
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            yield from sections(field.annotation, f"{prefix}{name}.")  # type: ignore[arg-type]


def format_type(annotation: Any) -> str:
    """A compact, stable spelling of a field type: `int | None`, `tuple[float, float]`, `'a' | 'b'`."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(format_type(a) for a in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))


def format_constraints(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{symbol} {getattr(meta, attr)}")
        if isinstance(meta, MinLen):
            out.append(f"length ≥ {meta.min_length}")
        if isinstance(meta, MaxLen):
            out.append(f"length ≤ {meta.max_length}")
    return ", ".join(out)


def format_default(field: FieldInfo, path: str) -> str:
    if _is_model(field.annotation):
        return f"see [`{path}`](#{path.replace('.', '')})"
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "*required*"
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"  # YAML spelling: null, true


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def section_table(path: str, model: type[BaseModel]) -> list[str]:
    title = path.rstrip(".") or "top level"
    lines = [f"## {title}", ""]
    if doc := _doc(model):
        lines += [doc, ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = f"{path}{name}"
        typ = f"`{format_type(field.annotation)}`"
        if bounds := format_constraints(field):
            typ += f", {bounds}"
        desc = field.description or ""
        lines.append(f"| `{key}` | {_cell(typ)} | {_cell(format_default(field, key))} | {_cell(desc)} |")
    return [*lines, ""]


def shipped_configs(directory: Path = CONFIGS) -> list[str]:
    """One row per configs/*.yaml, from the validated config and the file's first comment line."""
    lines = [
        "## Shipped configs",
        "",
        "Derived from `configs/*.yaml` (validated as above; the note is each file's first comment line).",
        "",
        "| file | d_model | layers | heads (kv) | stages | k | codec | steps | batch × seq | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(directory.glob("*.yaml")):
        cfg = load_config(path)
        m, t = cfg.model, cfg.train
        note = next(
            (ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), ""
        )
        sub = cfg.subspace  # how the k is kept: the paper's write mode, or projected where stages end
        kept = sub.mode if sub.constrain == "layers" else "boundaries"
        k = f"{cfg.rank} ({sub.preset}: {kept})" if sub.enabled else "-"
        micro = f" (micro {t.micro})" if t.micro != t.batch_size else ""
        row = [
            f"`{path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name}`",
            str(m.d_model),
            str(m.n_layers),
            f"{m.n_heads} ({m.kv_heads})",
            str(cfg.n_stages),
            k,
            f"`{cfg.codec_spec}`",
            str(t.steps),
            f"{t.batch_size}{micro} × {t.seq_len}",
            note,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return [*lines, ""]


def render(configs_dir: Path = CONFIGS) -> str:
    lines = [
        "# Run config reference",
        "",
        f"<!-- Generated by `{COMMAND}` from pmnode/config/; do not edit by hand. -->",
        "",
        "A run config is a YAML file whose top-level keys are the fields below; nested sections are",
        "mappings (`model:`, `subspace:`, ...). Unknown keys are errors. Precedence: command-line flag >",
        "config file > the defaults listed here (in YAML spelling: `null` is None). Field paths are dotted.",
        "",
    ]
    for path, model in sections(RunConfig):
        lines += section_table(path, model)
    lines += shipped_configs(configs_dir)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if the output file is stale.")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"Default: {OUTPUT.relative_to(ROOT)}.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True), str(args.output), "generated"
        )
        sys.stderr.write("".join(diff))
        sys.stderr.write(f"{args.output} is stale; regenerate it with `{COMMAND}`\n")
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
