"""Loopback HTTP peers for the tests that need a real server (image fetching, BigQuery REST, webhooks).

Imported by test modules as ``loopback`` (pytest puts this folder on the import path of its test modules).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 request handler without access logging, with one way to answer."""

    protocol_version = "HTTP/1.1"

    def send_body(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class LoopbackServer:
    """A threading HTTP server on 127.0.0.1 (a free port) running ``handler`` in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], path: str = ""):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
