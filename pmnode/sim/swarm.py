"""The swarm simulator: micro-batches as events through the stages of a pipeline.

A micro-batch goes forward from the head through one replica of every stage and its gradient comes
back the same way. Every node has one compute thread (a FIFO server) and one event loop (another,
for `msg_s` per message); each of its outgoing links is a `LinkShaper`, the one the real node uses
to emulate links, on the simulated clock. A node picks the next stage's replica with the real
routing policy (`choose_peer` over the records announced every HEARTBEAT_PERIOD, `Backoff` for the
ones that failed it). Every node of stage 0 is a head: each keeps its own `max_inflight` micro-batches
in flight and drives its own `micro_batches_per_step` of every step; under sync the swarm drains
every step and commits it (round trips to the farthest stage, then every stage's optimizer step).
Replicated stages run their replica-sync rounds on the same uplinks (pmnode.sim.rounds).
A node that dies loses what it held; its upstream notices after `retry_s` and sends it elsewhere
(heads do not die here).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

from pmnode.net.routing import HEARTBEAT_PERIOD, Backoff, StageRecord, choose_peer
from pmnode.net.shaping import LinkShaper
from pmnode.sim.events import Engine, Server
from pmnode.sim.model import NodeSpec, SwarmSpec
from pmnode.sim.rounds import Rounds

STALL_S = 600.0  # simulated seconds without a finished micro-batch that end a run (the swarm is stuck)


@dataclass
class Mb:
    key: int
    attempt: int = 0
    path: dict[int, SimNode] = field(default_factory=dict)


class SimNode:
    def __init__(self, eng: Engine, stage: int, index: int, spec: NodeSpec, shared_loop: bool = False):
        self.stage, self.spec, self.name = stage, spec, f"s{stage}n{index}"
        self.compute = Server(eng)
        self.loop = self.compute if shared_loop else Server(eng)
        self.shaper = LinkShaper(spec.bandwidth, spec.latency, clock=eng.clock)
        self.backoff = Backoff()
        self.online = spec.join_at == 0
        self.held: dict[int, int] = {}  # micro-batch -> attempt, between its forward and backward here
        self.served = 0
        self.link_busy: dict[tuple[int, str], float] = {}  # (to stage, peer) -> seconds serialising
        self.sent: dict[str, int] = {}  # downstream replica -> micro-batches this node has in flight there

    @property
    def alive(self) -> bool:
        return self.online and self.compute.up

    def record(self) -> StageRecord:
        c = self.compute
        thr = self.served / c.busy_s if c.busy_s > 0.2 and self.served else 0.0
        state = "online" if self.alive else "offline"
        return StageRecord(
            peer_id=self.name, stage=self.stage, state=state, throughput=thr, queue=len(self.held)
        )


class SwarmSim:
    def __init__(self, spec: SwarmSpec):
        self.spec, self.eng = spec, Engine()
        self.rng = random.Random(spec.seed)
        self.nodes = [
            [SimNode(self.eng, s, i, n, spec.loop_shares_compute) for i, n in enumerate(st.nodes)]
            for s, st in enumerate(spec.stages)
        ]
        self.heads = self.nodes[0]
        self.records: list[list[StageRecord]] = []
        self.done_at: list[float] = []  # when each micro-batch's backward finished at its head
        self.step_ends: list[float] = []
        self.retried = 0
        self.rounds = Rounds(self)
        self._next_key = 0
        self._inflight = {h.name: 0 for h in self.heads}
        self._launched = {h.name: 0 for h in self.heads}  # micro-batches each head has started
        self._step_left = 0
        self._steps_target = 0
        self._done_seen, self._idle, self.stalled = 0, 0, False
        self._committing = False

    # ---- membership ------------------------------------------------------------------------------
    def _announce(self) -> None:
        self.records = [[n.record() for n in stage] for stage in self.nodes]
        # Nothing finished for STALL_S: the swarm cannot go on (a stage with no node left, say). A long
        # commit or replica-sync round is slow, not stuck.
        waiting = self._committing or self.rounds.in_flight()
        self._idle = self._idle + 1 if len(self.done_at) == self._done_seen and not waiting else 0
        self._done_seen = len(self.done_at)
        self.stalled = self._idle * HEARTBEAT_PERIOD >= STALL_S
        self.eng.after(HEARTBEAT_PERIOD, self._announce)

    def _schedule_churn(self) -> None:
        for stage in self.nodes:
            for n in stage:
                if n.spec.join_at > 0:
                    self.eng.at(n.spec.join_at, partial(setattr, n, "online", True))
                if n.spec.leave_at is not None:
                    self.eng.at(n.spec.leave_at, partial(self._leave, n))

    def _leave(self, node: SimNode) -> None:
        node.compute.stop()
        node.loop.stop()
        for key, attempt in list(node.held.items()):
            mb = self._live.get(key)
            if mb is not None and mb.attempt == attempt:
                self._resend(mb, mb.path[node.stage - 1], node)
        node.held.clear()

    def _resend(self, mb: Mb, up: SimNode, dead: SimNode) -> None:
        """The upstream node notices after retry_s that `dead` will not answer, and tries another."""
        mb.attempt += 1
        self.retried += 1
        up.backoff.fail(dead.name, self.eng.now)
        up.sent[dead.name] = max(0, up.sent.get(dead.name, 0) - 1)
        self.eng.after(self.spec.retry_s, partial(self._send_forward, up, mb, mb.attempt))

    def _route(self, src: SimNode) -> SimNode | None:
        stage = src.stage + 1
        by_name = {n.name: n for n in self.nodes[stage]}
        # The announced records, except that the sender knows at once about replicas that failed it.
        recs = [r for r in self.records[stage] if by_name[r.peer_id].online]
        pick = choose_peer(recs, exclude=src.backoff.skipped(self.eng.now), rng=self.rng, inflight=src.sent)
        return by_name[pick.peer_id] if pick is not None else None

    # ---- the data path ---------------------------------------------------------------------------
    def _transmit(self, src: SimNode, dst: SimNode, nbytes: float, then, forward: Mb | None = None) -> None:
        """Send over src's link to dst; a forward micro-batch is dst's to answer from its arrival on,
        and one that arrives at a dead node is sent elsewhere once the sender notices."""
        attempt = forward.attempt if forward is not None else 0

        def arrive() -> None:
            if forward is not None:
                if forward.attempt != attempt:
                    return
                if not dst.compute.up:
                    self._resend(forward, src, dst)
                    return
                dst.held[forward.key] = attempt
            dst.loop.submit(self._msg_s(dst), then)

        def send() -> None:
            link = dst.name if self.spec.link_per_peer else "uplink"
            at = src.shaper.arrival(link, int(nbytes)) + self.spec.hop_s
            if src.shaper.active:
                at += self.spec.shaped_late_s
            if src.shaper.bandwidth:
                key = (dst.stage, link)
                src.link_busy[key] = src.link_busy.get(key, 0.0) + nbytes / src.shaper.bandwidth
                self.rounds.on_uplink(src, nbytes)
            self.eng.at(at, arrive)

        src.loop.submit(self._msg_s(src), send)

    def _msg_s(self, node: SimNode) -> float:
        return self.spec.msg_s if node.spec.msg_s is None else node.spec.msg_s

    def _send_forward(self, src: SimNode, mb: Mb, attempt: int) -> None:
        if mb.attempt != attempt or not src.alive:
            return
        dst = self._route(src)
        if dst is None:  # no live replica downstream: look again in a while
            self.eng.after(0.5, lambda: self._send_forward(src, mb, attempt))
            return
        mb.path[dst.stage] = dst
        src.sent[dst.name] = src.sent.get(dst.name, 0) + 1
        nbytes = self.spec.fwd_bytes_per_token * self.spec.tokens_per_micro_batch
        self._transmit(src, dst, nbytes, lambda: self._forward_at(dst, mb, attempt), forward=mb)

    def _forward_at(self, node: SimNode, mb: Mb, attempt: int) -> None:
        if mb.attempt != attempt:
            return
        st = self.spec.stages[node.stage]
        if node.stage == len(self.nodes) - 1:  # the tail: forward and backward in one job
            node.compute.submit(self._bwd_s(node), lambda: self._backward_done(node, mb, attempt))
        else:
            node.compute.submit(st.fwd_s / node.spec.speed, lambda: self._send_forward(node, mb, attempt))

    def _backward_done(self, node: SimNode, mb: Mb, attempt: int) -> None:
        node.held.pop(mb.key, None)
        if mb.attempt != attempt:
            return
        node.served += 1
        if node.stage == 0:
            self._finish(mb)
            return
        up = mb.path[node.stage - 1]
        nbytes = self.spec.bwd_bytes_per_token * self.spec.tokens_per_micro_batch
        self._transmit(node, up, nbytes, lambda: self._backward_at(up, mb, attempt))

    def _bwd_s(self, node: SimNode) -> float:
        """Backward, and under async a share of the optimizer step, which runs in the backward's job."""
        s, st = self.spec, self.spec.stages[node.stage]
        step = st.step_s / s.micro_batches_per_step if s.schedule == "async" else 0.0
        return (st.bwd_s + step) / node.spec.speed

    def _backward_at(self, node: SimNode, mb: Mb, attempt: int) -> None:
        if mb.attempt != attempt:
            return
        down = mb.path[node.stage + 1].name  # its answer is back: no longer in flight there
        node.sent[down] = max(0, node.sent.get(down, 0) - 1)
        node.compute.submit(self._bwd_s(node), lambda: self._backward_done(node, mb, attempt))

    # ---- the heads -------------------------------------------------------------------------------
    @property
    def micro_batches_per_step(self) -> int:
        """Of the whole swarm: every head drives its own share."""
        return len(self.heads) * self.spec.micro_batches_per_step

    def _launch(self, head: SimNode) -> None:
        mb = Mb(self._next_key)
        self._next_key += 1
        self._live[mb.key] = mb
        self._inflight[head.name] += 1
        self._launched[head.name] += 1
        mb.path[0] = head
        head.held[mb.key] = 0
        fwd = self.spec.stages[0].fwd_s / head.spec.speed
        head.compute.submit(fwd, lambda: self._send_forward(head, mb, 0))

    def _finish(self, mb: Mb) -> None:
        del self._live[mb.key]
        self._inflight[mb.path[0].name] -= 1
        self.done_at.append(self.eng.now)
        if self.spec.schedule == "async":
            if len(self.done_at) % self.micro_batches_per_step == 0:
                self._stepped()
            self._fill()
            return
        self._step_left -= 1
        if self._step_left == 0:
            self._commit()
        else:
            self._fill()

    def _stepped(self) -> None:
        self.step_ends.append(self.eng.now)
        self.rounds.on_step(len(self.step_ends))

    def _fill(self) -> None:
        """Keep every head's window full: async without pause, sync within the current step."""
        s, per = self.spec, self.spec.micro_batches_per_step
        total = self._steps_target * per
        for head in self.heads:
            name = head.name
            while self._inflight[name] < s.max_inflight and self._launched[name] < total:
                if s.schedule == "sync" and self._launched[name] >= (len(self.step_ends) + 1) * per:
                    break
                self._launch(head)

    def _commit(self) -> None:
        """sync: round trips from the head to the farthest stage, the replicas' exchange if it is in
        the commit, then the optimizer steps together."""
        s = self.spec
        lat = [n.spec.latency for stage in self.nodes for n in stage if n.alive]
        far = max(lat, default=0.0) if s.commit_latency else 0.0
        trip = 2 * (far + s.hop_s + 2 * s.msg_s) * s.commit_round_trips
        step = max(st.step_s for st in s.stages)
        exchange = self.rounds.commit_wait()
        self._committing = True

        def stepped() -> None:
            self._committing = False
            self._stepped()
            self._step_left = self.micro_batches_per_step
            self._fill()

        self.eng.after(trip + exchange + step, stepped)

    def run(self, steps: int):
        from pmnode.sim.result import summarise

        self._live: dict[int, Mb] = {}
        self._steps_target, self._step_left = steps, self.micro_batches_per_step
        self._announce()
        self._schedule_churn()
        self.rounds.start_timed()
        self._fill()
        self.eng.run(stop=lambda: len(self.step_ends) >= steps or self.stalled)
        return summarise(self, steps)
