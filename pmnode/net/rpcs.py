"""Every RPC a node serves, by name, once: who may call it and what it carries.

    hello    JSON  anyone              Hello -> Hello: certificates, both ways, before data calls
    forward  data  the previous stage  a training micro-batch -> its gradient (the tail: and loss)
    eval     data  the previous stage  an evaluation batch -> the held-out loss
    done     JSON  the previous stage  Done -> Ack: training is over, sealed by the head (swarm.roles)
    prepare  JSON  a current head      Prepare -> Prepared: sum a sync step's gradients with the replicas
    apply    JSON  the head            Apply -> Applied: step with the prepared sum
    reset    JSON  the head            Reset -> Ack: drop a step's sums; its micro-batches come again
    resend   JSON  a head (to a head)  Resend -> Ack: the leading head asks another to send again
                                       micro-batches of its own batch (sync, several heads)
    grads    data  the same stage      {step} -> this replica's gradient sums of that step, in chunks
    state    data  the same stage      -> weights, optimizer state and step (catch-up, copy), in chunks
             (grads and state speak pmnode.net.bulk: open, then checksummed chunks, then close)
    outer_share  data  the same stage  a replica's compressed share of an outer round -> ack
    outer_vote   JSON  the same stage  Vote -> Decision: the round's leader says who its members are
             (replica_sync.method outer; declared in pmnode.net.outer_rpcs, served by swarm.outer_peer)

The coordinator's own RPCs (join, status) have fixed names: see net.control.JOIN_RPC and
net.status.STATUS_RPC.
"""

from __future__ import annotations

from pmnode.net.control import Ack, Applied, Apply, Done, Hello, Prepare, Prepared, Resend, Reset
from pmnode.net.services import Admission, DataRpc, JsonRpc

HELLO = JsonRpc("hello", Hello, Hello, Admission.ANYONE)
FORWARD = DataRpc("forward", Admission.PREVIOUS_STAGE, on_compute=True)
EVAL = DataRpc("eval", Admission.PREVIOUS_STAGE, on_compute=True)
DONE = JsonRpc("done", Done, Ack, Admission.PREVIOUS_STAGE)
PREPARE = JsonRpc("prepare", Prepare, Prepared, Admission.HEAD)
APPLY = JsonRpc("apply", Apply, Applied, Admission.HEAD)
RESET = JsonRpc("reset", Reset, Ack, Admission.HEAD)
RESEND = JsonRpc("resend", Resend, Ack, Admission.HEAD)
GRADS = DataRpc("grads", Admission.SAME_STAGE, run_limits=False)
STATE = DataRpc("state", Admission.SAME_STAGE, shaped=False, run_limits=False)
