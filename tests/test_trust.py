"""Strangers and garbage against a real swarm on 127.0.0.1.

One `pmnode local-swarm` (3 stages, sync) trains undisturbed: the control. A second, identical one
trains while this test, as a certified stage-0 member gone bad, sends it well over 1,000 malformed
payloads, and as an outsider without the join token tries to join, to be served and to write swarm
records. The second swarm must finish with weights and optimizer state bit-identical to the control.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from launch import BIN, assert_no_leftovers, kill_tagged, swarm_config, tagged_env
from safetensors.torch import load_file

from pmnode.config import load_config
from pmnode.core.codecs import Packet, make_codec
from pmnode.core.stages import build_subspace
from pmnode.net.auth import Verifier, issue_cert, public_bytes
from pmnode.net.control import JOIN_RPC, ControlError, Hello, JoinReply, JoinRequest, call_json
from pmnode.net.dht import p2p_options, stage_records
from pmnode.net.meta import ActivationMeta, ErrorMeta, GradientMeta
from pmnode.net.records import SwarmValidator, sign_config, sign_record
from pmnode.net.routing import StageRecord, config_key, stage_key
from pmnode.net.transport import TransportError, call
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, decode, encode

pytestmark = pytest.mark.slow
STEPS = 400  # long enough that the fuzzing happens while the swarm trains


def _config(tmp: Path, corpus: Path) -> Path:
    # Rate limits and bans would refuse most of the garbage before it is even decoded; lift them so
    # every payload goes through the checks (the guard has its own tests).
    return swarm_config(
        tmp,
        corpus,
        train={"steps": STEPS, "eval_every": 200},
        swarm={"peer_rate": 1e6, "ban_after": 10**6},
        # the fuzz below is written against the fp32 codec's float tensor "v" (NaN, dtype, shape)
        subspace={"preset": "paper"},
    )


def _swarm(cfg: Path, work: Path, tag: str) -> subprocess.Popen:
    args = ["--config", str(cfg), "--stages", "3", "--schedule", "sync", "--workdir", str(work)]
    return subprocess.Popen(
        [str(BIN / "pmnode"), "local-swarm", *args],
        stdout=subprocess.DEVNULL,
        stderr=work.with_suffix(".err").open("w"),
        env=tagged_env(tag),
    )


def _weights(work: Path) -> dict[str, torch.Tensor]:
    out = {}
    for s in range(3):
        d = work / "checkpoint" / f"stage-{s}"
        out.update({f"{s}/{k}": v for k, v in load_file(str(d / "model.safetensors")).items()})
        opt = torch.load(d / "optimizer.pt")
        for i, st in opt["state"].items():
            out.update({f"{s}/adam/{i}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


# ---- the garbage ------------------------------------------------------------------------------------------
def payloads(cfg_path: Path, run: str, step: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, message) pairs, every one of which stage 1 must refuse; over 1,000 of them."""
    cfg = load_config(cfg_path)
    codec = make_codec(
        cfg.codec_spec,
        d_model=cfg.model.d_model,
        vocab_size=cfg.model.vocab_size,
        subspace=build_subspace(cfg),
    )
    b, n, k = cfg.train.micro, cfg.train.seq_len, codec.fwd.dim  # type: ignore[attr-defined]
    vocab = cfg.model.vocab_size

    def good(batch: int = b, length: int = n) -> dict[str, torch.Tensor]:
        p = codec.pack_activation(torch.randn(batch, length, k), torch.randint(0, vocab, (batch, length)))
        p.tensors["last_target"] = torch.randint(0, vocab, (batch, 1)).to(codec.token_dtype)
        return dict(p.tensors)

    def msg(
        tensors: dict[str, torch.Tensor],
        mb: str = "999999:0",
        kind: str = "activation",
        samples: int | None = None,
        **hdr: Any,
    ) -> bytes:
        held = next(iter(tensors.values())).shape[0] if tensors else 1
        meta = (
            ActivationMeta(samples=held if samples is None else samples)
            if kind == "activation"
            else GradientMeta()
        )
        fields = {"run": run, "micro_batch": mb, "stage": 0, "step": step, **hdr}
        return encode(MessageHeader.of(meta, **fields), Packet(tensors))

    out: list[tuple[str, bytes]] = []
    valid = msg(good())
    for _ in range(150):
        out.append(("random bytes", rng.randbytes(rng.randrange(0, 3000))))
    for _ in range(100):
        out.append(("truncated", valid[: rng.randrange(0, len(valid) - 1)]))
    for _ in range(50):
        head = json.dumps({"kind": "activation", "run": run, "stage": "one", "tensors": 7}).encode()
        out.append(("bad header", struct.pack("<I", len(head)) + head))
        out.append(("bad length", struct.pack("<I", 10**9) + valid[4:]))
    for i in range(60):  # wrong dtypes, one tensor at a time
        t = good()
        name = ["v", "tokens", "last_target"][i % 3]
        t[name] = t[name].to(torch.float16 if name == "v" else torch.int32)
        out.append(("wrong dtype", msg(t)))
    for i in range(100):  # wrong shapes
        t = good()
        if i % 4 == 0:
            t["v"] = torch.randn(b, n, k + 1)
        elif i % 4 == 1:
            t = good(batch=b + 1 + i % 5)
        elif i % 4 == 2:
            t = good(length=n + 1 + i)
        else:
            t["v"] = t["v"].reshape(-1)
        out.append(("wrong shape", msg(t)))
    for i in range(100):  # NaN and Inf
        t = good()
        t["v"].view(-1)[rng.randrange(t["v"].numel())] = [float("nan"), float("inf"), -float("inf")][i % 3]
        out.append(("non-finite", msg(t)))
    for i in range(60):  # oversized: claimed or real
        t = good()
        if i % 3 == 0:  # a header that claims 32 TiB; the bytes never come
            head = {"kind": "activation", "run": run, "micro_batch": "1:0", "stage": 0, "step": 0}
            head["tensors"] = [{"name": "v", "dtype": "float32", "shape": [2**20, 2**20, 8]}]
            raw = json.dumps(head).encode()
            out.append(("huge claim", struct.pack("<I", len(raw)) + raw))
        elif i % 3 == 1:
            out.append(("huge batch", msg(good(batch=64 + i))))
        else:
            out.append(("many tensors", msg({**t, **{f"x{j}": torch.zeros(1) for j in range(10)}})))
    for _ in range(2):  # above the node's message limit: streamed, cut off by the server
        out.append(("oversized stream", msg({"v": torch.randn(2**20)})))
    for i in range(100):  # ids the stage can't be expecting
        mb = ["garbage", "-1:0", "999999:0", f"{step}:99", "eval:0", "1:2:3", ""][i % 7]
        out.append(("unknown id", msg(good(), mb=mb)))
    for i in range(50):  # replays of ids trained on long ago
        out.append(("old id", msg(good(), mb=f"{i % max(step, 1)}:{i % 2}")))
    for i in range(100):  # well-formed, but not for this stage
        hdr = [{"run": "other"}, {"stage": 1}, {"kind": "gradient"}, {"samples": 3}][i % 4]
        out.append(("not for us", msg(good(), **hdr)))
    for _ in range(50):  # token ids outside the vocabulary are caught even when the dtype holds them
        t = good()
        if codec.token_dtype.is_floating_point is False and torch.iinfo(codec.token_dtype).max >= vocab:
            t["tokens"][0, 0] = vocab
        else:
            t["tokens"] = t["tokens"].to(torch.int64) + vocab
        out.append(("token range", msg(t)))
    return out


