"""Typed RPC services, in the spirit of hivemind's ServicerBase.

An RPC is declared once (pmnode.net.rpcs) with its name, its request and reply types and who may
call it. A role serves the RPCs it owns by defining `async def rpc_<name>(...)` methods; `serve_all`
finds them, puts the declared admission in front of each, and registers them under `{run}.{name}`.
`Client` is the typed caller side: `await client.call(PREPARE, peer, Prepare(...))` returns a
`Prepared`.

Two kinds of RPC exist:
    JsonRpc  control: a pydantic request and reply (pmnode.net.control's JSON envelope)
    DataRpc  data: a wire message in, a wire message out (pmnode.net.transport), tensors included

A data RPC's payload is checked once, in the job that decodes it (pmnode.net.jobs): a role that
defines `check_<name>(header, packet)` has it run there, before `rpc_<name>` sees the message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from pmnode.net.auth import AuthError, Guard
from pmnode.net.control import add_json_handler, call_json
from pmnode.net.jobs import Run, off_loop
from pmnode.net.serving import serve
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import TransportStats
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import WireLimits

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp", bound=BaseModel)


class Admission(Enum):
    """Who may call an RPC, checked before the handler runs (and, for data RPCs, before decoding)."""

    ANYONE = "anyone"  # the handler checks what the caller shows (hello: its certificate)
    PREVIOUS_STAGE = "a certified member of the stage before this one"
    HEAD = "the head"  # a current head: its slot not given to another since (Guard.admit_head)
    SAME_STAGE = "a certified replica of this node's stage"

    def refuse(self, guard: Guard, caller: str) -> str | None:
        """None to admit, else the reason (counted by the guard)."""
        if self is Admission.ANYONE:
            return None
        if self is Admission.HEAD:
            return guard.admit_head(caller)
        if self is Admission.SAME_STAGE:
            return guard.admit(caller, from_stage=guard.stage)
        return guard.admit(caller)


@dataclass(frozen=True)
class JsonRpc(Generic[Req, Resp]):
    name: str
    request: type[Req]
    reply: type[Resp]
    admission: Admission

    def path(self, run: str) -> str:
        return f"{run}.{self.name}"


@dataclass(frozen=True)
class DataRpc:
    name: str
    admission: Admission
    shaped: bool = True  # replies wait for the emulated link
    run_limits: bool = True  # refuse messages above the run's largest honest message
    # Decode, check and encode on the stage's compute thread (the training path, whose checks need the
    # stage's codec); else on the loop's default executor: bulk bytes (a state chunk) must not wait
    # behind a training step there.
    on_compute: bool = False

    def path(self, run: str) -> str:
        return f"{run}.{self.name}"


class _Gate:
    """serving.Gate for one data RPC: its admission on the node's guard."""

    def __init__(self, guard: Guard, admission: Admission):
        self.guard, self.admission = guard, admission

    def admit(self, caller: str) -> str | None:
        return self.admission.refuse(self.guard, caller)

    def strike(self, caller: str) -> bool:
        return self.guard.strike(caller)


def _admitted(
    rpc: JsonRpc[Any, Any], guard: Guard, handler: Callable[[Any, str], Awaitable[BaseModel]]
) -> Callable[[Any, str], Awaitable[BaseModel]]:
    async def checked(req: BaseModel, caller: str) -> BaseModel:
        reason = rpc.admission.refuse(guard, caller)
        if reason is not None:
            raise AuthError(reason, f"{rpc.name} is for {rpc.admission.value}")
        return await handler(req, caller)

    return checked


@dataclass
class ServeOptions:
    guard: Guard
    stats: TransportStats
    limits: WireLimits
    shaper: LinkShaper
    run: Run = off_loop  # the stage's compute thread (StageRunner.run), for DataRpc.on_compute


async def serve_all(
    tun: Tunnel, run: str, service: object, rpcs: Sequence[JsonRpc[Any, Any] | DataRpc], opts: ServeOptions
) -> None:
    """Register `service.rpc_<name>` for each of `rpcs`, behind its admission; a data RPC's request is
    checked by `service.check_<name>` (if the service has one) in the job that decodes it."""
    for rpc in rpcs:
        handler = getattr(service, f"rpc_{rpc.name}")
        if isinstance(rpc, JsonRpc):
            await add_json_handler(tun, rpc.path(run), rpc.request, _admitted(rpc, opts.guard, handler))
            continue
        await serve(
            tun,
            rpc.path(run),
            handler,
            opts.stats,
            limits=opts.limits if rpc.run_limits else None,
            shaper=opts.shaper if rpc.shaped else None,
            guard=_Gate(opts.guard, rpc.admission),
            run=opts.run if rpc.on_compute else off_loop,
            check=getattr(service, f"check_{rpc.name}", None),
        )


class Client:
    """Typed calls to the JSON RPCs of other nodes of one run."""

    def __init__(self, tun: Tunnel, run: str):
        self.tunnel, self.run = tun, run

    async def call(self, rpc: JsonRpc[Req, Resp], peer: str, request: Req, timeout: float = 10.0) -> Resp:
        if not isinstance(request, rpc.request):
            raise TypeError(f"{rpc.name} takes {rpc.request.__name__}, not {type(request).__name__}")
        return await call_json(self.tunnel, peer, rpc.path(self.run), request, rpc.reply, timeout)
