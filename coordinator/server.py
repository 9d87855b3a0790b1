"""The coordinator: DHT bootstrap peer, holder of the run config and seed, stage assigner.

It keeps no training state of its own beyond what nodes announce: membership
is read back from the nodes' heartbeats in the DHT, so a restarted coordinator
(same --state-dir, hence same peer identity and port) simply reads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from rich.console import Console

from coordinator.http import Metrics, StatusServer, reach_note
from coordinator.state import SavedState, extend_history, head_of, load_state, save_state
from coordinator.view import swarm_status
from pmnode.config import RunConfig
from pmnode.core.durable import disk_problem
from pmnode.core.stages import build_subspace
from pmnode.errors import PmnodeError
from pmnode.net.auth import WRONG_TOKEN, AuthError, Verifier, issue_cert, public_bytes
from pmnode.net.control import JOIN_RPC, CoordinatorInfo, JoinReply, JoinRequest, add_json_handler
from pmnode.net.dht import run_until_signal, stage_records, start_dht
from pmnode.net.forwarder import Forwarder
from pmnode.net.reach import REACH_RPC, ReachReply, ReachRequest, dial_back
from pmnode.net.records import SwarmValidator, sign_config
from pmnode.net.relay import RelayLimits, configure_daemon
from pmnode.net.routing import HEARTBEAT_PERIOD, StageRecord, choose_stage, config_key, head_slot
from pmnode.net.status import STATUS_RPC, HistoryPoint, StatusRequest, SwarmStatus
from pmnode.net.tokens import (
    AUTHORITY_FILE,
    JOIN_TOKEN_ENV,
    TOKEN_FILE,
    load_or_create_key,
    new_token,
    read_token_file,
    token_matches,
    write_secret,
)
from pmnode.net.tunnel import Tunnel

CONFIG_TTL = 60.0  # seconds a published config record lives; republished every third of it
PENDING_TTL = 15.0  # an assigned node that has not announced yet still counts for its stage this long


class Coordinator:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        host: str,
        port: int,
        state_dir: Path,
        console: Console,
        http_port: int | None = None,
        token: str | None = None,
        relay: RelayLimits | None = None,
        http_host: str | None = None,
        http_token: str | None = None,
        relay_peers: Iterable[str] = (),
    ):
        self.relay = relay or RelayLimits(serve=True)
        self.cfg, self.host, self.port, self.state_dir, self.console = cfg, host, port, state_dir, console
        self.token = token
        self.relay_peers = set(relay_peers)  # members the operator lets relay (--relay-peer); no one else
        self.http_port, self.http_token = http_port, http_token
        # Without a token the page is this machine's only, unless the operator says otherwise.
        self.http_host = http_host or (host if http_token else "127.0.0.1")
        self.metrics = Metrics()
        self.http: StatusServer | None = None
        self.history: list[HistoryPoint] = []
        self.forwarder: Forwarder | None = None
        self.maddrs: list[str] = []
        sub = build_subspace(cfg)
        self.fingerprint = sub.fingerprint if sub is not None else None
        self.members: dict[int, list[StageRecord]] = {}
        self.pending: dict[str, tuple[int, int, float]] = {}  # peer -> (stage, head slot, assigned at)
        self.state_path = state_dir / "state.json"
        self.disk_problem: str | None = None  # why state.json was last not saved (a full disk)
        self.global_step = 0

    def _load_state(self) -> None:
        state = load_state(self.state_path, self.cfg.name, self.fingerprint)
        if state is not None:
            self.global_step, self.history = state.global_step, state.history
            if not self.port:  # come back on the same port, so nodes' bootstrap address still works
                self.port = state.port

    def _save_state(self, maddrs: list[str]) -> None:
        state = SavedState(
            run=self.cfg.name,
            fingerprint=self.fingerprint,
            config=self.cfg.model_dump(mode="json"),
            port=self.port,
            maddrs=maddrs,
            global_step=self.global_step,
            members=self.members,
            history=self.history,
        )
        try:
            save_state(self.state_path, state)
            self.disk_problem = None
        except OSError as e:  # a full disk must not stop the coordinator: the last saved state stays
            line = f"{disk_problem(e, self.state_dir)}; keeping the last saved state"
            if line != self.disk_problem:
                self.console.print(line, highlight=False)
            self.disk_problem = line

    def _by_stage_with_pending(self) -> dict[int, list[StageRecord]]:
        now = time.monotonic()
        self.pending = {p: (s, h, t) for p, (s, h, t) in self.pending.items() if now - t < PENDING_TTL}
        by = {s: list(recs) for s, recs in self.members.items()}
        announced = {r.peer_id for recs in by.values() for r in recs}
        for peer, (s, h, _) in self.pending.items():
            if peer not in announced:
                by.setdefault(s, []).append(StageRecord(peer_id=peer, stage=s, slot=h, state="joining"))
        return by

    async def _slot_or_lapse(self, stage: int | None, caller: str) -> dict[int, list[StageRecord]]:
        """The members by stage, pending assignments included. A node asking for stage 0 while every
        head slot free of a live head is held by a node just assigned waits (at most PENDING_TTL) until
        that node comes up or its assignment lapses: two heads of one slot would read the same data,
        and an assignment that never comes up must not turn the real head away."""
        deadline = time.monotonic() + PENDING_TTL
        while True:
            by = self._by_stage_with_pending()
            heads = by.get(0, [])
            pending = any(r.state == "joining" for r in heads)
            if stage != 0 or head_slot(heads, self.cfg.swarm.heads, caller) is not None or not pending:
                return by
            if time.monotonic() > deadline:
                return by
            await asyncio.sleep(0.25)

    async def _on_join(self, req: JoinRequest, caller: str) -> JoinReply:
        try:
            if self.token is None or not token_matches(req.token, self.token):  # none yet: nobody is admitted
                self.console.print(f"refused peer {caller[-8:]}: wrong join token", highlight=False)
                raise AuthError(WRONG_TOKEN)
            try:
                RSAPublicKey.from_bytes(req.public_key.encode())
            except Exception as e:
                raise PmnodeError("the join request carries no valid RSA public key") from e
            heads = self.cfg.swarm.heads
            by_stage = await self._slot_or_lapse(req.stage, caller)
            stage = choose_stage(by_stage, self.cfg.n_stages, req.stage, caller, heads)
            slot = (head_slot(by_stage.get(0, []), heads, caller) or 0) if stage == 0 else 0
        except PmnodeError:
            self.metrics.refused.inc()
            raise
        # `caller` is the peer id libp2p authenticated, so the certificate binds the key that made the call.
        cert = issue_cert(self.authority, self.cfg.name, caller, stage, req.public_key, slot=slot)
        if not req.renew:
            self.metrics.joins.inc()
            self.pending[caller] = (stage, slot, time.monotonic())
            head = f" as head {slot} of {heads}" if stage == 0 and heads > 1 else ""
            self.console.print(
                f"assigned peer {caller[-8:]} ({req.device}) to stage {stage}{head}", highlight=False
            )
        return JoinReply(
            stage=stage,
            slot=slot,
            config=self.cfg.model_dump(mode="json"),
            fingerprint=self.fingerprint,
            cert=cert,
            authority=public_bytes(self.authority),
        )

    def _setup_secrets(self) -> None:
        """The authority key and the join token: created on the first start, kept in the state dir."""
        self.authority = load_or_create_key(self.state_dir / AUTHORITY_FILE)
        self.verifier = Verifier(self.cfg.name, public_bytes(self.authority))
        path = self.state_dir / TOKEN_FILE
        if self.token is not None:
            write_secret(path, self.token.encode())
        elif path.exists():
            self.token = read_token_file(path)
        else:
            self.token = new_token()
            write_secret(path, self.token.encode())
            self.new_token = True

    def _show_token(self) -> None:
        """Once, when the token is made: the operator hands it to volunteers out of band."""
        if getattr(self, "new_token", False):
            self.console.print(
                f"join token (shown once; kept in {self.state_dir / TOKEN_FILE}, mode 0600):", highlight=False
            )
            print(f"  {self.token}", flush=True)
            self.console.print(
                f"volunteers pass it as ${JOIN_TOKEN_ENV} or with --token-file PATH (mode 0600)",
                highlight=False,
            )

    def start(self) -> None:
        """Start the DHT outside any event loop: its forked child must keep default signal handling."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "coordinator.json").unlink(missing_ok=True)  # stale until this run writes it
        self._load_state()
        self._setup_secrets()
        configure_daemon(self.relay)
        self.dht = start_dht(
            [],
            self.host,
            self.port,
            identity_path=self.state_dir / "identity.key",
            what="the coordinator",
            record_validators=[
                SwarmValidator(self.cfg.name, self.cfg.n_stages, public_bytes(self.authority))
            ],
        )

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM."""
        self.start()
        run_until_signal(self.run)

    async def run(self, stop: asyncio.Event) -> None:
        dht = self.dht
        try:
            tun = Tunnel(await dht.replicate_p2p())  # the coordinator's one tunnel over its P2P
            await add_json_handler(tun, JOIN_RPC, JoinRequest, self._on_join)
            await add_json_handler(tun, STATUS_RPC, StatusRequest, self._on_status)
            await add_json_handler(tun, REACH_RPC, ReachRequest, self._on_reach)
            if self.relay.serve:  # members behind NAT are called through it (net.tunnel)
                self.forwarder = Forwarder(tun, self.verifier)
                await self.forwarder.serve()
            maddrs = self.maddrs = [str(m) for m in dht.get_visible_maddrs()]
            if not self.port:
                self.port = int(maddrs[0].split("/tcp/")[1].split("/")[0])
            self._save_state(maddrs)
            info = CoordinatorInfo(maddrs=maddrs)
            if self.http_port is not None:
                self.http = StatusServer(self.http_host, self.http_port, self.metrics, self.http_token)
                self.http.publish(self.status())
                self.http.start()
                info.http = f"http://{self.http_host}:{self.http.port}/"
            (self.state_dir / "coordinator.json").write_text(info.model_dump_json(exclude_none=True))
            self.console.print(
                f"[bold]coordinator[/] for run [bold]{self.cfg.name}[/] is up. Volunteers join with:"
            )
            for m in maddrs:
                print(f"  pmnode join --coordinator {m}", flush=True)
            self._show_token()
            if self.http is not None and info.http is not None:
                loopback = self.http_host.startswith("127.") or self.http_host in ("localhost", "::1")
                note = reach_note(info.http, self.http.port, self.http_token is not None, loopback)
                self.console.print(note, highlight=False)
            published = 0.0
            while not stop.is_set():
                if time.monotonic() - published > CONFIG_TTL / 3:
                    published = time.monotonic()
                    await self._publish_config()
                self.members = {
                    s: await stage_records(dht, self.cfg.name, s, self.verifier)
                    for s in range(self.cfg.n_stages)
                }
                steps = [r.step for recs in self.members.values() for r in recs]
                self.global_step = max([self.global_step, *steps])
                self.history = extend_history(self.history, head_of(self.members))
                self._save_state(maddrs)
                if self.forwarder is not None:
                    self.metrics.update_relay(self.forwarder.counters)
                if self.http is not None:
                    self.http.publish(self.status())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEARTBEAT_PERIOD)
        finally:
            if self.http is not None:
                self.http.close()
            dht.shutdown()

    async def _publish_config(self) -> None:
        """The run config in the DHT, signed: only this coordinator's key can write it."""
        value = sign_config(self.cfg.model_dump(mode="json"), self.fingerprint, self.authority)
        with contextlib.suppress(Exception):
            await self.dht.store(
                config_key(self.cfg.name), value, get_dht_time() + CONFIG_TTL, return_future=True
            )

    def status(self) -> SwarmStatus:
        return swarm_status(
            self.cfg,
            self.fingerprint,
            members=self.members,
            shown=self._by_stage_with_pending(),
            history=self.history,
            global_step=self.global_step,
            coordinator=self.maddrs,
        )

    async def _on_status(self, req: StatusRequest, caller: str) -> SwarmStatus:
        """The page's status over libp2p: behind the page's token when the page has one."""
        if self.http_token is not None and not token_matches(req.token, self.http_token):
            self.metrics.refused.inc()
            raise AuthError("unauthorized", "the status needs the coordinator's HTTP token")
        return self.status()

    async def _on_reach(self, req: ReachRequest, caller: str) -> ReachReply:
        """Dial a joining node back (members only: the token), and name the relays it may reserve on."""
        if self.token is None or not token_matches(req.token, self.token):  # none yet: nobody is admitted
            self.metrics.refused.inc()
            raise AuthError(WRONG_TOKEN)
        reachable = await dial_back(req.maddrs)
        relays = list(self.maddrs) if self.relay.serve else []
        members = [r for recs in self.members.values() for r in recs]
        named = [r for r in members if r.relay and r.peer_id in self.relay_peers]  # not its own say-so
        relays += [a for r in named for a in r.addrs[:1]]
        seen = "reachable" if reachable else f"not reachable at {', '.join(req.maddrs)}"
        self.console.print(f"peer {caller[-8:]}: {seen}", highlight=False)
        return ReachReply(reachable=reachable, relays=relays)
