"""Test helper: an HTTP proxy in front of the S3 test server that injects faults into chosen requests.

Clients talk to the proxy as if it were the server (point ``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.endpoint`).
Each request is forwarded unchanged unless a rule set by :meth:`FaultProxy.fail` matches it; then the proxy
answers with the rule's fault instead, and the server never sees the request (or, for a fault that is a
function, calls it first and then forwards the request: another client that gets there first). A rule lasts
for a number of requests or until :meth:`FaultProxy.clear`, so it can outlast the clients' own retries.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Answer:
    """An S3 error answer: HTTP status, error code and message."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
                f"<Message>{self.message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()


SLOW_DOWN = Answer(503, "SlowDown", "Please reduce your request rate.")
INTERNAL_ERROR = Answer(500, "InternalError", "We encountered an internal error. Please try again.")
PRECONDITION_FAILED = Answer(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold")
DROP = "drop"  # close the connection with a reset, without an answer
STALL = "stall"  # accept the request and answer nothing until the rule is cleared (or STALL_LIMIT_S passes)
STALL_LIMIT_S = 60
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
Matcher = Callable[[str, str, http.client.HTTPMessage], bool]
Fault = Answer | str | Callable[[], None]


@dataclasses.dataclass
class Rule:
    """Answer the requests ``matches(method, path, headers)`` accepts with ``fault``, ``times`` times
    (None: until cleared)."""

    fault: Fault
    matches: Matcher
    times: int | None = None


class FaultProxy:
    """A threaded forwarding proxy to ``upstream`` (``http://host:port``) on a free local port."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlparse(upstream).netloc
        self.rules: list[Rule] = []
        self.faulted: list[str] = []  # "METHOD path" of every request answered with a fault
        self.lock = threading.Lock()
        self.cleared = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.clear()
        self.server.shutdown()
        self.server.server_close()

    def fail(self, fault: Fault, method: str | None = None, key: str | None = None, times: int | None = None,
             when: Matcher | None = None) -> None:
        """Answer with ``fault`` the requests with ``method`` on a path ending in ``key`` for which ``when`` holds
        (each where given), ``times`` times or until :meth:`clear`."""
        def matches(request_method: str, path: str, headers: http.client.HTTPMessage) -> bool:
            return ((method is None or request_method == method)
                    and (key is None or urllib.parse.urlparse(path).path.endswith(key))
                    and (when is None or when(request_method, path, headers)))

        with self.lock:
            self.cleared.clear()
            self.rules.append(Rule(fault, matches, times))

    def clear(self) -> None:
        """Forward every request again (and release stalled ones)."""
        with self.lock:
            self.rules.clear()
            self.cleared.set()

    def fault_for(self, method: str, path: str, headers: http.client.HTTPMessage) -> Fault | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path, headers):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times == 0:
                            self.rules.remove(rule)
                    self.faulted.append(f"{method} {path}")
                    return rule.fault
        return None

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect

            def log_message(self, *args):  # quiet: the tests say what failed
                pass

            def handle_request(self) -> None:
                body = self.read_body()
                fault = proxy.fault_for(self.command, self.path, self.headers)
                if callable(fault):
                    fault()
                    self.forward(body)
                elif fault in (DROP, STALL):
                    if fault == STALL:
                        proxy.cleared.wait(STALL_LIMIT_S)
                    # SO_LINGER 0: closing sends a reset, as a dying server or load balancer does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                elif fault is not None:
                    self.answer(fault.status, [("Content-Type", "application/xml")], fault.body())
                else:
                    self.forward(body)

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""  # HTTP chunks, decoded (the aws-chunked framing inside them, if any, is the server's)
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return body

            def forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    own = HOP_BY_HOP | {"content-length", "server", "date"}  # send_response writes the last two
                    kept = [(n, v) for n, v in response.getheaders() if n.lower() not in own]
                    # A HEAD answer announces the object's length but carries no body.
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.answer(response.status, kept, payload, length)
                finally:
                    upstream.close()

            def answer(self, status: int, headers: list[tuple[str, str]], payload: bytes,
                       length: str | None = None) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", length if length is not None else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_request

        return Handler
