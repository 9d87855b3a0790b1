"""One process of tests/test_state_transfer.py: a replica serving its stage's state through the node's
own guarded `state` RPC (swarm.replicas.Replicas.rpc_state behind net.services' SAME_STAGE admission,
after a `hello`), or a joiner copying it, over real libp2p with pmnode's transfer code (net.bulk,
core.replica_state) and its check of the digest each sender signs (net.state_digest). Certificates come
from an authority key the test writes (the coordinator's part).

    python tests/state_peer.py serve CONFIG INFO.json AUTHORITY [--pause-at N]
    python tests/state_peer.py fetch CONFIG INFO.json AUTHORITY A.json B.json
A sender given --pause-at stops in the middle of answering chunk N (it writes `mid-chunk` beside
INFO.json and never answers: the test kills it there). The joiner first asks without a `hello` (it
must be refused), then copies; it writes what it got to INFO.json: the digest of its own state after
loading, and how.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from pmnode.config import RunConfig, load_config
from pmnode.core.codecs import Packet
from pmnode.core.replica_state import load_state_tensors, max_state_bytes, state_tensors
from pmnode.core.snapshot_meta import StateMeta
from pmnode.core.worker import StageWorker
from pmnode.net.auth import Cert, Guard, Verifier, issue_cert, public_bytes
from pmnode.net.bulk import fetch, pack, unpack
from pmnode.net.callproof import Identity
from pmnode.net.control import Hello, call_json
from pmnode.net.meta import AckMeta, BulkChunk, BulkOpen, BulkRequest, Meta
from pmnode.net.rpcs import HELLO, STATE
from pmnode.net.services import ServeOptions, serve_all
from pmnode.net.state_digest import StateCheck
from pmnode.net.tokens import load_or_create_key
from pmnode.net.transport import Refused, TransportStats, request
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, WireError

P2P_OPTS = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False}
RUN = "big"


def certified(p2p: P2P, authority: Path) -> tuple[Cert, Verifier, RSAPrivateKey]:
    """This peer's stage-0 certificate, as the coordinator would issue it, and the key it names."""
    key, mine = load_or_create_key(authority), RSAPrivateKey()
    cert = issue_cert(key, RUN, p2p.peer_id.to_base58(), 0, public_bytes(mine))
    return cert, Verifier(RUN, public_bytes(key)), mine


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


async def serve_state(cfg: RunConfig, info: Path, authority: Path, pause_at: int) -> None:
    from pmnode.swarm.replicas import Replicas

    worker = trained(cfg)
    p2p = await P2P.create(**P2P_OPTS)
    cert, verifier, key = certified(p2p, authority)
    guard = Guard(verifier, 0, rate=1e6, burst=10**6, ban_after=20, ban_seconds=60)

    async def now(fn):  # this process has no other job: its "compute thread" is the caller
        return fn()

    def header(mb: str, meta: Meta | None = None) -> MessageHeader:
        return MessageHeader.of(meta or AckMeta(), run=RUN, micro_batch=mb, stage=0, step=worker.step_count)

    class Node:  # what a node serves besides: the hello that binds a certificate to the caller
        async def rpc_hello(self, req: Hello, caller: str) -> Hello:
            guard.hello(req.cert, caller)
            return Hello(cert=cert)

    class Stalling(Replicas):
        async def rpc_state(self, header: MessageHeader, packet: Packet, caller: str):  # type: ignore[override]
            if isinstance(header.meta, BulkChunk) and header.meta.index == pause_at:
                (info.parent / "mid-chunk").write_text("")
                await asyncio.Event().wait()  # killed in the middle of this chunk's answer
            return await super().rpc_state(header, packet, caller)

    runner = SimpleNamespace(worker=worker, step=worker.step_count, run=now)
    me = p2p.peer_id.to_base58()
    ctx = SimpleNamespace(runner=runner, header=header, cfg=SimpleNamespace(name=RUN), stage=0, peer_id=me)
    identity = Identity(key, lambda: cert)  # the digest it serves is signed with its certified key
    replicas = Stalling(ctx, None, None, None, identity=identity, guard=guard)  # type: ignore[arg-type]
    opts = ServeOptions(guard, TransportStats(), None, None)  # type: ignore[arg-type]  # state: unshaped
    tun = Tunnel(p2p)  # the peer's one tunnel over its P2P
    await serve_all(tun, RUN, Node(), (HELLO,), opts)
    await serve_all(tun, RUN, replicas, (STATE,), opts)
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    size = sum(t.numel() * t.element_size() for t in state_tensors(worker)[0].values())
    body = {"peer": p2p.peer_id.to_base58(), "maddrs": maddrs, "digest": digest(worker), "bytes": size}
    tmp = info.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, info)
    await asyncio.Event().wait()  # until killed


