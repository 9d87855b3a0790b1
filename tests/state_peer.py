"""One process of tests/test_state_transfer.py: a replica serving its stage's state, or a joiner
copying it, over real libp2p with pmnode's own transfer code (pmnode.net.bulk, core.replica_state).

    python tests/state_peer.py serve CONFIG INFO.json          # one step trained, then serve `state`
    python tests/state_peer.py fetch CONFIG INFO.json A.json B.json --pause-at N --go FILE
The joiner stops before chunk N until FILE exists (the test kills a sender meanwhile), then goes
on; it writes what it got to INFO.json: the digest of its own state after loading, and how.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import torch
from hivemind.p2p import P2P

from pmnode.config import RunConfig, load_config
from pmnode.core.codecs import Packet
from pmnode.core.replica_state import load_state_tensors, max_state_bytes, state_tensors
from pmnode.core.worker import StageWorker
from pmnode.net.bulk import BulkServer, fetch, pack, unpack
from pmnode.net.serving import serve
from pmnode.net.transport import TransportStats, request

P2P_OPTS = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False}
RPC = "big.state"


def trained(cfg: RunConfig) -> StageWorker:
    """Stage 0 after one optimizer step: the same bits in every process (one thread, fixed seeds)."""
    worker = StageWorker(cfg, 0, cfg.codec_spec)
    tokens = torch.arange(16).reshape(1, 16) % cfg.model.vocab_size
    out = worker.forward("mb", tokens=tokens)
    g = torch.randn(out.tensors["v"].shape, generator=torch.Generator().manual_seed(7))
    worker.backward("mb", Packet({"v": g}))
    worker.step()
    return worker


def digest(worker: StageWorker) -> str:
    return pack(*state_tensors(worker)).manifest.digest


async def serve_state(cfg: RunConfig, info: Path) -> None:
    worker = trained(cfg)
    p2p = await P2P.create(**P2P_OPTS)

    async def now(fn):  # this process has no other job: its "compute thread" is the caller
        return fn()

    bulk = BulkServer(now)

    async def handler(header, packet, caller):
        return {"kind": "ack"}, await bulk.answer(header.meta, lambda: pack(*state_tensors(worker)))

    await serve(p2p, RPC, handler, TransportStats())
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    size = sum(t.numel() * t.element_size() for t in state_tensors(worker)[0].values())
    body = {"peer": p2p.peer_id.to_base58(), "maddrs": maddrs, "digest": digest(worker), "bytes": size}
    tmp = info.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, info)
    await asyncio.Event().wait()  # until killed


async def fetch_state(cfg: RunConfig, info: Path, senders: list[Path], pause_at: int, go: Path) -> None:
    worker = StageWorker(cfg.with_overrides(train={"seed": 99}), 0, cfg.codec_spec)  # other weights
    before = digest(worker)
    peers = [json.loads(p.read_text()) for p in senders]
    p2p = await P2P.create(initial_peers=[m for p in peers for m in p["maddrs"]], **P2P_OPTS)
    asked: list[tuple[str, str]] = []

    async def ask(peer: str, meta: dict[str, int | str]) -> Packet:
        if meta.get("op") == "chunk" and meta.get("index") == pause_at and not go.exists():
            (info.parent / "paused").write_text("")
            while not go.exists():
                await asyncio.sleep(0.05)
        header = {"kind": "ack", "run": "big", "micro_batch": "state", "stage": 0, "step": 0, "meta": meta}
        reply = (await request(p2p, peer, RPC, header, Packet({}), None, timeout=30.0))[1]
        asked.append((peer, str(meta.get("op"))))  # answered
        return reply

    peer_ids = [p["peer"] for p in peers]
    got = await fetch(ask, peer_ids, {}, say=lambda s: print(s, flush=True), max_size=max_state_bytes(worker))
    load_state_tensors(worker, unpack(got.manifest, got.buffer), got.manifest.meta)
    chunks = {p["peer"]: sum(1 for who, op in asked if who == p["peer"] and op == "chunk") for p in peers}
    body = {
        "before": before,
        "after": digest(worker),
        "resumed": got.resumed,
        "chunks": len(got.manifest.chunks),
        "chunks_from": [chunks[p["peer"]] for p in peers],
    }
    info.write_text(json.dumps(body))
    await p2p.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["serve", "fetch"])
    ap.add_argument("config", type=Path)
    ap.add_argument("info", type=Path)
    ap.add_argument("senders", type=Path, nargs="*")
    ap.add_argument("--pause-at", type=int, default=-1)
    ap.add_argument("--go", type=Path, default=Path("/nonexistent"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(a.config)
    if a.role == "serve":
        asyncio.run(serve_state(cfg, a.info))
    else:
        asyncio.run(fetch_state(cfg, a.info, a.senders, a.pause_at, a.go))


if __name__ == "__main__":
    main()
