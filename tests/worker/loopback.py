"""HTTP servers on loopback addresses that answer as a test tells them: receivers that trickle,
answer without end, redirect, or pretend to be an MLflow tracking server. Linux answers on all
of 127.0.0.0/8, so two servers on 127.0.0.1 and 127.0.0.2 are two hosts to the SSRF guard."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[BaseHTTPRequestHandler], None]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, handle: Handler) -> None:
        super().__init__((host, 0), _Dispatch)
        self.handle_request_with = handle
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Dispatch(BaseHTTPRequestHandler):
    """Reads the request's body (`body`) before the test's handler answers."""

    server: Server
    protocol_version = "HTTP/1.1"
    body = b""

    def _any(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        self.body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.handle_request_with(self)

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def serving(handle: Handler, host: str = "127.0.0.1") -> Iterator[Server]:
    server = Server(host, handle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def body_of(request: BaseHTTPRequestHandler) -> bytes:
    return request.body if isinstance(request, _Dispatch) else b""


def answer(request: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name.replace("_", "-"), value)
    request.send_header("content-length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


class Flood:
    """A peer that answers `status` with a `total`-byte body, and records how much of it it
    could write before the client hung up (`written`, set once `done`)."""

    def __init__(self, status: int, total: int = 256 * 1024 * 1024) -> None:
        self.status, self.total = status, total
        self.written = 0
        self.done = threading.Event()

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        request.send_response(self.status)
        request.send_header("content-length", str(self.total))
        request.end_headers()
        chunk = b"e" * 65536
        try:
            while self.written < self.total:
                request.wfile.write(chunk)
                self.written += len(chunk)
        except OSError:  # the client hung up
            pass
        self.done.set()


class Trickle:
    """A peer that answers `status` and sends its body a byte every 100 ms, until `released`:
    slow enough for any total deadline, fast enough for every per-read timeout."""

    def __init__(self, status: int, length: int = 1000) -> None:
        self.status, self.length = status, length
        self.released = threading.Event()

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        request.send_response(self.status)
        request.send_header("content-length", str(self.length))
        request.end_headers()
        try:
            for _ in range(self.length):
                request.wfile.write(b"x")
                request.wfile.flush()
                if self.released.wait(0.1):
                    return
        except OSError:
            pass
