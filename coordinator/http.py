"""The coordinator's HTTP side: /status (JSON), /metrics (Prometheus) and a one-page dashboard.

It runs in a daemon thread beside the DHT loop and only reads the latest SwarmStatus
the loop publishes, so a slow scraper never stalls the swarm.

With a token (`coordinator serve --http-token-file`), /status and /metrics answer only requests
carrying `Authorization: Bearer <token>` (what Prometheus sends with its `authorization` setting);
the page itself holds no data and asks the browser's user for the token.
"""

from __future__ import annotations

import hmac
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from pmnode.net.forwarder import RelayCounters
from pmnode.net.outer_report import OuterReport
from pmnode.net.status import SwarmStatus


class Metrics:
    """Gauges mirrored from the latest status; one registry per coordinator (tests run several)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.step = Gauge("pmnode_global_step", "Highest optimizer step any node reports.", registry=r)
        self.target = Gauge("pmnode_target_steps", "Steps the run trains for.", registry=r)
        self.loss = Gauge("pmnode_train_loss", "Latest training loss seen by the head.", registry=r)
        self.heldout = Gauge("pmnode_heldout_loss", "Latest held-out loss.", registry=r)
        self.tokens = Gauge("pmnode_tokens_per_second", "Training tokens/s at the head.", registry=r)
        self.wire = Gauge("pmnode_wire_bytes_per_second", "Bytes/s all nodes put on the wire.", registry=r)
        self.replicas = Gauge("pmnode_stage_replicas", "Online nodes per stage.", ["stage"], registry=r)
        self.stage_throughput = Gauge(
            "pmnode_stage_throughput_samples", "Summed samples/s per stage.", ["stage"], registry=r
        )
        self.node_queue = Gauge(
            "pmnode_node_queue", "Micro-batches in flight.", ["stage", "peer"], registry=r
        )
        self.node_step = Gauge("pmnode_node_step", "A node's optimizer step.", ["stage", "peer"], registry=r)
        self.heads = Gauge("pmnode_heads", "Online heads (stage-0 nodes driving the pipeline).", registry=r)
        self.head = {  # every head (swarm.heads > 1: several), by its slot of the data order
            name: Gauge(f"pmnode_head_{name}", doc, ["slot", "peer"], registry=r)
            for name, doc in (
                ("tokens_per_second", "Training tokens/s of one head's own batches."),
                ("step", "A head's optimizer step."),
                ("samples", "Samples a head has applied in optimizer steps."),
            )
        }
        self.node_refused = Gauge(
            "pmnode_node_refused_calls",
            "Calls a node's guard refused, by door (data; averaging.join/part/state/leader/group).",
            ["stage", "peer", "door"],
            registry=r,
        )
        self.outer = {  # replica_sync.method outer: each replica's rounds (pmnode.net.outer_report)
            name: Gauge(f"pmnode_outer_{name}", doc, ["stage", "peer"], registry=r)
            for name, doc in (
                ("rounds", "Outer rounds a replica applied as a member."),
                ("bytes_per_round", "Bytes of a replica's compressed share in one outer round."),
                ("round_seconds", "Mean wall seconds of a replica's outer rounds."),
                ("hidden_fraction", "Fraction of the outer rounds' wall time training went on."),
            )
        }
        self.outer_refused = Gauge(
            "pmnode_outer_refused",
            "Outer shares a replica refused, by reason.",
            ["stage", "peer", "reason"],
            registry=r,
        )
        self.joins = Counter("pmnode_joins", "Join requests the coordinator answered.", registry=r)
        self.refused = Counter("pmnode_joins_refused", "Join requests refused.", registry=r)
        self.relay_calls = Gauge(
            "pmnode_relay_calls",
            "Calls the relay forwarded to members behind NAT.",
            registry=r,
        )
        self.relay_bytes = Gauge(
            "pmnode_relay_bytes",
            "Bytes the relay forwarded, by direction (in: to NATed members).",
            ["direction"],
            registry=r,
        )
        self.relay_refused = Gauge(
            "pmnode_relay_refused", "Calls the relay refused to forward, by reason.", ["reason"], registry=r
        )
        self.http_refused = Counter(
            "pmnode_http_refused", "HTTP requests for /status or /metrics without the token.", registry=r
        )

    def update(self, s: SwarmStatus) -> None:
        self.step.set(s.global_step)
        self.target.set(s.target_steps)
        self.loss.set(s.loss if s.loss is not None else float("nan"))
        self.heldout.set(s.heldout_loss if s.heldout_loss is not None else float("nan"))
        self.tokens.set(s.tokens_per_s)
        self.wire.set(s.wire_bytes_per_s)
        self.node_queue.clear()  # nodes that left must not linger as stale series
        self.node_step.clear()
        self.node_refused.clear()
        for g in self.head.values():
            g.clear()
        for g in [*self.outer.values(), self.outer_refused]:
            g.clear()
        heads = [r for r in s.stages[0].replicas if r.state == "online"] if s.stages else []
        self.heads.set(len(heads))
        for r in heads:
            labels = {"slot": str(r.slot), "peer": r.peer_id}
            self.head["tokens_per_second"].labels(**labels).set(r.tokens_per_s)
            self.head["step"].labels(**labels).set(r.step)
            self.head["samples"].labels(**labels).set(r.samples)
        for st in s.stages:
            self.replicas.labels(stage=str(st.stage)).set(len(st.replicas))
            self.stage_throughput.labels(stage=str(st.stage)).set(st.throughput)
            for r in st.replicas:
                self.node_queue.labels(stage=str(st.stage), peer=r.peer_id).set(r.queue)
                self.node_step.labels(stage=str(st.stage), peer=r.peer_id).set(r.step)
                for door, n in r.refused.items():
                    self.node_refused.labels(stage=str(st.stage), peer=r.peer_id, door=door).set(n)
                if r.outer is not None:
                    self._outer(str(st.stage), r.peer_id, r.outer)

    def _outer(self, stage: str, peer: str, o: OuterReport) -> None:
        values = {
            "rounds": o.rounds,
            "bytes_per_round": o.bytes_per_round,
            "round_seconds": o.round_s,
            "hidden_fraction": o.hidden,
        }
        for name, v in values.items():
            self.outer[name].labels(stage=stage, peer=peer).set(v)
        for reason, n in o.refused.items():
            self.outer_refused.labels(stage=stage, peer=peer, reason=reason).set(n)

    def update_relay(self, c: RelayCounters) -> None:
        totals = c.total()
        self.relay_calls.set(totals["calls"])
        self.relay_bytes.labels(direction="in").set(totals["bytes_in"])
        self.relay_bytes.labels(direction="out").set(totals["bytes_out"])
        for reason, n in c.refused.items():
            self.relay_refused.labels(reason=reason).set(n)


def bearer_ok(header: str | None, token: str) -> bool:
    """True if an Authorization header carries `token` as a bearer token (constant-time compare)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def reach_note(url: str, port: int, protected: bool, loopback: bool) -> str:
    """The line the operator reads: who can open the page, and how to open it to others."""
    if protected:
        return (
            f"status page: {url}  (/status and /metrics need `Authorization: Bearer <token>` with the token "
            f"in --http-token-file; the page asks for it, or open {url}#token=<token>)"
        )
    if loopback:
        return (
            f"status page: {url}  (this machine only; to serve it to others, pass --http-token-file PATH "
            f"(mode 0600) and it listens on --host; or tunnel: ssh -L {port}:127.0.0.1:{port} <this host>)"
        )
    return (
        f"status page: {url}  (no token: anyone who reaches this port reads the swarm's status; "
        "pass --http-token-file PATH to require one)"
    )


