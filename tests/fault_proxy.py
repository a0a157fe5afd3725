"""A fault-injecting HTTP proxy for the loopback S3 server (tests only).

Clients talk to ``proxy.endpoint`` as they would to S3; the proxy forwards
each request to the upstream (moto) and, on the way, can:

- fail a seeded fraction of requests (``rate``) with ``500 InternalError``,
  ``503 ServiceUnavailable`` or ``503 SlowDown`` (S3's XML error bodies),
  without forwarding them, or reset the connection: the request reaches the
  store and is executed, then the response is cut off after half its body (or
  before its headers when it has no body), as a dropped connection does;
- refuse every request matching a method and a pattern searched in its path
  and query (and, optionally, in one of its headers), persistently, until
  :meth:`FaultProxy.clear` (a bucket policy that denies DELETE, a full prefix,
  the reads of one byte range, ...): 403 ``AccessDenied`` by default;
- fail the next N requests matching a pattern with one transient kind (a
  throttling burst longer than a client's retries);
- strip a request header (``If-None-Match``: a store that accepts but ignores
  conditional writes).

Whether a request is failed is a pure function of the seed, the method, the
path and how many times that method and path were seen before, so the faults
do not depend on how client threads interleave, and a retry of a failed
request is decided afresh. Everything injected is counted
(:attr:`FaultProxy.injected`), so a test can assert that faults did happen.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import re
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# The kinds of transient fault, drawn with equal odds once a request is chosen.
TRANSIENT = ("500", "503", "SlowDown", "reset")
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "SlowDown": (503, "SlowDown", "Please reduce your request rate."),
}
# Hop-by-hop headers: never forwarded as they came (the proxy re-frames bodies).
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te"}


@dataclass(frozen=True)
class Refusal:
    """Refuse requests whose method and path (and ``header``) match, with
    ``status`` and an S3 error code."""

    method: str
    pattern: re.Pattern[str]
    status: int = 403
    code: str = "AccessDenied"
    header: tuple[str, re.Pattern[str]] | None = None  # (name, pattern in its value)

    def matches(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> bool:
        if self.method not in ("*", method) or not self.pattern.search(path):
            return False
        if self.header is None:
            return True
        name, pattern = self.header
        return bool(pattern.search((headers or {}).get(name) or ""))


def _error_body(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class FaultProxy:
    """A proxy on 127.0.0.1 (free port) in front of ``upstream`` (``http://host:port``).

    Examples:
        >>> proxy = FaultProxy("http://127.0.0.1:5000", seed=7).start()  # doctest: +SKIP
        >>> with proxy.faults(rate=0.05):  # doctest: +SKIP
        ...     run_a_job(endpoint=proxy.endpoint)
        >>> assert proxy.injected_total() > 0  # doctest: +SKIP
    """

    def __init__(self, upstream: str, *, seed: int = 0, rate: float = 0.0) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.seed = seed
        self.rate = rate
        self.refusals: list[Refusal] = []
        self.bursts: list[list] = []  # [match, kind, requests left]
        self.stripped: set[str] = set()
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self._seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- control -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @contextlib.contextmanager
    def faults(self, rate: float) -> Iterator[FaultProxy]:
        """Fail a seeded ``rate`` of requests inside the block."""
        before, self.rate = self.rate, rate
        try:
            yield self
        finally:
            self.rate = before

    def refuse(
        self,
        method: str,
        pattern: str,
        *,
        status: int = 403,
        code: str = "AccessDenied",
        header: tuple[str, str] | None = None,
    ):
        """Refuse every ``method`` request (``*``: any) whose path matches ``pattern``
        and, if given, whose ``header`` (name, pattern) matches too, such as
        ``("Range", r"^bytes=0-")`` for the reads of a file's first bytes."""
        matcher = None if header is None else (header[0], re.compile(header[1]))
        with self._lock:
            self.refusals.append(
                Refusal(method.upper(), re.compile(pattern), status, code, matcher)
            )

    def burst(self, method: str, pattern: str, count: int, kind: str = "SlowDown") -> None:
        """Fail the next ``count`` matching requests with transient ``kind`` (a throttling burst)."""
        assert kind in TRANSIENT, kind
        with self._lock:
            self.bursts.append([Refusal(method.upper(), re.compile(pattern)), kind, count])

    def strip_header(self, header: str) -> None:
        """Drop ``header`` from every request before forwarding it."""
        with self._lock:
            self.stripped.add(header.lower())

    def clear(self) -> None:
        """Stop refusing, bursting and stripping (transient faults follow ``rate``)."""
        with self._lock:
            self.refusals.clear()
            self.bursts.clear()
            self.stripped.clear()

    def injected_total(self, kinds: tuple[str, ...] = TRANSIENT) -> int:
        with self._lock:
            return sum(self.injected[k] for k in kinds)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.injected)

    # --- decisions ------------------------------------------------------------------
    def decide(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> tuple[str | None, Refusal | None]:
        """The fault for one request (``path`` with its query): (transient kind, refusal)."""
        with self._lock:
            self.requests[method] += 1
            for rule in self.refusals:
                if rule.matches(method, path, headers):
                    self.injected["refused"] += 1
                    return None, rule
            for name in self.stripped:
                if name in {h.lower() for h in headers}:
                    self.injected["stripped"] += 1
            n = self._seen[(method, path)]
            self._seen[(method, path)] += 1
            for burst in self.bursts:
                if burst[2] > 0 and burst[0].matches(method, path):
                    burst[2] -= 1
                    self.injected[burst[1]] += 1
                    return burst[1], None
            if self.rate <= 0:
                return None, None
            digest = hashlib.sha256(f"{self.seed}|{method}|{path}|{n}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64
            if draw >= self.rate:
                return None, None
            kind = TRANSIENT[digest[8] % len(TRANSIENT)]
            self.injected[kind] += 1
            return kind, None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.resets: set[socket.socket] = set()
        self.resets_lock = threading.Lock()
        super().__init__(address, handler)

    def shutdown_request(self, request) -> None:
        with self.resets_lock:
            reset = request in self.resets
            self.resets.discard(request)
        if reset:
            # SO_LINGER 0 turns close() into a TCP RST; skip the polite FIN.
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_request(request)
            return
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        method, body = self.command, self._body()
        kind, refusal = proxy.decide(method, self.path, self.headers)
        if refusal is not None:
            self._error(refusal.status, refusal.code, f"{self.command} refused by the fault proxy")
            return
        if kind in _ERRORS:
            self._error(*_ERRORS[kind])
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _HOP and k.lower() not in proxy.stripped
        }
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
        try:
            upstream.request(method, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            status, reason, out_headers = response.status, response.reason, response.getheaders()
        finally:
            upstream.close()
        full_length = len(payload)
        if kind == "reset":  # executed upstream; the client never gets the whole answer
            self.close_connection = True
            with self.server.resets_lock:
                self.server.resets.add(self.connection)
            if len(payload) < 2:
                return
            payload = payload[: len(payload) // 2]
        self.send_response_only(status, reason)
        length = None
        for k, v in out_headers:
            if k.lower() == "content-length":
                length = v
            elif k.lower() not in _HOP:
                self.send_header(k, v)
        if method == "HEAD":
            self.send_header("Content-Length", length or "0")
        else:  # announce the whole body, also when only half of it follows
            self.send_header("Content-Length", str(full_length))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _error(self, status: int, code: str, message: str) -> None:
        body = _error_body(code, message, self.path) if self.command != "HEAD" else b""
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
