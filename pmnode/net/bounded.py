"""A size limit on every message a hivemind stream carries, checked before a byte of it is read.

hivemind 1.1.12 frames each protobuf message of a stream as an 8-byte length and the body, and reads
it (`P2P.receive_raw_data`) with `readexactly(length)`: a length the sender chose. It does so in its
own receive loop, up to `max_prefetch` messages ahead of the handler, so no handler can look at the
length first. Any peer that opens a stream to any door (a tunnel door, the forwarder's, a data
RPC's `.stream`, the averager's) could announce 4 GB and make this process buffer whatever it sends.

`install()` replaces that reader, process-wide and for both directions (requests a node serves,
replies it reads), with one that refuses a length above MAX_MESSAGE at once: the stream is closed
and the refusal counted in `REFUSED`, and the reader has taken nothing but the 8-byte header.
Legitimate messages are far smaller: pmnode streams in CHUNK_SIZE (1 MiB) pieces, hivemind's
averager in parts of 512 KiB, its other streams in pieces of at most DEFAULT_MAX_MSG_SIZE (4 MiB).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from hivemind.p2p import P2P

# Bytes one stream message may announce: hivemind's largest piece and its framing. hivemind reads up to
# max_prefetch (5) messages ahead of a handler, so one stream holds ~24 MiB at most before it says no.
MAX_MESSAGE = 4 * 2**20 + 2**16

REFUSED: Counter[str] = Counter()  # reason -> stream messages refused in this process


class OversizedMessage(EOFError):
    """A stream message announced more than MAX_MESSAGE bytes: the stream is dropped unread.

    An EOFError, as a stream cut off: callers already handle those (net.transport counts them)."""


async def receive_bounded(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_MESSAGE:
        REFUSED["stream message too large"] += 1
        raise OversizedMessage(f"a stream message announced {length} bytes, over {MAX_MESSAGE}")
    return await reader.readexactly(length)


def install() -> None:
    """Make every hivemind stream in this process read through `receive_bounded` (idempotent)."""
    P2P.receive_raw_data = staticmethod(receive_bounded)
