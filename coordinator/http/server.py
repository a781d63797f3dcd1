"""The coordinator's HTTP side: the dashboard, its JSON API and ``/metrics``, all read from the ledger.

    /                 the dashboard (static page; charts by the vendored uPlot, see static/vendor/README.md)
    /api/status       the status document (the same as ``hivefold status --json`` and the GetStatus RPC)
    /api/history      the charts' series: the swarm over time, training and validation loss against tokens
    /api/events       the latest notable events (joins, leaves, expired leases, rejected results, checkpoints)
    /api/credit       every peer's and team's points, with the key that signs receipts (for stats sites)
    /metrics          Prometheus text format

Nothing here touches the training path: every answer is a read of the ledger, cached for a second
so that many open dashboards cost one query a second.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from coordinator import handlers
from coordinator.metrics import CoordinatorMetrics
from hivefold.netaddr import parse_host_port

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CACHE_SECONDS = 1.0
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
MAX_EVENTS = 500
CONNECTION_TIMEOUT_S = 30.0


class _Cache:
    """Answers computed at most once per ``CACHE_SECONDS`` per key, whoever asks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, object]] = {}

    def get(self, key: str, compute: Callable[[], object]) -> object:
        with self._lock:
            hit = self._entries.get(key)
            if hit and time.monotonic() - hit[0] < CACHE_SECONDS:
                return hit[1]
            value = compute()
            self._entries[key] = (time.monotonic(), value)
            return value


def static_files() -> dict[str, Path]:
    """URL path -> file, for everything under static/ (a fixed table: no path from a request reaches the disk)."""
    files = {"/": STATIC / "index.html"}
    for path in STATIC.rglob("*"):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            files["/static/" + path.relative_to(STATIC).as_posix()] = path
    return files


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # a client that fails the TLS handshake (plain HTTP, an untrusting browser) or hangs up is not news
        log.debug("http: connection from %s failed", client_address[0], exc_info=True)


def make_metrics(ctx: handlers.Context) -> CoordinatorMetrics:
    return CoordinatorMetrics(lambda: handlers.status_document(ctx, time.time()), ctx.ledger.counters)


def start_http(ctx: handlers.Context, listen: str, metrics: CoordinatorMetrics | None = None,
               tls: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, int]:
    """Serve the dashboard, the JSON API and /metrics; over HTTPS when given ``tls`` (as gRPC is)."""
    host, port = parse_host_port(listen, flag="--http")
    metrics = metrics or make_metrics(ctx)
    cache = _Cache()
    files = static_files()
    seq_len = ctx.spec.seq_len

    def api(path: str, query: dict) -> tuple[int, object]:
        if path == "/api/status":
            return 200, cache.get("status", lambda: handlers.status_document(ctx, time.time()))
        if path == "/api/history":
            return 200, cache.get("history", lambda: ctx.ledger.history(seq_len=seq_len))
        if path == "/api/credit":
            return 200, cache.get("credit", lambda: {
                "run_id": ctx.spec.run_id, "receipt_public_key": ctx.signer.public_key_hex,
                "qrb_k": ctx.config.qrb_k, "time": time.time(), **ctx.ledger.credit_board(seq_len=seq_len)})
        if path == "/api/events":
            raw = query.get("limit", ["50"])[0]
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_EVENTS:
                return 400, {"error": f"limit must be a whole number from 1 to {MAX_EVENTS}, not {raw!r}"}
            return 200, cache.get(f"events{raw}", lambda: ctx.ledger.recent_events(limit=int(raw)))
        return 404, {"error": f"no such endpoint {path}; try /, /api/status, /api/history, /api/events, "
                              "/api/credit or /metrics"}

    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_S  # a client that stalls (mid-handshake, mid-request) frees its thread

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if path in files:
                f = files[path]
                self._send(200, f.read_bytes(), CONTENT_TYPES[f.suffix],
                           cache="no-cache" if path == "/" else "max-age=3600")
            elif path == "/metrics":
                self._send(200, cache.get("metrics", metrics.exposition), "text/plain; version=0.0.4; charset=utf-8")
            else:
                code, body = api(path, parse_qs(url.query))
                self._send(code, json.dumps(body, sort_keys=True).encode(), "application/json")

        def _send(self, code: int, data: bytes, content_type: str, cache: str = "no-store") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("http: " + fmt, *args)

    server = _Server((host, port), Handler)
    server.daemon_threads = True
    if tls is not None:  # the handshake happens in the connection's own thread, not in accept()
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("dashboard at %s://%s:%d/ (JSON under /api/, Prometheus at /metrics)", "https" if tls else "http",
             host, server.server_address[1])
    return server, server.server_address[1]
