"""Where the data plane's tensor work runs: never on the event loop.

Decoding a message copies its bytes and scans them for NaN and Inf; encoding one copies the tensors
into the message; the checks of a payload read it whole. On the event loop each of these stalls
every RPC, heartbeat and DHT call of the node for as long as it takes. So pmnode.net takes a `Run`,
a runner-like callable that runs a function elsewhere and awaits its result: a node passes its
stage's compute thread (pmnode.swarm.runner.StageRunner.run), where every tensor of the stage is
touched one job at a time; code without a stage (tests, tools, RPCs that only move bytes) uses
`off_loop`, the loop's default executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from pmnode.core.codecs import Packet
from pmnode.net.wire import MessageHeader

T = TypeVar("T")

# A check of a decoded message, run in the job that decoded it; it raises WireError to refuse it.
Check = Callable[[MessageHeader, Packet], None]


class Run(Protocol):
    """run(fn, *args): fn(*args) on another thread, awaited."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


async def off_loop(fn: Callable[..., T], /, *args: Any) -> T:
    """fn(*args) on the loop's default executor: any thread but the event loop's."""
    return await asyncio.to_thread(fn, *args)
