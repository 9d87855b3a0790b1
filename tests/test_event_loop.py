"""The event loop schedules; the compute thread owns the tensors (pmnode.swarm.runner).

An AST walk over pmnode/net and pmnode/swarm finds, inside every `async def` body (nested defs and
lambdas excluded: they are what gets handed to the runner), calls that touch torch: `torch.*`,
tensor methods that read or copy data, and the pmnode helpers known to run torch (wire encode and
decode, the envelope's targets and labels, the spot checks' distance). Each one found must be in
KNOWN below, with the reason it is there. The list is a ratchet: a new call fails this test, and
one moved onto the runner must be taken off it (a stale entry fails too).

Issue 26 item 2 is to empty TO_MOVE. Found by a runtime probe (a TorchFunctionMode pushed on each
event-loop thread of a 3-stage local swarm, 12 steps, at 58cea96): on the loop ran wire.encode
(serving replies, transport requests), wire.decode (its copy and isfinite, both sides), the tail's
MicroBatch.labels (torch.cat), the head's make_targets and micro-batch slicing, the telemetry's
codec.bytes_per_token_forward (torch.empty for an itemsize) and hivemind's MPFuture state (a shared
one-element tensor behind every DHT call: hivemind's, not ours).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
DIRS = ("pmnode/net", "pmnode/swarm")
# tensor methods that read, copy or convert data (shape, dtype, numel, element_size: metadata, allowed)
DATA_METHODS = {"numpy", "tobytes", "item", "tolist", "clone", "contiguous", "copy_", "float", "long"}
# pmnode helpers that run torch on whatever thread calls them: functions called by name (a method of the
# same name, e.g. str.encode or runner.check_activation, is not one), and MicroBatch's two methods
TORCH_FUNCTIONS = {"encode", "decode", "distance", "make_targets", "check_activation", "check_gradient"}
TORCH_METHODS = {"labels", "first"}

# (file, async def, call) -> why it is still there
TO_MOVE: dict[tuple[str, str, str], str] = {}
ALLOWED = {
    # a process-wide setting made once while joining, before the compute thread exists; no tensor
    ("pmnode/swarm/node.py", "_join", "torch.set_num_threads"): "setup",
}
KNOWN = {**TO_MOVE, **ALLOWED}


def _name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Attribute):
        base: ast.expr = f
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name) and base.id == "torch":
            return ast.unparse(f)
        if f.attr in DATA_METHODS or f.attr in TORCH_METHODS:
            return f.attr
    if isinstance(f, ast.Name) and f.id in TORCH_FUNCTIONS:
        return f.id
    return None


def torch_calls_in_coroutines() -> set[tuple[str, str, str]]:
    found = set()
    for d in DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, ast.AsyncFunctionDef):
                    continue
                todo: list[ast.AST] = list(fn.body)
                while todo:
                    node = todo.pop()
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                        continue  # a job for the runner (or a coroutine walked on its own)
                    if isinstance(node, ast.Call) and (name := _name(node)) is not None:
                        found.add((rel, fn.name, name))
                    todo.extend(ast.iter_child_nodes(node))
    return found


def test_no_new_torch_calls_in_coroutines() -> None:
    new = torch_calls_in_coroutines() - set(KNOWN)
    assert not new, f"torch work inside async defs (hand it to the runner): {sorted(new)}"


def test_the_known_list_is_not_stale() -> None:
    gone = set(KNOWN) - torch_calls_in_coroutines()
    assert not gone, f"moved off the loop: take these off TO_MOVE/ALLOWED: {sorted(gone)}"
