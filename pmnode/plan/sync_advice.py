"""Which replica sync fits the link: the smallest H whose outer rounds hide behind H steps of compute
at every stage, for each compressor, and whether today's `step` exchange binds.

The recommendation is the compressor that hides at the smallest H (rounds as often as the link
allows: the nearest to exact sync), ties going to exact fp32 (no compression error), then top-k
(the measured default), then PowerSGD.
"""

from __future__ import annotations

from pydantic import BaseModel

from pmnode.plan.closed import ClosedForm, PlanInputs, closed_form
from pmnode.plan.shapes import Shape
from pmnode.plan.sync import SyncSettings, stage_loads

H_CHOICES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
PREFERENCE = ("none", "topk", "powersgd")
STEP_BINDS = 0.05  # step traffic that costs more than this share of the throughput binds


class CompressorFit(BaseModel):
    compressor: str
    inner_steps: int | None  # the smallest H of H_CHOICES whose rounds hide at every stage; None: none
    bytes_per_round: int  # the largest stage's share of a round at that H
    tokens_per_s: float  # at that H (or the largest tried)


class SyncAdvice(BaseModel):
    step_tokens_per_s: float  # with method step (the run's schedule)
    step_binds: bool
    fits: list[CompressorFit]
    method: str
    compressor: str
    inner_steps: int
    tokens_per_s: float  # the closed form with the recommended settings
    note: str


def _with(p: PlanInputs, shapes: list[list[Shape]], s: SyncSettings, **rs: object) -> ClosedForm:
    settings = s.model_copy(update={"replica_sync": s.replica_sync.model_copy(update=rs)})
    return closed_form(p.model_copy(update={"sync": stage_loads(shapes, p.heads, p.replicas, settings)}))


def _fit(p: PlanInputs, shapes: list[list[Shape]], s: SyncSettings, compressor: str) -> CompressorFit:
    c = None
    for h in H_CHOICES:
        c = _with(p, shapes, s, method="outer", overlap=True, compressor=compressor, inner_steps=h)
        if all(x.hidden >= 1 for x in c.replica_sync):
            return CompressorFit(
                compressor=compressor,
                inner_steps=h,
                bytes_per_round=max(x.bytes_per_round for x in c.replica_sync),
                tokens_per_s=c.tokens_per_s,
            )
    assert c is not None
    top = max(x.bytes_per_round for x in c.replica_sync)
    return CompressorFit(
        compressor=compressor, inner_steps=None, bytes_per_round=top, tokens_per_s=c.tokens_per_s
    )


def advise_sync(p: PlanInputs, shapes: list[list[Shape]], s: SyncSettings) -> SyncAdvice | None:
    """None when no stage has more than one node (nothing to sync)."""
    if p.heads < 2 and p.replicas < 2:
        return None
    step = _with(p, shapes, s, method="step")
    free = step.tokens_per_s_without_sync or step.tokens_per_s
    # Timed rounds cost no throughput: they bind when they cannot keep their period.
    step_binds = step.tokens_per_s < (1 - STEP_BINDS) * free or any(x.binds for x in step.replica_sync)
    fits = [_fit(p, shapes, s, c) for c in PREFERENCE]
    hiding = [f for f in fits if f.inner_steps is not None]
    if hiding:
        best = min(hiding, key=lambda f: (f.inner_steps, PREFERENCE.index(f.compressor)))
    else:
        best = max(fits, key=lambda f: f.tokens_per_s)
    h = best.inner_steps or H_CHOICES[-1]
    by = {f.compressor: f for f in fits}
    slow = max(step.replica_sync, key=lambda x: x.round_s)
    late = slow.every_s is not None and slow.hidden < 1  # timed rounds: they cost learning, not speed
    notes = [
        f"step binds: a round takes {slow.round_s:.3g} s, one is due every {slow.every_s:g} s"
        if late and slow.every_s is not None
        else f"step {'binds' if step_binds else 'fits'} ({step.tokens_per_s:,.0f} of {free:,.0f} tokens/s)",
        f"outer {best.compressor} hides from H = {h}" if hiding else f"no compressor hides by H = {h}",
    ]
    for name, f in by.items():
        if f is best:
            continue
        notes.append(f"{name} from H = {f.inner_steps}" if f.inner_steps else f"{name} never hides")
    method = "outer" if step_binds or s.replica_sync.method == "outer" else "step"
    return SyncAdvice(
        step_tokens_per_s=step.tokens_per_s,
        step_binds=step_binds,
        fits=fits,
        method=method,
        compressor=best.compressor,
        inner_steps=h,
        tokens_per_s=best.tokens_per_s if method == "outer" else step.tokens_per_s,
        note="; ".join(notes),
    )
