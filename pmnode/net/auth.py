"""Who may take part in a run, and how every peer checks it.

Trust chain:

* The coordinator holds the run's **join token** (a secret shown once to the operator) and an RSA
  **authority key** (kept in its state dir, so a restarted coordinator signs with the same key).
* A node proves it knows the token in its join request, over libp2p's encrypted channel to the
  coordinator's peer id, and sends the public half of a fresh RSA key. The coordinator answers with
  a **membership certificate**: run, peer id, stage, that public key and an expiry, signed by the
  authority. The node renews it at half-life (RENEW_BEFORE): the swarm outlives a 3 h coordinator outage.
* Data RPCs: libp2p authenticates the caller's peer id on every stream (Noise/TLS), so a caller
  needs to show its certificate once, in a `hello`; after that every forward/eval/done call is
  admitted by the `Guard` against the certificate bound to that authenticated peer id: right run,
  upstream stage, not expired, not banned, within its rate. Nothing is added to data messages.
* DHT records that steer the swarm carry proof too: a stage record is signed by the node's key and
  carries the node's certificate; the run config record is signed by the authority. Every pmnode
  DHT peer runs `SwarmValidator`, so it refuses to store or return a record that fails the check,
  and readers check again before they use a record (net/records.py).

The token and the authority key on disk: net/tokens.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from typing import Any

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import BaseModel, ConfigDict

from pmnode.errors import PmnodeError

CERT_TTL = 6 * 3600.0  # seconds a membership certificate is valid
# A node asks for a new certificate once less than this is left, and again at every heartbeat until it
# gets one. The data path never needs the coordinator, so the swarm trains through a coordinator outage
# of up to RENEW_BEFORE (3 h; less one heartbeat at worst) with the certificates it holds.
RENEW_BEFORE = CERT_TTL / 2


class AuthError(PmnodeError):
    """A peer failed a membership check; `reason` is a short fixed phrase, for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


WRONG_TOKEN = "wrong join token"  # the coordinator's reason for refusing a join


# ---- keys and certificates -----------------------------------------------------------------------------
def public_bytes(key: RSAPrivateKey) -> str:
    pem: bytes = key.get_public_key().to_bytes()  # hivemind is untyped here (pyproject.toml)
    return pem.decode()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Cert(BaseModel):
    """A membership certificate: the authority vouches that `peer_id` serves `stage` of `run`."""

    model_config = ConfigDict(extra="forbid")

    run: str
    peer_id: str
    stage: int
    slot: int = 0  # a head's slot (stage 0): which part of the data order it reads; 0 elsewhere
    public_key: str  # the node's record-signing key (OpenSSH format)
    expires: float  # unix time
    sig: str = ""

    def body(self) -> bytes:
        return canonical(self.model_dump(exclude={"sig"}))


def renewal_due(cert: Cert, now: float) -> bool:
    """Whether a node holding `cert` should ask the coordinator for a new one now."""
    return cert.expires - now < RENEW_BEFORE


def issue_cert(
    authority: RSAPrivateKey,
    run: str,
    peer_id: str,
    stage: int,
    public_key: str,
    ttl: float = CERT_TTL,
    slot: int = 0,
    now: float | None = None,
) -> Cert:
    expires = (time.time() if now is None else now) + ttl
    cert = Cert(run=run, peer_id=peer_id, stage=stage, slot=slot, public_key=public_key, expires=expires)
    cert.sig = authority.sign(cert.body()).decode()
    return cert


class Verifier:
    """Checks certificates and signatures against one run's authority key. Picklable (DHT process)."""

    def __init__(self, run: str, authority_public_key: str):
        self.run, self.authority_public_key = run, authority_public_key
        self._pub: RSAPublicKey | None = None
        self._keys: dict[str, RSAPublicKey] = {}

    def __getstate__(self) -> dict[str, str]:
        return {"run": self.run, "authority_public_key": self.authority_public_key}

    def __setstate__(self, state: dict[str, str]) -> None:
        Verifier.__init__(self, state["run"], state["authority_public_key"])

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


# ---- admission of data-plane calls -------------------------------------------------------------------------
MAX_PEERS = 4096  # entries per table of the Guard (certificates, buckets, strikes, bans)


def _room(table: dict[Any, Any], key: object) -> None:
    """Make room for `key` in a per-peer table: beyond MAX_PEERS the entry written longest ago goes, so
    many peer ids (any token holder can make more) cannot grow a node's memory without end."""
    while key not in table and len(table) >= MAX_PEERS:
        del table[next(iter(table))]


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
        # slot -> the newest head certificate shown for it: the coordinator issues a slot to one head at
        # a time, so an older certificate of that slot is a head it has since replaced (roles: HEAD)
        self.heads: dict[int, Cert] = {}

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
        _room(self.members, caller)
        self.members[caller] = cert
        self.saw_head(cert)

    def saw_head(self, cert: Cert) -> None:
        """Keep the newest head certificate of each slot (a later issue expires later: the TTL is fixed)."""
        known = self.heads.get(cert.slot)
        if cert.stage == 0 and (known is None or cert.expires > known.expires):
            _room(self.heads, cert.slot)
            self.heads[cert.slot] = cert

    def admit_head(self, caller: str) -> str | None:
        """None to admit `caller` as a current head (prepare, apply, reset, resend); else the reason.
        A certified member of another stage, or a head whose slot the coordinator has since given to
        another peer, is refused and struck: it holds a certificate, so the call is no honest mistake."""
        reason = self._refuse(caller, 0, time.monotonic())
        cert = self.members.get(caller)
        if reason is None and cert is not None:
            newest = self.heads.get(cert.slot, cert)
            if newest.peer_id != caller and newest.expires > cert.expires:
                reason = "not the head"  # its slot was given to another head since
        elif reason == "unauthorized" and cert is not None and cert.expires >= time.time():
            reason = "not the head"  # a certified member of another stage
        if reason is not None:
            self.rejected[reason] += 1
            if reason == "not the head":
                self.strike(caller)
        return reason

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
        _room(self.buckets, caller)
        if tokens < 1.0:
            self.buckets[caller] = (tokens, now)
            return "rate limited"
        self.buckets[caller] = (tokens - 1.0, now)
        return None

    def is_banned(self, peer: str) -> bool:
        """Whether `peer` is banned here now (whom this node neither serves nor takes state from)."""
        until = self.banned.get(peer)
        return until is not None and time.monotonic() < until

    def strike(self, caller: str) -> bool:
        """Count one bad message from `caller`; True if this one got it banned."""
        now = time.monotonic()
        _room(self.strikes, caller)
        q = self.strikes.setdefault(caller, deque())
        q.append(now)
        while q and now - q[0] > 60.0:
            q.popleft()
        if len(q) >= self.ban_after and caller not in self.banned:
            for gone in [p for p, until in self.banned.items() if until <= now]:
                del self.banned[gone]
            _room(self.banned, caller)
            self.banned[caller] = now + self.ban_seconds
            self.bans += 1
            q.clear()
            return True
        return False
