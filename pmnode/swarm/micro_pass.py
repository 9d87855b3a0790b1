"""One training micro-batch through a stage that is not the tail: the pass the head and every middle
stage share (pmnode.swarm.head, pmnode.swarm.handler).

    forward   the runner's forward of the micro-batch (the head's input ids, or the activation that came)
    send      the output, with the head's targets beside it, down to a replica of the next stage
    abandon   if no replica took it: the forward's saved state is dropped (the runner holds it otherwise)
    backward  the runner's backward with the gradient that came back
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pmnode.core.codecs import Packet
from pmnode.net.envelope import MicroBatch, MicroBatchId, activation_shape
from pmnode.net.meta import ActivationMeta
from pmnode.net.rpcs import FORWARD
from pmnode.net.wire import MessageHeader
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream


def _same(out: Packet) -> Packet:
    return out


def _nothing(wire: Packet, peer: str) -> None:
    return None


async def micro_batch_pass(
    ctx: NodeContext,
    downstream: Downstream,
    mb: MicroBatchId,
    meta: ActivationMeta,
    batch: MicroBatch,
    x: Tensor | None = None,
    *,
    sent: Callable[[Packet], Packet] = _same,
    went: Callable[[Packet, str], None] = _nothing,
) -> tuple[MessageHeader, Packet | None]:
    """Forward `batch` (at the head: its input ids `x`), send the output down with `meta` (its samples
    and try), abandon the forward if that fails, then backward with the gradient that came back.

    `sent(output)`: what is passed on instead (a middle stage remembers it for spot checks);
    `went(wire packet, replica)`: called once a replica answered, before the backward (the head starts
    its spot check there). Returns the downstream's reply and the gradient of this stage's input
    (None at the head, which has no upstream).
    """
    runner = ctx.runner
    out = sent(await runner.forward(mb.key, None if x is not None else batch.packet, x, meta.samples))
    wire = batch.passed_on(out).wire_packet()
    served: list[str] = []
    try:
        reply, grad = await downstream.send(
            FORWARD, ctx.header(mb.wire, meta), wire, activation_shape(out), served=served
        )
    except BaseException:
        await runner.abandon(mb.key)
        raise
    went(wire, served[0])
    return reply, await runner.backward(mb.key, grad, meta.samples)