def _reason(header: MessageHeader) -> str:
    """An error reply's reason ("" for any other reply)."""
    return header.meta.reason if isinstance(header.meta, ErrorMeta) else ""


def _with_id(message: bytes, mb: str) -> bytes:
    """The same message under another micro-batch id."""
    header, packet = decode(message)
    return encode(header.model_copy(update={"micro_batch": mb}), packet)


# ---- the scenario -----------------------------------------------------------------------------------------
async def _attack(maddr: str, token: str, cfg_path: Path, work: Path) -> dict:
    cfg = load_config(cfg_path)
    run, rng, report = cfg.name, random.Random(0), {}
    coord = maddr.rsplit("/p2p/", 1)[1]
    member = hivemind.DHT(initial_peers=[maddr], start=True, **p2p_options("127.0.0.1"))
    outsider = hivemind.DHT(initial_peers=[maddr], start=True, **p2p_options("127.0.0.1"))
    try:
        p2p, out_p2p = Tunnel(await member.replicate_p2p()), Tunnel(await outsider.replicate_p2p())
        key = RSAPrivateKey()
        join = JoinRequest(peer_id="x", stage=0, token=token, public_key=public_bytes(key))
        reply = await call_json(p2p, coord, JOIN_RPC, join, JoinReply)
        verifier = Verifier(run, reply.authority)
        member.add_validators([SwarmValidator(run, cfg.n_stages, reply.authority)])

        # wait until stage 1 has taken a few steps, so there are ids to replay
        for _ in range(600):
            recs = await stage_records(member, run, 1, verifier)
            if recs and recs[0].step >= 3:
                break
            await asyncio.sleep(0.1)
        stage1, stage2 = recs[0], (await stage_records(member, run, 2, verifier))[0]
        report["step_before"] = stage1.step

        # ---- the outsider: no token ----
        with pytest.raises(ControlError, match="wrong join token"):
            bad = JoinRequest(peer_id="x", stage=1, token="guess", public_key=public_bytes(key))
            await call_json(out_p2p, coord, JOIN_RPC, bad, JoinReply)
        some = payloads(cfg_path, run, stage1.step, rng)[0][1]
        replies = [await call(out_p2p, stage1.peer_id, f"{run}.forward", some, 10.0)]
        forged = issue_cert(RSAPrivateKey(), run, outsider.peer_id.to_base58(), 0, public_bytes(key))
        with pytest.raises(ControlError, match="unauthorized"):  # a certificate it signed itself
            await call_json(out_p2p, stage1.peer_id, f"{run}.hello", Hello(cert=forged), Hello)
        with pytest.raises(ControlError, match="unauthorized"):  # the member's, stolen
            await call_json(out_p2p, stage1.peer_id, f"{run}.hello", Hello(cert=reply.cert), Hello)
        replies.append(await call(out_p2p, stage1.peer_id, f"{run}.forward", some, 10.0))
        replies.append(await call(out_p2p, stage1.peer_id, f"{run}.eval", some, 10.0))
        report["outsider"] = [_reason(decode(r)[0]) for r in replies]
        # records: an unsigned one, one signed by a key nobody certified, the member's stage-0
        # certificate on a stage-1 record, and a fake run config
        fake = StageRecord(peer_id=outsider.peer_id.to_base58(), stage=1, throughput=1e6, time=time.time())
        exp = get_dht_time() + 5
        await outsider.store(
            stage_key(run, 1), fake.model_dump(), exp, subkey=fake.peer_id, return_future=True
        )
        await outsider.store(
            stage_key(run, 1),
            sign_record(fake, forged, key),
            exp,
            subkey=fake.peer_id,
            return_future=True,
        )
        mine = fake.model_copy(update={"peer_id": member.peer_id.to_base58()})
        await member.store(
            stage_key(run, 1),
            sign_record(mine, reply.cert, key),
            exp,
            subkey=mine.peer_id,
            return_future=True,
        )
        fake_cfg = sign_config({"name": run, "train": {"lr": 100}}, None, key)
        await outsider.store(config_key(run), fake_cfg, exp, return_future=True)

        # ---- the member gone bad: garbage at stage 1 (and some at stage 2, which it may not call) ----
        await call_json(p2p, stage1.peer_id, f"{run}.hello", Hello(cert=reply.cert), Hello)
        sent: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for kind, data in payloads(cfg_path, run, stage1.step, rng):
            try:
                r = await call(p2p, stage1.peer_id, f"{run}.forward", data, 30.0)
                header, _ = decode(r)
                assert header.kind == "error", (kind, header)
                reasons[_reason(header).split(":")[0]] += 1
            except TransportError as e:  # the server hangs up on an oversized upload
                assert kind == "oversized stream", (kind, e)
                reasons["hung up"] += 1
            sent[kind] += 1
        # replays of the ids stage 1 has just trained on: its refusal of an unknown id names its step
        valid = next(d for k, d in payloads(cfg_path, run, stage1.step, rng) if k == "old id")
        probe = _with_id(valid, "999999:0")
        for i in range(100):
            r = decode(await call(p2p, stage1.peer_id, f"{run}.forward", probe, 30.0))[0]
            now = int(_reason(r).rsplit("at step ", 1)[1])
            replay = _with_id(valid, f"{max(now - 1, 0)}:{i % 2}")
            r = decode(await call(p2p, stage1.peer_id, f"{run}.forward", replay, 30.0))[0]
            reasons[_reason(r).split(":")[0]] += 1
            sent["replay"] += 1
        for _, data in payloads(cfg_path, run, stage1.step, rng)[:40]:
            r = await call(p2p, stage1.peer_id, f"{run}.eval", data, 30.0)
            assert decode(r)[0].kind == "error"
            r = await call(p2p, stage2.peer_id, f"{run}.forward", data, 30.0)
            assert _reason(decode(r)[0]) == "unauthorized"  # stage 0 may not skip stage 1
            sent["eval and wrong stage"] += 2
        report.update(sent=dict(sent), reasons=dict(reasons))

        # ---- what the swarm sees now ----
        after = await stage_records(member, run, 1, verifier)
        report["stage1_peers"] = [r.peer_id for r in after]
        report["stage1_real"] = stage1.peer_id
        report["step_after"] = after[0].step if after else -1
        raw = await member.get(stage_key(run, 1), latest=True, return_future=True)
        report["raw_subkeys"] = sorted(raw.value) if raw is not None else []
        got = await member.get(config_key(run), latest=True, return_future=True)
        report["config"] = got.value["config"] if got is not None else None
        report["steps"] = STEPS
    finally:
        member.shutdown()
        outsider.shutdown()
    return report


