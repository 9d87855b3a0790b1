"""The serving side of outer rounds: shares that arrive, votes a leader answers, and the counters.

A share is admitted only from a certified replica of this stage (the RPC's admission, on the
connection's peer id: the share is that peer's), only at its expected size (the server's wire limit
is the stage's round_bytes), and only if it decodes: the right kind and size for every tensor,
finite values, indices inside their tensor, a round this replica can still use and a sample count
the sender can have. Anything else is refused with a reason and counted, and (but for a round too
far ahead, which is out of step rather than malformed) is a strike against the sender at the node's
guard; it never reaches OuterSync and so never touches the weights.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from torch import Tensor

from pmnode.config.replica_sync import ReplicaSyncConfig
from pmnode.core.codecs import Packet
from pmnode.core.compress import Malformed, decompress
from pmnode.core.outer import Share
from pmnode.core.share_bytes import unpack_share
from pmnode.errors import PmnodeError
from pmnode.net.meta import AckMeta, ShareMeta
from pmnode.net.outer_report import OuterReport
from pmnode.net.outer_rpcs import Decision, Vote
from pmnode.net.wire import MessageHeader, WireError
from pmnode.swarm.context import NodeContext
from pmnode.swarm.membership import SwarmView
from pmnode.swarm.outer_round import Ledger, leader_of

AHEAD = 2  # rounds a peer's share may be ahead of ours (it started the round first): kept for later


class Shares:
    """Checked shares by round and sender; a round's page is dropped once the round is over."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Share]] = {}

    def put(self, peer: str, share: Share) -> None:
        self.rounds.setdefault(share.round, {})[peer] = share

    def holders(self, r: int) -> list[str]:
        return sorted(self.rounds.get(r, {}))

    def take(self, r: int, peers: list[str]) -> list[Share]:
        page = self.rounds.get(r, {})
        return [page[p] for p in peers]

    def drop_through(self, r: int) -> None:
        for old in [x for x in self.rounds if x <= r]:
            del self.rounds[old]


class Counts:
    """What OuterReport shows, kept as the rounds go."""

    def __init__(self) -> None:
        self.rounds = self.observed = self.resynced = self.aborted = self.alone = 0
        self.refused: Counter[str] = Counter()
        self.bytes_per_round = self.bytes_sent = self.bytes_received = 0
        self.wall_s = self.blocked_s = 0.0
        self.anchor = self.weights = ""

    def report(self, round_now: int) -> OuterReport:
        done = self.rounds + self.observed + self.resynced + self.aborted
        return OuterReport(
            rounds=self.rounds,
            observed=self.observed,
            resynced=self.resynced,
            aborted=self.aborted,
            alone=self.alone,
            refused=dict(self.refused),
            bytes_per_round=self.bytes_per_round,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            round_s=round(self.wall_s / done, 4) if done else 0.0,
            blocked_s=round(self.blocked_s, 4),
            hidden=round(max(0.0, 1.0 - self.blocked_s / self.wall_s), 4) if self.wall_s > 0 else 0.0,
            round=round_now,
            anchor=self.anchor,
            weights=self.weights,
        )


def _reason(detail: str) -> str:
    """A short fixed phrase for counting, from a Malformed's message."""
    for key, phrase in (("bytes", "size"), ("non-finite", "non-finite"), ("index", "index")):
        if key in detail:
            return phrase
    return "shape"


def check_share(
    buf: Tensor | None, meta: ShareMeta, shapes: list[tuple[int, ...]], cfg: ReplicaSyncConfig
) -> Share:
    """Compute thread: the share a peer sent, decoded once to prove it can be applied; Malformed if not."""
    if buf is None:
        raise Malformed("no share tensor")
    tensors = unpack_share(buf, shapes, cfg)
    for c, s in zip(tensors, shapes, strict=True):
        decompress(c, s, cfg)
    return Share(meta.round, meta.samples, tensors)


class OuterPeer:
    """The RPC handlers of outer rounds (outer_share, outer_vote) and what they fill in."""

    def __init__(
        self,
        ctx: NodeContext,
        view: SwarmView,
        shapes: list[tuple[int, ...]],
        cap: int,
        round_now: Callable[[], int],
    ):
        self.ctx, self.view, self.shapes, self.cap = ctx, view, shapes, cap
        self.round_now = round_now
        self.on_share: Callable[[int], None] = lambda r: None  # a peer's share of round r arrived
        self.cfg = ctx.cfg.replica_sync
        self.shares = Shares()
        self.counts = Counts()
        self.ledger = Ledger(ctx.peer_id, self.cfg.round_timeout)

    def refuse(self, caller: str, reason: str, detail: str, strike: bool = True) -> PmnodeError:
        """Count a refused share; a WireError is a strike against its sender (pmnode.net.serving),
        other errors (a round too far ahead: out of step, not malformed) are not."""
        self.counts.refused[reason] += 1
        self.ctx.say(f"refused an outer share from {caller[-8:]}: {detail}")
        if strike:
            return WireError("bad payload", f"outer share refused: {detail}")
        return PmnodeError(f"outer share refused: {detail}")

    async def rpc_outer_share(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        meta = header.meta  # its fields were checked with the header, strictly (net.meta)
        if not isinstance(meta, ShareMeta):
            raise self.refuse(caller, "meta", f"a {header.kind} message, not a share")
        now = self.round_now()
        if meta.round < now:  # the round is over here: late, not malformed; nothing to count against it
            return self.ctx.header("outer", AckMeta(late=True)), Packet({})
        if meta.round > now + AHEAD:
            raise self.refuse(caller, "round", f"round {meta.round} while this replica is at {now}", False)
        if not 0 <= meta.samples <= self.cap:
            raise self.refuse(caller, "samples", f"{meta.samples} samples (0..{self.cap} possible)")
        buf = packet.tensors.get("share")

        def job() -> Share:
            t0 = time.perf_counter()
            try:
                return check_share(buf, meta, self.shapes, self.cfg)
            finally:  # the compute thread's time on rounds: what training waited for
                self.counts.blocked_s += time.perf_counter() - t0

        try:
            share = await self.ctx.runner.run(job)
        except Malformed as e:
            raise self.refuse(caller, _reason(str(e)), str(e)) from e
        assert buf is not None
        self.counts.bytes_received += buf.numel()
        self.shares.put(caller, share)
        self.on_share(share.round)
        return self.ctx.header("outer"), Packet({})

    async def rpc_outer_vote(self, vote: Vote, caller: str) -> Decision:
        """The leader's side: the caller's vote, and the round's decision if there is one."""
        live = await self.view.my_replicas()
        if leader_of(self.ctx.peer_id, [caller, *live]) != self.ctx.peer_id:
            return Decision(round=vote.round, status="not_leader")
        return self.ledger.vote(caller, vote, live, time.monotonic())
