"""hivemind's averager behind pmnode's admission: its RPCs answer certified replicas of this stage only.

hivemind's DecentralizedAverager authenticates nothing (hivemind issue #253): anyone who learns a
stage's averaging prefix could join its rounds, read its parameters, fetch its state or break a
round. Here every averaging RPC goes through the node's `Guard` with the same admission as the
`state` and `grads` data RPCs (Admission.SAME_STAGE), and the handlers keep hivemind's wire names, so
a stock hivemind peer reaches them and is refused by the guard, not by a name mismatch:

    rpc_join_group      a follower asks to join our group: its certificate, sent in its gathered
                        data, must name the (libp2p-authenticated) caller and this stage
    rpc_aggregate_part  a group member's part of the tensors: only from a peer that passed that check
    rpc_download_state  the same admission (pmnode copies state over its own `state` RPC anyway)

The follower's side is checked too: a peer is asked to lead us only if the node's signed DHT view
lists it as a certified online replica of this stage, so an outsider that declares itself a leader is
passed over instead of breaking the round; and the group a leader announces must show a valid
certificate for every member before a byte of our tensors leaves.

The averager runs in a forked process of its own: refusals are counted in shared memory, so the
node's heartbeat, summary and the coordinator's /status can show them. Behind NAT its calls take the
node's tunnel routes (sent before each round) and its handlers are reachable through the relay's
forwarder (net.tunnel), so two home replicas average at any size, not only what fits in a circuit.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
from collections.abc import Iterable, Sequence
from typing import Any, AsyncIterator, cast  # noqa: UP035  hivemind reads typing's AsyncIterator off the hints

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, as_aiter
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from pmnode.net import tunnel
from pmnode.net.auth import AuthError, Cert, Guard
from pmnode.net.callproof import Identity
from pmnode.net.services import Admission

# join/part/state: calls refused at our door; leader: an uncertified peer we would not follow;
# group: a leader's group that held a member without a valid certificate
DOORS = ("join", "part", "state", "leader", "group")


class Refusals:
    """Counts per door, in shared memory: written in the averager's process, read in the node's."""

    def __init__(self) -> None:
        self.counts = mp.Array(ctypes.c_long, len(DOORS))

    def add(self, door: str) -> None:
        with self.counts.get_lock():
            self.counts[DOORS.index(door)] += 1

    def snapshot(self) -> dict[str, int]:
        return {d: int(self.counts[i]) for i, d in enumerate(DOORS)}


class Tunnelled:
    """Averaging calls that reached this replica through a relay's forwarder (shared memory, as above)."""

    def __init__(self) -> None:
        self.count = mp.Value(ctypes.c_long, 0)

    def add(self, _handler: str = "") -> None:
        with self.count.get_lock():
            self.count.value += 1

    def value(self) -> int:
        return int(self.count.value)


def gathered_cert(blob: bytes) -> Cert:
    """The certificate a peer put in its averaging gather: hivemind packs [bandwidth, mode, user data]."""
    try:
        _, _, user = MSGPackSerializer.loads(blob)
        return Cert.model_validate(MSGPackSerializer.loads(user)["cert"])
    except Exception as e:
        raise AuthError("bad certificate", "no certificate in the averaging request") from e


class AveragingGate:
    """The checks, on a (forked) copy of the node's guard; `leaders`: who may lead us this round."""

    def __init__(self, guard: Guard, refusals: Refusals, tunnelled: Tunnelled | None = None):
        self.guard, self.refusals = guard, refusals
        self.tunnelled = tunnelled or Tunnelled()
        self.leaders: set[str] = set()

    def hello(self, peer: str, blob: bytes) -> str | None:
        """None if `peer` showed a certificate for this stage in `blob` and the guard admits it."""
        try:
            self.guard.hello(gathered_cert(blob), peer)
        except AuthError as e:
            return e.reason
        return Admission.SAME_STAGE.refuse(self.guard, peer)

    def admit(self, peer: str, door: str) -> bool:
        if Admission.SAME_STAGE.refuse(self.guard, peer) is None:
            return True
        self.refusals.add(door)
        return False

    def may_lead(self, peer: str) -> bool:
        if peer in self.leaders:
            return True
        self.refusals.add("leader")
        return False

    def check_group(self, me: PeerID, peers: Sequence[bytes], gathered: Sequence[bytes]) -> None:
        """Every other member of a group a leader announced must show its certificate; else refuse."""
        for raw, blob in zip(peers, gathered, strict=True):
            peer = PeerID(raw)
            if peer != me and self.hello(peer.to_base58(), blob) is not None:
                self.refusals.add("group")
                raise MatchmakingException(f"group member {peer.to_base58()[-8:]} is not a certified replica")


