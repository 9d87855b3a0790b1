"""An outsider for tests/test_averaging_auth.py: a stock hivemind peer that knows a stage's averaging
prefix and tries every averaging door of its replicas, with a member's certificate it read off the DHT.

    python tests/outsider.py CONFIG COORDINATOR_JSON OUT.json [--stage 1] [--rounds 3]

It joins the run's DHT (no join token: it never asked the coordinator), waits until two replicas of
the stage are online, then for `--rounds` of their averaging rounds steps a DecentralizedAverager with
the replicas' prefix and tensor schema (so only pmnode's checks can refuse it), and calls the replicas'
rpc_download_state and rpc_aggregate_part directly. It writes what it got to OUT.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter

from pmnode.config import load_config
from pmnode.core.worker import StageWorker
from pmnode.net.control import CoordinatorInfo
from pmnode.net.records import SignedRecord
from pmnode.net.routing import stage_key
from pmnode.swarm.averaging import averaging_prefix, next_round


def online_replicas(dht: hivemind.DHT, run: str, stage: int) -> list[SignedRecord]:
    found = dht.get(stage_key(run, stage), latest=True)
    recs = []
    if found is not None and isinstance(found.value, dict):
        for sub in found.value.values():
            rec = SignedRecord.model_validate(sub.value)
            if rec.record["state"] == "online":
                recs.append(rec)
    return recs


async def knock(p2p: hivemind.P2P, prefix: str, peer: str) -> dict[str, object]:
    """Ask one replica for its state and hand it a part of a made-up group, directly."""
    stub = DecentralizedAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=prefix)
    got = 0
    try:
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        async for msg in aiter_with_timeout(stream, 10.0):
            got += len(msg.tensor_part.buffer)
    except Exception as e:
        return {"state_bytes": got, "state_error": repr(e)[:200]}
    part = averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"\0" * 20)
    codes = []
    try:
        replies = await stub.rpc_aggregate_part(as_aiter(part))
        async for msg in aiter_with_timeout(replies, 10.0):
            codes.append(averaging_pb2.MessageCode.Name(msg.code))
    except Exception as e:
        codes.append(f"error {e!r}"[:200])
    return {"state_bytes": got, "part_replies": codes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("coordinator", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cfg = load_config(a.config)
    info = CoordinatorInfo.model_validate_json(a.coordinator.read_text())
    dht = hivemind.DHT(
        initial_peers=info.maddrs,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
        nat_port_map=False,
        auto_nat=False,
    )
    deadline = time.monotonic() + 120
    while len(members := online_replicas(dht, cfg.name, a.stage)) < 2:
        assert time.monotonic() < deadline, "the stage never had two online replicas"
        time.sleep(1.0)
    stolen = members[0].cert  # a real member's certificate: public in the DHT, bound to its peer id
    worker = StageWorker(cfg, a.stage, cfg.codec_spec)  # the replicas' tensor schema
    tensors = [p.detach().clone() for p in worker.stage.parameters() if p.requires_grad]
    prefix = averaging_prefix(cfg.name, a.stage)
    averager = DecentralizedAverager(
        tensors, dht, start=True, prefix=prefix, min_matchmaking_time=1.0, request_timeout=0.5
    )
    before = [t.clone() for t in tensors]
    groups, errors = [], []
    for _ in range(a.rounds):
        at = next_round(cfg.swarm.average_period)
        try:
            group = averager.step(
                gather={"cert": stolen.model_dump(mode="json"), "final": False},
                scheduled_time=at,
                timeout=at - get_dht_time() + 5.0,
                allow_retries=True,
            )
        except Exception as e:
            group = None
            errors.append(repr(e)[:200])
        groups.append(0 if group is None else len(group))
    with averager.get_tensors() as now:
        unchanged = all(torch.equal(x, y) for x, y in zip(now, before, strict=True))

    async def knock_all() -> list[dict[str, object]]:
        p2p = await dht.replicate_p2p()
        return [await knock(p2p, prefix, m.cert.peer_id) for m in members]

    knocks = asyncio.run(knock_all())
    averager.shutdown()
    dht.shutdown()
    result = {
        "members": [m.cert.peer_id for m in members],
        "groups": groups,
        "step_errors": errors,
        "tensors_unchanged": unchanged,
        "knocks": knocks,
    }
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