class StatusServer:
    def __init__(self, host: str, port: int, metrics: Metrics, token: str | None = None) -> None:
        self.metrics, self.token = metrics, token
        self._status_json = b"{}"
        self._page = files("coordinator").joinpath("static/index.html").read_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/status", "/metrics") and not self._authorized():
                    return
                if path == "/status":
                    self._send(server._status_json, "application/json")
                elif path == "/metrics":
                    self._send(generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/", "/index.html"):
                    self._send(server._page, "text/html; charset=utf-8")
                else:
                    self.send_error(HTTPStatus.NOT_FOUND, "try /, /status or /metrics")

            def _authorized(self) -> bool:
                if server.token is None or bearer_ok(self.headers.get("Authorization"), server.token):
                    return True
                server.metrics.http_refused.inc()
                body = b'{"error": "this coordinator needs its HTTP token: Authorization: Bearer <token>"}'
                self._send(body, "application/json", HTTPStatus.UNAUTHORIZED)
                return False

            def _send(self, body: bytes, content_type: str, code: HTTPStatus = HTTPStatus.OK) -> None:
                self.send_response(code)
                if code == HTTPStatus.UNAUTHORIZED:
                    self.send_header("WWW-Authenticate", 'Bearer realm="pmnode coordinator"')
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the operator's console

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pmnode-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def publish(self, status: SwarmStatus) -> None:
        self.metrics.update(status)
        self._status_json = status.model_dump_json().encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
