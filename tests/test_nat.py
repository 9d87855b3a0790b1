"""Volunteers behind home routers, on real processes in network namespaces (benchmarks/netlab.py).

A wan bridge; the coordinator and the head on public addresses; stage 1 served by two home nodes,
each behind its own router that masquerades and drops every inbound connection, and the tail behind a
third. Without relays the first home node is refused with one line, and a head behind NAT starts
outbound only. With the coordinator relaying, the home nodes reserve a slot at once and show as
relayed in the status; the second copies the stage's state from the first through the relay; the
head reaches them over connections they open to it (net.relay.reach_out); stage 1 reaches the tail,
NAT to NAT, through the coordinator's forwarder (net.tunnel), and the swarm trains to the end with no
micro-batch lost; the two home nodes average with each other through the forwarder too (hivemind's
averager takes the node's routes), not through relay circuits, which hivemind's p2pd caps at about
128 KiB each way.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from launch import BIN, swarm_config

from benchmarks.netlab import Host, Lab, can_run, sweep_stale
from pmnode.net.status import SwarmStatus
from pmnode.swarm.report import NodeSummary

pytestmark = [
    pytest.mark.xdist_group("netns"),
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]

STEPS = 48


def _coordinator(host: Host, cfg: Path, state: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    info = state / "coordinator.json"
    args = ["serve", "--config", str(cfg), "--host", host.addr, "--state-dir", str(state), *flags]
    p = host.popen([str(BIN / "coordinator"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not info.exists():
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
        assert time.monotonic() < deadline, "the coordinator did not come up"
        time.sleep(0.2)
    return p, json.loads(info.read_text())["maddrs"][0]


def _join(host: Host, maddr: str, state: Path, stage: int, out: Path, *flags: str) -> subprocess.Popen:
    args = ["join", "--coordinator", maddr, "--token-file", str(state / "join_token"), "--stage", str(stage)]
    args += ["--host", host.addr, "--threads", "1", "--log-format", "json", "--summary-json", str(out)]
    err = out.with_suffix(".err").open("w")
    return host.popen([str(BIN / "pmnode"), *args, *flags], stdout=err, stderr=subprocess.STDOUT)


def _status(host: Host, maddr: str) -> SwarmStatus:
    r = host.run([str(BIN / "pmnode"), "status", "--coordinator", maddr, "--json"], timeout=60)
    assert r.returncode == 0, r.stderr
    return SwarmStatus.model_validate_json(r.stdout)


@pytest.mark.timeout(600)  # many processes on 2 cores, beside another worker
def test_home_nodes_serve_through_the_relay(tmp_path: Path, toy_corpus: Path) -> None:
    sweep_stale()
    cfg = swarm_config(
        tmp_path,
        toy_corpus,
        train={"steps": STEPS, "eval_every": STEPS},
        swarm={"schedule": "async", "average_period": 3.0},
    )
    with Lab() as lab:
        coord, head = lab.public("coord"), lab.public("head")
        homes = [lab.home(f"home{i}", lab.router(f"router{i}")) for i in (1, 2)]
        tail = lab.home("tail", lab.router("router4"))  # stage 2 at home too: stage 1 -> 2 is NAT to NAT

        # Relays off: the home node cannot be dialed back, and says what to do in one line.
        p, maddr = _coordinator(coord, cfg, tmp_path / "norelay", "--no-relay")
        r = homes[0].run(
            [str(BIN / "pmnode"), "join", "--coordinator", maddr, "--host", homes[0].addr, "--threads", "1"],
            timeout=120,
            env={**os.environ, "PMNODE_JOIN_TOKEN": (tmp_path / "norelay" / "join_token").read_text()},
        )
        assert r.returncode == 1, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert "cannot be reached from outside" in lines[0] and "relay" in lines[0]

        # The head behind NAT needs no inbound connection: it goes on outbound only, relays or not.
        nat_head = lab.home("nathead", lab.router("router3"))
        log = tmp_path / "nathead.log"
        h = nat_head.popen(
            [str(BIN / "pmnode"), "join", "--coordinator", maddr, "--host", nat_head.addr, "--stage", "0"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PMNODE_JOIN_TOKEN": (tmp_path / "norelay" / "join_token").read_text()},
        )
        deadline = time.monotonic() + 120
        while "waiting for stage 1" not in log.read_text():
            assert h.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        assert "the head needs no inbound connection; outbound only" in log.read_text()
        h.terminate()
        h.wait(timeout=30)
        p.terminate()
        p.wait(timeout=30)

        # Relays on (the coordinator).
        state = tmp_path / "relay"
        p, maddr = _coordinator(coord, cfg, state)
        out = tmp_path / "nodes"
        out.mkdir()
        nodes = [
            _join(tail, maddr, state, 2, out / "tail.json"),
            _join(homes[0], maddr, state, 1, out / "home1.json"),
            _join(homes[1], maddr, state, 1, out / "home2.json"),
        ]
        # Both home nodes online and announced as relayed before the head starts: the run itself
        # takes seconds, too short to watch.
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 180
        while len(seen) < 2:
            for n, name in zip(nodes, ("tail", "home1", "home2"), strict=True):
                assert n.poll() is None, (out / f"{name}.err").read_text()[-3000:]
            assert time.monotonic() < deadline, [(out / f"home{i}.err").read_text()[-2000:] for i in (1, 2)]
            for st in _status(coord, maddr).stages:
                if st.stage == 1:
                    seen = {r.peer_id: r.reach for r in st.replicas if r.state == "online"}
            time.sleep(2)
        assert sorted(seen.values()) == ["relayed", "relayed"]
        nodes.append(_join(head, maddr, state, 0, out / "head.json"))
        try:
            nodes[-1].wait(timeout=400)
        except subprocess.TimeoutExpired:
            raise AssertionError((out / "head.err").read_text()[-3000:]) from None
        assert nodes[-1].returncode == 0, (out / "head.err").read_text()[-3000:]
        for n in nodes[:-1]:  # a home node whose final round's circuit was reset tries twice more first
            n.wait(timeout=180)

        head_sum = NodeSummary.model_validate_json((out / "head.json").read_text())
        assert head_sum.steps == STEPS
        assert head_sum.steps_lost == 0 and head_sum.samples_off == 0
        assert head_sum.samples_applied == STEPS * 8  # tiny: batch 8; every micro-batch came back
        homes_sum = [NodeSummary.model_validate_json((out / f"home{i}.json").read_text()) for i in (1, 2)]
        assert sum(s.samples_served for s in homes_sum) == STEPS * 8
        assert all(s.averaging.rounds >= 1 for s in homes_sum), [s.averaging for s in homes_sum]
        # ... through the relay's forwarder: each one's averager answered the other's forwarded calls
        assert all(s.averaging.calls_tunnelled > 0 for s in homes_sum), [s.averaging for s in homes_sum]
        # NAT to NAT: every micro-batch from stage 1 reached the tail through the coordinator's forwarder
        tail_sum = NodeSummary.model_validate_json((out / "tail.json").read_text())
        # (a call in the moment before a route is set goes over a circuit, which carries small calls)
        forwarded = sum(n for name, n in tail_sum.tunnelled_in.items() if name.endswith(".forward"))
        received = tail_sum.server["messages_received"].get("forward", 0)
        assert received > 0 and forwarded >= 0.9 * received, (forwarded, received)
        p.terminate()
        p.wait(timeout=30)
