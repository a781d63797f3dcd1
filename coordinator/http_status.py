"""HTTP endpoint serving the status document at ``/api/status`` (the dashboard comes later).

It reads the ledger only, through the same function as the ``GetStatus`` RPC.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from coordinator import handlers
from hivefold.netaddr import parse_host_port

log = logging.getLogger(__name__)


def start_http(ctx: handlers.Context, listen: str) -> tuple[ThreadingHTTPServer, int]:
    host, port = parse_host_port(listen, flag="--http")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] not in ("/api/status", "/api/status/"):
                self._send(404, {"error": f"no such endpoint {self.path}; try /api/status"})
                return
            self._send(200, handlers.status_document(ctx, time.time()))

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body, sort_keys=True).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("http: " + fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http-status", daemon=True).start()
    log.info("status JSON at http://%s:%d/api/status", host, server.server_address[1])
    return server, server.server_address[1]
