"""The closed form of a pipeline's throughput: per stage, what compute, each link direction and the
latency of the in-flight window allow, and which of them binds.

Per stage s with R_s replicas, a micro-batch of M tokens, fwd/bwd seconds per token f_s, b_s:
  compute      R_s / (f_s + b_s) tokens/s
  link out     (fwd)  R_s · bandwidth / bytes_fwd        (each replica has its own uplink)
  link back    (bwd)  R_s · bandwidth / bytes_bwd
  round trip   RTT = M·Σ(f_s + b_s) + Σ_boundaries (2·latency + M·bytes_fwd/bw + M·bytes_bwd/bw)
  window       W·M / RTT  (async: W micro-batches in flight)
async: the minimum of them all. sync: every step drains; with n micro-batches per step,
  step = max(RTT + (n − 1)·M/r, ⌈n/W⌉·RTT) + commit, commit = 2 round trips of 2·latency,
where r is the slowest compute or link rate.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from pmnode.plan.costs import StageCost


class PlanInputs(BaseModel):
    costs: list[StageCost]
    fwd_s_per_token: list[float]  # per stage, on one node
    bwd_s_per_token: list[float]  # the tail: its forward too is in its job, counted here or in fwd
    bandwidth: float | None  # bytes/s per node uplink; None: unlimited
    latency: float  # one way, seconds
    replicas: int = 1  # per stage after the head
    max_inflight: int = 4
    schedule: str = "async"
    tokens_per_micro_batch: int
    micro_batches_per_step: int
    commit_round_trips: int = 2


class StageRate(BaseModel):
    stage: int
    nodes: int
    compute_tokens_per_s: float
    link_fwd_tokens_per_s: float | None  # None: no next stage, or an unlimited link
    link_bwd_tokens_per_s: float | None
    binds: str  # compute, link fwd (to the next stage), link bwd (back to the previous one)


class ClosedForm(BaseModel):
    stages: list[StageRate]
    round_trip_s: float
    window_tokens_per_s: float
    tokens_per_s: float
    step_s: float
    binding: str
    suggested_max_inflight: int


def _nodes(i: int, replicas: int) -> int:
    return 1 if i == 0 else replicas  # the head is never replicated


def stage_rates(p: PlanInputs) -> list[StageRate]:
    out = []
    for i, c in enumerate(p.costs):
        n = _nodes(i, p.replicas)
        comp = n / (p.fwd_s_per_token[i] + p.bwd_s_per_token[i])
        fwd = n * p.bandwidth / c.bytes_fwd_per_token if p.bandwidth and c.bytes_fwd_per_token else None
        bwd = n * p.bandwidth / c.bytes_bwd_per_token if p.bandwidth and c.bytes_bwd_per_token else None
        rates = {
            "compute": comp,
            "link out (forward)": fwd or math.inf,
            "link back (backward)": bwd or math.inf,
        }
        out.append(
            StageRate(
                stage=i,
                nodes=n,
                compute_tokens_per_s=comp,
                link_fwd_tokens_per_s=fwd,
                link_bwd_tokens_per_s=bwd,
                binds=min(rates, key=lambda k: rates[k]),
            )
        )
    return out


def round_trip(p: PlanInputs) -> float:
    m = p.tokens_per_micro_batch
    rtt = m * sum(f + b for f, b in zip(p.fwd_s_per_token, p.bwd_s_per_token, strict=True))
    for a, b in zip(p.costs, p.costs[1:], strict=False):  # the boundary a -> b: forward, then back
        ser = m * (a.bytes_fwd_per_token + b.bytes_bwd_per_token) / p.bandwidth if p.bandwidth else 0.0
        rtt += 2 * p.latency + ser
    return rtt


def closed_form(p: PlanInputs) -> ClosedForm:
    rows = stage_rates(p)
    m, n = p.tokens_per_micro_batch, p.micro_batches_per_step
    rtt = round_trip(p)
    window = p.max_inflight * m / rtt
    limits: dict[str, float] = {}
    for r in rows:
        limits[f"compute, stage {r.stage}"] = r.compute_tokens_per_s
        if r.link_fwd_tokens_per_s:
            limits[f"link {r.stage}->{r.stage + 1}"] = r.link_fwd_tokens_per_s
        if r.link_bwd_tokens_per_s:
            limits[f"link {r.stage}->{r.stage - 1}"] = r.link_bwd_tokens_per_s
    slowest = min(limits, key=lambda k: limits[k])
    rate = limits[slowest]
    if p.schedule == "async":
        limits["latency and the in-flight window"] = window
        binding = min(limits, key=lambda k: limits[k])
        tokens_per_s = limits[binding]
        step = n * m / tokens_per_s
    else:
        commit = p.commit_round_trips * 2 * p.latency
        drain = max(rtt + (n - 1) * m / rate, math.ceil(n / p.max_inflight) * rtt)
        step = drain + commit
        tokens_per_s = n * m / step
        binding = slowest if (n - 1) * m / rate > rtt + commit else "pipeline drain and commit"
    # The window that hides the round trip behind the slowest resource (sync: at most a step's worth).
    want = max(1, math.ceil(rtt * rate / m))
    suggested = min(want, n) if p.schedule == "sync" else want
    return ClosedForm(
        stages=rows,
        round_trip_s=rtt,
        window_tokens_per_s=window,
        tokens_per_s=tokens_per_s,
        step_s=step,
        binding=binding,
        suggested_max_inflight=suggested,
    )
