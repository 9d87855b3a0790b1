"""A swarm node: one stage of the run, served over hivemind P2P.

Data path (one RPC per boundary and micro-batch, SWARM-style): a stage's
`forward` handler decodes the activation packet, runs its layers, calls the
next stage's `forward` with its own packet and gets the gradient packet back
in the reply, backpropagates, and replies upstream with its own gradient. The
call stack remembers the route, so gradients retrace the activations' path.
The head drives: it owns the data and keeps `swarm.max_inflight` micro-batches
in flight. Each stage steps when the samples whose backward finished reach
the batch size; in `sync` that happens only after the head's flush, so a swarm
reproduces `pmnode train` step for step.

All torch work runs on one worker thread, so handlers never block the event
loop and never race on gradients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import BaseModel, ConfigDict, SecretStr
from rich.console import Console
from torch import Tensor

from pmnode.config import RunConfig
from pmnode.core import checkpoint
from pmnode.core.codecs import Packet
from pmnode.core.worker import StageWorker
from pmnode.data.dataset import TokenDataset
from pmnode.errors import PmnodeError
from pmnode.net.auth import (
    CERT_TTL,
    JOIN_TOKEN_ENV,
    AuthError,
    Cert,
    Guard,
    SwarmValidator,
    Verifier,
    public_bytes,
)
from pmnode.net.checks import (
    DATA_KEYS,
    GradScale,
    check_activation,
    check_eval_batch,
    check_gradient,
    check_micro_batch,
)
from pmnode.net.control import (
    JOIN_RPC,
    Applied,
    Apply,
    ControlError,
    Hello,
    JoinReply,
    JoinRequest,
    Prepare,
    Prepared,
    Reset,
    add_json_handler,
    call_json,
)
from pmnode.net.dht import announce, keep_in_touch, stage_records, start_dht
from pmnode.net.routing import HEARTBEAT_PERIOD, RECORD_TTL, Backoff, StageRecord, choose_peer
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import TransportStats, request, serve
from pmnode.net.wire import MessageHeader, WireError, WireLimits
from pmnode.swarm.averaging import MATCHMAKING_TIME, StageAverager, next_round
from pmnode.swarm.panel import Display, LogFormat, NodeSnapshot


class NodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coordinator: str
    stage: int | None = None
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0
    announce: list[str] = []
    data: str | None = None
    checkpoint_dir: Path | None = None
    summary_json: Path | None = None
    bf16: bool = False
    connect_timeout: float = 30.0
    resume: bool = False
    checkpoint_every: int = 0  # steps between checkpoints; 0: only on exit
    log_format: LogFormat = "text"
    link_bandwidth: float | None = None  # bytes/s on each emulated outgoing link; None: unshaped
    link_latency: float = 0.0  # seconds, one way
    token: SecretStr | None = None  # the run's join token; never printed
    fresh_weights: bool = False  # may start an empty stage mid-run from random weights


LINGER = 5.0  # seconds an async replica keeps its averager after the last round, for the others
ASYNC_SLACK = 256  # steps an async micro-batch id may be ahead of the head's step a replica knows


class SameStage:
    """Admission for calls between replicas of one stage (gradient sums), on the stage's own guard."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def admit(self, caller: str) -> str | None:
        return self.guard.admit(caller, from_stage=self.guard.stage)

    def strike(self, caller: str) -> bool:
        return self.guard.strike(caller)


class Done(BaseModel):
    reason: str = "finished"


class Ack(BaseModel):
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
    maddrs = json.loads(path.read_text())["maddrs"]
    pick = [m for m in maddrs if m.startswith("/ip4/127.") == local] or maddrs
    return pick[0]


def coordinator_peer(maddr: str) -> str:
    if "/p2p/" not in maddr:
        raise PmnodeError(
            f"--coordinator {maddr!r} must end in /p2p/<peer id>, as `coordinator serve` prints it"
        )
    return maddr.rsplit("/p2p/", 1)[1]


