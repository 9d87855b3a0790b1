"""Generated docs stay in step with the code: docs/configs.md is what scripts/config_reference.py writes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from pmnode.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configs.md"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    script = ROOT / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _paths(ann, f"{prefix}{name}.")
    return out


def test_configs_md_is_up_to_date(generator: ModuleType) -> None:
    assert DOC.read_text() == generator.render(), (
        "docs/configs.md is stale: run `python scripts/config_reference.py`"
    )
    assert generator.main(["--check"]) == 0


def test_check_flags_a_stale_file(generator: ModuleType, tmp_path: Path) -> None:
    stale = tmp_path / "configs.md"
    stale.write_text(DOC.read_text().replace("Residual stream width d.", "Something else."))
    assert generator.main(["--check", "--output", str(stale)]) == 1
    assert generator.main(["--check", "--output", str(tmp_path / "missing.md")]) == 1
    assert generator.main(["--output", str(stale)]) == 0
    assert generator.main(["--check", "--output", str(stale)]) == 0


def test_every_field_is_documented() -> None:
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| .* \| ((?:\\\||[^|])*) \|$", text, flags=re.M))
    for path in _paths(RunConfig):
        assert path in rows, f"{path} is missing from docs/configs.md"
        assert rows[path].strip(), f"{path} has no description; add description= to its Field"


def test_every_shipped_config_is_listed() -> None:
    text = DOC.read_text()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"`configs/{path.name}`" in text


def test_shipped_fidelity_costs_are_the_committed_runs() -> None:
    """`coordinator inspect` prints what the committed fidelity runs measured, not an older copy."""
    script = ROOT / "benchmarks" / "fidelity_costs.py"
    spec = importlib.util.spec_from_file_location("fidelity_costs", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.COSTS_FILE.read_text() == module.build(), "run `python -m benchmarks.fidelity_costs`"
