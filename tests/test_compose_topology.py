"""docker-compose.yml on real separate hosts, without Docker: each service in its own network namespace
on one bridge (as compose's default network), sharing the directory its `swarm` volume stands for,
each running the command line read from docker-compose.yml itself. The swarm trains to the end.

What compose gives a container and the emulation copies: its own network stack (127.0.0.1 reaches only
itself), the image's working directory (/app: the repository here, so configs/ resolves), the image's
entrypoint when the service names none, and the volume mounted at /swarm (a temporary directory here:
arguments under /swarm are rewritten to it). Services start together, as `docker compose up` starts
them (depends_on orders the starts, it does not wait for the coordinator to be ready).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from launch import BIN, ROOT, tagged_env, wait_until

from benchmarks.netlab import Host, Lab, can_run, sweep_stale
from pmnode.core import checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.long,  # test_nat covers the namespaces lab in CI; this one checks compose's topology
    pytest.mark.xdist_group("netns"),
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]
VOLUME = "/swarm"  # where docker-compose.yml mounts the shared `swarm` volume


def compose_services() -> dict[str, list[str]]:
    """Each service's argv as its container runs it: the entrypoint (the image's when not given), then
    the command."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    entry = ["pmnode"]  # the Dockerfile's ENTRYPOINT
    assert 'ENTRYPOINT ["pmnode"]' in (ROOT / "Dockerfile").read_text()
    return {
        name: [*(svc.get("entrypoint") or entry), *svc["command"]] for name, svc in doc["services"].items()
    }


def on_this_machine(argv: list[str], volume: Path) -> list[str]:
    """The container's argv with the image's programs from this venv and the volume's paths moved."""
    program, *args = argv
    moved = [str(volume) + a[len(VOLUME) :] if a == VOLUME or a.startswith(VOLUME + "/") else a for a in args]
    return [str(BIN / program), *moved]


@pytest.mark.timeout(900)
def test_compose_swarm_trains_across_namespaces(tmp_path: Path) -> None:
    sweep_stale()
    volume = tmp_path / "volume"
    volume.mkdir()
    services = compose_services()
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    steps, tag = cfg["train"]["steps"], uuid.uuid4().hex
    logs = {name: tmp_path / f"{name}.log" for name in services}
    env = {**tagged_env(tag), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with Lab() as lab:
        hosts: dict[str, Host] = {name: lab.public(name) for name in services}
        procs: dict[str, subprocess.Popen] = {}
        for name, argv in services.items():  # coordinator first, as depends_on orders it
            cmd = on_this_machine(argv, volume)
            procs[name] = hosts[name].popen(
                cmd, cwd=ROOT, env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT
            )
        nodes = [n for n in services if n != "coordinator"]
        finished = [procs[n] for n in nodes]
        wait_until(
            lambda: all(p.poll() is not None for p in finished),
            900,
            "the nodes to finish",
            every=1.0,
            logs=logs,
        )
        for n in nodes:
            assert procs[n].returncode == 0, logs[n].read_text()[-3000:]
        info = json.loads((volume / "coordinator" / "coordinator.json").read_text())
        coord_host = hosts["coordinator"].addr
        # The address file on the volume names the coordinator's own host, never a loopback address only
        assert any(f"/ip4/{coord_host}/" in m for m in info["maddrs"]), info
        assert procs["coordinator"].poll() is None, logs["coordinator"].read_text()[-3000:]
    for s, n in enumerate(nodes):
        man = checkpoint.load_manifest(volume / "checkpoint", s)
        assert man is not None and man.step == steps, (n, man)
        text = logs[n].read_text()  # (each namespace's 127.0.0.1 is its own: they met across the bridge)
        assert f"serves stage {s}" in text and f"stage {s} step {steps}/{steps}" in text, text[-2000:]