class Node:
    def __init__(self, opts: NodeOptions, console: Console):
        self.opts, self.console = opts, console
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pmnode-compute")
        self.stats = TransportStats()  # calls this node makes (to the next stage)
        self.server_stats = TransportStats()  # calls this node serves (from the previous stage)
        self.done = asyncio.Event()
        self.pause_lock = asyncio.Lock()
        self.downstream: list[StageRecord] = []
        self.backoff = Backoff()  # downstream replicas that failed us, skipped for a doubling while
        self.commit_failed: dict[str, float] = {}  # head: replica -> when a commit last failed with it
        self.rng = random.Random()
        self.losses: list[float] = []
        self.evals: list[tuple[int, int, float]] = []
        self.samples_applied = 0
        self.samples_served = 0  # samples whose backward finished here: with `busy`, the service rate
        self.busy = 0.0  # seconds the compute thread worked
        self.started = time.monotonic()
        self.last_loss: float | None = None
        self.tokens_per_s = 0.0
        self.upstream: dict[str, float] = {}  # caller -> when it last sent us a micro-batch
        self.display = Display(console, opts.log_format)
        self.shaper = LinkShaper(opts.link_bandwidth, opts.link_latency)
        self._io = (time.monotonic(), 0, 0, 0.0, 0.0)  # when, bytes in, bytes out, rate in, rate out
        self.key = RSAPrivateKey()  # signs this node's DHT records; the coordinator certifies its public half
        self.greeted: dict[str, Cert] = {}  # downstream peer -> its verified certificate
        self.seen: dict[str, set[int]] = {}  # micro-batch id -> tries taken here: replays are refused
        self.seen_step: dict[str, int] = {}
        self.prepared: tuple[int, Tensor, int] | None = None  # (step, summed gradients, samples) to apply
        self.members: dict[int, list[StageRecord]] = {}  # head: every stage's replicas, for commits
        self.grad_scale = GradScale()
        self.dropped_gradients = 0
        self.reissued = 0  # micro-batches the head sent again after losing a replica
        self.samples_off = 0  # summed |samples applied - batch_size| over this node's steps: 0 when exact
        self.origin: str | None = None  # where this stage's weights came from, when not random init
        self.rejoined = False  # took over an empty stage mid-run: its first step re-sends everything
        self.steps_lost = 0  # swarm steps whose updates this stage's weights never saw (empty stage)
        self.paused_s = 0.0  # head: seconds spent waiting for an empty stage
        # async replicas: parameter averaging (pmnode.swarm.averaging) and the head's step they follow
        self.averager: StageAverager | None = None
        self.replicated = False  # async: has shared this stage with another node
        self.frontier = 0  # async: the furthest step of a micro-batch taken here
        self.since_average = 0  # samples applied since this replica's last averaging round
        self.finishing = False  # async: in the last averaging round
        self.round: Any = None  # async: hivemind's StepControl of the round in progress
        self.final_done = asyncio.Event()
        self.averaging: dict[str, int] = {"rounds": 0, "failed": 0, "refused": 0, "alone": 0}

    # ---- plumbing --------------------------------------------------------------------------------------
    async def compute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - t0  # one compute thread: the only writer

        return await asyncio.get_running_loop().run_in_executor(self.pool, timed)

    def _header(self, kind: str, mb: str, **meta: Any) -> MessageHeader:
        return MessageHeader(
            kind=kind,
            run=self.cfg.name,
            micro_batch=mb,
            stage=self.worker.index,
            step=self.worker.step_count,
            sender=self.peer_id,
            tensors=[],
            meta=meta,
        )

    async def _refresh_downstream(self) -> None:
        if not self.worker.is_last:
            self.downstream = await stage_records(
                self.dht, self.cfg.name, self.worker.index + 1, self.verifier
            )

    async def _send(
        self,
        rpc: str,
        header: MessageHeader,
        packet: Packet,
        check: Callable[[Packet], None] | None = None,
    ) -> tuple[MessageHeader, Packet]:
        """Send to a downstream replica; on failure try another until request_timeout runs out.

        A reply that fails `check` (a bad gradient) counts as a failure of that route: it is dropped,
        never applied, and the micro-batch goes by another replica."""
        deadline = time.monotonic() + self.cfg.swarm.request_timeout
        while True:
            now = time.monotonic()
            recent = self.backoff.skipped(now)
            peer = choose_peer(self.downstream, exclude=recent, rng=self.rng)
            if peer is None:
                if now > deadline:
                    raise PmnodeError(f"stage {self.worker.index + 1} has no reachable node")
                await asyncio.sleep(0.5)
                await self._refresh_downstream()
                continue
            try:
                await self._greet(peer.peer_id)
                answer = await request(
                    self.p2p,
                    peer.peer_id,
                    f"{self.cfg.name}.{rpc}",
                    header,
                    packet,
                    self.stats,
                    timeout=max(1.0, deadline - now),
                    shaper=self.shaper,
                )
                if check is not None:
                    check(answer[1])
                self.backoff.ok(peer.peer_id)
                return answer
            except Exception as e:  # any failure of this route: mark the peer, try another
                if "unauthorized" in str(e) and self.greeted.pop(peer.peer_id, None) is not None:
                    continue  # it forgot us (restarted, or our certificate was renewed): greet again
                # The dead route may have reached stages further down: a new try is not a replay there.
                header = header.model_copy(
                    update={"meta": {**header.meta, "try": self.rng.randrange(1, 2**31)}}
                )
                self.backoff.fail(peer.peer_id, time.monotonic())
                self.console.print(
                    f"stage {self.worker.index}: {rpc} to {peer.peer_id[-8:]} failed: {e}", markup=False
                )
                if time.monotonic() > deadline:
                    raise PmnodeError(f"micro-batch {header.micro_batch} failed: {e}") from e

    async def _greet(self, peer: str, stage: int | None = None) -> None:
        """Show our certificate to a peer once, and check its own: it serves `stage` (default: the next)."""
        if peer in self.greeted:
            return
        reply = await call_json(
            self.p2p, peer, f"{self.cfg.name}.hello", Hello(cert=self.cert), Hello, timeout=10.0
        )
        want = self.worker.index + 1 if stage is None else stage
        self.verifier.check_cert(reply.cert, peer_id=peer, stage=want)
        self.greeted[peer] = reply.cert

    async def _on_hello(self, req: Hello, caller: str) -> Hello:
        self.guard.hello(req.cert, caller)  # AuthError -> an error reply, counted, a strike
        return Hello(cert=self.cert)

    def _then_step(self, result: Any) -> Any:
        """async: step if this backward completed the batch. Called in the same compute job as the
        backward, so every step applies exactly batch_size samples. sync: the head's commit steps."""
        if self.cfg.swarm.schedule == "async":
            self._step_if_ready()
        return result

    def _step_if_ready(self, force: bool = False) -> tuple[int, float] | None:
        """Runs on the compute thread, so the check and the step are atomic."""
        if self.worker.samples_ready < self.cfg.train.batch_size and not force:
            return None
        # An async replica makes only its share of the stage's steps: the schedule follows the head.
        lr_step = max(self.frontier, self.worker.step_count) if self.replicated else None
        applied, lr = self.worker.step(self.cfg.train.steps, lr_step)
        self.samples_applied += applied
        self.since_average += applied
        # A step of anything but batch_size samples lost or double-counted micro-batches on the way.
        self.samples_off += abs(applied - self.cfg.train.batch_size)
        o = self.opts
        if o.checkpoint_every and o.checkpoint_dir and self.worker.step_count % o.checkpoint_every == 0:
            # Still on the compute thread: no backward can touch the weights while they are written.
            checkpoint.save(self.worker, o.checkpoint_dir, self.cfg.name, self.samples_applied)
            checkpoint.save_run_config(self.cfg, o.checkpoint_dir)
        return applied, lr

    # ---- sync commits: every replica of a stage applies the same summed gradient ----------------------
    def _own(self, step: int) -> list[str]:
        return sorted(k for k, v in self.worker.accumulated.items() if v == step)

    async def _on_grads(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        """A replica of our stage asks for our gradient sums of one step."""
        step = header.meta.get("step")
        if not isinstance(step, int):
            raise WireError("bad payload", "no step")
        deadline = time.monotonic() + self.cfg.swarm.request_timeout / 2
        while step > self.worker.step_count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # behind: our own prepare of this step is catching us up
        if step != self.worker.step_count:
            raise PmnodeError(f"this replica is at step {self.worker.step_count}, not {step}")
        flat, samples = await self.compute(lambda: (self.worker.grad_vector(), self.worker.samples_ready))
        return self._header("ack", header.micro_batch, samples=samples), Packet({"g": flat})

    def _only_head(self, caller: str) -> None:
        reason = self.guard.admit(caller, from_stage=0)
        if reason is not None:
            raise AuthError(reason, "only the head commits steps")

    async def _on_prepare(self, req: Prepare, caller: str) -> Prepared:
        self._only_head(caller)
        self.prepared = None
        if req.step > self.worker.step_count:  # it joined late or missed a commit: catch up first
            await self._catch_up(req.step, [p for p in sorted(req.peers) if p != self.peer_id])
        if req.step != self.worker.step_count:
            raise PmnodeError(f"this replica is at step {self.worker.step_count}, not {req.step}")
        flat, samples = await self.compute(lambda: (self.worker.grad_vector(), self.worker.samples_ready))
        parts = {self.peer_id: flat}
        own, unreachable = self._own(req.step), []
        for peer in sorted(set(req.peers) - {self.peer_id}):
            try:
                reply, pkt = await self._ask_replica(peer, "grads", req.step, timeout=15.0)
                parts[peer] = pkt.tensors["g"]
                samples += int(reply.meta["samples"])
            except Exception as e:
                self.console.print(
                    f"stage {self.worker.index}: no gradients from {peer[-8:]}: {e}", markup=False
                )
                unreachable.append(peer)
        if unreachable:
            return Prepared(ok=False, own=own, unreachable=unreachable)
        # The same sum in the same order on every replica: their weights stay bit-identical.
        total = torch.stack([parts[p] for p in sorted(parts)]).sum(0)
        self.prepared = (req.step, total, samples)
        return Prepared(ok=True, own=own, samples=samples)

    async def _on_state(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        """A replica of our stage that is behind downloads our weights and optimizer state."""
        if self.finishing:  # async, at the end: what the others take is the result of our last round
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.final_done.wait(), 60.0)
        data = await self.compute(self.worker.state_bytes)
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return self._header("ack", header.micro_batch, step=self.worker.step_count), Packet({"state": blob})

    async def _ask_replica(
        self, peer: str, rpc: str, step: int, timeout: float | None = None
    ) -> tuple[MessageHeader, Packet]:
        """One call to another replica of our stage (gradient sums, state) about `step`."""
        await self._greet(peer, self.worker.index)
        limit = self.cfg.swarm.request_timeout
        return await request(
            self.p2p,
            peer,
            f"{self.cfg.name}.{rpc}",
            self._header("ack", f"{step}:{rpc}", step=step),
            Packet({}),
            self.stats,
            timeout=min(limit, timeout) if timeout else limit,
        )

    async def _catch_up(self, step: int, peers: list[str]) -> None:
        """Load a live replica's state (weights, optimizer, step): never serve from a stale or random one."""
        for peer in peers:
            try:
                theirs, data = await self._state_of(peer, step)
            except Exception as e:
                self.console.print(f"stage {self.worker.index}: no state from {peer[-8:]}: {e}", markup=False)
                continue
            if theirs != step:
                continue
            await self.compute(self.worker.load_state_bytes, data)
            self.samples_applied = step * self.cfg.train.batch_size
            self.console.print(f"stage {self.worker.index}: caught up to step {step} from {peer[-8:]}")
            return
        if not peers:  # no other replica: this node is the stage now, from its checkpoint
            await self._adopt(step)
            return
        raise PmnodeError(f"stage {self.worker.index}: no replica at step {step} to catch up from")

    async def _replicas(self) -> list[str]:
        """The other online replicas of this node's stage, by peer id."""
        recs = await stage_records(self.dht, self.cfg.name, self.worker.index, self.verifier)
        return [r.peer_id for r in recs if r.peer_id != self.peer_id and r.state == "online"]

    async def _state_of(self, peer: str, step: int) -> tuple[int | None, bytes]:
        """A replica's weights, optimizer state and step (`{run}.state`): its step and the bytes."""
        reply, pkt = await self._ask_replica(peer, "state", step)
        return reply.meta.get("step"), pkt.tensors["state"].numpy().tobytes()

    async def _copy_replica(self, peers: list[str]) -> None:
        """async: start from a live replica's weights, optimizer state and step, before serving."""
        for peer in peers:
            try:
                _, data = await self._state_of(peer, self.worker.step_count)
            except Exception as e:
                self.console.print(f"stage {self.worker.index}: no state from {peer[-8:]}: {e}", markup=False)
                continue
            await self.compute(self.worker.load_state_bytes, data)
            step = self.worker.step_count
            self.samples_applied, self.frontier, self.replicated = 0, step, True
            self.origin = f"replica {peer[-8:]} at step {step}"
            self.console.print(f"stage {self.worker.index}: copied replica {peer[-8:]} at step {step}")
            return
        raise PmnodeError(
            f"stage {self.worker.index}: no replica answered with its state; this node will not serve "
            "from random weights: try again"
        )

    # ---- async replicas: parameter averaging with hivemind ---------------------------------------------
    async def _average_loop(self) -> None:
        """Every average_period: if this stage has other replicas, average parameters with them.

        Ends when the run does, after the round in progress (never cut off: hivemind would run it
        anyway and the replicas' last round could meet the wrong partner)."""
        period = self.cfg.swarm.average_period
        while not self.done.is_set():
            at = next_round(period)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), at - get_dht_time() - MATCHMAKING_TIME - 0.2)
            if self.done.is_set():
                return
            if not await self._replicas():
                self.averaging["alone"] += 1
                await asyncio.sleep(max(0.0, at - get_dht_time()))
                continue
            await self._average_round(at)

    def _task_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.console.print(f"stage {self.worker.index}: {task.get_name()} stopped: {task.exception()!r}")

    async def _average_round(self, at: float, final: bool = False) -> bool:
        """One round; True if its result was applied (and, if `final`, every participant's was final too)."""
        loop = asyncio.get_running_loop()
        if self.averager is None:  # started by the first round with a partner: one replica pays nothing
            # In this (the main) thread: hivemind's averager process sets up signal handling as it starts.
            self.averager = StageAverager(
                self.worker, self.dht, self.cfg.name, compression=self.cfg.swarm.average_compression
            )
            # hivemind ignores SIGINT in this process while it forks the averager, and leaves it so.
            loop.add_signal_handler(signal.SIGINT, self.stop.set)
            self.replicated = True
        avg = self.averager
        await self.compute(avg.snapshot)
        weight, self.since_average = self.since_average, 0
        try:
            control = avg.start_round(at, weight, self.cert, final)
            self.round = control
            limit = at - get_dht_time() + avg.timeout + 5.0  # a thread must never wait for ever on it
            group = await loop.run_in_executor(None, lambda: control.result(timeout=limit))
        except Exception as e:
            group = None
            self.console.print(f"stage {self.worker.index}: averaging round failed: {e}", markup=False)
        if not group or len(group) < 2:
            self.averaging["failed"] += 1
            self.since_average += weight  # those samples count toward the next round
            return False
        try:
            StageAverager.members(group, self.verifier, self.worker.index)
        except AuthError as e:
            self.averaging["refused"] += 1
            self.console.print(f"stage {self.worker.index}: averaging round refused: {e}", markup=False)
            return False
        if not await self.compute(avg.apply):
            self.averaging["refused"] += 1
            return False
        self.averaging["rounds"] += 1
        if final:
            ok = all(isinstance(d, dict) and d.get("final") for d in group.values())
            self.console.print(
                f"stage {self.worker.index}: last averaging round with {len(group)} replicas "
                f"({'all' if ok else 'not all'} finished)"
            )
            return ok
        return True

    async def _last_average(self, averaging: asyncio.Task | None) -> None:
        """async, at the end: let the round in progress finish, apply what is left, then rounds until
        one has only finished replicas in it, so the replicas end with one set of weights."""
        if averaging is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(averaging, self.cfg.swarm.average_period + 20.0)
        if self.averager is None:
            return

        def flush() -> None:
            if self.worker.samples_ready:  # a replica's last, partial batch: applied, not lost
                at = max(self.frontier, self.worker.step_count)
                applied, _ = self.worker.step(self.cfg.train.steps, at)
                self.samples_applied += applied
                self.since_average += applied

        self.finishing = True
        await self.compute(flush)
        try:
            for _ in range(4):  # another replica may still be in a regular round, or finishing its flush
                at = next_round(self.cfg.swarm.average_period, lead=MATCHMAKING_TIME + 1.0)
                if await self._average_round(at, final=True):
                    break
            else:
                self.console.print(f"stage {self.worker.index}: no final averaging round with the others")
        finally:
            self.final_done.set()
        await self._adopt_lowest()
        await asyncio.sleep(LINGER)  # others may still be receiving parts we reduced, or our state

    async def _adopt_lowest(self) -> None:
        """After the last round, every replica takes the weights of the one with the lowest peer id:
        a round whose all-reduce was partial (hivemind then keeps local parts) cannot leave two sets."""
        lowest = min([*await self._replicas(), self.peer_id])
        if lowest == self.peer_id:
            return
        try:
            _, data = await self._state_of(lowest, self.worker.step_count)
        except Exception as e:
            self.console.print(
                f"stage {self.worker.index}: could not take {lowest[-8:]}'s final weights: {e}", markup=False
            )
            return
        step = self.worker.step_count

        def load() -> None:
            self.worker.load_state_bytes(data)
            self.worker.step_count = step  # this replica's own count of its steps stays

        await self.compute(load)

    async def _swarm_step(self) -> int:
        """The step the swarm is at, read from the other stages' records: the head's, else the furthest."""
        run, here = self.cfg.name, self.worker.index
        steps: dict[int, list[int]] = {}
        for s in range(self.cfg.n_stages):
            if s != here:
                recs = await stage_records(self.dht, run, s, self.verifier)
                steps[s] = [r.step for r in recs if r.state == "online"]
        return max(steps.get(0) or [x for v in steps.values() for x in v] or [0])

    async def _take_over_if_empty(self) -> None:
        """Joining a stage that no node serves while the swarm is past step 0: never from random init."""
        others = await self._replicas()
        if others and self.cfg.swarm.schedule == "async":
            await self._copy_replica(others)
        if others:
            return  # sync: the head's next commit brings it up to date from them
        step = await self._swarm_step()
        if step > self.worker.step_count:
            await self._adopt(step)

    async def _adopt(self, step: int) -> None:
        """Serve an empty stage from its latest checkpoint, then move to the swarm's step.

        The updates the stage made after that checkpoint died with its last node; the other stages
        keep theirs, so the swarm goes on at `step` and this stage counts the steps it lost.
        """
        o, s = self.opts, self.worker.index
        if self.origin is None:
            man = checkpoint.load_manifest(o.checkpoint_dir, s) if o.checkpoint_dir else None
            if man is not None and man.run == self.cfg.name and man.step <= step:
                man = await self.compute(checkpoint.load, self.worker, o.checkpoint_dir)
                self.samples_applied = man.samples
                self.origin = f"its checkpoint of step {man.step} in {o.checkpoint_dir}"
            elif o.fresh_weights:
                self.origin = "random weights (--fresh-weights)"
            else:
                found = f" (the one there is of step {man.step} or another run)" if man else ""
                raise PmnodeError(
                    f"stage {s} has no node and the swarm is at step {step}: pass --checkpoint-dir DIR "
                    f"holding this run's stage-{s}/ checkpoint{found}, or --fresh-weights to start the stage "
                    "from random weights"
                )
        lost = step - self.worker.step_count

        def move() -> None:
            self.worker.step_count = step

        await self.compute(move)
        self.steps_lost += lost
        self.rejoined = True
        self.console.print(
            f"stage {s} had no node: serving from {self.origin}; the swarm is at step {step}, so this "
            f"stage skips the updates of {lost} step(s)",
            highlight=False,
            markup=False,
        )

    async def _on_reset(self, req: Reset, caller: str) -> Ack:
        self._only_head(caller)
        if req.step != self.worker.step_count:
            raise PmnodeError(f"this replica is at step {self.worker.step_count}, not {req.step}")
        self.prepared = None
        await self.compute(self.worker.forget, req.step)
        return Ack()

    async def _on_apply(self, req: Apply, caller: str) -> Applied:
        self._only_head(caller)
        if self.prepared is None or self.prepared[0] != req.step:
            raise PmnodeError(f"step {req.step} was not prepared here")
        _, total, samples = self.prepared
        self.prepared = None

        def apply() -> None:
            self.worker.set_grads(total, samples)
            self._step_if_ready(force=True)

        await self.compute(apply)
        return Applied(step=self.worker.step_count, samples=samples)

    async def _commit(self, step: int, batch: dict[str, tuple[Tensor, Tensor]]) -> None:
        """After a sync step: the replicas of every later stage sum their gradients (prepare), then all
        step together (apply), then the head steps.

        A micro-batch that no live replica of some stage holds (its replica died after answering) is
        sent again first; the stages that hold it already only pass it through, so every stage applies
        every sample of the step exactly once. Nothing is applied until every stage is prepared, so no
        re-sent micro-batch meets a stage that has already stepped.
        """
        run, deadline = self.cfg.name, time.monotonic() + self.cfg.swarm.request_timeout
        stages = range(1, self.cfg.n_stages)
        while True:
            now = time.monotonic()
            # Only a failure to commit excludes a replica here: one that refused micro-batches because it
            # is behind must still get the commit that brings it up to date.
            dead = {p for p, t in self.commit_failed.items() if now - t < 10.0}
            peers = {s: [r.peer_id for r in self.members.get(s, []) if r.peer_id not in dead] for s in stages}
            empty = [s for s in stages if not peers[s]]
            if empty and self._empty_stages():
                await self._wait_whole()
                deadline = time.monotonic() + self.cfg.swarm.request_timeout
                continue
            if empty:
                if now > deadline:
                    raise PmnodeError(f"stage {empty[0]} has no node to commit step {step} with")
                await asyncio.sleep(0.5)
                for s in empty:
                    self.members[s] = await stage_records(self.dht, run, s, self.verifier)
                continue
            results = await asyncio.gather(*(self._prepare_stage(s, step, peers[s]) for s in stages))
            failed = set().union(*(f for f, _, _ in results))
            missing = set().union(*(set(batch) - have for _, have, _ in results))
            for s, (_, _, twice) in zip(stages, results, strict=True):
                if twice:  # a retry met another replica than the first try: this stage's sums count it twice
                    self.console.print(
                        f"stage {s}: step {step} holds {len(twice)} micro-batch(es) twice after a lost "
                        "replica; its replicas start the step over"
                    )
                    resets = [call_json(self.p2p, p, f"{run}.reset", Reset(step=step), Ack) for p in peers[s]]
                    outcome = await asyncio.gather(*resets, return_exceptions=True)
                    failed |= {p for p, r in zip(peers[s], outcome, strict=True) if not isinstance(r, Ack)}
                    missing |= set(batch)
            if not failed and not missing:
                everyone = [p for s in stages for p in peers[s]]
                await asyncio.gather(
                    *(call_json(self.p2p, p, f"{run}.apply", Apply(step=step), Applied) for p in everyone),
                    return_exceptions=True,  # a replica that dies now is gone; the others stepped
                )
                await self.compute(self._step_if_ready)
                return
            for p in failed:
                self.commit_failed[p] = time.monotonic()
            if missing:
                self.console.print(
                    f"step {step}: {len(missing)} micro-batch(es) were held only by a lost replica; "
                    "sending them again"
                )
                self.reissued += len(missing)
                await asyncio.gather(
                    *(self._train_through_pauses(mb, *batch[mb], retry=True) for mb in sorted(missing))
                )

    async def _prepare_stage(
        self, stage: int, step: int, peers: list[str]
    ) -> tuple[set[str], set[str], set[str]]:
        """Ask every replica of `stage` to sum the step's gradients.

        Returns the replicas lost, the micro-batches the live ones hold, and those held twice."""
        run, timeout = self.cfg.name, self.cfg.swarm.request_timeout

        async def prepare(peer: str) -> Prepared:
            await self._greet(peer, stage)
            return await call_json(
                self.p2p, peer, f"{run}.prepare", Prepare(step=step, peers=peers), Prepared, timeout
            )

        replies = await asyncio.gather(*(prepare(p) for p in peers), return_exceptions=True)
        failed = {p for p, r in zip(peers, replies, strict=True) if not isinstance(r, Prepared)}
        for r in replies:
            if isinstance(r, Prepared):
                failed.update(r.unreachable)
        held = [
            mb
            for p, r in zip(peers, replies, strict=True)
            if isinstance(r, Prepared) and p not in failed
            for mb in r.own
        ]
        have = set(held)
        return failed, have, {mb for mb in have if held.count(mb) > 1}

    # ---- handlers (every stage but the head) -----------------------------------------------------------
    async def _on_forward(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        mb, samples = header.micro_batch, header.meta.get("samples", 1)
        if not isinstance(samples, int):
            raise WireError("bad payload", "samples is not an integer")
        t = self.cfg.train
        self._check(packet, t.micro, samples)  # the layout first: it needs no state
        sync = self.cfg.swarm.schedule == "sync"
        step = check_micro_batch(
            header,
            run=self.cfg.name,
            from_stage=self.worker.index - 1,
            n_micro=t.batch_size // t.micro,
            step=self._ref_step(),
            # Async replicas count only their own steps and learn the head's between micro-batches
            # (and from its record every heartbeat), so ids may run ahead of what they know.
            window=self.cfg.swarm.max_inflight // max(t.batch_size // t.micro, 1)
            + (2 if sync else ASYNC_SLACK),
            seen=self.seen,
        )
        self.frontier = max(self.frontier, step)
        if sync and step != self.worker.step_count:
            # A replica that missed a commit takes nothing until the next one brings it up to date.
            raise WireError(
                "unknown micro-batch", f"{mb!r} while this replica is at step {self.worker.step_count}"
            )
        self._remember(mb, step, int(header.meta.get("try", 0)))
        # A retry gets its own slot in flight here, beside an earlier try that may still be running.
        key = f"{mb}#{header.meta['try']}" if header.meta.get("try") else mb
        self.upstream[caller] = time.monotonic()
        extra = {k: packet.tensors.pop(k) for k in DATA_KEYS if k in packet.tensors}
        if self.worker.is_last:
            targets = self._targets(packet, extra)
            loss, grad = await self.compute(
                lambda: self._then_step(self.worker.forward_backward(key, packet, targets))
            )
            self.last_loss = loss
            self.samples_served += samples
            return self._header("gradient", mb, loss=loss), grad
        out = await self.compute(self.worker.forward, key, packet, None, samples)
        shape = self._shape(out)
        out.tensors.update(extra)
        try:
            reply, grad = await self._send(
                "forward",
                self._header("activation", mb, **header.meta),
                out,
                check=lambda g: self._check_gradient(g, shape),
            )
        except BaseException:
            await self.compute(self.worker.abandon, key)
            raise
        up = await self.compute(lambda: self._then_step(self.worker.backward(key, grad)))
        self.samples_served += samples
        return self._header("gradient", mb, **reply.meta), up

    async def _on_eval(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        check_eval_batch(
            header, run=self.cfg.name, from_stage=self.worker.index - 1, n_batches=self.cfg.train.eval_batches
        )
        self._check(packet, self.cfg.train.batch_size)  # evaluation sends whole batches
        extra = {k: packet.tensors.pop(k) for k in DATA_KEYS if k in packet.tensors}
        if self.worker.is_last:
            loss = await self.compute(self.worker.evaluate, packet, None, self._targets(packet, extra))
            return self._header("ack", header.micro_batch, loss=loss), Packet({})
        out = await self.compute(self.worker.evaluate, packet)
        out.tensors.update(extra)
        reply, _ = await self._send("eval", self._header("activation", header.micro_batch), out)
        return self._header("ack", header.micro_batch, **reply.meta), Packet({})

    def _check(self, packet: Packet, max_batch: int, samples: int | None = None) -> None:
        cfg = self.cfg
        check_activation(
            packet,
            self.worker.codec,
            vocab_size=cfg.model.vocab_size,
            max_batch=max_batch,
            max_len=cfg.train.seq_len,
            samples=samples,
        )

    def _ref_step(self) -> int:
        """The step this stage takes micro-batches around: its own, or async, the head's as far as known."""
        if self.cfg.swarm.schedule == "sync":
            return self.worker.step_count
        return max(self.worker.step_count, self.frontier)

    def _remember(self, mb: str, step: int, attempt: int) -> None:
        self.seen.setdefault(mb, set()).add(attempt)
        self.seen_step[mb] = step
        if len(self.seen) > 4 * self.cfg.swarm.max_inflight + 64:  # ids far behind can't pass the window
            oldest = self._ref_step() - self.cfg.swarm.max_inflight - 4
            self.seen_step = {k: v for k, v in self.seen_step.items() if v >= oldest}
            self.seen = {k: v for k, v in self.seen.items() if k in self.seen_step}

    def _shape(self, packet: Packet) -> tuple[int, int]:
        main = next(v for k, v in packet.tensors.items() if k != "tokens")
        return int(main.shape[0]), int(main.shape[1])

    def _check_gradient(self, grad: Packet, shape: tuple[int, int]) -> None:
        """A gradient from downstream is checked before backward; a bad one is dropped, never applied."""
        try:
            check_gradient(grad, self.worker.codec, shape, self.grad_scale)
        except WireError as e:
            self.dropped_gradients += 1
            self.stats.error("forward", e.reason)
            raise

    @staticmethod
    def _targets(packet: Packet, extra: dict[str, Tensor]) -> Tensor:
        if "targets" in extra:
            return extra["targets"].long()
        if "last_target" in extra and "tokens" in packet.tensors:
            return torch.cat([packet.tensors["tokens"][:, 1:].long(), extra["last_target"].long()], dim=1)
        raise WireError("micro-batch carries no targets")

    async def _on_done(self, req: Done, caller: str) -> Ack:
        reason = self.guard.admit(caller)
        if reason is not None:
            raise AuthError(reason, "only the previous stage may end the run here")
        self.done.set()
        return Ack()

    # ---- the head's loop ---------------------------------------------------------------------------------
    def _attach_targets(self, packet: Packet, y: Tensor) -> Packet:
        dtype = self.worker.codec.token_dtype
        if "tokens" in packet.tensors:  # targets are the tokens shifted by one: send only the last column
            packet.tensors["last_target"] = y[:, -1:].to(dtype)
        else:
            packet.tensors["targets"] = y.to(dtype)
        return packet

    async def _train_microbatch(self, mb: str, x: Tensor, y: Tensor, retry: bool = False) -> float:
        meta: dict[str, Any] = {"samples": x.shape[0]}
        key = mb
        if retry:  # the stages that already hold its gradient only pass it through
            meta["try"] = self.rng.randrange(1, 2**31)
            key = f"{mb}#{meta['try']}"
        pkt = await self.compute(self.worker.forward, key, None, x, x.shape[0])
        shape = self._shape(pkt)
        self._attach_targets(pkt, y)
        try:
            reply, grad = await self._send(
                "forward",
                self._header("activation", mb, **meta),
                pkt,
                check=lambda g: self._check_gradient(g, shape),
            )
        except BaseException:
            await self.compute(self.worker.abandon, key)
            raise
        # In sync the head steps after the flush; in async as soon as its batch is complete.
        if self.cfg.swarm.schedule == "async":
            await self.compute(lambda: self._then_step(self.worker.backward(key, grad)))
        else:
            await self.compute(self.worker.backward, key, grad)
        self.samples_served += x.shape[0]
        return float(reply.meta.get("loss", float("nan")))

    async def _eval(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        total = 0.0
        for i, (x, y) in enumerate(batches):
            pkt = await self.compute(self.worker.evaluate, None, x)
            reply, _ = await self._send(
                "eval", self._header("activation", f"eval:{i}"), self._attach_targets(pkt, y)
            )
            total += float(reply.meta["loss"])
        return total / len(batches)

    def _empty_stages(self) -> list[int]:
        return [
            s
            for s in range(1, self.cfg.n_stages)
            if not [r for r in self.members.get(s, []) if r.state == "online"]
        ]

    async def _refresh_members(self) -> None:
        for s in range(1, self.cfg.n_stages):
            self.members[s] = await stage_records(self.dht, self.cfg.name, s, self.verifier)

    async def _stage_went_empty(self) -> bool:
        """After a failed micro-batch: did a whole stage go? Its last record outlives it by RECORD_TTL."""
        deadline = time.monotonic() + RECORD_TTL + HEARTBEAT_PERIOD
        while True:
            await self._refresh_members()
            if self._empty_stages():
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(HEARTBEAT_PERIOD)

    async def _wait_whole(self) -> None:
        """Pause while some stage has no node at all; go on when one joins (the coordinator sends
        new nodes to empty stages first)."""
        empty = self._empty_stages()
        if not empty:
            return
        async with self.pause_lock:  # every waiting micro-batch shares one pause and one message
            empty, t0, said, waited = self._empty_stages(), time.monotonic(), -1e9, False
            limit = self.cfg.swarm.pause_limit
            while empty:
                waited = True
                now = time.monotonic()
                if now - said >= 30.0:
                    said = now
                    names = ", ".join(map(str, empty))
                    self.console.print(
                        f"training paused at step {self.worker.step_count}: stage {names} has no node; "
                        f"it resumes when one joins (pmnode join --stage {empty[0]} ...)",
                        highlight=False,
                    )
                if limit and now - t0 > limit:
                    raise PmnodeError(
                        f"stage {empty[0]} had no node for {limit:.0f}s (swarm.pause_limit); stopping"
                    )
                await asyncio.sleep(1.0)
                await self._refresh_members()
                empty = self._empty_stages()
            if waited:
                self.paused_s += time.monotonic() - t0
                # The swarm changed: whom we gave up on before may be back, and new routes are untried.
                self.backoff.failures.clear()
                self.commit_failed.clear()
                await self._refresh_downstream()
                self.console.print(
                    f"every stage has a node again: training resumes at step {self.worker.step_count} "
                    f"after {time.monotonic() - t0:.1f}s",
                    highlight=False,
                )

    async def _train_through_pauses(self, mb: str, x: Tensor, y: Tensor, retry: bool = False) -> float:
        """One micro-batch; if it fails because a stage lost its last node, wait for one and send again."""
        while True:
            try:
                return await self._train_microbatch(mb, x, y, retry=retry)
            except Exception:
                if not await self._stage_went_empty():
                    raise
            await self._wait_whole()
            retry = True  # stages that hold it already only pass it through

    async def drive(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        train_set, heldout = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
        eval_batches = heldout.eval_batches(t.eval_batches, t.batch_size, t.seq_len)
        waited = 0
        while not self.downstream:
            if waited % 30 == 0:  # once, then every half minute: the panel shows the empty downstream too
                self.console.print(f"waiting for stage {self.worker.index + 1} to come online...")
            await asyncio.sleep(1.0)
            waited += 1
            await self._refresh_downstream()
        await self._refresh_members()
        if self.worker.step_count >= t.steps:
            raise PmnodeError(
                f"nothing to train: stage 0 is at step {self.worker.step_count} and train.steps is "
                f"{t.steps}; pass a larger --steps to continue"
            )
        n_micro = t.batch_size // t.micro
        window = asyncio.Semaphore(cfg.swarm.max_inflight)
        start, tokens = time.perf_counter(), 0
        pending: list[float] = []
        failures: list[BaseException] = []

        async def one(mb: str, x: Tensor, y: Tensor, retry: bool) -> None:
            try:
                pending.append(await self._train_through_pauses(mb, x, y, retry))
            except Exception as e:  # kept, never dropped: a lost micro-batch would skew the step
                failures.append(e)
            finally:
                window.release()

        def check() -> None:
            if failures:
                raise PmnodeError(f"training stopped: {failures[0]}") from failures[0]

        tasks: set[asyncio.Task] = set()
        first = self.worker.step_count
        for step in range(first, t.steps):
            x, y = train_set.batch(step, t.batch_size, t.seq_len, t.seed)
            # A head that took over mid-step: the stages may hold some of this step from its predecessor.
            retry = self.rejoined and step == first
            for j in range(n_micro):
                await window.acquire()  # async: the window, not the step, bounds staleness
                check()
                await self._wait_whole()
                sl = slice(j * t.micro, (j + 1) * t.micro)
                task = asyncio.create_task(one(f"{step}:{j}", x[sl], y[sl], retry))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if cfg.swarm.schedule == "sync":
                await asyncio.gather(*tasks)
                check()
                batch = {
                    f"{step}:{j}": (x[j * t.micro : (j + 1) * t.micro], y[j * t.micro : (j + 1) * t.micro])
                    for j in range(n_micro)
                }
                await self._commit(step, batch)
            tokens += t.batch_size * t.seq_len
            last = step + 1 == t.steps
            if last and tasks:
                await asyncio.gather(*tasks)
            check()
            if pending:
                self.last_loss = sum(pending) / len(pending)
                pending.clear()
            self.losses.append(self.last_loss if self.last_loss is not None else float("nan"))
            held = None
            if (step + 1) % t.eval_every == 0 or last:
                held = await self._eval(eval_batches)
                self.evals.append((step + 1, tokens, held))
            self._report(step + 1, self.losses[-1], held, tokens, time.perf_counter() - start)
        self.elapsed = time.perf_counter() - start
        self.tokens = tokens

    def _report(self, step: int, loss: float, held: float | None, tokens: int, elapsed: float) -> None:
        """One JSON line per step on stdout: what local-swarm's progress view reads."""
        self.tokens_per_s = round(tokens / elapsed, 1)
        line: dict[str, Any] = {
            "step": step,
            "loss": round(loss, 5),
            "tokens_per_s": round(tokens / elapsed, 1),
            "tokens": tokens,
            "elapsed": round(elapsed, 4),  # for windowed rates (pmnode bench swarm)
        }
        if held is not None:
            line["heldout_loss"] = round(held, 5)
        line["fwd_bytes_per_token"] = round(self.stats.bytes_sent["forward"] / max(tokens, 1), 3)
        line["bwd_bytes_per_token"] = round(self.stats.bytes_received["forward"] / max(tokens, 1), 3)
        line["wire_bytes"] = self.stats.summary()["bytes_sent"] + self.stats.summary()["bytes_received"]
        if self.opts.log_format == "json" or not sys.stdout.isatty():  # a terminal gets the panel instead
            print(json.dumps(line), flush=True)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            if beats % 3 == 0:  # a restarted coordinator learns the swarm from these
                await keep_in_touch(self.dht, self.opts.coordinator)
            beats += 1
            rec = StageRecord(
                peer_id=self.peer_id,
                stage=self.worker.index,
                state="online",
                throughput=self._throughput(),
                queue=len(self.worker.inflight),
                step=self.worker.step_count,
                samples=self.samples_applied,
                loss=self.last_loss,
                heldout_loss=self.evals[-1][2] if self.evals else None,
                tokens_per_s=self.tokens_per_s,
                wire_bytes_per_s=round(sum(self._io_rates()), 1),
                device=self.opts.device,
                time=time.time(),
            )
            await self._announce(rec)
            await self._refresh_downstream()
            if self.cfg.swarm.schedule == "async" and not self.worker.is_first:
                heads = await stage_records(self.dht, self.cfg.name, 0, self.verifier)
                self.frontier = max([self.frontier] + [r.step for r in heads if r.state == "online"])
            if self.worker.is_first:  # the head commits with every stage's replicas
                for stage in range(1, self.cfg.n_stages):
                    self.members[stage] = await stage_records(self.dht, self.cfg.name, stage, self.verifier)
            if self.cert.expires - time.time() < CERT_TTL / 2:
                await self._renew()
            await asyncio.sleep(HEARTBEAT_PERIOD)

    async def _renew(self) -> None:
        """A fresh certificate before the old one runs out; peers see it at our next hello."""
        try:
            reply = await self._join(renew=True)
        except PmnodeError as e:  # the coordinator may be restarting: the old one is still valid a while
            self.console.print(f"could not renew the membership certificate yet: {e}")
            return
        self.cert = reply.cert
        self.greeted.clear()

    def _io_rates(self) -> tuple[float, float]:
        """Bytes/s in and out over the last second or more, both roles together."""
        c, v = self.stats.summary(), self.server_stats.summary()
        now = time.monotonic()
        b_in = c["bytes_received"] + v["bytes_received"]
        b_out = c["bytes_sent"] + v["bytes_sent"]
        then, i0, o0, r_in, r_out = self._io
        if now - then >= 1.0:
            r_in, r_out = (b_in - i0) / (now - then), (b_out - o0) / (now - then)
            self._io = (now, b_in, b_out, r_in, r_out)
        return r_in, r_out

    def snapshot(self) -> NodeSnapshot:
        cfg, w, now = self.cfg, self.worker, time.monotonic()
        r_in, r_out = self._io_rates()
        tps = self.tokens_per_s or self._throughput() * cfg.train.seq_len
        role = "head" if w.is_first else "tail" if w.is_last else "body"
        return NodeSnapshot(
            run=cfg.name,
            peer_id=self.peer_id,
            stage=w.index,
            n_stages=cfg.n_stages,
            layers=(w.stage.layer_range.start, w.stage.layer_range.stop),
            role=role,
            device=self.opts.device,
            codec=cfg.codec_spec,
            schedule=cfg.swarm.schedule,
            upstream=sorted(p for p, t in self.upstream.items() if now - t < 30.0),
            downstream=[r.peer_id for r in self.downstream],
            step=w.step_count,
            target_steps=cfg.train.steps,
            samples=self.samples_applied,
            loss=self.last_loss,
            heldout_loss=self.evals[-1][2] if self.evals else None,
            tokens_per_s=tps,
            bytes_in_per_s=r_in,
            bytes_out_per_s=r_out,
            compression=4 * cfg.model.d_model / max(w.codec.bytes_per_token_forward(), 1),
            inflight=len(w.inflight),
            errors=sum(self.stats.errors.values()) + sum(self.server_stats.errors.values()),
            uptime_s=now - self.started,
        )

    async def _show(self) -> None:
        while True:
            self.display.show(self.snapshot())
            await asyncio.sleep(0.5)

    def _throughput(self) -> float:
        """Samples/s this node can serve: per second of compute, not of wall time, so a replica that
        got little traffic is not mistaken for a slow one (0 until it has measured itself)."""
        return round(self.samples_served / self.busy, 3) if self.busy > 0.2 and self.samples_served else 0.0

    async def _announce(self, rec: StageRecord) -> None:
        await announce(self.dht, self.cfg.name, rec, self.cert, self.key)

    async def _join(self, renew: bool = False) -> JoinReply:
        coord = coordinator_peer(self.opts.coordinator)
        token = self.opts.token.get_secret_value() if self.opts.token else ""
        req = JoinRequest(
            peer_id=self.peer_id,
            stage=self.worker.index if renew else self.opts.stage,
            device=self.opts.device,
            token=token,
            public_key=public_bytes(self.key),
            renew=renew,
        )
        try:
            reply = await call_json(
                self.p2p, coord, JOIN_RPC, req, JoinReply, timeout=self.opts.connect_timeout
            )
        except ControlError as e:
            if "join token" in str(e):
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
        return reply

    def start(self) -> None:
        """Start the DHT outside any event loop (see start_dht)."""
        o = self.opts
        coordinator_peer(o.coordinator)  # validate the address before starting anything
        self.dht = start_dht([o.coordinator], o.host, o.port, announce=o.announce)

    async def run(self, stop: asyncio.Event) -> dict:
        o = self.opts
        self.stop = stop
        try:
            self.p2p: P2P = await self.dht.replicate_p2p()
            self.peer_id = self.dht.peer_id.to_base58()
            reply = await self._join()
            cfg = RunConfig.model_validate(reply.config)
            self.cert, self.verifier = reply.cert, Verifier(cfg.name, reply.authority)
            # From now on this DHT peer refuses run records that are not signed by members.
            self.dht.add_validators([SwarmValidator(cfg.name, cfg.n_stages, reply.authority)])
            if cfg.n_stages < 2:
                raise PmnodeError("this run has one stage: a swarm needs two or more; use `pmnode train`")
            if o.data:
                cfg = cfg.with_overrides(data={"source": o.data})
            if o.bf16:
                cfg = cfg.with_overrides(train={"autocast_bf16": True})
            self.cfg = cfg
            if cfg.swarm.threads:
                torch.set_num_threads(cfg.swarm.threads)
            self.worker = StageWorker(
                cfg, reply.stage, cfg.codec_spec, o.device, stash_weights=cfg.swarm.schedule == "async"
            )
            sub = self.worker.stage.subspace
            mine = sub.fingerprint if sub is not None else None
            if mine != reply.fingerprint:
                raise PmnodeError(
                    f"subspace fingerprint mismatch: coordinator has {reply.fingerprint}, this node "
                    f"built {mine}; upgrade pmnode to the coordinator's version"
                )
            if o.resume:
                if not (o.checkpoint_dir and checkpoint.load_manifest(o.checkpoint_dir, reply.stage)):
                    raise PmnodeError(
                        f"--resume: no checkpoint of stage {reply.stage} under {o.checkpoint_dir}; "
                        "drop --resume to start this stage fresh"
                    )
                man = checkpoint.load(self.worker, o.checkpoint_dir)
                self.samples_applied = man.samples
                self.origin = f"its checkpoint of step {man.step} in {o.checkpoint_dir}"
                self.console.print(f"resumed stage {reply.stage} from step {man.step}")
            await self._take_over_if_empty()
            sw = cfg.swarm
            self.grad_scale = GradScale(sw.max_grad_ratio)
            self.guard = Guard(
                self.verifier,
                reply.stage,
                rate=sw.peer_rate,
                burst=max(64, 2 * sw.max_inflight),
                ban_after=sw.ban_after,
                ban_seconds=sw.ban_seconds,
            )
            await add_json_handler(self.p2p, f"{cfg.name}.hello", Hello, self._on_hello)
            # No honest message is larger than a whole batch of dense fp32 activations: refuse beyond
            # that before buffering it.
            t = cfg.train
            limits = WireLimits(
                max_bytes=max(2**20, 2 * t.batch_size * t.seq_len * (4 * cfg.model.d_model + 16))
            )
            for rpc, handler in (("forward", self._on_forward), ("eval", self._on_eval)):
                await serve(
                    self.p2p,
                    f"{cfg.name}.{rpc}",
                    handler,
                    self.server_stats,
                    limits=limits,
                    shaper=self.shaper,
                    guard=self.guard,
                )
            await add_json_handler(self.p2p, f"{cfg.name}.done", Done, self._on_done)
            await add_json_handler(self.p2p, f"{cfg.name}.prepare", Prepare, self._on_prepare)
            await add_json_handler(self.p2p, f"{cfg.name}.apply", Apply, self._on_apply)
            await add_json_handler(self.p2p, f"{cfg.name}.reset", Reset, self._on_reset)
            await serve(
                self.p2p, f"{cfg.name}.state", self._on_state, self.server_stats, guard=SameStage(self.guard)
            )
            await serve(
                self.p2p,
                f"{cfg.name}.grads",
                self._on_grads,
                self.server_stats,
                shaper=self.shaper,
                guard=SameStage(self.guard),
            )
            r = self.worker.stage.layer_range
            self.console.print(
                f"node {self.peer_id[-8:]} serves stage {reply.stage} (layers {r.start}..{r.stop - 1}) "
                f"of run {cfg.name}, codec {cfg.codec_spec}, {cfg.swarm.schedule}"
                + (f", links emulated at {self.shaper.describe()}" if self.shaper.active else "")
            )
            beat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            beat.add_done_callback(self._task_ended)
            ui = asyncio.create_task(self._show())
            averaging = None
            if cfg.swarm.schedule == "async" and not self.worker.is_first:
                averaging = asyncio.create_task(self._average_loop(), name="averaging")
                averaging.add_done_callback(self._task_ended)
            try:
                if self.worker.is_first:
                    driver = asyncio.create_task(self.drive())
                    await asyncio.wait(
                        [driver, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED"
                    )
                    if driver.done():
                        driver.result()
                        await self._finish_swarm()
                    else:
                        driver.cancel()
                else:
                    await asyncio.wait(
                        [asyncio.create_task(self.done.wait()), asyncio.create_task(stop.wait())],
                        return_when="FIRST_COMPLETED",
                    )
                    if self.done.is_set():
                        await self._finish_swarm()
                        if averaging is not None:
                            await self._last_average(averaging)
            finally:
                beat.cancel()
                ui.cancel()
                if averaging is not None:
                    averaging.cancel()
                if self.averager is not None:
                    if self.round is not None and not self.round.done():
                        self.round.cancel()  # its waiting thread returns; the process can exit
                    self.averager.shutdown()
                self.display.close(self.snapshot())
                if o.checkpoint_dir:
                    checkpoint.save(self.worker, o.checkpoint_dir, cfg.name, self.samples_applied)
                    checkpoint.save_run_config(cfg, o.checkpoint_dir)
                offline = StageRecord(
                    peer_id=self.peer_id, stage=self.worker.index, state="offline", time=time.time()
                )
                # Best effort: if the DHT process is gone (SIGTERM to the whole group), don't hang on it;
                # the record expires after RECORD_TTL anyway.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._announce(offline), 5.0)
            return self.summary()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.dht.shutdown()

    async def _finish_swarm(self) -> None:
        """Tell the next stage's replicas that training is over (they pass it on)."""
        await self._refresh_downstream()
        for rec in self.downstream:
            try:
                await self._greet(rec.peer_id)  # a replica that never got a micro-batch from us
                await call_json(self.p2p, rec.peer_id, f"{self.cfg.name}.done", Done(), Ack, timeout=10)
            except (ControlError, AuthError) as e:
                self.console.print(f"could not tell {rec.peer_id[-8:]} to stop: {e}")

    def summary(self) -> dict:
        out: dict[str, Any] = {
            "stage": self.worker.index,
            "steps": self.worker.step_count,
            "schedule": self.cfg.swarm.schedule,
            "codec": self.cfg.codec_spec,
            "samples_applied": self.samples_applied,
            "client": _counters(self.stats),
            "server": _counters(self.server_stats),
            "rejected": dict(self.guard.rejected) if hasattr(self, "guard") else {},
            "bans": self.guard.bans if hasattr(self, "guard") else 0,
            "dropped_gradients": self.dropped_gradients,
            "reissued": self.reissued,
            "samples_off": self.samples_off,
            "steps_lost": self.steps_lost,
            "paused_s": round(self.paused_s, 2),
            "averaging": dict(self.averaging),
        }
        if self.worker.is_first and self.losses:
            tokens = getattr(self, "tokens", 0)
            out.update(
                final_train_loss=self.losses[-1],
                heldout_loss=self.evals[-1][2] if self.evals else None,
                tokens_per_s=tokens / max(getattr(self, "elapsed", 1e-9), 1e-9),
                train_losses=self.losses,
                evals=self.evals,
                wire_bytes_per_token_per_boundary={
                    "forward": self.stats.bytes_sent["forward"] / max(tokens, 1),
                    "backward": self.stats.bytes_received["forward"] / max(tokens, 1),
                    "forward_payload": self.stats.payload_sent["forward"] / max(tokens, 1),
                    "backward_payload": self.stats.payload_received["forward"] / max(tokens, 1),
                },
            )
        return out


def _counters(stats: TransportStats) -> dict[str, dict[str, int]]:
    """Every per-RPC counter, for summaries and the bytes-on-the-wire tests."""
    return {k: dict(v) for k, v in vars(stats).items()}
