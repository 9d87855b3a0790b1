"""Who may take part in a run, and how every peer checks it.

Trust chain:

* The coordinator holds the run's **join token** (a secret shown once to the operator) and an RSA
  **authority key** (kept in its state dir, so a restarted coordinator signs with the same key).
* A node proves it knows the token in its join request, over libp2p's encrypted channel to the
  coordinator's peer id, and sends the public half of a fresh RSA key. The coordinator answers with
  a **membership certificate**: run, peer id, stage, that public key and an expiry, signed by the
  authority. The node renews it at half-life.
* Data RPCs: libp2p authenticates the caller's peer id on every stream (Noise/TLS), so a caller
  needs to show its certificate once, in a `hello`; after that every forward/eval/done call is
  admitted by the `Guard` against the certificate bound to that authenticated peer id: right run,
  upstream stage, not expired, not banned, within its rate. Nothing is added to data messages.
* DHT records that steer the swarm carry proof too: a stage record is signed by the node's key and
  carries the node's certificate; the run config record is signed by the authority. Every pmnode
  DHT peer runs `SwarmValidator`, so it refuses to store or return a record that fails the check,
  and readers check again before they use a record.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import BaseModel, ConfigDict, ValidationError

from pmnode.errors import PmnodeError
from pmnode.net.routing import RECORD_TTL, StageRecord, config_key, stage_key

JOIN_TOKEN_ENV = "PMNODE_JOIN_TOKEN"
TOKEN_FILE = "join_token"  # in the coordinator's state dir, mode 0600
AUTHORITY_FILE = "authority.key"
CERT_TTL = 3600.0  # seconds a membership certificate is valid; nodes renew at half-life


class AuthError(PmnodeError):
    """A peer failed a membership check; `reason` is a short fixed phrase, for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


WRONG_TOKEN = "wrong join token"  # the coordinator's reason for refusing a join


