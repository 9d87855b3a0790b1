"""Signed DHT records: a stage record is signed by its node's key and carries the node's
certificate; the run config record is signed by the authority. `SwarmValidator` runs in every pmnode
DHT peer, so a record that fails its proof is neither stored nor returned.

Replays: a signed record is public (anyone can read it in the DHT) and stays valid, so a captured one
could be stored again. It may not outlive its announcement (time + RECORD_TTL, with RECORD_SLACK for
clock differences), and each validator remembers the newest time it saw per signer and refuses an
older record of the same signer: an old state cannot be brought back while a newer one is known."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import BaseModel, ConfigDict, ValidationError

from pmnode.net.auth import AuthError, Cert, Verifier, canonical
from pmnode.net.routing import RECORD_TTL, StageRecord, config_key, stage_key

RECORD_SLACK = 2.0  # seconds a record's expiry may lie past its own time + RECORD_TTL (clock differences)
MAX_SIGNERS = 4096  # signers whose newest record time a validator remembers; the least recent go first


class SignedRecord(BaseModel):
    """A stage record as stored in the DHT: the record, its author's certificate, the author's signature."""

    model_config = ConfigDict(extra="forbid")

    record: dict[str, Any]
    cert: Cert
    sig: str


def sign_record(rec: StageRecord, cert: Cert, key: RSAPrivateKey) -> dict[str, Any]:
    body = rec.model_dump()
    return SignedRecord(record=body, cert=cert, sig=key.sign(canonical(body)).decode()).model_dump()


def open_record(value: Any, verifier: Verifier, stage: int, subkey: str) -> StageRecord:
    """The StageRecord inside a signed DHT value, or AuthError/ValidationError if it fails a check."""
    signed = SignedRecord.model_validate(value)
    verifier.check_cert(signed.cert, peer_id=subkey, stage=stage)
    rec = StageRecord.model_validate(signed.record)
    if rec.peer_id != subkey or rec.stage != stage:
        raise AuthError("unauthorized", "record names another peer or stage than its key")
    if rec.slot != signed.cert.slot:  # a head's slot is the coordinator's word, not its own
        raise AuthError("unauthorized", "record names another head slot than its certificate")
    if not verifier.node_key(signed.cert).verify(canonical(signed.record), signed.sig.encode()):
        raise AuthError("unauthorized", "record signature does not verify")
    return rec


def sign_config(config: dict[str, Any], fingerprint: str | None, authority: RSAPrivateKey) -> dict[str, Any]:
    body = {"config": config, "fingerprint": fingerprint}
    return {**body, "sig": authority.sign(canonical(body)).decode()}


def open_config(value: Any, verifier: Verifier) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"config", "fingerprint", "sig"}:
        raise AuthError("unauthorized", "malformed config record")
    body = {"config": value["config"], "fingerprint": value["fingerprint"]}
    if not verifier.authority.verify(canonical(body), str(value["sig"]).encode()):
        raise AuthError("unauthorized", "config record not signed by this run's coordinator")
    return body


class SwarmValidator(RecordValidatorBase):
    """Installed in every pmnode DHT peer: refuses run-config and stage records that fail their proof.

    Keys arrive hashed (DHTIDs), so the run's keys are hashed once up front; other keys pass untouched.
    Checked when a peer asks us to store a record and when a peer returns one to us.
    """

    def __init__(self, run: str, n_stages: int, authority_public_key: str):
        self.run, self.n_stages = run, n_stages
        self.verifier = Verifier(run, authority_public_key)
        self._config_id = DHTID.generate(source=config_key(run)).to_bytes()
        self._stage_ids = {DHTID.generate(source=stage_key(run, s)).to_bytes(): s for s in range(n_stages)}
        self.newest: OrderedDict[tuple[int, str], float] = OrderedDict()  # (stage, signer) -> record time

    def _not_older(self, stage: int, signer: str, at: float) -> bool:
        """False for a record older than one this validator already saw from the same signer."""
        key = (stage, signer)
        if at < self.newest.get(key, at):
            return False
        self.newest[key] = at
        self.newest.move_to_end(key)
        while len(self.newest) > MAX_SIGNERS:
            self.newest.popitem(last=False)
        return True

    def validate(self, record: DHTRecord) -> bool:
        try:
            if record.key == self._config_id:
                open_config(MSGPackSerializer.loads(record.value), self.verifier)
            elif record.key in self._stage_ids:
                subkey = MSGPackSerializer.loads(record.subkey)
                if not isinstance(subkey, str):
                    return False
                rec = open_record(
                    MSGPackSerializer.loads(record.value), self.verifier, self._stage_ids[record.key], subkey
                )
                # a captured record cannot be kept alive past its own announcement's lifetime...
                if record.expiration_time > rec.time + RECORD_TTL + RECORD_SLACK:
                    return False
                # ...nor bring back an older state of its signer than one already seen
                return self._not_older(self._stage_ids[record.key], subkey, rec.time)
            return True
        except (AuthError, ValidationError, ValueError, TypeError, KeyError):
            return False
        except Exception:  # a validator must answer, never raise into the DHT
            return False

    @property
    def priority(self) -> int:
        return 10
