"""HTTP endpoints shared by address, the HTTP server's hardening, and query names that
must not break log lines. Every exchange is over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import dns.message
import dns.name
import pytest

from resolver.endpoints import WILDCARD, HTTPEndpoints, Route, bind_target
from resolver.httpserver import HTTPRequest, Limits, Response
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Capture, raw_udp, wait_for

REGISTRY = Registry.default()
REPLY_TIMEOUT = 5.0  # a bound on waiting for the server, never an assertion about time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- a raw HTTP client ---------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Client:
    """One TCP connection; requests are written as given, answers parsed by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, head_only: bool = False) -> Answer:
        async with asyncio.timeout(REPLY_TIMEOUT):
            status_line = await self.reader.readuntil(b"\r\n")
            version, status, _reason = status_line.decode().split(" ", 2)
            assert version == "HTTP/1.1"
            headers: dict[str, str] = {}
            while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            length = 0 if head_only else int(headers["content-length"])
            body = await self.reader.readexactly(length)
        return Answer(int(status), headers, body)

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF or reset) without sending more."""
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await self.reader.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.close()


def get(path: str = "/health", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def ok(_request: HTTPRequest) -> Response:
    return Response.text("OK")


@pytest.fixture
def http_log() -> Iterator[Capture]:
    logger = logging.getLogger("resolver.http")
    capture = Capture()
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)


@pytest.fixture
async def endpoints() -> AsyncIterator[HTTPEndpoints]:
    # Short read timeouts so a slow client is answered quickly; the rest as in production.
    http = HTTPEndpoints(Limits(read_timeout=0.3, idle_timeout=0.5, linger=0.2))
    yield http
    await http.close()


async def serve_health(http: HTTPEndpoints) -> Route:
    return await http.add("127.0.0.1:0", "/health", ok, 8080)


# -- sharing by address --------------------------------------------------------------------


def test_host_names_bind_ipv4_first_and_wildcards_are_one_key() -> None:
    assert bind_target("localhost", 9153) == (socket.AF_INET, "127.0.0.1")
    for wildcard in (None, "", "0.0.0.0", "::"):
        assert bind_target(wildcard, 9153)[1] == WILDCARD


async def test_rewriting_an_address_in_a_reload_reuses_the_socket(start_server: StartServer) -> None:
    port = free_port()
    running = await start_server(
        f". {{\n bind 127.0.0.1\n prometheus 127.0.0.1:{port}\n whoami\n}}\n", registry=REGISTRY
    )
    # Same socket written another way: the new configuration must not try to bind it again.
    await running.reconfigure(f". {{\n bind 127.0.0.1\n prometheus localhost:{port}\n whoami\n}}\n")
    client = await Client.connect(port)
    await client.send(get("/metrics"))
    assert (await client.answer()).status == 200
    client.close()


async def test_the_newest_route_answers_and_the_port_closes_with_the_last(endpoints: HTTPEndpoints) -> None:
    async def newer(_request: HTTPRequest) -> Response:
        return Response.text("newer", 503)

    first = await serve_health(endpoints)
    second = await endpoints.add("localhost:0", "/health", newer, 8080)  # the same socket
    assert second.port == first.port and endpoints.serves(first) and endpoints.serves(second)
    client = await Client.connect(first.port)
    await client.send(get())
    answer = await client.answer()
    assert (answer.status, answer.body) == (503, b"newer")
    await endpoints.remove(second)
    await client.send(get())
    assert (await client.answer()).body == b"OK"
    await endpoints.remove(first)
    assert not endpoints.serves(first)
    assert await client.closed()  # the server closed its idle connection with the socket
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(first.port)


# -- what a well-behaved client gets ---------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_on_one_connection(endpoints: HTTPEndpoints) -> None:
    route = await serve_health(endpoints)
    client = await Client.connect(route.port)
    # Three requests in one write: a GET, a HEAD, an unknown path, then one that asks to close.
    await client.send(
        get() + b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n" + get("/nope") + get("/health", "Connection: close\r\n")
    )
    first = await client.answer()
    assert (first.status, first.body) == (200, b"OK")
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    assert first.headers["content-length"] == "2" and "date" in first.headers
    assert "connection" not in first.headers  # HTTP/1.1 keeps the connection by default
    head = await client.answer(head_only=True)
    assert (head.status, head.headers["content-length"], head.body) == (200, "2", b"")
    missing = await client.answer()
    assert (missing.status, missing.body) == (404, b"404 page not found\n")
    last = await client.answer()
    assert (last.status, last.headers["connection"]) == (200, "close")
    assert await client.closed()


async def test_http_1_0_closes_unless_asked_to_keep_alive(endpoints: HTTPEndpoints) -> None:
    route = await serve_health(endpoints)
    client = await Client.connect(route.port)
    await client.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert (await client.answer()).headers["connection"] == "keep-alive"
    await client.send(b"GET /health HTTP/1.0\r\n\r\n")
    answer = await client.answer()
    assert (answer.status, answer.headers["connection"]) == (200, "close")
    assert await client.closed()


async def test_query_strings_absolute_targets_and_escapes_reach_the_route(endpoints: HTTPEndpoints) -> None:
    route = await serve_health(endpoints)
    client = await Client.connect(route.port)
    for target in ("/health?verbose=1", f"http://127.0.0.1:{route.port}/health", "/%68ealth"):
        await client.send(get(target))
        assert (await client.answer()).status == 200, target
    client.close()


async def test_a_small_request_body_is_skipped_and_the_connection_goes_on(endpoints: HTTPEndpoints) -> None:
    route = await serve_health(endpoints)
    client = await Client.connect(route.port)
    await client.send(get("/health", "Content-Length: 5\r\n") + b"hello" + get())
    assert (await client.answer()).status == 200
    assert (await client.answer()).status == 200  # "hello" was not taken for a request
    client.close()


async def test_a_handler_that_raises_gets_500_and_the_server_carries_on(endpoints: HTTPEndpoints) -> None:
    async def broken(_request: HTTPRequest) -> Response:
        raise RuntimeError("bug")

    route = await endpoints.add("127.0.0.1:0", "/broken", broken, 8080)
    await endpoints.add("127.0.0.1:0", "/health", ok, 8080)
    client = await Client.connect(route.port)
    await client.send(get("/broken") + get())
    assert (await client.answer()).status == 500
    assert (await client.answer()).status == 200
    client.close()


# -- what a bad client gets ---------------------------------------------------------------


async def refused(port: int, data: bytes, http_log: Capture) -> Answer:
    """Send ``data``; the answer, after checking that the server closed the connection
    and logged exactly one warning line for it, without a traceback."""
    client = await Client.connect(port)
    await client.send(data)
    answer = await client.answer()
    assert answer.headers["connection"] == "close"
    assert await client.closed()
    client.close()
    await wait_for(lambda: len(http_log.records) == 1)
    (record,) = http_log.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "\n" not in record.getMessage() and "bad request from 127.0.0.1:" in record.getMessage()
    return answer


async def test_an_oversized_request_line_is_414(endpoints: HTTPEndpoints, http_log: Capture) -> None:
    route = await serve_health(endpoints)
    answer = await refused(route.port, get("/" + "a" * 20000), http_log)
    assert answer.status == 414
    assert "414 request line longer than 8192 bytes" in http_log.messages[0]


async def test_oversized_headers_are_431(endpoints: HTTPEndpoints, http_log: Capture) -> None:
    route = await serve_health(endpoints)
    headers = "".join(f"X-Filler-{n}: {'b' * 100}\r\n" for n in range(100))  # each line is short
    assert (await refused(route.port, get("/health", headers), http_log)).status == 431


async def test_one_endless_header_line_is_431(endpoints: HTTPEndpoints, http_log: Capture) -> None:
    route = await serve_health(endpoints)
    assert (await refused(route.port, get("/health", f"Cookie: {'c' * 9000}\r\n"), http_log)).status == 431


async def test_other_methods_are_405_and_the_connection_stays(endpoints: HTTPEndpoints, http_log: Capture) -> None:
    route = await serve_health(endpoints)
    client = await Client.connect(route.port)
    await client.send(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + get())
    answer = await client.answer()
    assert (answer.status, answer.headers["allow"]) == (405, "GET, HEAD")
    assert (await client.answer()).status == 200
    client.close()
    assert len(http_log.records) == 1 and "405 method POST not allowed" in http_log.messages[0]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /health\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  /health HTTP/1.1\r\n\r\n", 400),
        (b"GET health HTTP/1.1\r\n\r\n", 400),
        (b"G(T /health HTTP/1.1\r\n\r\n", 400),
        (b"GET /h\x01ealth HTTP/1.1\r\n\r\n", 400),
        (b"GET /health HTTP/one\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\n\r\n", 505),
        (b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nA: 1\r\n  folded\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"GET /health HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", 413),
        (b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    ],
)
async def test_malformed_requests_get_a_status_and_one_log_line(
    endpoints: HTTPEndpoints, http_log: Capture, data: bytes, status: int
) -> None:
    route = await serve_health(endpoints)
    answer = await refused(route.port, data, http_log)
    assert answer.status == status
    assert answer.body.startswith(f"{status} ".encode())


async def test_a_slow_client_gets_408_and_is_closed(endpoints: HTTPEndpoints, http_log: Capture) -> None:
    route = await serve_health(endpoints)
    client = await Client.connect(route.port)
    await client.send(b"GET /health HTTP/1.1\r\nHo")  # and then nothing more
    answer = await client.answer()
    assert (answer.status, answer.headers["connection"]) == (408, "close")
    assert await client.closed()
    assert len(http_log.records) == 1 and "408 request not complete within 0.3s" in http_log.messages[0]


async def test_silent_and_idle_connections_are_closed_without_a_word(
    endpoints: HTTPEndpoints, http_log: Capture
) -> None:
    route = await serve_health(endpoints)
    silent = await Client.connect(route.port)  # never sends anything
    idle = await Client.connect(route.port)
    await idle.send(get())
    assert (await idle.answer()).status == 200  # then sends nothing more
    assert await silent.closed()
    assert await idle.closed()
    assert http_log.records == []


# -- many connections -------------------------------------------------------------------


async def test_many_concurrent_connections_are_all_answered(endpoints: HTTPEndpoints) -> None:
    route = await serve_health(endpoints)
    clients = await asyncio.gather(*(Client.connect(route.port) for _ in range(100)))
    await asyncio.gather(*(client.send(get()) for client in clients))
    answers = await asyncio.gather(*(client.answer() for client in clients))
    assert [answer.status for answer in answers] == [200] * 100
    for client in clients:
        client.close()


async def test_at_the_limit_busy_connections_keep_their_place(http_log: Capture) -> None:
    http = HTTPEndpoints(Limits(max_connections=3, read_timeout=REPLY_TIMEOUT * 2))
    try:
        route = await serve_health(http)
        busy = [await Client.connect(route.port) for _ in range(3)]
        for client in busy:
            await client.send(b"GET /hea")  # a request under way: not to be dropped
        connections = http._sites[route.address].server.connections
        await wait_for(lambda: sorted(c.state.value for c in connections.values()) == ["reading"] * 3)
        extra = await Client.connect(route.port)
        assert await extra.closed()  # refused: every place is busy
        await wait_for(lambda: len(http_log.records) == 1)
        assert "3 connections busy, refusing new ones" in http_log.messages[0]
        for client in busy:
            await client.send(b"lth HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.answer()).status == 200
            client.close()
    finally:
        await http.close()


async def test_at_the_limit_the_oldest_idle_connection_makes_room() -> None:
    http = HTTPEndpoints(Limits(max_connections=3))
    try:
        route = await serve_health(http)
        idle = [await Client.connect(route.port) for _ in range(3)]
        for client in idle:
            await client.send(get())
            assert (await client.answer()).status == 200  # now each waits for its next request
        newcomer = await Client.connect(route.port)
        await newcomer.send(get())
        assert (await newcomer.answer()).status == 200
        assert await idle[0].closed()  # the oldest idle connection went
        await idle[2].send(get())
        assert (await idle[2].answer()).status == 200  # the others stayed
        for client in [*idle, newcomer]:
            client.close()
    finally:
        await http.close()


async def test_close_ends_every_connection_and_the_listener(endpoints: HTTPEndpoints) -> None:
    route = await serve_health(endpoints)
    idle, reading = await Client.connect(route.port), await Client.connect(route.port)
    await idle.send(get())
    assert (await idle.answer()).status == 200
    await reading.send(b"GET /he")
    await endpoints.close()
    assert await idle.closed()
    assert await reading.closed()
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(route.port)


# -- log lines ---------------------------------------------------------------------------


async def test_a_query_name_cannot_forge_log_lines(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n errors\n log\n}\n", registry=REGISTRY)
    caplog.set_level(logging.INFO)
    name = dns.name.Name([b"x\n[FATAL] plugin/reload: forged", b"\x00nul", b"example", b""])
    await raw_udp(running.port, dns.message.make_query(name, "A").to_wire())
    lines = [r.getMessage() for r in caplog.records if r.name in ("resolver.log", "plugin.errors")]
    assert len(lines) == 2  # one query line (log) and one error line (errors: nobody answered)
    assert all("\n" not in line and "\x00" not in line for line in lines)
    assert all("x\\010[fatal]\\032plugin/reload:\\032forged.\\000nul.example." in line for line in lines)
