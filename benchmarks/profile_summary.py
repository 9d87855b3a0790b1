r"""Summarise a `py-spy record --format raw --threads` profile of a node: busy share per thread, hot frames.

py-spy record -p $(pgrep -f "pmnode join.*--stage 1 ") -d 15 -r 200 --format raw --threads -o prof.txt
python -m benchmarks.profile_summary prof.txt
"""

from __future__ import annotations

import collections
import sys

IDLE = ("_worker (concurrent/futures/thread.py", "EpollSelector.select", "socket.accept", "Connection._recv")


def main(path: str) -> None:
    threads: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, n = line.rstrip().rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        threads[thread] += int(n)
        if frames[-1].startswith(IDLE):
            idle[thread] += int(n)
        for fn in {f.split(":")[0] + ")" for f in frames[1:] if "pmnode/" in f}:
            inclusive[(thread, fn)] += int(n)
    print("| thread | busy |\n|---|---|")
    for t, c in threads.most_common():
        print(f"| {t} | {100 * (c - idle[t]) / c:.0f}% |")
    print("\n| thread | frame (inclusive) | share of that thread |\n|---|---|---|")
    for (t, fn), c in inclusive.most_common(25):
        print(f"| {t} | `{fn}` | {100 * c / threads[t]:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
