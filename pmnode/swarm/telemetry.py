"""What a node shows about itself: the DHT record its heartbeat announces, the live panel's
snapshot and the summary at exit, all read from the parts that own the numbers."""

from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING

import torch

from pmnode.net import bounded
from pmnode.net.reach import Reachability
from pmnode.net.routing import StageRecord
from pmnode.net.transport import TransportStats
from pmnode.swarm.options import NodeOptions
from pmnode.swarm.panel import NodeSnapshot
from pmnode.swarm.report import NodeSummary, counters

if TYPE_CHECKING:
    from pmnode.swarm.parts import Parts


class IoRates:
    """Bytes/s in and out over the last second or more, both roles together."""

    def __init__(self, client: TransportStats, server: TransportStats):
        self.client, self.server = client, server
        self.then, self.b_in, self.b_out, self.rates = time.monotonic(), 0, 0, (0.0, 0.0)

    def now(self) -> tuple[float, float]:
        c, v = self.client.summary(), self.server.summary()
        now = time.monotonic()
        b_in = c["bytes_received"] + v["bytes_received"]
        b_out = c["bytes_sent"] + v["bytes_sent"]
        if now - self.then >= 1.0:
            dt = now - self.then
            self.rates = ((b_in - self.b_in) / dt, (b_out - self.b_out) / dt)
            self.then, self.b_in, self.b_out = now, b_in, b_out
        return self.rates


class Telemetry:
    def __init__(
        self, parts: Parts, opts: NodeOptions, server_stats: TransportStats, reach: Reachability | None = None
    ):
        self.parts, self.opts, self.server_stats = parts, opts, server_stats
        self.reach = reach or Reachability()
        self.io = IoRates(parts.downstream.stats, server_stats)
        self.started = time.monotonic()

    def _loss(self) -> float | None:
        p = self.parts
        return p.head.progress.last_loss if p.ctx.runner.worker.is_first else p.handler.last_loss

    def record(self) -> StageRecord:
        p, runner = self.parts, self.parts.ctx.runner
        return StageRecord(
            peer_id=p.ctx.peer_id,
            stage=p.ctx.stage,
            slot=p.ctx.slot,
            driving_since=p.head.group.since,
            state="online",
            throughput=runner.throughput(),
            queue=len(runner.worker.inflight),
            step=runner.step,
            samples=runner.samples_applied,
            loss=self._loss(),
            heldout_loss=p.head.progress.heldout,
            tokens_per_s=p.head.progress.tokens_per_s,
            wire_bytes_per_s=round(sum(self.io.now()), 1),
            device=self.opts.machine.device,
            refused=self.refused(),
            time=time.time(),
            reach=self.reach.mode,
            addrs=self.reach.addrs,
            relay=self.opts.relay and self.reach.mode == "direct",
            outer=p.outer.report() if p.outer is not None else None,
            problem=runner.disk_problem[:300] if runner.disk_problem else None,
        )

    def refused(self) -> dict[str, int]:
        p = self.parts
        doors = {f"averaging.{k}": v for k, v in p.averaging.refusals.snapshot().items() if v}
        # stream messages that announced more than any door takes, refused before they were read
        streams = {"streams": n} if (n := sum(bounded.REFUSED.values())) else {}
        return {"data": sum(p.guard.rejected.values()), **doors, **streams}

    def snapshot(self) -> NodeSnapshot:
        p, cfg = self.parts, self.parts.ctx.cfg
        w = p.ctx.runner.worker
        r_in, r_out = self.io.now()
        tps = p.head.progress.tokens_per_s or p.ctx.runner.throughput() * cfg.train.seq_len
        return NodeSnapshot(
            run=cfg.name,
            peer_id=p.ctx.peer_id,
            stage=w.index,
            n_stages=cfg.n_stages,
            layers=(w.stage.layer_range.start, w.stage.layer_range.stop),
            role=self._role(),
            device=self.opts.machine.device,
            codec=cfg.codec_spec,
            schedule=cfg.swarm.schedule + (f" ({cfg.swarm.async_correction})" if w.stash_weights else ""),
            upstream=p.handler.recent_upstream(),
            downstream=[r.peer_id for r in p.downstream.records],
            step=w.step_count,
            target_steps=cfg.train.steps,
            samples=p.ctx.runner.samples_applied,
            loss=self._loss(),
            heldout_loss=p.head.progress.heldout,
            tokens_per_s=tps,
            bytes_in_per_s=r_in,
            bytes_out_per_s=r_out,
            compression=4 * cfg.model.d_model / max(w.codec.bytes_per_token_forward(), 1),
            inflight=len(w.inflight),
            errors=sum(p.downstream.stats.errors.values()) + sum(self.server_stats.errors.values()),
            uptime_s=time.monotonic() - self.started,
            problem=p.ctx.runner.disk_problem,
        )

    def _role(self) -> str:
        ctx, w = self.parts.ctx, self.parts.ctx.runner.worker
        if w.is_first:  # several heads: which part of the data this one drives
            heads = ctx.cfg.swarm.heads
            return f"head {ctx.slot} of {heads}" if heads > 1 else "head"
        return "tail" if w.is_last else "body"

    def _spot(self) -> dict[str, object]:
        p = self.parts
        if p.ctx.runner.worker.is_first:
            commit = p.head.commit
            return {**p.head.spot.report(), "steps_redone": commit.redone, "steps_dropped": commit.dropped}
        liar = p.handler.spot.liar
        lies = liar.lies if liar is not None else 0
        return {"peer_id": p.ctx.peer_id, "checks_served": p.handler.spot.checks, "lies": lies}

    def summary(self) -> NodeSummary:
        p, runner = self.parts, self.parts.ctx.runner
        head = p.head.progress
        extra = head.head_summary(p.downstream.stats) if runner.worker.is_first and head.losses else {}
        if runner.worker.is_first:
            extra["samples_driven"] = p.head.samples_driven
            extra["data_position"] = runner.data_positions.get(runner.step)
        return NodeSummary(
            stage=p.ctx.stage,
            slot=p.ctx.slot,
            steps=runner.step,
            schedule=p.ctx.schedule.name,
            codec=p.ctx.cfg.codec_spec,
            samples_applied=runner.samples_applied,
            client=counters(p.downstream.stats),
            server=counters(self.server_stats),
            rejected=dict(p.guard.rejected),
            bans=p.guard.bans,
            dropped_gradients=p.downstream.dropped_gradients,
            reissued=p.head.commit.reissued,
            samples_off=runner.samples_off,
            steps_lost=p.replicas.steps_lost,
            paused_s=round(p.pauses.paused_s, 2),
            averaging=p.averaging.report(),
            outer=p.outer.report() if p.outer is not None else None,
            grad_shares=p.participant.report(),
            compute=runner.times.model_copy(update={"busy_s": round(runner.busy, 4)}),
            busy_s=round(runner.busy, 3),
            process_cpu_s=round(sum(os.times()[:2]), 3),
            samples_served=runner.samples_served,
            peak_memory_bytes=peak_memory(runner.worker.device),
            tunnelled_in=dict(p.ctx.tunnel.forwarded),
            relay_forwarded=p.forwarder.counters.total() if p.forwarder is not None else None,
            spot_checks=self._spot(),
            **extra,
        )


def peak_memory(device: torch.device) -> int:
    """The allocator's counter (no device sync) on CUDA; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
