"""The closed form of a pipeline's throughput: per stage, what compute, each link direction, the
replicas' sync traffic and the latency of the in-flight windows allow, and which of them binds.

Per stage s with n_s nodes (N heads at stage 0, R replicas elsewhere), micro-batches of M tokens,
fwd/bwd seconds per token f_s, b_s, and T = N·n·M tokens per step (each head drives its own n
micro-batches of a step, with its own window of W):
  compute      n_s / (f_s + b_s) tokens/s
  link out     (fwd)  n_s · bandwidth / bytes_fwd        (each node has its own uplink)
  link back    (bwd)  n_s · bandwidth / bytes_bwd
  replica sync bandwidth / max(up, down), per swarm token on one node's links: the activations it
               sends (bytes_fwd + bytes_bwd) / n_s (and receives), plus an overlapped round's bytes
               spread over its H steps (up / (H·T)) (pmnode.plan.sync)
  round trip   RTT = M·Σ(f_s + b_s) + Σ_boundaries (2·latency + M·bytes_fwd/bw + M·bytes_bwd/bw)
  window       N·W·M / RTT  (async: W micro-batches in flight per head)
async: the minimum of them all. sync: every step drains; with N·n micro-batches per step,
  step = max(max(RTT + (N·n − 1)·M/r, ⌈n/W⌉·RTT) + commit, T/s) + wait,
  commit = 2 round trips of 2·latency,
where r is the slowest compute or link rate, s the slowest replica-sync rate and wait the rounds the
stages wait for (the fp32 gradient exchange of sync `step`, or outer rounds without overlap), spread
over their steps.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from pmnode.plan.costs import StageCost
from pmnode.plan.sync import SyncLoad, blocking_s_per_step, overlapped_per_token


class PlanInputs(BaseModel):
    costs: list[StageCost]
    fwd_s_per_token: list[float]  # per stage, on one node
    bwd_s_per_token: list[float]  # the tail: its forward too is in its job, counted here or in fwd
    bandwidth: float | None  # bytes/s per node uplink (and downlink); None: unlimited
    latency: float  # one way, seconds
    heads: int = 1  # stage-0 nodes, each with its own window and its own n micro-batches a step
    replicas: int = 1  # per stage after the head
    max_inflight: int = 4  # per head
    schedule: str = "async"
    tokens_per_micro_batch: int
    micro_batches_per_step: int  # per head
    commit_round_trips: int = 2
    sync: list[SyncLoad | None] = []  # per stage; empty: no replica traffic counted

    def nodes(self, stage: int) -> int:
        return self.heads if stage == 0 else self.replicas

    @property
    def tokens_per_step(self) -> int:
        return self.heads * self.micro_batches_per_step * self.tokens_per_micro_batch

    def load(self, stage: int) -> SyncLoad | None:
        return self.sync[stage] if self.sync else None


class StageRate(BaseModel):
    stage: int
    nodes: int
    compute_tokens_per_s: float
    link_fwd_tokens_per_s: float | None  # None: no next stage, or an unlimited link
    link_bwd_tokens_per_s: float | None
    sync_tokens_per_s: float | None = None  # a node's links with its rounds; None: no overlapped sync
    binds: str  # compute, link fwd (to the next stage), link bwd (back to the previous one), sync


class StageSync(BaseModel):
    """One stage's replica sync at the plan's rate (pmnode.plan.sync)."""

    stage: int
    nodes: int
    bytes_per_round: int  # one replica's share of a round
    upload_bytes_per_round: int
    download_bytes_per_round: int
    every_steps: int | None
    every_s: float | None
    blocking: bool  # the stage waits for its rounds
    round_s: float  # at the link the pipeline's activations leave free
    window_s: float  # the compute a round may hide behind: H steps, or the period; 0 if blocking
    hidden: float  # the fraction of a round's time hidden behind compute
    binds: bool  # the round costs the swarm throughput, or (timed) lands later than its period


class ClosedForm(BaseModel):
    stages: list[StageRate]
    round_trip_s: float
    window_tokens_per_s: float
    tokens_per_s: float
    step_s: float
    binding: str
    suggested_max_inflight: int  # per head
    replica_sync: list[StageSync] = []  # the stages with more than one node
    tokens_per_s_without_sync: float | None = None  # the same swarm with its replica traffic free


def _activations(p: PlanInputs, i: int) -> tuple[float, float]:
    """(sent, received) activation and gradient bytes per swarm token on one node of stage i."""
    c, n = p.costs, p.nodes(i)
    sent = c[i].bytes_fwd_per_token + c[i].bytes_bwd_per_token
    got = (c[i - 1].bytes_fwd_per_token if i > 0 else 0) + (
        c[i + 1].bytes_bwd_per_token if i + 1 < len(c) else 0
    )
    return sent / n, got / n


def _sync_rate(p: PlanInputs, i: int) -> float | None:
    """The rate at which a node's links carry its activations and its rounds every H steps; None for
    rounds that stall the stage instead, or timed ones (they only average less often)."""
    load, bw = p.load(i), p.bandwidth
    if load is None or not bw or load.blocking or load.every_s is not None:
        return None
    sent, got = _activations(p, i)
    up, down = overlapped_per_token(load, p.tokens_per_step)
    return bw / max(sent + up, got + down)


def stage_rates(p: PlanInputs, with_sync: bool = True) -> list[StageRate]:
    out = []
    for i, c in enumerate(p.costs):
        n = p.nodes(i)
        comp = n / (p.fwd_s_per_token[i] + p.bwd_s_per_token[i])
        fwd = n * p.bandwidth / c.bytes_fwd_per_token if p.bandwidth and c.bytes_fwd_per_token else None
        bwd = n * p.bandwidth / c.bytes_bwd_per_token if p.bandwidth and c.bytes_bwd_per_token else None
        sync = _sync_rate(p, i) if with_sync else None
        rates = {
            "compute": comp,
            "link out (forward)": fwd or math.inf,
            "link back (backward)": bwd or math.inf,
            "replica sync": sync or math.inf,
        }
        out.append(
            StageRate(
                stage=i,
                nodes=n,
                compute_tokens_per_s=comp,
                link_fwd_tokens_per_s=fwd,
                link_bwd_tokens_per_s=bwd,
                sync_tokens_per_s=sync,
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


def _limits(rows: list[StageRate]) -> dict[str, float]:
    limits: dict[str, float] = {}
    for r in rows:
        limits[f"compute, stage {r.stage}"] = r.compute_tokens_per_s
        if r.link_fwd_tokens_per_s:
            limits[f"link {r.stage}->{r.stage + 1}"] = r.link_fwd_tokens_per_s
        if r.link_bwd_tokens_per_s:
            limits[f"link {r.stage}->{r.stage - 1}"] = r.link_bwd_tokens_per_s
        if r.sync_tokens_per_s:
            limits[f"replica sync, stage {r.stage}"] = r.sync_tokens_per_s
    return limits


def _rate(p: PlanInputs, with_sync: bool) -> tuple[list[StageRate], float, float, str]:
    """(stage rates, tokens/s, seconds per step, what binds)."""
    rows = stage_rates(p, with_sync)
    m, n, big_t = p.tokens_per_micro_batch, p.micro_batches_per_step, p.tokens_per_step
    rtt = round_trip(p)
    limits = _limits(rows)
    waits = [blocking_s_per_step(ld, p.bandwidth) if with_sync and ld else 0.0 for ld in p.sync]
    wait = max(waits, default=0.0)
    if p.schedule == "async":
        limits["latency and the in-flight window"] = p.heads * p.max_inflight * m / rtt
        binding = min(limits, key=lambda k: limits[k])
        step = big_t / limits[binding] + wait
    else:
        # The drain is paced by the pipeline's own resources; rounds spread over the step's link.
        pipe = {k: v for k, v in limits.items() if not k.startswith("replica sync")}
        slowest = min(pipe, key=lambda k: pipe[k])
        rate, commit = pipe[slowest], p.commit_round_trips * 2 * p.latency
        drain = max(rtt + (p.heads * n - 1) * m / rate, math.ceil(n / p.max_inflight) * rtt)
        binding = slowest if (p.heads * n - 1) * m / rate > rtt + commit else "pipeline drain and commit"
        step = drain + commit
        # Rounds use the link through the whole step, the commit too: a step takes at least as long as
        # its activations and its share of the rounds take on the busiest node's link.
        sync = {k: big_t / v for k, v in limits.items() if k.startswith("replica sync")}
        if sync and max(sync.values()) > step:
            binding = max(sync, key=lambda k: sync[k])
            step = sync[binding]
        step += wait
    if wait > 0.5 * step:
        binding = f"replica sync, stage {waits.index(wait)} (the stage waits for its rounds)"
    return rows, big_t / step, step, binding


def _stage_sync(
    p: PlanInputs, i: int, load: SyncLoad, free_rate: float, step_s: float, cost: float
) -> StageSync:
    """A stage's round at the rate the swarm would have with sync free: how long it takes at the link
    the activations leave, and how much of it the compute between two rounds hides."""
    bw = p.bandwidth
    if not bw:
        round_s = 0.0
    elif load.blocking:
        round_s = max(load.up_bytes, load.down_bytes) / bw
    else:
        sent, got = _activations(p, i)
        floor = 0.01 * bw  # a link the activations fill leaves rounds a trickle, not nothing
        free_up, free_down = max(bw - free_rate * sent, floor), max(bw - free_rate * got, floor)
        round_s = max(load.up_bytes / free_up, load.down_bytes / free_down)
    window = 0.0 if load.blocking else (load.every_s or (load.every_steps or 1) * step_s)
    hidden = 1.0 if round_s == 0 else (0.0 if load.blocking else min(1.0, window / round_s))
    return StageSync(
        stage=i,
        nodes=p.nodes(i),
        bytes_per_round=load.share_bytes,
        upload_bytes_per_round=load.up_bytes,
        download_bytes_per_round=load.down_bytes,
        every_steps=load.every_steps,
        every_s=load.every_s,
        blocking=load.blocking,
        round_s=round_s,
        window_s=window,
        hidden=hidden,
        binds=hidden < 1 if load.every_s is not None else cost > 0.01 and (hidden < 1 or load.blocking),
    )


def closed_form(p: PlanInputs) -> ClosedForm:
    m = p.tokens_per_micro_batch
    rows, tokens_per_s, step, binding = _rate(p, with_sync=True)
    _, free_rate, free_step, _ = _rate(p, with_sync=False)
    cost = 1 - tokens_per_s / free_rate
    syncs = [
        _stage_sync(p, i, ld, free_rate, free_step, cost) for i, ld in enumerate(p.sync) if ld is not None
    ]
    rtt = round_trip(p)
    limits = _limits(rows)
    rate = min(limits.values())
    # The window that hides the round trip behind the slowest resource (sync: at most a step's worth),
    # per head: the heads' windows add up.
    want = max(1, math.ceil(rtt * rate / m / p.heads))
    suggested = min(want, p.micro_batches_per_step) if p.schedule == "sync" else want
    return ClosedForm(
        stages=rows,
        round_trip_s=rtt,
        window_tokens_per_s=p.heads * p.max_inflight * m / rtt,
        tokens_per_s=tokens_per_s,
        step_s=step,
        binding=binding,
        suggested_max_inflight=suggested,
        replica_sync=syncs,
        tokens_per_s_without_sync=free_rate if syncs else None,
    )