async def fetch_state(cfg: RunConfig, info: Path, authority: Path, senders: list[Path]) -> None:
    worker = StageWorker(cfg.with_overrides(train={"seed": 99}), 0, cfg.codec_spec)  # other weights
    before = digest(worker)
    peers = [json.loads(p.read_text()) for p in senders]
    p2p = await P2P.create(initial_peers=[m for p in peers for m in p["maddrs"]], **P2P_OPTS)
    cert, verifier, _ = certified(p2p, authority)
    tun = Tunnel(p2p)
    asked: list[tuple[str, str]] = []

    async def ask(peer: str, req: BulkRequest) -> Packet:
        header = MessageHeader.of(req, run=RUN, micro_batch="state", stage=0, step=0)
        try:
            reply = (await request(tun, peer, STATE.path(RUN), header, Packet({}), None, timeout=30.0))[1]
        except WireError:  # a reply stream cut short (hivemind ends a reset stream quietly), on a busy
            print("a reply came cut short: asked again", flush=True)  # machine: once more, same peer
            reply = (await request(tun, peer, STATE.path(RUN), header, Packet({}), None, timeout=30.0))[1]
        asked.append((peer, req.kind))  # answered
        return reply

    peer_ids = [p["peer"] for p in peers]
    try:  # the door is guarded: no state for a caller that has not shown a certificate of the stage
        await ask(peer_ids[0], BulkOpen())
        refused = "served"
    except Refused as e:
        refused = e.reason
    certs: dict[str, Cert] = {}
    bad: list[str] = []  # reasons a sender's copy was refused (none here: both are honest)
    for peer in peer_ids:
        reply = await call_json(tun, peer, HELLO.path(RUN), Hello(cert=cert), Hello)
        verifier.check_cert(reply.cert, peer_id=peer, stage=0)
        certs[peer] = reply.cert
    check = StateCheck(verifier, RUN, 0, certs.get, refused=lambda peer, reason: bad.append(reason))
    size = max_state_bytes(worker)
    got = await fetch(
        ask, peer_ids, BulkOpen(), StateMeta, say=lambda s: print(s, flush=True), max_size=size, check=check
    )
    load_state_tensors(worker, unpack(got.manifest, got.buffer), got.manifest.meta)
    chunks = {p["peer"]: sum(1 for who, op in asked if who == p["peer"] and op == "chunk") for p in peers}
    body = {
        "refused_without_hello": refused,
        "before": before,
        "after": digest(worker),
        "resumed": got.resumed,
        "vouched_by": sorted(p[-8:] for p in check.vouched),  # every sender's signed digest checked
        "copies_refused": bad,
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
    ap.add_argument("authority", type=Path)
    ap.add_argument("senders", type=Path, nargs="*")
    ap.add_argument("--pause-at", type=int, default=-1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(a.config)
    if a.role == "serve":
        asyncio.run(serve_state(cfg, a.info, a.authority, a.pause_at))
    else:
        asyncio.run(fetch_state(cfg, a.info, a.authority, a.senders))


if __name__ == "__main__":
    main()
