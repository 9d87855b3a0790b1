"""The reaper: a watchdog that outlives `pmnode local-swarm` by a moment, so that its processes don't.

local-swarm starts it first, in a session of its own (no terminal signal reaches it), and writes to
its stdin the process group of every process it starts ("+PGID"), stops ("-PGID"), and "exit" once
it has stopped them all itself. If stdin closes without "exit" (local-swarm was killed, or its
cleanup was cut short), the reaper stops every group still listed: SIGINT, then SIGKILL after
`grace` seconds. It imports nothing from pmnode, so it is up in milliseconds.

    python -m pmnode.swarm.reaper GRACE
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(pgids: set[int], sig: int) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def reap(pgids: set[int], grace: float) -> None:
    _signal(pgids, signal.SIGINT)  # a node's clean exit: it saves its checkpoint, leaves the DHT
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(g) for g in pgids):
        time.sleep(0.1)
    _signal(pgids, signal.SIGKILL)


def main(argv: list[str]) -> int:
    grace = float(argv[0]) if argv else 10.0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgids: set[int] = set()
    for line in sys.stdin:
        word = line.strip()
        if word == "exit":
            return 0
        if word.startswith("+"):
            pgids.add(int(word[1:]))
        elif word.startswith("-"):
            pgids.discard(int(word[1:]))
    reap(pgids, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
