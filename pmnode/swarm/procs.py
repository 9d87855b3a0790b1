"""The processes of a local swarm, each in a session of its own, and how they are always stopped.

A process is started with SIGINT and SIGTERM blocked in this one, and registered (in the list and
with the reaper, pmnode.swarm.reaper) before they are unblocked, so an interrupt at any moment of
start-up finds it listed. Stopping is all at once: SIGINT to every session, one shared grace
period, then SIGKILL to whatever is left, with further interrupts held off until it is done. If
this process dies before that (SIGKILL), the reaper stops them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pmnode.errors import PmnodeError
from pmnode.net.control import CoordinatorInfo

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (they are delivered then, not lost)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _unblocked() -> None:
    """In a new child, before exec: it must get the signals this process holds off while it starts it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Proc:
    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], log: Path, file: IO[str], stage: int | None
    ):
        self.name, self.p, self.log, self.file, self.stage = name, popen, log, file, stage
        self.started = time.monotonic()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)  # the whole session: the process, its DHT child and p2pd


class Launcher:
    """Starts processes, keeps them listed with the reaper, stops them all."""

    def __init__(self, grace: float = 10.0):
        self.grace = grace
        self.procs: list[Proc] = []
        with signals_held():
            self.reaper = subprocess.Popen(
                [sys.executable, "-m", "pmnode.swarm.reaper", str(grace)],
                stdin=subprocess.PIPE,
                text=True,
                start_new_session=True,
                preexec_fn=_unblocked,
            )

    def _tell(self, word: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            assert self.reaper.stdin is not None
            self.reaper.stdin.write(word + "\n")
            self.reaper.stdin.flush()

    def start(
        self,
        name: str,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        stage: int | None = None,
    ) -> Proc:
        with signals_held():
            file = log.open("w")
            popen = subprocess.Popen(
                args,
                stdout=file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                preexec_fn=_unblocked,
            )
            proc = Proc(name, popen, log, file, stage)
            self.procs.append(proc)
            self._tell(f"+{popen.pid}")
        return proc

    def forget(self, proc: Proc) -> None:
        """A process that left on purpose (churn) and was reaped."""
        if proc.p.poll() is not None:
            self._tell(f"-{proc.p.pid}")

    def stop_all(self) -> None:
        """SIGINT to every session, one grace period for all, SIGKILL to what is left; no interrupt
        cuts this short."""
        with signals_held():
            live = [p for p in self.procs if p.p.poll() is None]
            for p in live:
                p.signal(signal.SIGINT)
            deadline = time.monotonic() + self.grace
            for p in live:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.p.wait(max(0.0, deadline - time.monotonic()))
            for p in self.procs:
                p.signal(signal.SIGKILL)  # whatever is left of the session, even if the leader exited
                p.p.wait()
                p.file.close()
            self._tell("exit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.reaper.wait(5)


def wait_coordinator(path: Path, proc: Proc, timeout: float) -> CoordinatorInfo:
    """The address file a coordinator writes when it is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            with contextlib.suppress(ValueError):  # half written
                return CoordinatorInfo.model_validate_json(path.read_text())
        if proc.p.poll() is not None:
            raise PmnodeError(f"{proc.name} exited early; see {proc.log}:\n{proc.log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise PmnodeError(f"{proc.name} did not come up within {timeout:.0f}s; see {proc.log}")
