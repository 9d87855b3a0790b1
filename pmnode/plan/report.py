"""`pmnode plan`'s report: a per-stage table and the swarm's figures, printed with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pmnode.bench.advice import spread_text
from pmnode.core.sizing import HEADROOM
from pmnode.net.shaping import format_bandwidth
from pmnode.plan.costs import PLAN_PRECISION
from pmnode.plan.plan import Plan


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {p}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def print_plan(plan: Plan, console: Console) -> None:
    c = plan.closed
    t = Table(
        title=f"{plan.config}, {plan.codec}, {plan.stages_n} stages x {plan.replicas} replicas, "
        f"{plan.device}, {format_bandwidth(plan.bandwidth)} / {plan.latency * 1e3:g} ms, {plan.schedule}, "
        f"max_inflight {plan.max_inflight}"
    )
    t.caption = "rates in tokens/s; fwd: the link to the next stage, bwd: the link back"
    for col in (
        "stage",
        "layers",
        "params",
        "FLOP/tok",
        "B/tok fwd",
        "B/tok bwd",
        "compute",
        "fwd",
        "bwd",
        "binds",
    ):
        t.add_column(col, justify="right")
    for cost, r in zip(plan.costs, c.stages, strict=True):
        t.add_row(
            str(cost.stage),
            str(cost.layers),
            _si(cost.params),
            _si(cost.flops_per_token),
            str(cost.bytes_fwd_per_token or "-"),
            str(cost.bytes_bwd_per_token or "-"),
            _si(r.compute_tokens_per_s),
            _si(r.link_fwd_tokens_per_s),
            _si(r.link_bwd_tokens_per_s),
            r.binds,
        )
    console.print(t)
    s = plan.simulated
    k = plan.max_k_compute_bound
    lines = [
        f"round trip of a micro-batch: {c.round_trip_s * 1e3:,.1f} ms; the window of {plan.max_inflight} "
        f"allows {_si(c.window_tokens_per_s)} tokens/s",
        f"closed form: [bold]{_si(c.tokens_per_s)} tokens/s[/], {c.step_s:.3g} s per step of "
        f"{plan.tokens_per_step:,} tokens; bound by {c.binding}",
        f"simulated:   [bold]{_si(s.tokens_per_s)} tokens/s[/], {s.step_s:.3g} s per step; "
        f"bound by {s.binding}; stage utilisation " + ", ".join(f"{x.utilisation:.2f}" for x in s.stages),
        f"suggested max_inflight: {c.suggested_max_inflight}",
        "largest k that keeps every stage compute-bound: "
        + (str(k) if k is not None else "none (even k = 1 is link-bound)"),
    ]
    if (a := plan.advice) is not None:
        m = a.measured
        cost = (
            f"{100 * m.gap:+.1f}% held-out loss at {m.tokens / 1e6:.1f}M tokens (d={m.d_model} study)"
            if m is not None and m.gap is not None
            else "not measured; a larger k costs no more than a smaller one"
        )
        cost = spread_text(a) or cost  # the range over corpora, where measured on several
        shipped = ", the config's own boundary" if a.shipped else ""
        lines.append(
            f"lowest measured cost this link carries: {a.codec}@{a.rank} ({a.setting}{shipped}): {cost}"
        )
    worst = max(plan.memory_gb)
    mem = (
        f"stage memory ({PLAN_PRECISION}: weights, gradients, Adam, basis and token table, one "
        f"micro-batch, {HEADROOM:.0%} headroom): up to {worst:.3g} GB"
    )
    if plan.gpu_memory_gb is not None:
        fits = worst < plan.gpu_memory_gb
        mem += f" of the GPU's {plan.gpu_memory_gb:g} GB" + (
            "" if fits else " [bold red]: does not fit[/], use more stages"
        )
    lines.append(mem)
    for line in lines:
        console.print(line, highlight=False)
