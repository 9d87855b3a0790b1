"""The downstream client: calls to the next stage (and to this stage's other replicas).

It owns the choice of route (pure, in net.routing), the backoff of replicas that failed, the
certificates shown and checked (hello, once per peer), the link shaping and the byte counters
of the calls this node makes. A reply that fails its check counts as a failed route.

The training path's messages (send) are encoded, decoded and checked on the stage's compute thread
(`compute`, pmnode.net.jobs); calls to replicas of this stage (bulk chunks) on the default executor.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from rich.console import Console

from pmnode.core.codecs import Packet
from pmnode.errors import PmnodeError
from pmnode.net.auth import Cert, Verifier
from pmnode.net.checks import GradScale
from pmnode.net.control import Hello
from pmnode.net.dht import stage_records
from pmnode.net.jobs import Check, Run
from pmnode.net.links import LinkStats
from pmnode.net.meta import ActivationMeta, GradientMeta
from pmnode.net.relay import connect_known
from pmnode.net.routing import Backoff, StageRecord, choose_peer
from pmnode.net.rpcs import HELLO
from pmnode.net.services import Client, DataRpc
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import Refused, TransportStats, request
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, WireError

NEW_TRY = 2**31  # a re-sent micro-batch's attempt is drawn from 1..NEW_TRY
# (compute thread) refuse a reply that is not the gradient of an activation of this (batch, tokens)
GradCheck = Callable[[Packet, tuple[int, int], GradScale], None]


class Downstream:
    def __init__(
        self,
        *,
        tun: Tunnel,
        dht: object,
        run: str,
        stage: int,
        n_stages: int,
        verifier: Verifier,
        cert: Callable[[], Cert],
        shaper: LinkShaper,
        request_timeout: float,
        console: Console,
        grad_check: GradCheck,
        grad_scale: GradScale,
        compute: Run,
    ):
        self.tunnel, self.p2p = tun, tun.p2p
        self.dht, self.run, self.stage, self.n_stages = dht, run, stage, n_stages
        self.verifier, self.cert, self.shaper = verifier, cert, shaper
        self.request_timeout, self.console = request_timeout, console
        self.client = Client(tun, run)
        self.stats = TransportStats()  # calls this node makes
        self.records: list[StageRecord] = []  # the next stage's replicas, from the DHT
        self.on_change: Callable[[], Awaitable[None]] | None = None  # the replicas changed (routes)
        self.backoff = Backoff()  # replicas that failed us, skipped for a doubling while
        self.links = LinkStats()  # measured per-replica call rates: they steer the choice of route
        self.inflight: Counter[str] = Counter()  # our calls waiting on each replica: they spread the load
        self.greeted: dict[str, Cert] = {}  # peer -> its verified certificate
        self.rng = random.Random()
        self.grad_check, self.grad_scale, self.compute = grad_check, grad_scale, compute
        self.dropped_gradients = 0
        self.excluded: Callable[[], list[str]] = list  # replicas never to route to (spot checks' liars)

    def new_try(self) -> int:
        return self.rng.randrange(1, NEW_TRY)

    async def refresh(self) -> None:
        if self.stage + 1 < self.n_stages:
            before = {r.peer_id for r in self.records}
            self.records = await stage_records(self.dht, self.run, self.stage + 1, self.verifier)
            if self.on_change is not None and {r.peer_id for r in self.records} != before:
                await self.on_change()  # a new replica behind NAT is called through its relay at once

    def forget_failures(self) -> None:
        """The swarm changed: whom we gave up on before may be back, and new routes are untried."""
        self.backoff.failures.clear()

    async def greet(self, peer: str, stage: int | None = None) -> None:
        """Show our certificate to a peer once, and check its own: it serves `stage` (default: the next)."""
        if peer in self.greeted:
            return
        reply = await self.client.call(HELLO, peer, Hello(cert=self.cert()), timeout=10.0)
        want = self.stage + 1 if stage is None else stage
        self.verifier.check_cert(reply.cert, peer_id=peer, stage=want)
        self.greeted[peer] = reply.cert

    async def send(
        self,
        rpc: DataRpc,
        header: MessageHeader,
        packet: Packet,
        shape: tuple[int, int] | None = None,
        served: list[str] | None = None,
    ) -> tuple[MessageHeader, Packet]:
        """Send to a replica of the next stage; on failure try another until request_timeout runs out.
        `served` gets the replica that answered (by the connection, not by what the reply says).

        With `shape` (batch, tokens), the reply must be the gradient of an activation of that shape;
        one that fails the check counts as a failure of that route: it is dropped, never applied,
        and the micro-batch goes by another replica."""
        deadline = time.monotonic() + self.request_timeout
        while True:
            now = time.monotonic()
            skip = self.backoff.skipped(now) + self.excluded()
            peer = choose_peer(
                self.records, exclude=skip, rng=self.rng, links=self.links.rates(), inflight=self.inflight
            )
            if peer is None:
                if now > deadline:
                    raise PmnodeError(f"stage {self.stage + 1} has no reachable node")
                await asyncio.sleep(0.5)
                await self.refresh()
                continue
            try:
                await self.greet(peer.peer_id)
                self.inflight[peer.peer_id] += 1
                try:
                    answer = await request(
                        self.tunnel,
                        peer.peer_id,
                        rpc.path(self.run),
                        header,
                        packet,
                        self.stats,
                        timeout=max(1.0, deadline - now),
                        shaper=self.shaper,
                        run=self.compute,
                        check=self._gradient_check(shape) if shape is not None else None,
                    )
                finally:
                    self.inflight[peer.peer_id] -= 1
                    if self.inflight[peer.peer_id] <= 0:
                        del self.inflight[peer.peer_id]  # bounded by the calls in flight, not by peers seen
                if shape is not None:
                    self.links.observe(peer.peer_id, time.monotonic() - now, shape[0])
                self.backoff.ok(peer.peer_id)
                if served is not None:
                    served.append(peer.peer_id)
                return answer
            except Exception as e:  # any failure of this route: mark the peer, try another
                forgot = isinstance(e, Refused) and e.reason == "unauthorized"
                if forgot and self.greeted.pop(peer.peer_id, None) is not None:
                    continue  # it forgot us (restarted, or our certificate was renewed): greet again
                # The dead route may have reached stages further down: a new try is not a replay there.
                retry = header.meta_as(ActivationMeta).model_copy(update={"attempt": self.new_try()})
                header = header.model_copy(update={"meta": retry})
                self.backoff.fail(peer.peer_id, time.monotonic())
                self.links.forget(peer.peer_id)
                await connect_known(self.p2p, [peer])  # a relay closed its circuit: dial it again
                self.console.print(
                    f"stage {self.stage}: {rpc.name} to {peer.peer_id[-8:]} failed: {e}", markup=False
                )
                if time.monotonic() > deadline:
                    raise PmnodeError(f"micro-batch {header.micro_batch} failed: {e}") from e

    def _gradient_check(self, shape: tuple[int, int]) -> Check:
        """The reply's check, run in the job that decodes it (request counts the error's reason)."""

        def check(header: MessageHeader, grad: Packet) -> None:
            header.meta_as(GradientMeta)  # a forward is answered with a gradient, or refused
            try:
                self.grad_check(grad, shape, self.grad_scale)
            except WireError:
                self.dropped_gradients += 1  # the compute thread is the only writer
                raise

        return check

    async def ask_replica(
        self, rpc: DataRpc, peer: str, header: MessageHeader, timeout: float | None = None
    ) -> tuple[MessageHeader, Packet]:
        """One call to another replica of our own stage (gradient sums, state)."""
        await self.greet(peer, self.stage)
        limit = self.request_timeout
        return await request(
            self.tunnel,
            peer,
            rpc.path(self.run),
            header,
            Packet({}),
            self.stats,
            timeout=min(limit, timeout) if timeout else limit,
        )
