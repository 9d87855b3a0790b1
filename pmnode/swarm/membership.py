"""Membership: joining the run, renewing the certificate, the heartbeat, and the swarm as the DHT
shows it (every stage's replicas, for the head's commits and pauses)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from hivemind.utils.crypto import RSAPrivateKey
from rich.console import Console

from pmnode.errors import PmnodeError
from pmnode.net.auth import WRONG_TOKEN, AuthError, Cert, Verifier, public_bytes, renewal_due
from pmnode.net.control import JOIN_RPC, ControlError, JoinReply, JoinRequest, call_json, coordinator_peer
from pmnode.net.dht import announce, keep_in_touch, stage_records
from pmnode.net.routing import HEARTBEAT_PERIOD, StageRecord
from pmnode.net.tokens import JOIN_TOKEN_ENV
from pmnode.net.tunnel import Tunnel
from pmnode.swarm.options import NodeOptions


class Membership:
    """This node's place in the run: its key, its certificate and how to renew it."""

    def __init__(self, opts: NodeOptions, tun: Tunnel, peer_id: str, console: Console):
        self.opts, self.tunnel, self.peer_id, self.console = opts, tun, peer_id, console
        self.key = RSAPrivateKey()  # signs this node's DHT records; the coordinator certifies its public half
        self.cert: Cert | None = None
        self.stage: int | None = opts.stage
        self.renewed: list[Callable[[], None]] = []  # told when the certificate changes

    def current(self) -> Cert:
        if self.cert is None:
            raise PmnodeError("this node has not joined the run yet")
        return self.cert

    async def join(self, renew: bool = False) -> JoinReply:
        coord = coordinator_peer(self.opts.coordinator)
        token = self.opts.token.get_secret_value() if self.opts.token else ""
        req = JoinRequest(
            peer_id=self.peer_id,
            stage=self.stage,
            device=self.opts.machine.device,
            token=token,
            public_key=public_bytes(self.key),
            renew=renew,
        )
        try:
            reply = await call_json(
                self.tunnel, coord, JOIN_RPC, req, JoinReply, timeout=self.opts.connect_timeout
            )
        except ControlError as e:
            if e.reason == WRONG_TOKEN:
                how = "is wrong" if token else "is missing"
                raise PmnodeError(
                    f"the coordinator refused to admit this node: the join token {how}; set "
                    f"${JOIN_TOKEN_ENV} or pass --token-file PATH with the token `coordinator serve` showed"
                ) from e
            raise PmnodeError(f"coordinator refused or did not answer: {e}") from e
        # The reply came over libp2p's channel to the coordinator's peer id, so its key can be trusted.
        verifier = Verifier(reply.cert.run, reply.authority)
        try:
            verifier.check_cert(reply.cert, peer_id=self.peer_id, stage=reply.stage)
        except AuthError as e:
            raise PmnodeError(f"the coordinator sent an unusable certificate: {e}") from e
        self.cert, self.stage = reply.cert, reply.stage
        return reply

    async def renew_if_due(self) -> None:
        """A fresh certificate before the old one runs out; peers see it at our next hello."""
        if not renewal_due(self.current(), time.time()):
            return
        try:
            await self.join(renew=True)
        except PmnodeError as e:  # the coordinator may be restarting: the old one is still valid a while
            self.console.print(f"could not renew the membership certificate yet: {e}")
            return
        for tell in self.renewed:
            tell()


def empty_stages(members: dict[int, list[StageRecord]], n_stages: int) -> list[int]:
    """Stages after the head with no online replica."""
    return [s for s in range(1, n_stages) if not [r for r in members.get(s, []) if r.state == "online"]]


class SwarmView:
    """Every stage's replicas, as the DHT shows them (signed records, checked by the verifier)."""

    def __init__(self, dht: object, run: str, n_stages: int, stage: int, peer_id: str, verifier: Verifier):
        self.dht, self.run, self.n_stages, self.stage = dht, run, n_stages, stage
        self.peer_id, self.verifier = peer_id, verifier
        self.members: dict[int, list[StageRecord]] = {}  # the head's: every stage's replicas (0: heads)

    async def records(self, stage: int) -> list[StageRecord]:
        return await stage_records(self.dht, self.run, stage, self.verifier)

    async def refresh(self, stages: list[int] | None = None) -> None:
        for s in stages if stages is not None else range(self.n_stages):  # stage 0: the heads
            self.members[s] = await self.records(s)

    def empty(self) -> list[int]:
        return empty_stages(self.members, self.n_stages)

    async def my_replicas(self) -> list[str]:
        """The other online replicas of this node's stage, by peer id."""
        recs = await self.records(self.stage)
        return [r.peer_id for r in recs if r.peer_id != self.peer_id and r.state == "online"]

    async def head_step(self) -> int | None:
        steps = [r.step for r in await self.records(0) if r.state == "online"]
        return max(steps) if steps else None

    async def swarm_step(self) -> int:
        """The step the swarm is at, read from the other stages' records: the head's, else the furthest."""
        steps: dict[int, list[int]] = {}
        for s in range(self.n_stages):
            if s != self.stage:
                steps[s] = [r.step for r in await self.records(s) if r.state == "online"]
        return max(steps.get(0) or [x for v in steps.values() for x in v] or [0])


async def heartbeat(
    dht: object,
    run: str,
    coordinator: str,
    membership: Membership,
    record: Callable[[], StageRecord],
    every_beat: Callable[[], Awaitable[None]],
) -> None:
    """Announce this node's record every HEARTBEAT_PERIOD; keep the coordinator and certificate fresh.

    The announcements keep a clock of their own: the chores of a beat (pinging the coordinator, up to 5 s;
    `every_beat`'s DHT reads; a renewal) run beside them, not between them. In one loop, a 5 s ping and
    a few slow reads on a loaded machine can put the next announcement past the record's lifetime
    (RECORD_TTL, three beats): a node training all along would vanish from every reader meanwhile, and
    the head's commits would leave it out."""
    chores = asyncio.create_task(_chores(dht, coordinator, membership, every_beat), name="heartbeat chores")
    try:
        due = time.monotonic()
        while True:
            if chores.done():  # a chore that failed stops the heartbeat, as it always did
                chores.result()
            await announce(dht, run, record(), membership.current(), membership.key)
            due = max(due + HEARTBEAT_PERIOD, time.monotonic())  # a late store is not made up for in a burst
            await asyncio.sleep(due - time.monotonic())
    finally:
        chores.cancel()


async def _chores(
    dht: object, coordinator: str, membership: Membership, every_beat: Callable[[], Awaitable[None]]
) -> None:
    beats = 0
    while True:
        if beats % 3 == 0:  # a restarted coordinator learns the swarm from these
            await keep_in_touch(dht, coordinator)
        beats += 1
        await every_beat()
        await membership.renew_if_due()
        await asyncio.sleep(HEARTBEAT_PERIOD)
