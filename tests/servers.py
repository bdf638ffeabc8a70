"""Real servers on loopback for the sharing tests: a static HTTP server with (or without) Range support, a
fault-injecting HTTP proxy in front of it, and a local S3-compatible endpoint (moto's server)."""

from __future__ import annotations

import http.client
import http.server
import os
import re
import socket
import threading
from functools import partial
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range `Range: bytes=a-b` support (206 + Content-Range), as any CDN serves them."""

    ranges = True
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not self.ranges or match is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(match.group(1)), int(match.group(2) or size - 1)
        if start >= size:
            self.send_error(416)
            return None
        end = min(end, size - 1)
        f = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return _Limited(f, end - start + 1)


class _Limited:
    def __init__(self, f, n):
        self.f, self.n = f, n

    def read(self, size=-1):
        size = self.n if size < 0 else min(size, self.n)
        data = self.f.read(size)
        self.n -= len(data)
        return data

    def close(self):
        self.f.close()


class NoRangeHandler(RangeHandler):
    ranges = False


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; `url` is its base URL."""

    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def static_server(root: Path, ranges: bool = True) -> Server:
    return Server(partial(RangeHandler if ranges else NoRangeHandler, directory=str(root)))


class Faults:
    """What the proxy does to the n-th request (counted from 1): every `every`-th request gets the next fault in
    `kinds` (503, drop: close without answering, truncate: half the body then close); `persistent` paths (a
    substring) always get 503."""

    def __init__(self, every: int = 0, kinds=("503", "drop", "truncate"), persistent: str | None = None):
        self.every, self.kinds, self.persistent = every, kinds, persistent
        self.count = self.injected = 0
        self.lock = threading.Lock()
        self.paths: list[str] = []
        self.methods: list[str] = []  # of each request in `paths`

    def next(self, path: str, method: str = "GET") -> str | None:
        with self.lock:
            self.count += 1
            self.paths.append(path)
            self.methods.append(method)
            if self.persistent is not None and self.persistent in path:
                self.injected += 1
                return "503"
            if self.every and self.count % self.every == 0:
                self.injected += 1
                return self.kinds[(self.count // self.every) % len(self.kinds)]
        return None


def fault_proxy(upstream: str, faults: Faults) -> Server:
    host, port = upstream.removeprefix("http://").split(":")

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):  # noqa: N802
            self._forward("HEAD")

        def do_GET(self):  # noqa: N802
            self._forward("GET")

        def _forward(self, method):
            fault = faults.next(self.path, method)
            if fault == "503":
                body = b"try again"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            headers = {k: v for k, v in self.headers.items()  # an S3 request's credentials go through too
                       if k.lower() in ("range", "authorization") or k.lower().startswith("x-amz-")}
            conn.request(method, self.path, headers=headers)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() in ("content-type", "content-range", "accept-ranges", "content-length"):
                    self.send_header(k, v)
            self.end_headers()
            if method == "GET":
                if fault == "truncate" and len(body) > 1:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

    return Server(Proxy)


class S3Server:
    """moto's S3-compatible server on loopback, with one bucket; `options` are the fsspec storage options."""

    def __init__(self, bucket: str = "labs"):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.options = {"key": "testing", "secret": "testing", "endpoint_url": self.endpoint}
        import s3fs

        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        if not fs.exists(bucket):  # moto's buckets live in the process: another server of this session made it
            fs.mkdir(bucket)
        self.bucket = bucket

    def close(self):
        self.server.stop()
