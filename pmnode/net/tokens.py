"""The run's secrets on disk and in the environment: the join token (never on a command line, since
other users can read a process's arguments) and the coordinator's authority key, both mode 0600."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from hivemind.utils.crypto import RSAPrivateKey

from pmnode.core.durable import fsync_path
from pmnode.errors import PmnodeError

JOIN_TOKEN_ENV = "PMNODE_JOIN_TOKEN"
TOKEN_FILE = "join_token"  # in the coordinator's state dir, mode 0600
AUTHORITY_FILE = "authority.key"


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
        f.flush()
        os.fsync(f.fileno())  # the authority key must not come back empty after a power cut
    os.replace(tmp, path)
    fsync_path(path.parent)


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


def load_or_create_key(path: Path) -> RSAPrivateKey:
    """The coordinator's authority key: created once (mode 0600), then reused across restarts."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.exists():
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
    else:
        key = RSAPrivateKey()
        write_secret(path, key.to_bytes())
    return key
