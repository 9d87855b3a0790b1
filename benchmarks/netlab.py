"""Network namespaces for tests and benchmarks that need real separate hosts: a "wan" bridge, public
hosts on it, and home hosts behind NAT routers that masquerade and accept no inbound connections.

Everything lives inside namespaces the lab creates, the bridge included (in the lab's own "wan"
namespace), so the host's own network is never touched and two labs running at once cannot collide:
names carry the pid and a counter. Leaving the `Lab` context (failure and timeout included) kills
every process inside its namespaces and deletes them; `sweep_stale()` removes labs whose process died
without cleaning up (a SIGKILLed pytest).

    with Lab() as lab:
        coord = lab.public("coord")
        router = lab.router("router")
        home = lab.home("home", router)
        p = home.popen(["python", "-m", "http.server"])  # runs in the home namespace
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

_PREFIX = "pmt"
_SEQ = itertools.count()
WAN_NET = "10.66.0"  # public addresses: 10.66.0.N/24 on the wan bridge


def can_run() -> str | None:
    """None when namespaces can be made here; otherwise the reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _in(ns: str, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, text=True, timeout=30)


def _pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in r.stdout.split()]


def _kill_all(ns: str, grace: float) -> None:
    """TERM everything in the namespace, then KILL what is still there after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in _pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _pids(ns) and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass
class Host:
    """One namespace with an address; `popen`/`run` start commands inside it."""

    ns: str
    addr: str
    lab: Lab

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], start_new_session=True, **kw)
        self.lab.procs.append(p)
        return p

    def run(self, cmd: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], text=True, timeout=timeout, **kw)


@dataclass
class Router(Host):
    """A home router: `addr` on the wan, `lan` = its LAN prefix (LAN hosts get .2, .3, ...)."""

    lan: str = ""
    next_host: int = 2


@dataclass
class Lab:
    grace: float = 5.0
    tag: str = field(default_factory=lambda: f"{_PREFIX}{os.getpid()}x{next(_SEQ)}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _next_wan: int = 1
    _next_lan: int = 1
    _links: int = 0

    def __enter__(self) -> Lab:
        self.wan = self._ns("wan")
        _in(self.wan, "ip", "link", "add", "br0", "type", "bridge")
        _in(self.wan, "ip", "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:  # process groups first: children that left the namespace's pid list too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        for ns in reversed(self.namespaces):
            _kill_all(ns, self.grace)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()

    def _ns(self, role: str) -> str:
        ns = f"{self.tag}-{role}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _in(ns, "ip", "link", "set", "lo", "up")
        return ns

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        _ip("link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        _in(a, "ip", "link", "set", a_if, "up")
        _in(b, "ip", "link", "set", b_if, "up")

    def _on_wan(self, ns: str, iface: str) -> str:
        """Plug `ns` into the wan bridge as `iface`; returns its public address."""
        self._links += 1
        port = f"p{self._links}"
        self._veth(self.wan, port, ns, iface)
        _in(self.wan, "ip", "link", "set", port, "master", "br0")
        addr = f"{WAN_NET}.{self._next_wan}"
        self._next_wan += 1
        _in(ns, "ip", "addr", "add", f"{addr}/24", "dev", iface)
        return addr

    def public(self, role: str) -> Host:
        """A host with a public address on the wan, reachable by everyone there."""
        ns = self._ns(role)
        return Host(ns, self._on_wan(ns, "eth0"), self)

    def router(self, role: str) -> Router:
        """A NAT router: masquerades its LAN out of the wan, forwards replies only, and drops every new
        inbound connection (to itself and to its LAN), as a home router without port forwarding does."""
        ns = self._ns(role)
        addr = self._on_wan(ns, "wan0")
        lan = f"192.168.{self._next_lan}"
        self._next_lan += 1
        _in(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _in(ns, "ip", "link", "add", "lan", "type", "bridge")
        _in(ns, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
        _in(ns, "ip", "link", "set", "lan", "up")
        rules = [
            ["-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"],
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "wan0", "-j", "DROP"],
            ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "wan0", "-j", "DROP"],
        ]
        for rule in rules:
            _in(ns, "iptables", *rule)
        return Router(ns, addr, self, lan=lan)

    def home(self, role: str, router: Router) -> Host:
        """A host on `router`'s LAN: private address, default route through the router's NAT."""
        ns = self._ns(role)
        self._links += 1
        lan_if = f"l{self._links}"
        self._veth(router.ns, lan_if, ns, "eth0")
        _in(router.ns, "ip", "link", "set", lan_if, "master", "lan")
        addr = f"{router.lan}.{router.next_host}"
        router.next_host += 1
        _in(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        _in(ns, "ip", "route", "add", "default", "via", f"{router.lan}.1")
        return Host(ns, addr, self)


def sweep_stale() -> list[str]:
    """Delete namespaces of labs whose pytest process is gone (killed before its cleanup ran)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    removed = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{_PREFIX}(\d+)x\d+-.+", name)
        if m and not psutil.pid_exists(int(m.group(1))):
            _kill_all(name, 1.0)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            removed.append(name)
    return removed
