"""The coordinator: DHT bootstrap peer, holder of the run config and seed, stage assigner.

It keeps no training state of its own beyond what nodes announce: membership
is read back from the nodes' heartbeats in the DHT, so a restarted coordinator
(same --state-dir, hence same peer identity and port) simply reads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P
from rich.console import Console

from pmnode.config import RunConfig
from pmnode.control import JOIN_RPC, JoinReply, JoinRequest, add_json_handler
from pmnode.dht import run_until_signal, stage_records, start_dht
from pmnode.errors import PmnodeError
from pmnode.routing import HEARTBEAT_PERIOD, StageRecord, choose_stage
from pmnode.stages import build_subspace

PENDING_TTL = 15.0  # an assigned node that has not announced yet still counts for its stage this long


class Coordinator:
    def __init__(self, cfg: RunConfig, *, host: str, port: int, state_dir: Path, console: Console):
        self.cfg, self.host, self.port, self.state_dir, self.console = cfg, host, port, state_dir, console
        sub = build_subspace(cfg)
        self.fingerprint = sub.fingerprint if sub is not None else None
        self.members: dict[int, list[StageRecord]] = {}
        self.pending: dict[str, tuple[int, float]] = {}  # peer -> (stage, assigned at)
        self.state_path = state_dir / "state.json"
        self.global_step = 0

    def _load_state(self) -> None:
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("fingerprint") != self.fingerprint or state.get("run") != self.cfg.name:
                raise PmnodeError(
                    f"{self.state_dir} holds state of another run ({state.get('run')}, fingerprint "
                    f"{state.get('fingerprint')}); use another --state-dir"
                )
            self.global_step = state.get("global_step", 0)
            if not self.port:  # come back on the same port, so nodes' bootstrap address still works
                self.port = state.get("port", 0)

    def _save_state(self, maddrs: list[str]) -> None:
        state = {
            "run": self.cfg.name,
            "fingerprint": self.fingerprint,
            "config": self.cfg.model_dump(mode="json"),
            "port": self.port,
            "maddrs": maddrs,
            "global_step": self.global_step,
            "members": {s: [r.model_dump() for r in recs] for s, recs in self.members.items()},
            "time": time.time(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_path)  # atomic: a crash never leaves half a state file

    def _by_stage_with_pending(self) -> dict[int, list[StageRecord]]:
        now = time.monotonic()
        self.pending = {p: (s, t) for p, (s, t) in self.pending.items() if now - t < PENDING_TTL}
        by = {s: list(recs) for s, recs in self.members.items()}
        announced = {r.peer_id for recs in by.values() for r in recs}
        for peer, (s, _) in self.pending.items():
            if peer not in announced:
                by.setdefault(s, []).append(StageRecord(peer_id=peer, stage=s, state="joining"))
        return by

    async def _on_join(self, req: JoinRequest, caller: str) -> JoinReply:
        stage = choose_stage(self._by_stage_with_pending(), self.cfg.n_stages, req.stage)
        self.pending[caller] = (stage, time.monotonic())
        self.console.print(f"assigned peer {caller[-8:]} to stage {stage}", highlight=False)
        return JoinReply(
            stage=stage,
            config=self.cfg.model_dump(mode="json"),
            fingerprint=self.fingerprint,
            step=self.global_step,
        )

    def start(self) -> None:
        """Start the DHT outside any event loop: its forked child must keep default signal handling."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._load_state()
        self.dht = start_dht(
            [], self.host, self.port, identity_path=self.state_dir / "identity.key", what="the coordinator"
        )

    async def run(self, stop: asyncio.Event) -> None:
        dht = self.dht
        try:
            p2p: P2P = await dht.replicate_p2p()
            await add_json_handler(p2p, JOIN_RPC, JoinRequest, self._on_join)
            maddrs = [str(m) for m in dht.get_visible_maddrs()]
            if not self.port:
                self.port = int(maddrs[0].split("/tcp/")[1].split("/")[0])
            self._save_state(maddrs)
            (self.state_dir / "coordinator.json").write_text(json.dumps({"maddrs": maddrs}))
            self.console.print(
                f"[bold]coordinator[/] for run [bold]{self.cfg.name}[/] is up. Volunteers join with:"
            )
            for m in maddrs:
                print(f"  pmnode join --coordinator {m}", flush=True)
            while not stop.is_set():
                self.members = {
                    s: await stage_records(dht, self.cfg.name, s) for s in range(self.cfg.n_stages)
                }
                steps = [r.step for recs in self.members.values() for r in recs]
                self.global_step = max([self.global_step, *steps])
                self._save_state(maddrs)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEARTBEAT_PERIOD)
        finally:
            dht.shutdown()

    def status(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())


def serve(cfg: RunConfig, *, host: str, port: int, state_dir: Path, console: Console) -> None:
    """Run until SIGINT/SIGTERM."""

    coord = Coordinator(cfg, host=host, port=port, state_dir=state_dir, console=console)
    coord.start()
    run_until_signal(coord.run)
