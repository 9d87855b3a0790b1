"""`pmnode plan`'s report: a per-stage table and the swarm's figures, printed with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pmnode.core.sizing import HEADROOM
from pmnode.net.shaping import format_bandwidth
from pmnode.plan.advice import spread_text
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
    heads = f"{plan.heads} heads, " if plan.heads > 1 else ""
    t = Table(
        title=f"{plan.config}, {plan.codec}, {heads}{plan.stages_n} stages x {plan.replicas} replicas, "
        f"{plan.device}, {format_bandwidth(plan.bandwidth)} / {plan.latency * 1e3:g} ms, {plan.schedule}, "
        f"max_inflight {plan.max_inflight}"
    )
    t.caption = (
        "rates in tokens/s; fwd: the link to the next stage, bwd: the link back; sync: one replica's share "
        "of a replica-sync round, the round's time at the link the activations leave, the share of it "
        "hidden behind compute"
    )
    syncs = {x.stage: x for x in c.replica_sync}
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
        "sync B/round",
        "round",
        "hidden",
        "binds",
    ):
        t.add_column(col, justify="right")
    for cost, r in zip(plan.costs, c.stages, strict=True):
        x = syncs.get(r.stage)
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
            _si(x.bytes_per_round, "B") if x else "-",
            f"{x.round_s:.3g} s" if x else "-",
            f"{x.hidden:.0%}" if x else "-",
            r.binds if x is None or not x.binds else "sync",
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
        f"suggested max_inflight: {c.suggested_max_inflight}" + (" per head" if plan.heads > 1 else ""),
        "largest k that keeps every stage compute-bound: "
        + (str(k) if k is not None else "none (even k = 1 is link-bound)"),
    ]
    lines += _sync_lines(plan)
    if (a := plan.advice) is not None:
        m = a.measured
        cost_text = (
            f"{100 * m.gap:+.1f}% held-out loss at {m.tokens / 1e6:.1f}M tokens (d={m.d_model} study)"
            if m is not None and m.gap is not None
            else "not measured; a larger k costs no more than a smaller one"
        )
        cost_text = spread_text(a) or cost_text  # the range over corpora, where measured on several
        shipped = ", the config's own boundary" if a.shipped else ""
        lines.append(
            f"lowest measured cost this link carries: {a.codec}@{a.rank} ({a.setting}{shipped}): {cost_text}"
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


def _sync_lines(plan: Plan) -> list[str]:
    c, a = plan.closed, plan.sync_advice
    if not c.replica_sync:
        return []
    worst = max(c.replica_sync, key=lambda x: x.round_s)
    n = worst.every_steps
    every = f"every {n} steps" if n and n > 1 else ("every step" if n else f"every {worst.every_s:g} s")
    free = c.tokens_per_s_without_sync or c.tokens_per_s
    out = [
        f"replica sync ({plan.replica_sync_summary}): up to {_si(worst.upload_bytes_per_round, 'B')} up "
        f"and {_si(worst.download_bytes_per_round, 'B')} down per replica and round ({every}), "
        f"{worst.round_s:.3g} s a round at stage {worst.stage}, {worst.hidden:.0%} hidden; "
        f"{c.tokens_per_s / free:.0%} of the {_si(free)} tokens/s the swarm has with sync free"
    ]
    if a is not None:
        out.append(
            f"replica sync that fits: [bold]--replica-sync {a.method}"
            + (f" --compressor {a.compressor} --inner-steps {a.inner_steps}" if a.method == "outer" else "")
            + f"[/] ({_si(a.tokens_per_s)} tokens/s); {a.note}"
        )
    return out
