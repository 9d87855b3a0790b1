"""The namespace lab itself: a home host reaches the wan through its router's NAT, nobody reaches it back,
and the lab leaves no namespace or process behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.netlab import Host, Lab, can_run, sweep_stale

pytestmark = [
    pytest.mark.xdist_group("netns"),
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]

# Listens on port 0, prints the port, and prints the peer address of the first connection it accepts.
_SERVER = (
    "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
    "print(s.getsockname()[1], flush=True); c, a = s.accept(); print(a[0], flush=True)"
)
_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"


def _serve(host: Host) -> tuple[subprocess.Popen, int]:
    p = host.popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def _connect(host: Host, addr: str, port: int) -> bool:
    return host.run([sys.executable, "-c", _CONNECT, addr, str(port)], timeout=20).returncode == 0


def test_nat_lets_out_and_nothing_in() -> None:
    sweep_stale()
    with Lab() as lab:
        public = lab.public("pub")
        router = lab.router("router")
        home = lab.home("home", router)
        home2 = lab.home("home2", router)
        names = list(lab.namespaces)

        server, port = _serve(public)
        assert _connect(home, public.addr, port)
        assert server.stdout.readline().strip() == router.addr  # masqueraded: the peer sees the router

        server, port = _serve(home)
        assert not _connect(public, home.addr, port)  # no route into the LAN from the wan
        assert not _connect(public, router.addr, port)  # and the router forwards nothing inbound
        assert _connect(home2, home.addr, port)  # the LAN itself is open
        server.wait(timeout=10)

        sleeper = home.popen(["sleep", "600"])
    assert sleeper.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed]
