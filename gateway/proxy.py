"""The request handler: health route, predict route, and a faithful pass-through.

Standard library only (``http.server`` + ``http.client``): the runtime image
should carry nothing the handler does not need, and one upstream on loopback
needs no connection pooling.

Bodies are never buffered whole. Requests are forwarded as they are read
(Content-Length or chunked); responses are relayed as they arrive, and a
chunked response keeps its chunk boundaries, because streaming clients of
TorchServe read one message per chunk.
"""

from __future__ import annotations

import http.client
import json
import logging
from http.server import BaseHTTPRequestHandler
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

from gateway import health
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1: headers that describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
COPY_BLOCK = 64 * 1024
MAX_CHUNK_LINE = 4096
WORKER_DIED = b'{"error": "the model worker died during this request; retry it", "code": 507}'


class BadBody(ValueError):
    """A peer sent a body whose framing does not parse or ends early."""


def upstream_path(settings: GatewaySettings, raw_path: str) -> str:
    """The TorchServe path for a client path: the predict route is renamed, the rest kept.

    The query string travels unchanged either way.
    """
    parts = urlsplit(raw_path)
    path = parts.path
    if path == settings.predict_route:
        path = settings.upstream_predict_path
    return path + (f"?{parts.query}" if parts.query else "")


def forwardable(headers) -> list[tuple[str, str]]:
    """The end-to-end headers of a message, in order, repeats kept.

    Also drops headers named in ``Connection:``, which are hop-by-hop too.
    """
    named = {
        token.strip().lower()
        for value in headers.get_all("Connection", [])
        for token in value.split(",")
    }
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Yield the chunks of a chunked body one by one, as they are read, then eat the trailer."""
    while True:
        line = stream.readline(MAX_CHUNK_LINE)
        if not line.endswith(b"\n"):
            raise BadBody("chunk size line missing or too long")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadBody(f"bad chunk size {line[:40]!r}") from None
        if size == 0:
            break
        data = _read_exact(stream, size)
        if stream.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
            raise BadBody("chunk not followed by CRLF")
        yield data
    while stream.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
        pass  # trailer fields: dropped, as TorchServe sends none


def read_length(stream: BinaryIO, length: int) -> Iterator[bytes]:
    """Yield a Content-Length body in blocks, so large requests are not held in memory."""
    left = length
    while left > 0:
        block = stream.read(min(COPY_BLOCK, left))
        if not block:
            raise BadBody(f"body ended {left} bytes early")
        left -= len(block)
        yield block


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise BadBody("body ended inside a chunk")
    return data


class GatewayHandler(BaseHTTPRequestHandler):
    """One client connection; ``settings`` is set on a subclass by ``server.make_server``."""

    settings: GatewaySettings
    protocol_version = "HTTP/1.1"
    server_version = "torchserve-llm-gateway"
    # An idle keep-alive connection frees its thread after this long.
    timeout = 120

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch()

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature from http.server)
        log.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        server = self.server
        if server.draining:
            self.close_connection = True
            self._drain_request_body()
            self._send_json(503, b'{"error": "shutting down"}')
            return
        server.request_started()
        try:
            if urlsplit(self.path).path == self.settings.health_route and self.command in ("GET", "HEAD"):
                self._answer_health()
            else:
                self._proxy()
        finally:
            server.request_finished()
            if server.draining:
                self.close_connection = True

    def _answer_health(self) -> None:
        self._drain_request_body()
        state = health.check(self.settings.app, self.settings.management, self.settings.health_timeout_s)
        self._send_json(state.http_status, state.body())

    def _proxy(self) -> None:
        s = self.settings
        try:
            body = self._request_body()
        except ValueError as exc:
            self.close_connection = True
            self._send_json(400, json.dumps({"error": f"bad request body: {exc}"}).encode())
            return
        conn = http.client.HTTPConnection(s.inference.host, s.inference.port, timeout=s.upstream_timeout_s)
        held = None
        try:
            try:
                conn.connect()
                held = self.server.watch.hold(conn.sock)
                self._send_upstream(conn, body)
                response = conn.getresponse()
            except BadBody as exc:
                self.close_connection = True
                self._send_json(400, json.dumps({"error": f"bad request body: {exc}"}).encode())
                return
            except (OSError, http.client.HTTPException) as exc:
                self.close_connection = True
                if held is not None and held.worker_died:
                    self._send_json(507, WORKER_DIED)
                    return
                log.warning("TorchServe inference API failed for %s %s: %s", self.command, urlsplit(self.path).path, exc)
                self._send_json(502, b'{"error": "TorchServe is not answering"}')
                return
            self._relay(response)
        finally:
            if held is not None:
                self.server.watch.release(held)
            conn.close()

    def _client_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _request_body(self) -> Iterator[bytes] | None:
        if self._client_chunked():
            return read_chunks(self.rfile)
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        if not length.strip().isdigit():
            raise ValueError(f"Content-Length {length!r}")
        return read_length(self.rfile, int(length))

    def _drain_request_body(self) -> None:
        """Read and drop a body we answer without forwarding, so keep-alive stays in step.

        A body whose framing is broken cannot be skipped: the connection closes instead.
        """
        try:
            for _ in self._request_body() or ():
                pass
        except ValueError:
            self.close_connection = True

    def _send_upstream(self, conn: http.client.HTTPConnection, body: Iterator[bytes] | None) -> None:
        """Send the request line, the client's end-to-end headers, then the body as it is read.

        A chunked request stays chunked upstream (block by block), so a large
        upload is never held whole in the gateway.
        """
        chunked = self._client_chunked()
        conn.putrequest(self.command, upstream_path(self.settings, self.path), skip_host=True, skip_accept_encoding=True)
        headers = forwardable(self.headers)
        for name, value in headers:
            # http.server already answered any "Expect: 100-continue" itself.
            if name.lower() != "expect" and not (chunked and name.lower() == "content-length"):
                conn.putheader(name, value)
        if not any(name.lower() == "host" for name, _ in headers):
            conn.putheader("Host", f"{self.settings.inference.host}:{self.settings.inference.port}")
        conn.putheader("X-Forwarded-For", self.client_address[0])
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for block in body or ():
            conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        if chunked:
            conn.send(b"0\r\n\r\n")

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send TorchServe's answer back: status, headers, then the body as it arrives.

        A failure half-way closes the client connection without the final
        chunk, so the client sees a truncated response rather than a short one
        that looks complete.
        """
        self.log_request(response.status)
        self.send_response_only(response.status, response.reason)
        for name, value in forwardable(response.headers):
            self.send_header(name, value)
        if self.command == "HEAD" or response.status in (204, 304) or response.status < 200:
            self.end_headers()
            return
        if response.getheader("Content-Length") is not None and not response.chunked:
            self.end_headers()
            blocks = _until_eof(response)
            framed = False
        else:
            # Chunked upstream, or one that ends its body by closing: re-chunk to
            # the client, one chunk per upstream chunk, each flushed at once.
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            blocks = read_chunks(response.fp) if response.chunked else _until_eof(response)
            framed = True
        try:
            for block in blocks:
                if block:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if framed else block)
                    self.wfile.flush()
            if framed:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (OSError, http.client.HTTPException, BadBody) as exc:
            log.warning("response for %s cut short: %s", urlsplit(self.path).path, exc)
            self.close_connection = True

    def _send_json(self, status: int, body: bytes) -> None:
        self.log_request(status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _until_eof(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """Yield what the upstream has sent so far, block by block, up to its length or EOF."""
    while True:
        block = response.read1(COPY_BLOCK)
        if not block:
            return
        yield block
