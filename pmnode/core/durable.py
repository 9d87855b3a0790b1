"""Writes that survive a power cut: data reaches the disk before the rename that makes it current.

A rename is atomic for readers, but without fsync a crash right after it can leave the new name
pointing at an empty or half-written file (ext4 and xfs delay data, not metadata). So every file is
fsynced before its rename, and the directory after it, so the rename itself is on disk too.

A full disk is an ordinary event on a volunteer's machine, not a bug: `disk_problem` turns the
OSError into one line that names the directory, for the node's log, panel and record.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then `root` itself (a checkpoint directory about to be renamed)."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(root)


def atomic_write(path: Path, write: Callable[[Path], object], tmp: Path | None = None) -> None:
    """Write `path` through `tmp` (default PATH.PID.tmp): write, fsync, rename, fsync the directory.
    A failed write leaves the previous file as it was and no temporary behind."""
    tmp = tmp or path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def disk_problem(e: OSError, where: Path) -> str:
    """One line for a failed write: a full disk said as such, anything else with its reason."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: cannot write under {where}"
    return f"cannot write under {where}: {e.strerror or e}"
