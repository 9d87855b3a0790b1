"""Control plane: small JSON RPCs between nodes and the coordinator over hivemind P2P.

Requests and replies are pydantic models carried in the `metadata` bytes of
hivemind's own ExpertRequest/ExpertResponse protobufs, so no extra protoc step
is needed. A request that fails validation gets an error reply; the handler's
exception never reaches the P2P daemon.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pmnode.data.shards import DataPosition
from pmnode.errors import PmnodeError
from pmnode.net import tunnel
from pmnode.net.auth import AuthError, Cert, canonical

JOIN_RPC = "pmnode.coord.join"  # fixed name: a joining node does not know the run yet

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp", bound=BaseModel)


class ControlError(PmnodeError):
    """The peer answered with an error, or did not answer in time; `reason` is the peer's fixed phrase
    when it refused a membership check (net.auth.AuthError), else empty."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peer_id: str
    stage: int | None = Field(None, description="The stage asked for; None lets the coordinator choose.")
    device: str = "cpu"
    token: str = Field("", max_length=256, description="The run's join token.", repr=False)
    public_key: str = Field("", max_length=2048, description="The node's record-signing RSA key (OpenSSH).")
    renew: bool = Field(False, description="Renewing the certificate of a stage already served.")


class JoinReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: int
    slot: int = Field(0, description="The head slot assigned (stage 0): its part of the data order.")
    config: dict[str, Any]
    fingerprint: str | None
    cert: Cert
    authority: str = Field(description="The coordinator's certificate-signing public key (OpenSSH).")


class Hello(BaseModel):
    """Shown once to each peer before data calls, both ways: the caller's and the callee's certificate."""

    model_config = ConfigDict(extra="forbid")

    cert: Cert


class CoordinatorInfo(BaseModel):
    """STATE_DIR/coordinator.json: where a running coordinator can be reached."""

    maddrs: list[str]
    http: str | None = None


class Envelope(BaseModel):
    """What travels: either a result or an error line (and, for a refused membership check, its reason)."""

    ok: bool
    error: str = ""
    reason: str = ""
    body: dict[str, Any] = {}


async def add_json_handler(
    tun: tunnel.Tunnel,
    name: str,
    request_type: type[Req],
    handler: Callable[[Req, str], Awaitable[BaseModel]],
) -> None:
    """Serve `name`: parse request_type, call handler(request, caller peer id), reply."""

    async def _handle(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            req = request_type.model_validate_json(request.metadata)
            reply = Envelope(ok=True, body=(await handler(req, context.remote_id.to_base58())).model_dump())
        except ValidationError as e:
            reply = Envelope(ok=False, error=f"bad request: {e.error_count()} invalid field(s)")
        except AuthError as e:
            reply = Envelope(ok=False, error=str(e), reason=e.reason)
        except PmnodeError as e:
            reply = Envelope(ok=False, error=str(e))
        except Exception as e:  # never let a handler bug take the daemon's connection down
            reply = Envelope(ok=False, error=f"internal error: {type(e).__name__}: {e}")
        return runtime_pb2.ExpertResponse(metadata=reply.model_dump_json().encode())

    await tun.add_handler(name, _handle)


async def call_json(
    tun: tunnel.Tunnel,
    peer: PeerID | str,
    name: str,
    request: BaseModel,
    reply_type: type[Resp],
    timeout: float = 10.0,
) -> Resp:
    peer_id = PeerID.from_base58(peer) if isinstance(peer, str) else peer
    msg = runtime_pb2.ExpertRequest(metadata=request.model_dump_json().encode())
    try:
        resp: tunnel.Response = await asyncio.wait_for(tun.unary(peer_id, name, msg), timeout)
    except asyncio.TimeoutError as e:
        raise ControlError(f"{name}: no answer from {peer_id} within {timeout:.0f}s") from e
    except Exception as e:
        raise ControlError(f"{name}: call to {peer_id} failed: {e}") from e
    env = Envelope.model_validate_json(resp.metadata)
    if not env.ok:
        raise ControlError(env.error, env.reason)
    return reply_type.model_validate(env.body)


class Prepare(BaseModel):
    """Head -> every replica of a stage, after a sync step's micro-batches are all back."""

    model_config = ConfigDict(extra="forbid")

    step: int
    peers: list[str] = Field(max_length=256, description="The stage's replicas that take part.")


class Prepared(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ok: bool
    own: list[str] = Field(description="Micro-batches this replica accumulated for the step.")
    samples: int = 0
    unreachable: list[str] = []
    position: DataPosition | None = Field(
        None, description="A head: where its slot's next batch starts once the step is applied."
    )


class Apply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int
    samples: int = Field(0, ge=0, description="The samples the step commits (every head's); 0: not said.")
    positions: dict[int, DataPosition] = Field(
        {}, description="Every head slot's committed data position after the step (heads keep them)."
    )
    drop: bool = Field(
        False,
        description="The step's batch is dropped: no update from it anywhere, the step count moves on "
        "(spot checks that kept disagreeing with no third replica to say who lied).",
    )


class Resend(BaseModel):
    """The leading head -> another head: send these micro-batches of your batch again (sync)."""

    model_config = ConfigDict(extra="forbid")

    step: int
    ids: list[str] = Field(max_length=4096)


class Applied(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int
    samples: int


class Reset(BaseModel):
    """Head -> replicas of a stage: drop the step's gradient sums; its micro-batches will come again."""

    model_config = ConfigDict(extra="forbid")

    step: int


class DoneSeal(BaseModel):
    """The head's own word that the run is over, signed with the key its certificate names: a stage
    passes it on unchanged, so no member of a stage before can stop the stages after it."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(max_length=256)
    head: str = Field(max_length=128)  # the head's peer id
    step: int  # the step the head stopped at
    time: float  # unix time the head sealed it
    cert: Cert  # the head's certificate (stage 0)
    sig: str = Field("", max_length=4096)

    def body(self) -> bytes:
        return canonical(self.model_dump(exclude={"sig", "cert"}))


class Done(BaseModel):
    """Stage -> the next stage's replicas: training is over (each passes it on with the head's seal)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("finished", max_length=256)
    seal: DoneSeal | None = None


class Ack(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ok: bool = True


def coordinator_from_file(path: Path, local: bool, timeout: float = 60.0) -> str:
    """The coordinator's multiaddr from its coordinator.json: loopback for local nodes, else another."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if timeout <= 0:
            raise PmnodeError(f"{path} does not exist; give the coordinator's STATE_DIR/coordinator.json")
        if time.monotonic() > deadline:
            raise PmnodeError(f"{path} did not appear within {timeout:.0f}s; is the coordinator running?")
        time.sleep(0.5)
    maddrs = CoordinatorInfo.model_validate_json(path.read_text()).maddrs
    pick = [m for m in maddrs if m.startswith("/ip4/127.") == local] or maddrs
    return pick[0]


def coordinator_peer(maddr: str) -> str:
    if "/p2p/" not in maddr:
        raise PmnodeError(
            f"--coordinator {maddr!r} must end in /p2p/<peer id>, as `coordinator serve` prints it"
        )
    return maddr.rsplit("/p2p/", 1)[1]
