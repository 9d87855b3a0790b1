"""The `pmnode` and `coordinator` command lines run inside the test process, as their console scripts
run them: the same `main` (pmnode.errors.run_cli around the real typer app), the same argv, exit codes,
stdout and stderr, an uncaught exception printed as the interpreter prints it.

Why: a subprocess per case spends 2-4 s of CPU importing torch and hivemind before it parses a flag.
What a fresh process adds (the console-script wrapper, output at import time) is covered once, by the
real-subprocess test in test_cli.py. Each call puts back what a command may change in this process
(argv, environment, working directory, torch threads and RNG, SIGINT/SIGTERM handlers), so the tests
that share an xdist worker see none of it; and a command that leaves a child process behind fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import psutil
import torch


def pmnode(*args: str, env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """`pmnode ARGS`; `env`: variables to set for the call, None to unset one."""
    from pmnode.cli.main import main

    return invoke(main, "pmnode", args, env)


def coordinator(*args: str) -> subprocess.CompletedProcess[str]:
    from coordinator.cli import main

    return invoke(main, "coordinator", args, None)


def one_line(r: subprocess.CompletedProcess[str], *needles: str, fields: int = 0) -> None:
    """A user's mistake: exit code 1, no traceback, and stderr is exactly one line, `error: ...`; or,
    for a config that fails validation, that line and then `fields` indented lines, one per field."""
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 + fields and lines[0].startswith("error:"), r.stderr
    assert all(line.startswith("  ") for line in lines[1:]), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def invoke(
    main: Callable[[], None], prog: str, args: tuple[str, ...], env: Mapping[str, str | None] | None
) -> subprocess.CompletedProcess[str]:
    argv = [prog, *args]
    out, err = _stream(), _stream()
    with _restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = list(argv)
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        code = _exit_code(main, err)
        out.flush()
        err.flush()
    return subprocess.CompletedProcess(argv, code, _text(out), _text(err))


def _exit_code(main: Callable[[], None], err: io.TextIOWrapper) -> int:
    """What the process would exit with; an exception that escapes `main` (--verbose re-raises) is
    printed with its traceback and exits 1, as the interpreter does."""
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=err)
        return 1
    except Exception:
        traceback.print_exc(file=err)
        return 1
    return 0


def _stream() -> io.TextIOWrapper:
    # A text stream over bytes, as a pipe is: click and rich write to it as to a real stderr.
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="replace", write_through=True)


def _text(s: io.TextIOWrapper) -> str:
    return s.buffer.getvalue().decode("utf-8")  # type: ignore[attr-defined]


@contextlib.contextmanager
def _restored() -> Iterator[None]:
    argv, environ, cwd = list(sys.argv), dict(os.environ), os.getcwd()
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    py_rng, np_rng = random.getstate(), np.random.get_state()
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        for s, h in handlers.items():
            if h is not None and signal.getsignal(s) is not h:  # None: set outside Python, left as is
                signal.signal(s, h)
        left = [p for p in me.children(recursive=True) if p.pid not in children]
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert not left, f"the command left processes behind: {[p.pid for p in left]}"
