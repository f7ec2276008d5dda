"""An HTTP proxy that fails every n-th request with 503 SlowDown: a storage service having a
bad day, in front of the real S3-compatible server."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FlakyProxy:
    def __init__(self, upstream: str, fail_every: int, fail_if=None):
        """fail_if(method, path) -> bool: also fail the requests it picks (an outage)."""
        up = urlparse(upstream)
        self.fail_if = fail_if
        self.failed = 0
        self.requests = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                with lock:
                    proxy.requests += 1
                    fail = proxy.requests % fail_every == 0 or (
                        proxy.fail_if is not None and proxy.fail_if(self.command, self.path)
                    )
                    proxy.failed += fail
                if fail:
                    err = (
                        b'<?xml version="1.0"?><Error><Code>SlowDown</Code>'
                        b"<Message>injected</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = up.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length, not the (empty) body's
                length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
