"""Roles only the right member can play (issue 25, item 2).

prepare, apply, reset, resend   only a current head: a stage-0 certificate whose slot the coordinator
                                has not given to another peer since (net.services Admission.HEAD,
                                net.auth Guard.admit_head); a member of any other stage is refused
                                and struck
done                            only the head: it seals the end of the run with its own key
                                (`seal_done`); every stage checks the seal (`check_done`) and passes
                                it on unchanged, so a member of a stage before cannot stop the stages
                                after it, and a seal from an earlier run of the same name is stale
state copy                      only from a certified replica of the same stage (Downstream.greet
                                checks the named peer's certificate before a byte is asked), and
                                checked before it is loaded: layout, finiteness, step
                                (core.replica_state.check_state)
"""

from __future__ import annotations

import time

from pmnode.net.auth import AuthError, Guard, Verifier
from pmnode.net.callproof import Identity
from pmnode.net.control import Done, DoneSeal

DONE_FRESH = 600.0  # seconds a head's seal of the end passes down the stages (then it is stale)
NOT_THE_HEAD = "not the head"


def seal_done(me: Identity, run: str, head: str, step: int, now: float | None = None) -> Done:
    """The head's `done`: the end of the run, signed with its node key."""
    seal = DoneSeal(run=run, head=head, step=step, time=time.time() if now is None else now, cert=me.cert())
    seal.sig = me.key.sign(seal.body()).decode()
    return Done(seal=seal)


def check_done(done: Done, verifier: Verifier, guard: Guard, caller: str, now: float | None = None) -> Done:
    """The `done` a stage may act on and pass on: sealed by a current head of this run, lately.
    AuthError otherwise, counted by the guard and a strike against `caller` (who sent it here)."""
    now = time.time() if now is None else now
    try:
        seal = done.seal
        if seal is None:
            raise AuthError(NOT_THE_HEAD, "a done without the head's seal")
        if seal.run != verifier.run:
            raise AuthError(NOT_THE_HEAD, f"a done of run {seal.run!r}")
        verifier.check_cert(seal.cert, peer_id=seal.head, stage=0, now=now)
        if abs(now - seal.time) > DONE_FRESH:
            raise AuthError(NOT_THE_HEAD, f"a done sealed {now - seal.time:.0f} s from now")
        try:
            ok = verifier.node_key(seal.cert).verify(seal.body(), seal.sig.encode())
        except Exception:
            ok = False
        if not ok:
            raise AuthError(NOT_THE_HEAD, "the done's seal does not verify")
        newest = guard.heads.get(seal.cert.slot)
        if newest is not None and newest.peer_id != seal.head and newest.expires > seal.cert.expires:
            raise AuthError(NOT_THE_HEAD, "a done sealed by a head whose slot was given to another")
    except AuthError as e:
        guard.rejected[e.reason] += 1
        guard.strike(caller)
        raise
    return done
