"""Members who cannot be trusted, against a real swarm on 127.0.0.1 (issue 25, item 7).

One `pmnode local-swarm` (3 stages, sync) trains undisturbed: the control. A second, identical one
trains while this test attacks it as token holders gone bad, one scenario per attack:

fake head         a stage-1 member, and a head whose slot the coordinator gave away since, send
                  prepare/apply/reset: refused as "not the head", struck, the stage-1 member banned
done              a stage-1 member tells stage 2 the run is over, unsealed and sealed with its own key
poisoning         four certified stage-1 "replicas" join the head's commits and serve gradient sums
                  with a negative count, a NaN, one element, 3e38; and 3e38 activations to stage 2
4 GB              a first message announcing 4 GB on every door of stage 1's node
replayed record   stage 1's record, stored again after a newer one and past its lifetime
status            the coordinator's status over libp2p without the page's token

Each is refused with a counted reason, the run finishes every step, and since every one of them is
refused before it touches the weights, every stage ends bit-identical to the control (weights and
optimizer state). The lying relay's scenarios are in tests/test_tunnel.py (three real p2pd daemons,
the relay trusted by the target): made-up, altered, replayed and cut-short calls, and forged answers.
Spot checks of compute (a replica that lies about its outputs, issue 25 item 5) are tested by that
item's own tests, not here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import hivemind
import psutil
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from launch import BIN, assert_no_leftovers, kill_tagged, swarm_config, tagged_env
from safetensors.torch import load_file
from test_bounds import SENT

from pmnode.config import load_config
from pmnode.core.codecs import Packet, make_codec
from pmnode.core.snapshot_meta import SumsMeta
from pmnode.core.stages import build_subspace
from pmnode.core.worker import StageWorker
from pmnode.net import tunnel
from pmnode.net.auth import Cert, Verifier, issue_cert, public_bytes
from pmnode.net.bulk import BulkServer, Snapshot, pack
from pmnode.net.callproof import Identity
from pmnode.net.control import (
    JOIN_RPC,
    Ack,
    Applied,
    Apply,
    ControlError,
    Done,
    Hello,
    JoinReply,
    JoinRequest,
    Prepare,
    Prepared,
    Reset,
    add_json_handler,
    call_json,
)
from pmnode.net.dht import announce, p2p_options, stage_records
from pmnode.net.meta import AckMeta, ActivationMeta, BulkChunk, BulkClose, BulkOpen, ErrorMeta
from pmnode.net.records import SwarmValidator
from pmnode.net.routing import StageRecord, stage_key
from pmnode.net.serving import serve
from pmnode.net.status import STATUS_RPC, StatusRequest, SwarmStatus
from pmnode.net.tokens import AUTHORITY_FILE, load_or_create_key
from pmnode.net.transport import TransportStats, call
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, WireError, decode, encode
from pmnode.swarm.roles import seal_done

# two whole swarms run in the module's fixture, which counts against its first test's time
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("adversarial"), pytest.mark.timeout(900)]
STEPS = 300
# The attacked swarm's links get this latency, so that its run outlasts the attacks however fast the
# machine: unshaped, 300 steps took 25-31 s at load 10 and the attacks ended after it (the record polled
# for was gone: the run was over). At 100 ms a step took 0.6 s, at 75 ms about 0.45 s; the attacks end
# near step 120. The latency delays messages and changes no number: the two runs stay comparable.
ATTACKED_LATENCY = "75ms"
POISONS = ("negative count", "nan", "one element", "3e38")
HTTP_TOKEN = "adversarial-page-token"


def _swarm(cfg: Path, work: Path, tag: str, token_file: Path, latency: str = "0ms") -> subprocess.Popen:
    args = ["--config", str(cfg), "--stages", "3", "--schedule", "sync", "--workdir", str(work)]
    args += ["--http-port", "0", "--http-token-file", str(token_file), "--link-latency", latency]
    return subprocess.Popen(
        [str(BIN / "pmnode"), "local-swarm", *args],
        stdout=subprocess.DEVNULL,
        stderr=work.with_suffix(".err").open("w"),
        env=tagged_env(tag),
    )


def _state(work: Path) -> dict[str, torch.Tensor]:
    """Every stage's checkpointed weights and optimizer state."""
    out = {}
    for s in range(3):
        d = work / "checkpoint" / f"stage-{s}"
        out.update({f"{s}/{k}": v for k, v in load_file(str(d / "model.safetensors")).items()})
        for i, st in torch.load(d / "optimizer.pt")["state"].items():
            out.update({f"{s}/adam/{i}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


# ---- a poisoning replica: certified for stage 1, announced online, serving poisoned sums ----------------
class Poisoner:
    """A stage-1 member that takes part in the head's commits (hello, prepare, apply, reset, done) and
    serves `grads` with a poisoned sum; it takes no micro-batches (its record says it is very slow)."""

    def __init__(self, tun: Tunnel, cert: Cert, key: RSAPrivateKey, run: str, n: int, poison: str):
        self.p2p, self.cert, self.key, self.run, self.n, self.poison = tun, cert, key, run, n, poison
        self.peer = tun.p2p.peer_id.to_base58()
        self.served = 0  # poisoned sums handed out
        self.bulk = BulkServer(self._now)

    @staticmethod
    async def _now(make: Callable[[], Snapshot]) -> Snapshot:
        return make()

    def _snapshot(self) -> Snapshot:
        g, samples = torch.zeros(self.n), 0
        if self.poison == "negative count":
            samples = -8  # would flip the sum
        elif self.poison == "nan":
            g[self.n // 2] = float("nan")
        elif self.poison == "one element":
            g = torch.full((1,), 1e3)  # would broadcast over every entry
        else:
            g.fill_(3e38)
        self.served += 1
        return pack({"g": g}, SumsMeta(samples=samples, step=0))

    async def serve(self) -> None:
        async def hello(req: Hello, caller: str) -> Hello:
            return Hello(cert=self.cert)

        async def prepare(req: Prepare, caller: str) -> Prepared:
            return Prepared(ok=True, own=[], samples=0)

        async def apply(req: Apply, caller: str) -> Applied:
            return Applied(step=req.step + 1, samples=0)

        async def ack(req: object, caller: str) -> Ack:
            return Ack()

        async def grads(header: MessageHeader, packet: Packet, caller: str) -> tuple[MessageHeader, Packet]:
            req = header.meta
            assert isinstance(req, (BulkOpen, BulkChunk, BulkClose))
            reply = MessageHeader.of(
                AckMeta(), run=header.run, micro_batch=header.micro_batch, stage=1, step=0
            )
            return reply, await self.bulk.answer(req, self._snapshot)

        async def refuse(header: MessageHeader, packet: Packet, caller: str) -> tuple[MessageHeader, Packet]:
            raise WireError("bad payload", "this replica takes no micro-batches")

        for name, kind, fn in (
            ("hello", Hello, hello),
            ("prepare", Prepare, prepare),
            ("apply", Apply, apply),
            ("reset", Reset, ack),
            ("done", Done, ack),
        ):
            await add_json_handler(self.p2p, f"{self.run}.{name}", kind, fn)
        await serve(self.p2p, f"{self.run}.grads", grads, TransportStats())
        for name in ("forward", "eval"):
            await serve(self.p2p, f"{self.run}.{name}", refuse, TransportStats())

    def record(self, state: str = "online") -> StageRecord:
        # slow and busy: the head's router never picks it for a micro-batch (net.routing.choose_peer)
        return StageRecord(
            peer_id=self.peer, stage=1, state=state, throughput=1e-6, queue=1000, time=time.time()
        )


# ---- the attacks ---------------------------------------------------------------------------------------
async def _wait_step(
    dht: hivemind.DHT, run: str, verifier: Verifier, stage: int, at_least: int
) -> StageRecord:
    for _ in range(1200):
        recs = await stage_records(dht, run, stage, verifier)
        if recs and recs[0].step >= at_least:
            return recs[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"stage {stage} never reached step {at_least}")


async def _refused(coro: object) -> str:
    try:
        await coro  # type: ignore[misc]
    except ControlError as e:
        return e.reason or str(e)
    return "accepted"


async def _join(p2p: Tunnel, coord: str, token: str, stage: int) -> tuple[JoinReply, RSAPrivateKey]:
    key = RSAPrivateKey()
    req = JoinRequest(peer_id="x", stage=stage, token=token, public_key=public_bytes(key))
    return await call_json(p2p, coord, JOIN_RPC, req, JoinReply), key


def _node_process(tag: str, stage: int) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if (
                p.environ().get("PMNODE_TEST_TAG") == tag
                and "join" in cmd
                and cmd[cmd.index("--stage") + 1] == str(stage)
            ):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError, IndexError):
            continue
    raise AssertionError(f"no node of stage {stage}")


async def _attack(work: Path, cfg_path: Path, tag: str, swarm: subprocess.Popen) -> dict:
    cfg = load_config(cfg_path)
    run, report = cfg.name, {}
    info = json.loads((work / "coordinator" / "coordinator.json").read_text())
    maddr = info["maddrs"][0]
    coord, token = maddr.rsplit("/p2p/", 1)[1], (work / "coordinator" / "join_token").read_text().strip()
    authority = load_or_create_key(work / "coordinator" / AUTHORITY_FILE)
    member = hivemind.DHT(initial_peers=[maddr], start=True, **p2p_options("127.0.0.1"))
    outsider = hivemind.DHT(initial_peers=[maddr], start=True, **p2p_options("127.0.0.1"))
    opts = {"initial_peers": [maddr], "host_maddrs": ["/ip4/127.0.0.1/tcp/0"], **p2p_options("127.0.0.1")}
    others = [Tunnel(await P2P.create(**opts)) for _ in range(1 + len(POISONS))]
    stale_p2p, poison_p2ps = others[0], others[1:]
    poisoners: list[Poisoner] = []
    try:
        p2p = Tunnel(await member.replicate_p2p())
        reply, key = await _join(p2p, coord, token, stage=1)  # a certified stage-1 member
        verifier = Verifier(run, reply.authority)
        member.add_validators([SwarmValidator(run, cfg.n_stages, reply.authority)])
        node1 = await _wait_step(member, run, verifier, 1, 3)
        node2 = (await stage_records(member, run, 2, verifier))[0]
        head = (await stage_records(member, run, 0, verifier))[0]
        report["step_before"] = node1.step

        # ---- a fake head: a stage-1 member, then a head whose slot was given to another since ----
        await call_json(p2p, node1.peer_id, f"{run}.hello", Hello(cert=reply.cert), Hello)
        fake = []
        for _ in range(2):
            for rpc, req, out in (
                ("prepare", Prepare(step=node1.step, peers=[reply.cert.peer_id]), Prepared),
                ("apply", Apply(step=node1.step), Applied),
                ("reset", Reset(step=node1.step), Ack),
            ):
                fake.append(await _refused(call_json(p2p, node1.peer_id, f"{run}.{rpc}", req, out)))
        report["fake_head"] = fake
        stale_key = RSAPrivateKey()
        stale = issue_cert(
            authority,
            run,
            stale_p2p.p2p.peer_id.to_base58(),
            0,
            public_bytes(stale_key),
            now=time.time() - 600,
        )
        await call_json(stale_p2p, node1.peer_id, f"{run}.hello", Hello(cert=stale), Hello)
        report["stale_head"] = [
            await _refused(
                call_json(stale_p2p, node1.peer_id, f"{run}.apply", Apply(step=node1.step), Applied)
            ),
            await _refused(call_json(stale_p2p, node1.peer_id, f"{run}.reset", Reset(step=node1.step), Ack)),
        ]

        # ---- `done` from a stage-1 member, and 3e38 activations, to stage 2 ----
        await call_json(p2p, node2.peer_id, f"{run}.hello", Hello(cert=reply.cert), Hello)
        mine = Identity(key, lambda: reply.cert)
        report["done"] = [
            await _refused(call_json(p2p, node2.peer_id, f"{run}.done", Done(), Ack)),
            await _refused(
                call_json(
                    p2p, node2.peer_id, f"{run}.done", seal_done(mine, run, reply.cert.peer_id, STEPS), Ack
                )
            ),
        ]
        codec = make_codec(
            cfg.codec_spec,
            d_model=cfg.model.d_model,
            vocab_size=cfg.model.vocab_size,
            subspace=build_subspace(cfg),
        )
        b, n = cfg.train.micro, cfg.train.seq_len
        act = codec.pack_activation(torch.zeros(b, n, codec.fwd.dim), torch.zeros(b, n, dtype=torch.long))  # type: ignore[attr-defined]
        for v in act.tensors.values():
            if v.is_floating_point():
                v.fill_(3e38)  # finite, so past the wire's check: the magnitude bound must refuse it
        act.tensors["last_target"] = torch.zeros(b, 1, dtype=codec.token_dtype)
        hdr = MessageHeader.of(
            ActivationMeta(samples=b), run=run, micro_batch=f"{node2.step}:0", stage=1, step=node2.step
        )
        msg = encode(hdr, Packet(dict(act.tensors)))
        got = decode(await call(p2p, node2.peer_id, f"{run}.forward", msg, 30.0))[0]
        report["huge_activation"] = got.meta.reason if isinstance(got.meta, ErrorMeta) else got.kind

        # ---- poisoning replicas: each joins stage 1's commits with one poison ----
        n_params = sum(p.numel() for p in StageWorker(cfg, 1, cfg.codec_spec).stage.parameters())
        for p, poison in zip(poison_p2ps, POISONS, strict=True):
            r, k = await _join(p, coord, token, stage=1)
            poisoners.append(Poisoner(p, r.cert, k, run, n_params, poison))
            await poisoners[-1].serve()
            for peer in (head.peer_id, node1.peer_id):  # open the connections the commits will use
                await call_json(p, peer, f"{run}.hello", Hello(cert=r.cert), Hello)
        deadline = time.monotonic() + 60
        while not all(x.served for x in poisoners) and time.monotonic() < deadline:
            for x in poisoners:
                await announce(member, run, x.record(), x.cert, x.key)
            await asyncio.sleep(1.0)
        report["poisons_served"] = {x.poison: x.served for x in poisoners}
        for x in poisoners:
            await announce(member, run, x.record("offline"), x.cert, x.key)

        # ---- a first message announcing 4 GB on every door of stage 1's node ----
        proc = _node_process(tag, 1)
        rss = proc.memory_info().rss
        doors = [tunnel.VIA_CALL, tunnel.VIA_STREAM]
        for name in ("hello", "done", "prepare", "apply", "reset", "resend"):
            doors.append(f"{run}.{name}")
        for name in ("forward", "eval", "grads", "state", "check"):  # check: the head's spot checks
            doors += [f"{run}.{name}", f"{run}.{name}.stream", f"{run}.{name}.fetch"]
        pushed, kept_open = {}, []
        for door in doors:
            try:
                pushed[door], hung_up = await _push_4gb(p2p.p2p, node1.peer_id, door)
            except Exception as e:  # a door this node does not have is refused by its daemon
                pushed[door], hung_up = -1, True
                report.setdefault("no_door", []).append(f"{door}: {type(e).__name__}")
            if not hung_up:
                kept_open.append(door)
        report["rss_growth"] = proc.memory_info().rss - rss
        report["pushed"], report["kept_open"] = pushed, kept_open
        # stream doors read through hivemind's reader in the node (net.bounded counts what it refuses);
        # unary doors are read by the node's p2pd, which refuses a message over its 4 MiB itself
        opened = sum(d == tunnel.VIA_STREAM or d.endswith((".stream", ".fetch")) for d in doors)
        # its record (every heartbeat) counts the stream messages it refused unread; one DHT read may miss
        # the record (a heartbeat late on a loaded machine): the last one seen counts until the next
        rec, deadline = None, time.monotonic() + 15
        while time.monotonic() < deadline:
            recs = await stage_records(member, run, 1, verifier)
            rec = next((r for r in recs if r.peer_id == node1.peer_id), rec)
            if rec is not None and rec.refused.get("streams", 0) >= opened:  # may stay below: see the test
                break
            await asyncio.sleep(0.2)
        if not proc.is_running():
            ended = work / "node-1.json"  # written as the node exits at the end of the run
            assert not ended.exists(), f"the run ended before the attacks did: {ended.read_text()[:200]}"
            raise AssertionError(f"stage 1's node died under the 4 GB pushes (pushed {pushed})")
        assert rec is not None, "stage 1's node is running but announced no record in 15 s after the pushes"
        report["streams_refused"], report["stream_doors"] = rec.refused.get("streams", 0), opened
        report["step_after_4gb"] = rec.step

        # ---- a replayed record: stage 1's, stored again after a newer one, and past its lifetime ----
        raw = await member.get(stage_key(run, 1), latest=True, return_future=True)
        old = raw.value[node1.peer_id]
        old_step = StageRecord.model_validate(old.value["record"]).step
        newer = await _wait_step(member, run, verifier, 1, old_step + 2)
        await outsider.store(
            stage_key(run, 1), old.value, get_dht_time() + 60, subkey=node1.peer_id, return_future=True
        )
        await outsider.store(
            stage_key(run, 1), old.value, old.expiration_time, subkey=node1.peer_id, return_future=True
        )
        seen = [r for r in await stage_records(member, run, 1, verifier) if r.peer_id == node1.peer_id]
        report["replay"] = {"old": old_step, "newer": newer.step, "seen": [r.step for r in seen]}

        # ---- the status over libp2p without the page's token ----
        report["status"] = [
            await _refused(call_json(p2p, coord, STATUS_RPC, StatusRequest(), SwarmStatus)),
            await _refused(call_json(p2p, coord, STATUS_RPC, StatusRequest(token=token), SwarmStatus)),
        ]
        ok = await call_json(p2p, coord, STATUS_RPC, StatusRequest(token=HTTP_TOKEN), SwarmStatus)
        report["status_with_token"] = ok.run

        report["step_after"] = (await stage_records(member, run, 1, verifier))[0].step
        # the poisoners stay up (their records offline) until the run ends: the head's `done` may reach them
        await asyncio.to_thread(swarm.wait, 600)
    finally:
        for p in others:
            await p.p2p.shutdown()
        member.shutdown()
        outsider.shutdown()
    return report


async def _push_4gb(p2p: P2P, peer: str, door: str) -> tuple[int, bool]:
    """Open `door`, announce a 4 GB first message, push up to SENT bytes of it, then wait (30 s at most)
    for the node to hang up; (bytes pushed, whether it hung up). Closing first, as test_bounds'
    attacker does, may cut a stream the loaded node has not read yet: p2pd drops it, nothing in the node
    ever reads its header, so nothing refuses it or counts it (seen once at load 10: 10 of 11 counted)."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), door)
    writer.write(P2P.MESSAGE_MARKER + (4 * 2**30).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    block, pushed, hung_up = bytes(2**20), 0, False
    try:
        while pushed < SENT:
            writer.write(block)
            await asyncio.wait_for(writer.drain(), 10)
            pushed += len(block)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass  # hung up on, or the node reads nothing more
    try:
        deadline = time.monotonic() + 30
        while not hung_up and time.monotonic() < deadline:
            hung_up = not await asyncio.wait_for(reader.read(2**16), max(0.1, deadline - time.monotonic()))
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        hung_up = True
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
    return pushed, hung_up


# ---- the runs -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> dict:
    tmp = tmp_path_factory.mktemp("adversarial")
    cfg = swarm_config(tmp, toy_corpus, train={"steps": STEPS, "eval_every": 1000}, swarm={"ban_after": 3})
    token_file = tmp / "http_token"
    token_file.write_text(HTTP_TOKEN + "\n")
    token_file.chmod(0o600)
    tag = uuid.uuid4().hex
    try:
        control = _swarm(cfg, tmp / "control", tag, token_file)
        assert control.wait(600) == 0, (tmp / "control.err").read_text()[-3000:]
        work = tmp / "attacked"
        swarm = _swarm(cfg, work, tag, token_file, ATTACKED_LATENCY)
        ready = [work / "coordinator" / "coordinator.json", work / "coordinator" / "join_token"]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in ready):
            assert swarm.poll() is None and time.monotonic() < deadline, work.with_suffix(".err").read_text()
            time.sleep(0.2)
        report = asyncio.run(asyncio.wait_for(_attack(work, cfg, tag, swarm), 900))
        assert swarm.wait(60) == 0, work.with_suffix(".err").read_text()[-3000:]
    finally:
        kill_tagged(tag)
    print(json.dumps(report, indent=1))
    nodes = [json.loads((work / f"node-{s}.json").read_text()) for s in range(3)]
    yield {"report": report, "nodes": nodes, "control": tmp / "control", "work": work, "tag": tag}
    assert_no_leftovers(tag)


def test_a_fake_head_is_refused_struck_and_banned(runs: dict) -> None:
    r, node1 = runs["report"], runs["nodes"][1]
    # a stage-1 member: refused as not the head, struck; its third strike bans it (ban_after 3)
    assert r["fake_head"][:3] == ["not the head"] * 3 and r["fake_head"][3:] == ["banned"] * 3
    assert r["stale_head"] == ["not the head"] * 2  # a head whose slot was given to another
    assert node1["rejected"]["not the head"] == 5 and node1["bans"] >= 1


def test_done_from_a_stage_1_member_is_refused_and_the_run_goes_on(runs: dict) -> None:
    r, nodes = runs["report"], runs["nodes"]
    assert r["done"][0] == "not the head"  # no seal
    assert r["done"][1] == "unauthorized"  # sealed with a stage-1 certificate
    assert [n["steps"] for n in nodes] == [STEPS] * 3  # every stage trained every step
    assert r["step_before"] < r["step_after"] < STEPS


def test_poisoned_sums_and_huge_activations_are_refused(runs: dict) -> None:
    r, node1, node2 = runs["report"], runs["nodes"][1], runs["nodes"][2]
    assert all(n >= 1 for n in r["poisons_served"].values()), r["poisons_served"]
    # the negative count is refused with the manifest, the others when added to the sum
    assert node1["rejected"]["bad payload"] >= 1 and node1["rejected"]["bad gradient"] >= 3
    assert r["huge_activation"].startswith("bad payload") and "beyond" in r["huge_activation"]
    assert node2["rejected"].get("not the head", 0) >= 1
    assert node1["samples_off"] == 0 and node2["samples_off"] == 0  # every step applied its whole batch


def test_a_4gb_announcement_on_every_door_is_refused(runs: dict) -> None:
    r, server = runs["report"], runs["nodes"][1]["server"]
    assert len(r["pushed"]) == 23 and r["stream_doors"] == 11
    assert r["kept_open"] == []  # every door hung up on the announcement (none read on)
    # Each stream door refused it unread. The tunnel's and the five `.fetch` doors read the 8-byte header
    # and refuse it (the record's "streams"). A `.stream` door refuses a caller its admission turns away
    # (this member, banned since the fake head's strikes) before it reads anything, counted among the
    # server's errors; hivemind's reader may have read the header first and refused it as well: a race
    # (4 of the 5 were counted in "streams" too in one run, all 5 in another).
    stream_rpcs = ("forward", "eval", "grads", "state", "check")
    assert all(server["errors"].get(k, 0) >= 1 for k in stream_rpcs), server["errors"]
    assert server["error_reasons"].get("banned") == len(stream_rpcs), server["error_reasons"]
    assert r["stream_doors"] - len(stream_rpcs) <= r["streams_refused"] <= r["stream_doors"]
    assert [d for d, v in r["pushed"].items() if v < 0] == ["tiny.resend"]  # served by heads only
    assert r["rss_growth"] < 64 * 2**20
    assert all(v < 96 * 2**20 for v in r["pushed"].values())  # hung up on before it all went


def test_a_replayed_record_does_not_bring_back_an_older_state(runs: dict) -> None:
    replay = runs["report"]["replay"]
    assert replay["seen"] and all(s >= replay["newer"] for s in replay["seen"]), replay


def test_the_status_over_libp2p_needs_the_pages_token(runs: dict) -> None:
    r = runs["report"]
    assert r["status"] == ["unauthorized", "unauthorized"]  # none, and the join token is not the page's
    assert r["status_with_token"] == load_config(runs["work"] / "config.yaml").name


def test_the_honest_weights_equal_the_clean_run_bit_for_bit(runs: dict) -> None:
    a, b = _state(runs["control"]), _state(runs["work"])
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
