"""The run config's trust section: spot checks of the compute of later stages' replicas."""

from __future__ import annotations

from pydantic import Field

from pmnode.config.sections import _Strict


class TrustConfig(_Strict):
    """Spot checks (pmnode.swarm.spot_checks): the head asks for the output a stage-1 replica sent for
    a sampled micro-batch and has a second replica compute it again; a mismatch is decided by a third,
    and the replica found lying is banned and the step's gradients are computed again without it.

    Checks run only where two replicas must hold the same weights: schedule sync with
    replica_sync.method step. Elsewhere they are off (async or outer-round replicas differ)."""

    spot_check_rate: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fraction of the head's micro-batches whose stage-1 output is checked (0: none).",
    )
    spot_check_tolerance: float = Field(
        0.05,
        gt=0.0,
        description="Relative L2 distance between two replicas' outputs still taken as equal: bf16 "
        "autocast and int8 rounding differ by about 1e-2; a corrupted output by about 1 or more.",
    )
