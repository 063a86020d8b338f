"""A real HTTP proxy in front of moto's S3 server that misbehaves on the requests a fault plan names.

Point boto3 at `proxy.url` instead of moto's endpoint. Each request is classified into its S3 operation
(from method, query and headers, path-style addressing) and either forwarded untouched or given a fault:

  refuse        read the body, answer `status` (503 SlowDown, 500 InternalError, 501 NotImplemented, 405
                MethodNotAllowed: a store without object tags) with S3's XML error body
  stall         read the body, then say nothing for `stall_seconds` (past the client's read timeout), hang up
  cut           read half of the body, then hang up: the request never reaches moto
  cut_response  forward to moto (the operation happens), then hang up before the first byte of its answer
  deny          answer 403 AccessDenied, as a bucket policy denying s3:PutObject would
  read_only     like deny, and from then on every PutObject-family write is denied (`proxy.read_only`)

A fault applies to the first `times` matching requests (None: all of them). `proxy.log` records every
request as (operation, key, what happened), so tests can count attempts and retries.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# What a policy denying s3:PutObject refuses: every way of creating or completing an object.
PUT_OBJECT_FAMILY = {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "CopyObject",
                     "UploadPartCopy"}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERROR_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 501: "NotImplemented",
                405: "MethodNotAllowed"}


@dataclass
class Fault:
    operation: str  # an S3 operation name, e.g. "UploadPart", "CompleteMultipartUpload", "PutObjectTagging"
    kind: str  # refuse | stall | cut | cut_response | deny | read_only
    times: int | None = 1  # how many matching requests get it; None: every one
    status: int = 503  # for refuse
    key_contains: str = ""  # only requests whose object key contains this


def operation_of(method: str, path: str, query: dict[str, list[str]], headers: Any) -> tuple[str, str]:
    """(S3 operation, object key) of a path-style request."""
    _, _, rest = unquote(path).lstrip("/").partition("/")
    key = rest
    copy = "x-amz-copy-source" in {name.lower() for name in headers}
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return ("UploadPartCopy" if copy else "UploadPart"), key
        if not key:
            return "CreateBucket" if not query else "PutBucketConfig", key
        if "tagging" in query:
            return "PutObjectTagging", key
        if query:
            return "PutObjectConfig", key  # acl, retention ...
        return ("CopyObject" if copy else "PutObject"), key
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload", key
        if "uploadId" in query:
            return "CompleteMultipartUpload", key
        return ("DeleteObjects" if "delete" in query else "Post"), key
    if method == "DELETE":
        return ("AbortMultipartUpload" if "uploadId" in query else "DeleteObject"), key
    if method == "HEAD":
        return ("HeadObject" if key else "HeadBucket"), key
    if "uploads" in query:
        return "ListMultipartUploads", key
    if "uploadId" in query:
        return "ListParts", key
    if "tagging" in query and key:
        return "GetObjectTagging", key
    return ("GetObject" if key else "ListObjects"), key


class S3FaultProxy:
    def __init__(self, upstream: str, stall_seconds: float = 3.0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.stall_seconds = stall_seconds
        self.faults: list[Fault] = []
        self.read_only = False
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like S3: a cut must really break a pooled connection

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def plan(self, faults: Iterable[Fault]) -> None:
        with self._lock:
            self.faults = list(faults)

    def count(self, operation: str, outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for op, _, got in self.log if op == operation and outcome in (None, got))

    def close(self) -> None:
        self._closing.set()  # stalled handlers wake up and hang up
        self.server.shutdown()
        self.server.server_close()

    # ---- per request ------------------------------------------------------------------------------------------

    def _pick(self, operation: str, key: str) -> Fault | None:
        with self._lock:
            if self.read_only and operation in PUT_OBJECT_FAMILY:
                return Fault(operation, "deny", times=None)
            for fault in self.faults:
                if fault.operation == operation and fault.key_contains in key and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    if fault.kind == "read_only":
                        self.read_only = True
                    return fault
            return None

    def _record(self, operation: str, key: str, outcome: str) -> None:
        with self._lock:
            self.log.append((operation, key, outcome))

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        split = urlsplit(req.path)
        query = parse_qs(split.query, keep_blank_values=True)
        operation, key = operation_of(req.command, split.path, query, req.headers)
        if "chunked" in req.headers.get("Transfer-Encoding", "").lower():
            raise RuntimeError("chunked request bodies are not supported by the fault proxy")
        length = int(req.headers.get("Content-Length") or 0)
        fault = self._pick(operation, key)
        kind = fault.kind if fault else "forwarded"
        self._record(operation, key, kind)
        if fault is not None and fault.kind == "cut":
            req.rfile.read(length // 2)
            req.close_connection = True
            return  # the handler's connection closes mid-body
        body = req.rfile.read(length) if length else b""
        if fault is not None and fault.kind == "stall":
            self._closing.wait(self.stall_seconds)
            req.close_connection = True
            return
        if fault is not None and fault.kind in ("refuse", "deny", "read_only"):
            status = 403 if fault.kind != "refuse" else fault.status
            self._error(req, status, operation)
            return
        status, headers, answer = self._forward(req, body)
        if fault is not None and fault.kind == "cut_response":
            req.close_connection = True  # not a byte of the answer: half a status line would pass for a 200
            return
        self._send_head(req, status, headers, len(answer) if req.command != "HEAD" else None)
        if req.command != "HEAD":
            req.wfile.write(answer)

    def _forward(self, req: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            headers = {name: value for name, value in req.headers.items() if name.lower() not in _HOP_BY_HOP}
            conn.request(req.command, req.path, body=body if body or req.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
            return resp.status, [(n, v) for n, v in resp.getheaders() if n.lower() not in _HOP_BY_HOP], answer
        finally:
            conn.close()

    @staticmethod
    def _send_head(req: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]],
                   length: int | None) -> None:
        req.send_response_only(status)
        for name, value in headers:
            if length is not None and name.lower() == "content-length":
                continue
            req.send_header(name, value)
        if length is not None:
            req.send_header("Content-Length", str(length))
        req.end_headers()

    @staticmethod
    def _error(req: BaseHTTPRequestHandler, status: int, operation: str) -> None:
        code = _ERROR_CODES.get(status, "InternalError")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{operation} refused by the fault proxy</Message>"
                "<RequestId>fault-proxy</RequestId></Error>").encode()
        req.send_response_only(status)
        req.send_header("Content-Type", "application/xml")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