def test_fuzz_and_outsiders_leave_the_weights_bit_identical(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = _config(tmp_path, toy_corpus)
    tag = uuid.uuid4().hex
    try:
        control = _swarm(cfg, tmp_path / "control", tag)
        assert control.wait(600) == 0, (tmp_path / "control.err").read_text()[-3000:]

        work = tmp_path / "fuzzed"
        swarm = _swarm(cfg, work, tag)
        info, tok = work / "coordinator" / "coordinator.json", work / "coordinator" / "join_token"
        deadline = time.monotonic() + 120
        while not (info.exists() and tok.exists()):
            assert swarm.poll() is None and time.monotonic() < deadline, (
                work.with_suffix(".err")
            ).read_text()
            time.sleep(0.2)
        maddr = json.loads(info.read_text())["maddrs"][0]
        report = asyncio.run(_attack(maddr, tok.read_text().strip(), cfg, work))
        assert swarm.wait(600) == 0, work.with_suffix(".err").read_text()[-3000:]
    finally:
        kill_tagged(tag)

    print(json.dumps({k: report[k] for k in ("sent", "reasons", "outsider", "step_before", "step_after")}))
    # the outsider got nothing
    assert report["outsider"] == ["unauthorized"] * 3
    assert report["stage1_peers"] == [report["stage1_real"]]
    assert report["raw_subkeys"] == [report["stage1_real"]]  # refused by the DHT peers themselves
    signed = load_config(work / "config.yaml").model_dump(mode="json")
    served = report["config"]
    # the coordinator adds the prepared data's hashes (checked at join) to the config it signs
    signed["data"].update({k: served["data"][k] for k in ("manifest_sha256", "tokenizer_sha256")})
    assert served == signed
    # the garbage: over 1,000 pieces, each refused, while the swarm went on training
    assert sum(report["sent"].values()) >= 1000
    assert report["reasons"]["replay"] >= 90  # ids it had just trained on (a few may leave the window)
    assert report["reasons"]["bad payload"] >= 300  # dtypes, shapes, token ids, samples, headers
    assert sum(report["reasons"].values()) == sum(v for k, v in report["sent"].items() if "eval" not in k)
    assert report["step_after"] > report["step_before"] and report["step_after"] < report["steps"]
    node1 = json.loads((work / "node-1.json").read_text())
    assert node1["steps"] == STEPS
    refused = sum(node1["server"]["errors"].values())
    assert refused >= sum(report["sent"].values()) - 40 + 3  # stage 1's share, plus the outsider's calls
    # and none of it touched the model
    a, b = _weights(tmp_path / "control"), _weights(work)
    assert a.keys() == b.keys() and len(a) > 10
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == []
    assert_no_leftovers(tag)
