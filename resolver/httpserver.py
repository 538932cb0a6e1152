"""A small HTTP/1.1 server for health, ready and metrics: GET and HEAD, nothing else.

Three endpoints that answer a few bytes to kubelet and Prometheus do not need a web
framework: importing aiohttp's server cost about 13 MB of RSS and 100 ms of startup,
more than a third of what the process needs to answer DNS. This module speaks just
enough HTTP/1.1 for those clients (keep-alive, pipelining, HTTP/1.0, HEAD) and is strict
about the rest, because the port may be reachable from the whole cluster:

* the request line and headers together must fit in ``Limits.max_head`` (8 KiB): a
  longer request line is answered 414, longer headers 431;
* a request's head must arrive within ``Limits.read_timeout`` of its first byte (of the
  connection, for the first request), or the client gets 408 (slowloris);
* a kept-alive connection that sends nothing for ``Limits.idle_timeout`` is closed;
* at most ``Limits.max_connections`` connections are open per listening socket: at the
  limit, a new connection replaces the oldest one that has not started a request, or is
  closed at once if every one is busy;
* a small request body (``Content-Length`` up to 8 KiB) is read and discarded, a bigger
  one is answered 413, a chunked one 501, and the connection is closed after either;
* methods other than GET and HEAD get 405, a malformed request line or header 400,
  an HTTP version other than 1.x 505.

Each refused request logs one ``[WARNING]`` line (never a traceback) and gets a short
plain-text answer with ``Connection: close``; the connection is then closed gracefully
(our side shut, the client's leftovers read and dropped for a moment) so that the client
reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import unquote

log = logging.getLogger("resolver.http")

TEXT = "text/plain; charset=utf-8"
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
METHODS = ("GET", "HEAD")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_TARGET_BYTES = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no controls, spaces or 8-bit bytes
_ABSOLUTE = re.compile(r"https?://[^/?#]*", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """What one client may take from the server; tests shorten the timeouts."""

    max_head: int = 8192  # request line plus headers, bytes
    max_headers: int = 100
    max_body: int = 8192  # bodies up to this are read and dropped; longer ones refused
    read_timeout: float = 10.0  # from a request's first byte (a connection's start) to its last header
    idle_timeout: float = 75.0  # between requests on a kept-alive connection (aiohttp's default)
    write_timeout: float = 10.0  # for an answer to be taken by a client that does not read
    max_connections: int = 128
    close_grace: float = 1.0  # on close, for answers being written to finish
    linger: float = 2.0  # after a refusal, how long the client's leftovers are read and dropped


@dataclass
class HTTPRequest:
    method: str
    target: str
    path: str  # percent-decoded, without the query
    version: tuple[int, int]
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())


Dispatch = Callable[[HTTPRequest], Awaitable[Response]]


class Refusal(Exception):
    """A request answered with an error status; the connection closes after it."""

    def __init__(self, status: int, why: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.headers = headers or {}


class _Gone(Exception):
    """The client closed the connection, or went quiet before a request began: nothing
    to answer and nothing worth a log line (port scans and load-balancer checks do it)."""


class State(Enum):
    WAITING = "waiting"  # for a request's first byte: may be closed to make room
    READING = "reading"
    ANSWERING = "answering"
    CLOSING = "closing"  # made room for a newer connection


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    peer: str
    state: State = State.WAITING


class HTTPServer:
    """One listening socket; every well-formed GET or HEAD is handed to ``dispatch``."""

    def __init__(self, dispatch: Dispatch, name: str, limits: Limits | None = None) -> None:
        self.dispatch = dispatch
        self.name = name  # the address, for log lines
        self.limits = limits or Limits()
        self.connections: dict[asyncio.Task[None] | None, _Connection] = {}
        self._server: asyncio.Server | None = None
        self._full = False  # the connection limit was hit and logged; reset once below it

    async def start(self, sock: socket.socket) -> None:
        # The stream limit bounds what one readuntil may buffer: a request line or header
        # that long is refused before it can grow further.
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=self.limits.max_head)

    async def close(self) -> None:
        """Stop listening; close every connection, giving answers in progress a moment."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            if conn.state is not State.ANSWERING:
                conn.writer.close()
        tasks = [task for task in self.connections if task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.limits.close_grace)
            for task in pending:
                self.connections[task].writer.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if not self._admit(writer):
            return
        conn = self.connections[task] = _Connection(writer, _peer_text(writer))
        try:
            await self._converse(reader, conn)
        except (_Gone, OSError, TimeoutError, asyncio.IncompleteReadError):  # the network, not a bug
            pass
        except asyncio.CancelledError:
            # The loop is shutting down. Ending normally matters: a cancelled connection
            # task would make asyncio's own callback log an error for it.
            pass
        except Exception:
            log.exception("HTTP %s: connection from %s failed", self.name, conn.peer)
        finally:
            del self.connections[task]
            writer.close()
            if self._full and len(self.connections) < self.limits.max_connections:
                self._full = False

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """At the connection limit, make room by closing the oldest connection that has no
        request under way; refuse the new one if there is none."""
        if len(self.connections) < self.limits.max_connections:
            return True
        victim = next((c for c in self.connections.values() if c.state is State.WAITING), None)
        if victim is not None:
            victim.state = State.CLOSING
            victim.writer.close()
            return True
        if not self._full:
            self._full = True
            log.warning(
                "HTTP %s: %d connections busy, refusing new ones until one ends", self.name, len(self.connections)
            )
        writer.transport.abort()
        return False

    async def _converse(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        """Answer requests one after the other (pipelined ones in order) until the client
        or a refusal closes the connection."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        wait = limits.read_timeout  # a new connection has to start its request promptly
        while True:
            conn.state = State.WAITING
            try:
                try:
                    async with asyncio.timeout(wait) as deadline:
                        first = await reader.read(1)
                        if not first or conn.state is State.CLOSING:
                            raise _Gone
                        conn.state = State.READING
                        deadline.reschedule(loop.time() + limits.read_timeout)
                        request = await self._read_request(reader, first)
                except TimeoutError:
                    if conn.state is not State.READING:
                        raise _Gone from None  # nothing was sent: an idle connection, closed quietly
                    raise Refusal(408, f"request not complete within {limits.read_timeout:g}s") from None
            except Refusal as refusal:
                await self._refuse(reader, conn, refusal)
                return
            conn.state = State.ANSWERING
            if request.method not in METHODS:
                refusal = Refusal(405, f"method {request.method[:20]} not allowed", {"Allow": ", ".join(METHODS)})
                self._log_refusal(conn, refusal)
                response = _error_response(refusal)
            else:
                response = await self._answer(request, conn)
            keep = _keep_alive(request)
            await self._write(conn, response, request, keep)
            if not keep:
                return
            wait = limits.idle_timeout

    async def _answer(self, request: HTTPRequest, conn: _Connection) -> Response:
        try:
            return await self.dispatch(request)
        except Exception:
            log.exception("HTTP %s: handler for %s failed", self.name, request.path)
            return Response.text("500 internal server error\n", 500)

    async def _read_request(self, reader: asyncio.StreamReader, first: bytes) -> HTTPRequest:
        limits = self.limits
        line = first if first == b"\n" else first + await _read_line(reader, 414, "request line", limits.max_head)
        empty_lines = 0
        while line in (b"\r\n", b"\n") and empty_lines < 4:  # RFC 9112 2.2: tolerated before a request
            empty_lines += 1
            line = await _read_line(reader, 414, "request line", limits.max_head)
        size = len(line)
        if size > limits.max_head:
            raise Refusal(414, f"request line longer than {limits.max_head} bytes")
        method, target, version = _parse_request_line(line)
        headers: dict[str, str] = {}
        count = 0
        while True:
            line = await _read_line(reader, 431, "request line and headers", limits.max_head)
            size += len(line)
            if size > limits.max_head:
                raise Refusal(431, f"request line and headers longer than {limits.max_head} bytes")
            line = _chomp(line)
            if not line:
                break
            count += 1
            if count > limits.max_headers:
                raise Refusal(431, f"more than {limits.max_headers} header fields")
            name, value = _parse_header(line)
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        request = HTTPRequest(method, target, _path_of(target), version, headers)
        await self._skip_body(reader, request)
        return request

    async def _skip_body(self, reader: asyncio.StreamReader, request: HTTPRequest) -> None:
        """No endpoint reads a body; a small one is dropped so the connection can go on."""
        if "transfer-encoding" in request.headers:
            raise Refusal(501, "request bodies with Transfer-Encoding are not supported")
        text = request.headers.get("content-length")
        if text is None:
            return
        values = {value.strip() for value in text.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit() or not next(iter(values)).isascii():
            raise Refusal(400, "invalid Content-Length")
        length = int(values.pop())
        if length > self.limits.max_body:
            raise Refusal(413, f"request body longer than {self.limits.max_body} bytes")
        if length:
            await reader.readexactly(length)

    async def _write(self, conn: _Connection, response: Response, request: HTTPRequest | None, keep: bool) -> None:
        head = _response_head(response, keep, request is not None and request.version == (1, 0))
        send_body = request is None or request.method != "HEAD"
        conn.writer.write(head + response.body if send_body else head)
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await conn.writer.drain()
        except TimeoutError:
            conn.writer.transport.abort()  # a client that does not read holds no buffer for long
            raise _Gone from None

    async def _refuse(self, reader: asyncio.StreamReader, conn: _Connection, refusal: Refusal) -> None:
        self._log_refusal(conn, refusal)
        conn.state = State.ANSWERING
        await self._write(conn, _error_response(refusal), None, keep=False)
        conn.state = State.WAITING  # only draining now: may be closed to make room
        await self._linger(reader, conn.writer)

    def _log_refusal(self, conn: _Connection, refusal: Refusal) -> None:
        log.warning("HTTP %s: bad request from %s: %d %s", self.name, conn.peer, refusal.status, refusal.why)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close our side, then read and drop what the client still sends, for a moment:
        closing with unread data would reset the connection, and the client could lose
        the answer it has not read yet."""
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(self.limits.linger):
                dropped = 0
                while dropped < 1 << 20:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    dropped += len(chunk)


# -- parsing ---------------------------------------------------------------------------


async def _read_line(reader: asyncio.StreamReader, status: int, what: str, limit: int) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:  # the stream's limit is ``limit``: no newline within it
        raise Refusal(status, f"{what} longer than {limit} bytes") from None
    except asyncio.IncompleteReadError:
        raise _Gone from None


def _chomp(line: bytes) -> bytes:
    """The line without its LF or CRLF (a bare LF is accepted, as RFC 9112 allows)."""
    line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line


def _parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    parts = _chomp(line).split(b" ")
    if len(parts) != 3:
        raise Refusal(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise Refusal(400, "malformed method")
    if not _TARGET_BYTES.fullmatch(target):
        raise Refusal(400, "malformed request target")
    matched = _VERSION.fullmatch(version)
    if matched is None:
        raise Refusal(400, "malformed HTTP version")
    if matched.group(1) != b"1":
        raise Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
    return method.decode(), target.decode(), (1, int(matched.group(2)))


def _parse_header(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise Refusal(400, "folded header line")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise Refusal(400, "malformed header line")
    return name.decode().lower(), value.strip(b" \t").decode("latin-1")


def _path_of(target: str) -> str:
    """The decoded path of an origin-form (``/metrics?x``) or absolute-form
    (``http://host/metrics``) target; ``*`` stays ``*`` (no route has it)."""
    matched = _ABSOLUTE.match(target)
    if matched is not None:
        target = target[matched.end() :] or "/"
    elif not target.startswith("/") and target != "*":
        raise Refusal(400, "malformed request target")
    path = target.partition("?")[0].partition("#")[0]
    return unquote(path, errors="replace")


def _keep_alive(request: HTTPRequest) -> bool:
    tokens = {token.strip().lower() for token in request.headers.get("connection", "").split(",")}
    if request.version >= (1, 1):
        return "close" not in tokens
    return "keep-alive" in tokens


# -- answers ---------------------------------------------------------------------------


def _error_response(refusal: Refusal) -> Response:
    reason = REASONS.get(refusal.status, "Error")
    return Response(refusal.status, f"{refusal.status} {reason}\n".encode(), TEXT, refusal.headers)


def _response_head(response: Response, keep: bool, http10: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
        f"Date: {_http_date()}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers.items())
    if not keep:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")  # an HTTP/1.0 client asked for it: say yes
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: tuple[int, str] = (-1, "")


def _http_date() -> str:
    """``Date`` in RFC 9110's IMF-fixdate, English whatever the locale; made once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        text = f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        text += f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
        _date_cache = (now, text)
    return _date_cache[1]


def _peer_text(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple) or len(peer) < 2:
        return "?"
    host = str(peer[0])
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
