"""What the multi-process tests share: the real CLIs, started on 127.0.0.1 and always cleaned up.

Every process a test starts carries PMNODE_TEST_TAG in its environment (so do its children: DHT
processes, p2pd), so whatever is left behind can be found and killed by tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 30


def tagged_env(tag: str) -> dict[str, str]:
    """Every descendant (nodes, DHT children, p2pd) inherits the tag, so leftovers can be found."""
    return {**os.environ, "PMNODE_TEST_TAG": tag}


def leftovers(tag: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get("PMNODE_TEST_TAG") == tag:
                found.append(f"{p.pid} {p.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_tagged(tag: str) -> None:
    """After a failure: kill whatever the test started, so one failure cannot load the next tests."""
    for p in psutil.process_iter():
        try:
            if p.environ().get("PMNODE_TEST_TAG") == tag:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def wait_until(
    cond: Callable[[], object],
    timeout: float,
    what: str,
    *,
    every: float = 0.25,
    procs: Sequence[subprocess.Popen] = (),
    logs: Mapping[str, Path] | None = None,
) -> None:
    """Poll `cond` every `every` s until it is true. Fails after `timeout` s naming `what`, or as soon
    as one of `procs` has exited (waiting on could only time out); the failure carries the end of
    each of `logs`, which is where a multi-process test's cause is."""
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = (
                f"exited early while waiting for {what}: {dead}" if dead else f"timed out waiting for {what}"
            )
            tails = "".join(
                f"\n--- {n}\n{p.read_text()[-1500:]}" for n, p in (logs or {}).items() if p.exists()
            )
            raise AssertionError(why + tails)
        time.sleep(every)


def interrupt_all(procs: Sequence[subprocess.Popen], tag: str, within: float = 30.0) -> None:
    """Teardown of processes started each in a group of its own: Ctrl-C to every group (each node says
    goodbye and saves, as on a terminal), up to `within` s each to exit, then whatever of `tag` is
    left is killed."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(within)
    kill_tagged(tag)


def join_pid(tag: str, summary_name: str) -> int:
    """The `pmnode join` process of the swarm tagged `tag` that writes the summary `summary_name`."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if (
                p.environ().get("PMNODE_TEST_TAG") == tag
                and "join" in cmd
                and any(c.endswith(summary_name) for c in cmd)
            ):
                return p.info["pid"]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    raise AssertionError(f"no process writes {summary_name}")


def start_async_swarm(
    cfg: Path,
    work: Path,
    tag: str,
    *extra: str,
    schedule: str = "async",
    own_group: bool = False,
    sigint_ignored: bool = False,
) -> subprocess.Popen:
    """`pmnode local-swarm` of 3 stages in the background; its stderr goes to WORK.err, since an
    unread pipe would fill up with progress lines and block it. `own_group`: in a process group of
    its own, which the test can signal whole, as a terminal's Ctrl-C does. `sigint_ignored`: started
    as a non-interactive shell starts a background job, with SIGINT ignored."""
    work.parent.mkdir(parents=True, exist_ok=True)
    args = ["--config", str(cfg), "--stages", "3", "--schedule", schedule, "--workdir", str(work), *extra]
    return subprocess.Popen(
        [str(BIN / "pmnode"), "local-swarm", *args],
        stdout=subprocess.DEVNULL,
        stderr=work.with_suffix(".err").open("w"),
        env=tagged_env(tag),
        process_group=0 if own_group else None,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def head_steps(work: Path) -> int:
    """The last step the head of a local swarm in WORK reported (0 before the first)."""
    from pmnode.swarm.report import StepLine

    log = work / "logs" / "node-0.log"
    if not log.exists():
        return 0
    done = log.read_text().rpartition("\n")[0]  # whole lines only: the node may be mid-write
    steps = [line.step for raw in done.splitlines() if (line := StepLine.parse(raw)) is not None]
    return max(steps, default=0)


def assert_no_leftovers(tag: str, within: float = 10.0) -> None:
    """Everything the test started is gone within `within` s; whatever is not is killed before failing."""
    deadline = time.monotonic() + within
    while leftovers(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = leftovers(tag)
    kill_tagged(tag)
    assert left == []


def swarm_config(tmp: Path, toy_corpus: Path, **overrides: dict) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["n_stages"] = 3
    cfg["data"] = {"source": str(toy_corpus)}
    cfg["train"].update(steps=STEPS, eval_every=10)
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "swarm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_heads_swarm(
    tmp: Path, cfg: Path, heads: int, replicas: int, tag: str
) -> subprocess.CompletedProcess[str]:
    """`pmnode local-swarm` of 3 stages, `heads` heads and `replicas` replicas, sync, under `tag`; its
    workdir is tmp/work and its summary tmp/swarm.json. Whatever it leaves is killed, even on a timeout."""
    args = ["--config", str(cfg), "--stages", "3", "--heads", str(heads), "--replicas", str(replicas)]
    args += ["--schedule", "sync", "--workdir", str(tmp / "work"), "--summary-json", str(tmp / "swarm.json")]
    try:
        return subprocess.run(
            [str(BIN / "pmnode"), "local-swarm", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=tagged_env(tag),
        )
    finally:
        kill_tagged(tag)  # a timeout must not leave the swarm loading the next tests


def start_coordinator(state: Path) -> tuple[subprocess.Popen, str]:
    info = state / "coordinator.json"
    info.unlink(missing_ok=True)  # a restart must not be mistaken for up by the last run's file
    p = subprocess.Popen(
        [
            str(BIN / "coordinator"),
            "serve",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not info.exists():
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return p, json.loads(info.read_text())["maddrs"][0]


def stop_coordinator(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out + err


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
