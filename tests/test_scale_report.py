"""The replica-sync report: labels and gaps against exact sums (pmnode.bench.scale_report)."""

from __future__ import annotations

from pmnode.bench.fidelity import RunResult
from pmnode.bench.scale_report import rows, sync_settings


def _run(variant: str, replicas: int, losses: list[float], sent: int = 0) -> RunResult:
    curve = [(i + 1, (i + 1) * 1000, loss) for i, loss in enumerate(losses)]
    return RunResult(
        variant=variant, codec="subspace:int8", d_model=64, rank=8, constrain="boundaries", boundaries=3,
        bytes_per_token=11, bytes_per_token_backward=10, steps=len(losses), tokens=len(losses) * 1000,
        tokens_per_s=1.0, heldout_loss=losses[-1], curve=curve, diagnostics=None, config_hash="x",
        command="c", replicas=replicas, sync_bytes_per_round=[sent], sync_params_per_stage=[1000],
    )  # fmt: skip


def test_each_outer_run_is_set_against_exact_sums_with_the_config_defaults() -> None:
    outer = "default+replica_sync.method=outer+replica_sync.topk_bits=4"
    assert sync_settings(outer) == ("default", {"method": "outer", "topk_bits": 4})
    table = rows([_run("default", 1, [2.0, 1.5]), _run(outer, 4, [2.2, 1.65], sent=20)])
    exact, row = table
    assert exact.gap is None and exact.label == "exact sums, R = 1"
    assert row.gap == 0.1 and row.fp16_ratio == 0.01
    assert row.label == "R=4 topk H=4 bits=4" and (row.compressor, row.inner_steps) == ("topk", 4)