class GuardedMatchmaking(Matchmaking):
    """hivemind's matchmaking with the follower's checks (the class is swapped in where hivemind builds
    its Matchmaking, inside the averager process)."""

    gate: AveragingGate

    async def _request_join_group(self, leader: PeerID) -> GroupInfo | None:
        if not self.gate.may_lead(leader.to_base58()):
            return None  # on to the next potential leader
        return await super()._request_join_group(leader)

    async def follower_assemble_group(
        self, leader: PeerID, msg: averaging_pb2.MessageFromLeader
    ) -> GroupInfo:
        self.gate.check_group(self.peer_id, msg.ordered_peer_ids, msg.gathered)
        return await super().follower_assemble_group(leader, msg)


class GuardedAverager(DecentralizedAverager):
    _tunnel: tunnel.Tunnel  # the averager process's own, made in add_p2p_handlers

    def __init__(self, *args: Any, gate: AveragingGate, **kwargs: Any):
        self.gate = gate  # before hivemind forks the averager's process, which takes a copy
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        name: str = DecentralizedAverager._get_handle_name(namespace, method_name)  # hivemind's wire names
        return name

    @property
    def _matchmaking(self) -> Matchmaking:
        return self.__dict__["_guarded_matchmaking"]

    @_matchmaking.setter
    def _matchmaking(self, mm: Matchmaking) -> None:
        mm.__class__ = GuardedMatchmaking
        mm.gate = self.gate
        self.__dict__["_guarded_matchmaking"] = mm

    async def add_p2p_handlers(
        self, p2p: P2P, wrapper: Any = None, *, namespace: str | None = None, balanced: bool = False
    ) -> None:
        """hivemind's handlers, also reachable through a relay (averager process, at its start, with the
        P2P hivemind made for this process: this process's one Tunnel is made over it here)."""
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)
        self._tunnel = tunnel.Tunnel(p2p)
        self._tunnel.on_arrival = self.gate.tunnelled.add
        for h in self._rpc_handlers or ():
            await self._tunnel.add_handler(
                self._get_handle_name(namespace, h.method_name),
                getattr(self if wrapper is None else wrapper, h.method_name),
                input_type=h.request_type,
                stream_input=h.stream_input,
                stream_output=h.stream_output,
                registered=True,
            )
        # hivemind makes its matchmaking and all-reduce stubs (get_stub, a classmethod given only a P2P)
        # from self._p2p after this call: handing it the routed P2P makes their calls take the tunnel's
        # routes, and everything else passes through to the P2P itself.
        self._p2p = cast(P2P, tunnel.Routed(self._tunnel))

    def use_tunnel(self, routes: dict[str, str], relays: Iterable[str], me: Identity | None = None) -> None:
        """Node side, before a round: the node's tunnel routes, trusted relays and signing identity (its
        key and current certificate: the averager signs its forwarded calls as the node), for the averager."""
        signing = (me.key, me.cert()) if me is not None else None
        self._outer_pipe.send(("_use_tunnel", [dict(routes), sorted(relays), signing], {}))

    async def _use_tunnel(
        self, routes: dict[str, str], relays: list[str], signing: tuple[RSAPrivateKey, Cert] | None = None
    ) -> None:
        self._tunnel.set_routes(routes)
        self._tunnel.trust_relays(relays)
        if signing is not None:
            key, cert = signing
            self._tunnel.set_identity(Identity(key, lambda: cert), self.gate.guard.verifier)

    def admit_leaders(self, peers: Sequence[str]) -> None:
        """Node side, before a round: the replicas it may follow (sent to the averager's process)."""
        self._outer_pipe.send(("_set_leaders", [sorted(peers)], {}))

    async def _set_leaders(self, peers: list[str]) -> None:
        self.gate.leaders = set(peers)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.gate.hello(context.remote_id.to_base58(), request.gather) is not None:
            self.gate.refusals.add("join")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        if request.group_id not in self._running_groups:
            # as hivemind: our group may be registered a moment after a member starts sending; by
            # then its members' certificates are checked
            await self._pending_groups_registered.wait()
        if not self.gate.admit(context.remote_id.to_base58(), "part"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not self.gate.admit(context.remote_id.to_base58(), "state"):
            return
        async for message in super().rpc_download_state(request, context):
            yield message
