"""Membership without a network: tokens, certificates, signed records, the DHT validator, the guard."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from pmnode.core.codecs import make_codec
from pmnode.errors import PmnodeError
from pmnode.net.auth import AuthError, Guard, Verifier, issue_cert, public_bytes
from pmnode.net.checks import GradScale, check_eval_batch, check_gradient, check_micro_batch
from pmnode.net.records import SwarmValidator, open_config, open_record, sign_config, sign_record
from pmnode.net.routing import StageRecord, config_key, stage_key
from pmnode.net.tokens import JOIN_TOKEN_ENV, load_or_create_key, read_token_file, resolve_token, write_secret
from pmnode.net.wire import MessageHeader, WireError

AUTHORITY, NODE, OTHER = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
RUN = "r"


def verifier() -> Verifier:
    return Verifier(RUN, public_bytes(AUTHORITY))


def cert(peer: str = "peerA", stage: int = 1, ttl: float = 60.0, key: RSAPrivateKey = NODE):
    return issue_cert(AUTHORITY, RUN, peer, stage, public_bytes(key), ttl)


# ---- the join token ----------------------------------------------------------------------------------------
def test_token_file_must_be_private(tmp_path: Path) -> None:
    p = tmp_path / "tok"
    write_secret(p, b"s3cret\n")
    assert oct(p.stat().st_mode & 0o777) == "0o600" and read_token_file(p) == "s3cret"
    os.chmod(p, 0o644)
    with pytest.raises(PmnodeError, match=r"readable by others .*chmod 600"):
        read_token_file(p)
    with pytest.raises(PmnodeError, match="does not exist"):
        read_token_file(tmp_path / "none")


def test_token_order_file_then_env_then_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f, fb = tmp_path / "f", tmp_path / "fb"
    write_secret(f, b"from-file")
    write_secret(fb, b"from-fallback")
    monkeypatch.delenv(JOIN_TOKEN_ENV, raising=False)
    assert resolve_token(None) is None
    assert resolve_token(None, fb) == "from-fallback"
    monkeypatch.setenv(JOIN_TOKEN_ENV, "from-env")
    assert resolve_token(None, fb) == "from-env"
    assert resolve_token(f, fb) == "from-file"


def test_authority_key_is_kept(tmp_path: Path) -> None:
    p = tmp_path / "authority.key"
    a = load_or_create_key(p)
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert public_bytes(load_or_create_key(p)) == public_bytes(a)


# ---- certificates and records ------------------------------------------------------------------------------
def test_certificate_checks() -> None:
    v, c = verifier(), cert()
    v.check_cert(c, peer_id="peerA", stage=1)
    for kwargs, match in (
        ({"peer_id": "peerB"}, "another peer"),
        ({"stage": 2}, "stage 1, not 2"),
    ):
        with pytest.raises(AuthError, match=match):
            v.check_cert(c, **kwargs)
    with pytest.raises(AuthError, match="expired"):
        v.check_cert(cert(ttl=-1))
    with pytest.raises(AuthError, match="not signed"):
        v.check_cert(c.model_copy(update={"stage": 0}))  # edited after signing
    forged = issue_cert(OTHER, RUN, "peerA", 1, public_bytes(NODE))  # signed by a stranger
    with pytest.raises(AuthError, match="not signed"):
        v.check_cert(forged)
    with pytest.raises(AuthError, match="run"):
        Verifier("other-run", public_bytes(AUTHORITY)).check_cert(c)


def _record(peer: str = "peerA", stage: int = 1, **kw: object) -> StageRecord:
    return StageRecord(peer_id=peer, stage=stage, step=3, time=time.time(), **kw)


def test_signed_record_round_trip_and_tampering() -> None:
    v, c = verifier(), cert()
    value = sign_record(_record(), c, NODE)
    assert open_record(value, v, 1, "peerA").step == 3
    bad = {**value, "record": {**value["record"], "throughput": 1e9}}  # a lie added after signing
    with pytest.raises(AuthError, match="signature"):
        open_record(bad, v, 1, "peerA")
    with pytest.raises(AuthError):
        open_record(value, v, 2, "peerA")  # stage 1's certificate under stage 2's key
    with pytest.raises(AuthError):
        open_record(value, v, 1, "peerB")  # under someone else's subkey
    with pytest.raises(AuthError, match="signature"):
        open_record(sign_record(_record(), c, OTHER), v, 1, "peerA")  # signed with a key not certified


def _dht_record(key: str, subkey: object, value: object, expiration: float | None = None) -> DHTRecord:
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(subkey),
        MSGPackSerializer.dumps(value),
        expiration if expiration is not None else time.time() + 6,
    )


def test_dht_validator() -> None:
    val = SwarmValidator(RUN, 3, public_bytes(AUTHORITY))
    rec, c = _record(), cert()
    assert val.validate(_dht_record(stage_key(RUN, 1), "peerA", sign_record(rec, c, NODE)))
    assert not val.validate(_dht_record(stage_key(RUN, 1), "peerA", rec.model_dump()))  # unsigned
    assert not val.validate(_dht_record(stage_key(RUN, 2), "peerA", sign_record(rec, c, NODE)))
    assert not val.validate(_dht_record(stage_key(RUN, 1), "peerA", b"\x00garbage"))
    # a captured record cannot be stored for longer than its announcement lives
    assert not val.validate(
        _dht_record(stage_key(RUN, 1), "peerA", sign_record(rec, c, NODE), time.time() + 3600)
    )
    cfg = sign_config({"name": RUN}, "fp", AUTHORITY)
    assert val.validate(_dht_record(config_key(RUN), None, cfg))
    assert open_config(cfg, verifier())["fingerprint"] == "fp"
    assert not val.validate(_dht_record(config_key(RUN), None, sign_config({"name": RUN}, "fp", NODE)))
    assert not val.validate(_dht_record(config_key(RUN), None, {**cfg, "fingerprint": "x"}))
    assert val.validate(_dht_record("some.other.key", None, {"anything": 1}))  # not ours to judge
    # it travels to the DHT's own process by pickle
    import pickle

    assert pickle.loads(pickle.dumps(val)).validate(_dht_record(config_key(RUN), None, cfg))


# ---- the guard ---------------------------------------------------------------------------------------------
def test_guard_admits_only_certified_upstream_members() -> None:
    g = Guard(verifier(), stage=2, rate=1e9, burst=10, ban_after=3, ban_seconds=60)
    assert g.admit("peerA") == "unauthorized"  # never said hello
    g.hello(cert("peerA", stage=1), "peerA")
    assert g.admit("peerA") is None
    g.hello(cert("peerB", stage=0), "peerB")
    assert g.admit("peerB") == "unauthorized"  # a member, but not of the stage before ours
    with pytest.raises(AuthError):
        g.hello(cert("peerA", stage=1), "peerC")  # someone else's certificate
    assert g.admit("peerC") == "unauthorized"
    assert g.rejected["unauthorized"] == 4


def test_guard_rate_limit_and_ban() -> None:
    g = Guard(verifier(), stage=1, rate=1.0, burst=5, ban_after=3, ban_seconds=0.2)
    g.hello(cert("p", stage=0), "p")
    assert [g.admit("p") for _ in range(6)] == [None] * 5 + ["rate limited"]
    assert [g.strike("p") for _ in range(3)] == [False, False, True]
    assert g.admit("p") == "banned" and g.bans == 1
    time.sleep(0.25)
    g.buckets.clear()
    assert g.admit("p") is None  # a ban ends


# ---- ids and gradients -------------------------------------------------------------------------------------
def _h(mb: str, **kw: object) -> MessageHeader:
    fields: dict = {"kind": "activation", "run": RUN, "micro_batch": mb, "stage": 0, "step": 0, **kw}
    return MessageHeader(**fields)


def test_micro_batch_ids() -> None:
    args = {"run": RUN, "from_stage": 0, "n_micro": 2, "step": 10, "window": 3, "seen": {"10:0": {0}}}
    assert check_micro_batch(_h("10:0", meta={"attempt": 7}), **args) == 10  # a retry: new try, same id
    assert check_micro_batch(_h("10:1"), **args) == 10
    assert check_micro_batch(_h("13:0"), **args) == 13
    for mb, reason in (
        ("10:0", "replay"),
        ("14:0", "unknown micro-batch"),
        ("6:1", "unknown micro-batch"),
        ("10:2", "unknown micro-batch"),
        ("x", "unknown micro-batch"),
        ("1:2:3", "unknown micro-batch"),
    ):
        with pytest.raises(WireError) as e:
            check_micro_batch(_h(mb), **args)
        assert e.value.reason == reason, mb
    for kw in ({"kind": "gradient"}, {"run": "other"}, {"stage": 1}):
        with pytest.raises(WireError, match="not for us"):
            check_micro_batch(_h("10:1", **kw), **args)
    check_eval_batch(_h("eval:3"), run=RUN, from_stage=0, n_batches=4)
    with pytest.raises(WireError, match="unknown micro-batch"):
        check_eval_batch(_h("eval:4"), run=RUN, from_stage=0, n_batches=4)


@pytest.mark.parametrize("spec", ["dense", "int8", "topk:4", "subspace", "subspace:int8", "subspace:int4"])
def test_gradient_checks(spec: str) -> None:
    from pmnode.core.subspace import Subspace

    sub = Subspace(d_model=32, rank=8, vocab_size=64, seed=0) if spec.startswith("subspace") else None
    codec = make_codec(spec, d_model=32, vocab_size=64, subspace=sub)
    dim = codec.bwd.dim  # type: ignore[attr-defined]
    scale = GradScale(ratio=100.0, warmup=4)
    for _ in range(6):
        check_gradient(codec.pack_gradient(torch.randn(2, 5, dim)), codec, (2, 5), scale)
    with pytest.raises(WireError, match="bad gradient"):
        check_gradient(codec.pack_gradient(torch.randn(2, 6, dim)), codec, (2, 5), scale)  # wrong shape
    with pytest.raises(WireError, match="over 100x the median"):
        check_gradient(codec.pack_gradient(1e5 * torch.randn(2, 5, dim)), codec, (2, 5), scale)
    assert len(scale.norms) == 6  # the dropped ones do not move the scale
    with pytest.raises(WireError, match="bad gradient"):
        GradScale().check(float("nan"))