# ---- the join token ------------------------------------------------------------------------------------
def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def write_secret(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only, atomically, without a moment of wider access."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_token_file(path: Path) -> str:
    if not path.is_file():
        raise PmnodeError(f"token file {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PmnodeError(f"token file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    token = path.read_text().strip()
    if not token:
        raise PmnodeError(f"token file {path} is empty")
    return token


def resolve_token(token_file: Path | None, fallback: Path | None = None) -> str | None:
    """The join token from --token-file, else $PMNODE_JOIN_TOKEN, else a readable `fallback` file.

    Never from a command-line value: other users can read a process's arguments.
    """
    if token_file is not None:
        return read_token_file(token_file)
    if os.environ.get(JOIN_TOKEN_ENV):
        return os.environ[JOIN_TOKEN_ENV].strip()
    if fallback is not None and fallback.is_file():
        return read_token_file(fallback)
    return None


# ---- keys and certificates -----------------------------------------------------------------------------
def load_or_create_key(path: Path) -> RSAPrivateKey:
    """The coordinator's authority key: created once (mode 0600), then reused across restarts."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.exists():
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
    else:
        key = RSAPrivateKey()
        write_secret(path, key.to_bytes())
    return key


def public_bytes(key: RSAPrivateKey) -> str:
    return key.get_public_key().to_bytes().decode()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Cert(BaseModel):
    """A membership certificate: the authority vouches that `peer_id` serves `stage` of `run`."""

    model_config = ConfigDict(extra="forbid")

    run: str
    peer_id: str
    stage: int
    public_key: str  # the node's record-signing key (OpenSSH format)
    expires: float  # unix time
    sig: str = ""

    def body(self) -> bytes:
        return _canonical(self.model_dump(exclude={"sig"}))


def issue_cert(
    authority: RSAPrivateKey, run: str, peer_id: str, stage: int, public_key: str, ttl: float = CERT_TTL
) -> Cert:
    cert = Cert(run=run, peer_id=peer_id, stage=stage, public_key=public_key, expires=time.time() + ttl)
    cert.sig = authority.sign(cert.body()).decode()
    return cert


class Verifier:
    """Checks certificates and signatures against one run's authority key. Picklable (DHT process)."""

    def __init__(self, run: str, authority_public_key: str):
        self.run, self.authority_public_key = run, authority_public_key
        self._pub: RSAPublicKey | None = None
        self._keys: dict[str, RSAPublicKey] = {}

    def __getstate__(self) -> dict:
        return {"run": self.run, "authority_public_key": self.authority_public_key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["run"], state["authority_public_key"])  # type: ignore[misc]

    @property
    def authority(self) -> RSAPublicKey:
        if self._pub is None:
            self._pub = RSAPublicKey.from_bytes(self.authority_public_key.encode())
        return self._pub

    def node_key(self, cert: Cert) -> RSAPublicKey:
        if cert.public_key not in self._keys:
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[cert.public_key] = RSAPublicKey.from_bytes(cert.public_key.encode())
        return self._keys[cert.public_key]

    def check_cert(
        self, cert: Cert, *, peer_id: str | None = None, stage: int | None = None, now: float | None = None
    ) -> None:
        """Raise AuthError unless the authority signed `cert` for this run (and peer, and stage)."""
        if cert.run != self.run:
            raise AuthError("unauthorized", f"certificate for run {cert.run!r}")
        if peer_id is not None and cert.peer_id != peer_id:
            raise AuthError("unauthorized", "certificate of another peer")
        if stage is not None and cert.stage != stage:
            raise AuthError("unauthorized", f"certificate for stage {cert.stage}, not {stage}")
        if cert.expires < (now or time.time()):
            raise AuthError("unauthorized", "certificate expired")
        try:
            ok = self.authority.verify(cert.body(), cert.sig.encode())
        except Exception:
            ok = False
        if not ok:
            raise AuthError("unauthorized", "certificate not signed by this run's coordinator")


# ---- signed DHT records --------------------------------------------------------------------------------
class SignedRecord(BaseModel):
    """A stage record as stored in the DHT: the record, its author's certificate, the author's signature."""

    model_config = ConfigDict(extra="forbid")

    record: dict[str, Any]
    cert: Cert
    sig: str


def sign_record(rec: StageRecord, cert: Cert, key: RSAPrivateKey) -> dict[str, Any]:
    body = rec.model_dump()
    return SignedRecord(record=body, cert=cert, sig=key.sign(_canonical(body)).decode()).model_dump()


def open_record(value: Any, verifier: Verifier, stage: int, subkey: str) -> StageRecord:
    """The StageRecord inside a signed DHT value, or AuthError/ValidationError if it fails a check."""
    signed = SignedRecord.model_validate(value)
    verifier.check_cert(signed.cert, peer_id=subkey, stage=stage)
    rec = StageRecord.model_validate(signed.record)
    if rec.peer_id != subkey or rec.stage != stage:
        raise AuthError("unauthorized", "record names another peer or stage than its key")
    if not verifier.node_key(signed.cert).verify(_canonical(signed.record), signed.sig.encode()):
        raise AuthError("unauthorized", "record signature does not verify")
    return rec


def sign_config(config: dict[str, Any], fingerprint: str | None, authority: RSAPrivateKey) -> dict[str, Any]:
    body = {"config": config, "fingerprint": fingerprint}
    return {**body, "sig": authority.sign(_canonical(body)).decode()}


def open_config(value: Any, verifier: Verifier) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"config", "fingerprint", "sig"}:
        raise AuthError("unauthorized", "malformed config record")
    body = {"config": value["config"], "fingerprint": value["fingerprint"]}
    if not verifier.authority.verify(_canonical(body), str(value["sig"]).encode()):
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
                # a captured record cannot be kept alive past its own announcement's lifetime
                if record.expiration_time > rec.time + RECORD_TTL + 60:
                    return False
            return True
        except (AuthError, ValidationError, ValueError, TypeError, KeyError):
            return False
        except Exception:  # a validator must answer, never raise into the DHT
            return False

    @property
    def priority(self) -> int:
        return 10


# ---- admission of data-plane calls -------------------------------------------------------------------------
class Guard:
    """Decides, before a byte is decoded, whether a caller may use this node's data handlers.

    A caller must have shown a valid certificate (`hello`) for the stage right upstream of ours, must
    not be banned, and gets a token bucket of `rate` calls/s (burst `burst`). Each payload the node
    rejects is a strike; `ban_after` strikes within a minute ban the caller for `ban_seconds`.
    """

    def __init__(
        self,
        verifier: Verifier,
        stage: int,
        *,
        rate: float,
        burst: int,
        ban_after: int,
        ban_seconds: float,
    ):
        self.verifier, self.stage = verifier, stage
        self.rate, self.burst, self.ban_after, self.ban_seconds = rate, burst, ban_after, ban_seconds
        self.members: dict[str, Cert] = {}
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill)
        self.strikes: dict[str, deque[float]] = {}
        self.banned: dict[str, float] = {}  # caller -> until (monotonic)
        self.rejected: Counter[str] = Counter()  # reason -> count
        self.bans = 0

    def hello(self, cert: Cert, caller: str) -> None:
        until = self.banned.get(caller)
        if until is not None and time.monotonic() < until:
            self.rejected["banned"] += 1
            raise AuthError("banned")
        try:
            self.verifier.check_cert(cert, peer_id=caller)
        except AuthError as e:
            self.rejected[e.reason] += 1
            self.strike(caller)
            raise
        self.members[caller] = cert

    def admit(self, caller: str, from_stage: int | None = None) -> str | None:
        """None to admit; otherwise the reason to refuse. `from_stage`: the stage callers must serve."""
        now = time.monotonic()
        reason = self._refuse(caller, self.stage - 1 if from_stage is None else from_stage, now)
        if reason is not None:
            self.rejected[reason] += 1
        return reason

    def _refuse(self, caller: str, from_stage: int, now: float) -> str | None:
        until = self.banned.get(caller)
        if until is not None:
            if now < until:
                return "banned"
            del self.banned[caller]
        cert = self.members.get(caller)
        if cert is None or cert.expires < time.time():
            return "unauthorized"
        if cert.stage != from_stage:
            return "unauthorized"
        tokens, last = self.buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[caller] = (tokens, now)
            return "rate limited"
        self.buckets[caller] = (tokens - 1.0, now)
        return None

    def strike(self, caller: str) -> bool:
        """Count one bad message from `caller`; True if this one got it banned."""
        now = time.monotonic()
        q = self.strikes.setdefault(caller, deque())
        q.append(now)
        while q and now - q[0] > 60.0:
            q.popleft()
        if len(q) >= self.ban_after and caller not in self.banned:
            self.banned[caller] = now + self.ban_seconds
            self.bans += 1
            q.clear()
            return True
        return False
