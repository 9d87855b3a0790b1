"""The picture of imports points down: a package imports only packages of a lower layer (issue 26).

Read from the source (every `import`, TYPE_CHECKING and function-level ones included), so an upward
import fails here before anyone draws the picture. Packages on one layer are siblings: neither may
import the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. errors is pmnode/errors.py; configs is the shipped YAML (package data, no code).
LAYERS: list[set[str]] = [
    {"errors", "configs"},
    {"config"},  # what a swarm agrees on: validated without touching the disk
    {"data"},  # prepared shards, tokenizers, manifests: read by the trainer and the node
    {"core"},  # model, codecs, the training step: one process, no network
    {"net"},  # transport, wire, tunnel, checks, the coordinator's protocol: no node logic
    {"swarm", "sim"},  # the node, and the simulator that shares net's policies with it
    {"plan"},  # the planner: costs, the simulator, the advice and its measured table
    {"bench"},  # benchmarks: run swarms and trainings, fit the simulator, write reports
    {"cli", "coordinator"},  # the two programs (coordinator is the top-level package beside pmnode)
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

# Deliberate upward imports, (from, to): none today. Add one only with a comment saying why the
# concept cannot live in the lower layer.
ALLOWED: set[tuple[str, str]] = set()


def _unit(module: str) -> str | None:
    """'pmnode.net.tunnel' -> 'net', 'pmnode.errors' -> 'errors', 'coordinator.cli' -> 'coordinator'."""
    parts = module.split(".")
    if parts[0] == "coordinator":
        return "coordinator"
    if parts[0] == "pmnode" and len(parts) > 1:
        return parts[1]
    return None


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import; name the package"
            name = node.module or ""
            out.append((name, node.lineno))
            out += [(f"{name}.{a.name}", node.lineno) for a in node.names]  # `from pmnode import bench`
    return out


def edges() -> list[tuple[str, str, str]]:
    """(from unit, to unit, 'file:line') for every import between two units."""
    found = []
    for top in ("pmnode", "coordinator"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            module = ".".join(rel.with_suffix("").parts)
            src = _unit(module) if len(rel.parts) > 2 or top == "coordinator" else "errors"
            for name, line in _imports(path):
                dst = _unit(name)
                if src and dst and dst != src and dst in RANK:
                    found.append((src, dst, f"{rel}:{line}"))
    return found


def test_every_unit_has_a_layer() -> None:
    units = {p.name for p in (ROOT / "pmnode").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    units |= {"errors", "configs", "coordinator"}
    assert units - {"__pycache__"} == set(RANK), "a new package needs its place in LAYERS"


def test_imports_only_point_down() -> None:
    up = sorted(
        {
            f"{where}: {src} imports {dst}"
            for src, dst, where in edges()
            if RANK[dst] >= RANK[src] and (src, dst) not in ALLOWED
        }
    )
    assert up == [], (
        "imports that point up or sideways (move the function down, or pass it in):\n" + "\n".join(up)
    )


def test_the_check_sees_imports() -> None:
    """The walk finds the arrows it should, function-level ones included (cli.commands imports data)."""
    found = {(s, d) for s, d, _ in edges()}
    assert {("swarm", "net"), ("cli", "data"), ("coordinator", "plan"), ("plan", "sim")} <= found
