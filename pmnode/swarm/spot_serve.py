"""Spot checks of compute, the replica side: what this stage sent for recent micro-batches, and the
`check` RPC the stage before calls to compare replicas (pmnode.swarm.spot_checks).

    check op=sent     the output this replica sent downstream for micro-batch STEP:INDEX (its last try),
                      from a bounded ring; the reply's OutputMeta says the step it was sent at
    check op=compute  the stage's output for the activation in the request, at step `at`, without
                      gradients and without passing it on; refused (not a strike: the caller did nothing
                      wrong) when this replica is at another step, whose weights would differ

A test-only fault makes a replica lie: PMNODE_TEST_LIE=p corrupts the output it sends (and the one a
check asks it to compute) on a fraction p of micro-batches, seeded by PMNODE_TEST_LIE_SEED. The lie is
quiet: the layout and token ids stay valid, so only a comparison of values can see it. In a local swarm,
whose nodes share one environment, PMNODE_TEST_LIE_NODE=NAME picks the one whose --summary-json is NAME.json.
"""

from __future__ import annotations

import os
import random
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

from pmnode.core.codecs import Packet
from pmnode.errors import PmnodeError
from pmnode.net.envelope import MicroBatch, MicroBatchId
from pmnode.net.meta import CheckRequest, OutputMeta
from pmnode.net.services import Admission, DataRpc
from pmnode.net.wire import MessageHeader
from pmnode.swarm.context import NodeContext

CHECK = DataRpc("check", Admission.PREVIOUS_STAGE)
LIE_ENV, LIE_SEED_ENV, LIE_NODE_ENV = "PMNODE_TEST_LIE", "PMNODE_TEST_LIE_SEED", "PMNODE_TEST_LIE_NODE"
APPLY_WAIT = 5.0  # seconds a check of the next step waits for this replica's apply (as a forward does)


class Liar:
    """The test-only fault: corrupt an activation packet with probability `p` (never in production:
    only the environment variable turns it on)."""

    def __init__(self, p: float, seed: int | None = None):
        self.p, self.rng, self.lies = p, random.Random(seed), 0

    @classmethod
    def from_env(cls) -> Liar | None:
        raw = os.environ.get(LIE_ENV)
        if not raw:
            return None
        who = os.environ.get(LIE_NODE_ENV)
        if who and not any(Path(a).name == f"{who}.json" for a in sys.argv):
            return None
        seed = os.environ.get(LIE_SEED_ENV)
        return cls(float(raw), int(seed) if seed else None)

    def __call__(self, out: Packet) -> Packet:
        if self.p <= 0 or self.rng.random() >= self.p:
            return out
        self.lies += 1
        t = dict(out.tensors)
        for k in ("q", "v"):  # the values flip sign: same layout, same magnitude, wrong direction
            if k in t:
                t[k] = -t[k].clamp(min=-127) if k == "q" else -t[k]
        return Packet(t)


class SpotServer:
    """The outputs this replica sent lately, and the `check` RPC over them."""

    def __init__(self, ctx: NodeContext, reach: Callable[[int, float], Awaitable[bool]] | None = None):
        self.ctx, self.reach = ctx, reach
        self.sent_ring: OrderedDict[str, tuple[int, Packet]] = OrderedDict()  # STEP:INDEX -> (step, output)
        self.limit = max(64, 4 * ctx.cfg.swarm.inflight_limit)
        self.liar = Liar.from_env()
        self.checks = 0

    def sent(self, mb: MicroBatchId, out: Packet) -> Packet:
        """The output this stage passes on for `mb` (the fault may corrupt it), remembered for checks."""
        if self.liar is not None:
            out = self.liar(out)
        self.sent_ring.pop(mb.wire, None)
        self.sent_ring[mb.wire] = (self.ctx.runner.step, out)
        while len(self.sent_ring) > self.limit:
            self.sent_ring.popitem(last=False)
        return out

    async def rpc_check(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        ctx, runner = self.ctx, self.ctx.runner
        if runner.worker.is_last:
            raise PmnodeError("the tail's output is a loss, not an activation: it is not checked")
        req = header.meta_as(CheckRequest)  # WireError (a strike) for a message of another kind
        at = req.at
        self.checks += 1
        if req.op == "sent":
            got = self.sent_ring.get(header.micro_batch)
            if got is None:
                raise PmnodeError(f"no output of {header.micro_batch[:40]!r} is remembered here")
            return ctx.header(header.micro_batch, OutputMeta(at=got[0])), got[1]
        # the same layout and bounds as a forward: bad input is refused (a strike) before it is computed
        await runner.run(runner.verify_activation, packet, ctx.cfg.train.micro, None)
        batch = MicroBatch.read(header, packet)
        if runner.step < at and self.reach is not None:
            await self.reach(at, APPLY_WAIT)
        if runner.step != at:
            raise PmnodeError(f"not comparable: this replica is at step {runner.step}, not {at}")
        out = await runner.evaluate(batch.packet)
        if self.liar is not None:
            out = self.liar(out)
        return ctx.header(header.micro_batch, OutputMeta(at=runner.step)), out
