"""Tiny upstream DNS servers for the forward tests, on 127.0.0.x with ephemeral ports.

One ``FakeUpstream`` listens on UDP and TCP (or TLS) on the same port, records every query
it gets (transport, raw bytes, source), and answers A queries with its own ``address`` so
a test can tell which upstream answered. Attributes switch on misbehaviour: silence,
truncation over UDP, a spoofed reply sent before the real one, a fixed RCODE, holding
answers until released, lower-casing the question.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass
class Received:
    transport: str  # "udp" or "tcp" (TLS counts as tcp)
    wire: bytes
    source: tuple[Any, ...]

    @property
    def message(self) -> dns.message.Message:
        return dns.message.from_wire(self.wire)

    @property
    def health_check(self) -> bool:
        """The forward plugin's health probe asks for the root (``. IN NS``)."""
        return self.wire[12] == 0


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.get_running_loop().create_task(self.upstream.handle_udp(data, addr, self))
        self.upstream.tasks.add(task)
        task.add_done_callback(self.upstream.tasks.discard)


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.2", address: str = "192.0.2.1") -> None:
        self.host = host
        self.address = address
        self.port = 0
        self.silent = False  # count queries, never answer
        self.ignore_health_checks = False  # never answer the ". IN NS" probe
        self.truncate_udp = False  # UDP answers carry TC and no records
        self.spoof_first: str | None = None  # "id" or "question": a wrong reply precedes the right one
        self.rcode = dns.rcode.NOERROR
        self.lowercase_question = False
        self.empty = False  # NOERROR with no records (NODATA)
        self.hold: asyncio.Event | None = None  # when set, answers wait for it
        self.close_after_answer = False  # TCP: close the connection after each answer
        self.hang_up_once = False  # TCP: close the connection on the next query, unanswered
        self.first_per_connection = False  # TCP: answer only the first query of a connection ("wedged")
        self.questionless = False  # answer with this rcode and no question section
        self.queries: list[Received] = []
        self.connections = 0  # TCP/TLS connections accepted
        self.open_connections = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.handlers: set[asyncio.Task[Any]] = set()  # one per TCP connection
        self.writers: set[asyncio.StreamWriter] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def received(self, transport: str | None = None, health: bool = False) -> list[Received]:
        """Queries received (health probes only if ``health``), optionally of one transport."""
        return [
            query
            for query in self.queries
            if query.health_check == health and (transport is None or query.transport == transport)
        ]

    async def start(self, tls: ssl.SSLContext | None = None) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            break
        else:
            raise RuntimeError("no free port for UDP and TCP")
        self.port = port
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=udp)  # type: ignore[assignment]
        self._tcp = await asyncio.start_server(self._serve_stream, sock=tcp, ssl=tls)
        return self

    def refuse_tcp(self) -> None:
        """Stop listening on TCP (UDP goes on): connections are refused."""
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self.writers):
            writer.close()  # the handler's read ends, and it returns
        for task in list(self.tasks):
            if task not in self.handlers:
                task.cancel()
        await asyncio.gather(*self.tasks, *self.handlers, return_exceptions=True)

    # -- answering ---------------------------------------------------------------------------

    def _answers(self, data: bytes) -> bool:
        if self.silent:
            return False
        return not (self.ignore_health_checks and data[12] == 0)

    def answer(self, data: bytes, transport: str) -> bytes:
        if self.questionless:  # header only: ID, QR, the rcode, no question
            return data[:2] + bytes([0x80 | (data[2] & 0x01), self.rcode & 0x0F]) + b"\x00" * 8
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.set_rcode(self.rcode)
        question = query.question[0]
        if transport == "udp" and self.truncate_udp:
            response.flags |= dns.flags.TC
        elif question.rdtype == dns.rdatatype.A and self.rcode == dns.rcode.NOERROR and not self.empty:
            response.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A", self.address))
        reply = response.to_wire()
        if self.lowercase_question:
            name_end = 12 + len(question.name.to_wire())
            reply = reply[:12] + reply[12:name_end].lower() + reply[name_end:]
        return reply

    def spoof(self, data: bytes) -> bytes:
        """A reply that must not be accepted: a wrong ID, or another question."""
        if self.spoof_first == "id":
            bad = bytes([data[0] ^ 0xFF, data[1] ^ 0xFF]) + data[2:]
            reply = self.answer(bad, "tcp")
        else:
            query = dns.message.from_wire(data)
            other = dns.message.make_query("spoofed.invalid.", "A")
            other.id = query.id
            reply = self.answer(other.to_wire(), "tcp")
        return reply.replace(socket.inet_aton(self.address), socket.inet_aton("6.6.6.6"))

    async def handle_udp(self, data: bytes, addr: Any, protocol: _UDP) -> None:
        self.queries.append(Received("udp", data, addr))
        if not self._answers(data):
            return
        if self.hold is not None:
            await self.hold.wait()
        assert protocol.transport is not None
        if self.spoof_first:
            protocol.transport.sendto(self.spoof(data), addr)
        protocol.transport.sendto(self.answer(data, "udp"), addr)

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        peer = writer.get_extra_info("peername")
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        self.writers.add(writer)
        answered = 0
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                self.queries.append(Received("tcp", data, peer))
                answered += 1
                if self.first_per_connection and answered > 1:
                    continue
                if self.hang_up_once:
                    self.hang_up_once = False
                    break
                if not self._answers(data):
                    continue
                # Each query answered on its own: pipelined queries may be answered out of order.
                task = asyncio.get_running_loop().create_task(self._answer_stream(data, writer))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.open_connections -= 1
            self.writers.discard(writer)
            self.handlers.discard(handler)
            writer.close()

    async def _answer_stream(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        if self.hold is not None:
            await self.hold.wait()
        reply = self.answer(data, "tcp")
        writer.write(len(reply).to_bytes(2, "big") + reply)
        if self.close_after_answer:
            await writer.drain()
            writer.close()
