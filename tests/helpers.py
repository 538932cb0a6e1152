"""Test helpers: a handle on a running server, raw DNS clients, waiting on conditions.

Every address used here is loopback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype

from resolver.config import load
from resolver.plugin import Registry
from resolver.server import Server
from tests.testplugins import ORDER as TEST_ORDER

LOOPBACK = "127.0.0.1"
TEST_REGISTRY = Registry(TEST_ORDER, "tests.testplugins")


class Running:
    """A started server and the port its ``.:0`` blocks got."""

    def __init__(self, server: Server, registry: Registry) -> None:
        self.server = server
        self.registry = registry
        self.port = server.port(0)

    async def reconfigure(self, corefile: str) -> None:
        """Load ``corefile`` into the running server, as a reload does."""
        config = load(corefile, "Corefile", self.registry, default_port=0, runtime=self.server.runtime)
        await self.server.apply(config)

    async def udp(self, name: str, rdtype: str = "A", **query_options: Any) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **query_options)
        # ignore_unexpected: a stray datagram (another test's health check reusing the
        # port) must not fail the query; the real reply still has to come.
        return await dns.asyncquery.udp(query, LOOPBACK, port=self.port, timeout=3, ignore_unexpected=True)

    async def tcp(self, name: str, rdtype: str = "A", **query_options: Any) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **query_options)
        return await dns.asyncquery.tcp(query, LOOPBACK, port=self.port, timeout=3)


class CollectReplies(asyncio.DatagramProtocol):
    """A UDP client's protocol that queues every datagram it receives."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(data)


async def raw_udp(port: int, packet: bytes, timeout: float = 2.0, source: str | None = None) -> bytes | None:
    """Send one raw datagram (from the loopback address ``source``, if given); the reply,
    or None if none came within ``timeout``."""
    loop = asyncio.get_running_loop()
    local = (source, 0) if source is not None else None
    transport, protocol = await loop.create_datagram_endpoint(
        CollectReplies, local_addr=local, remote_addr=(LOOPBACK, port)
    )
    try:
        transport.sendto(packet)
        try:
            return await asyncio.wait_for(protocol.replies.get(), timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


async def read_frame(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))[0]
    return await asyncio.wait_for(reader.readexactly(size), timeout)


def frame(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def query_bytes(name: str, rdtype: str = "A", qid: int = 0x1234, **options: Any) -> bytes:
    query = dns.message.make_query(name, rdtype, **options)
    query.id = qid
    return query.to_wire()


def rcode_of(wire: bytes) -> int:
    return wire[3] & 0x0F


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (polling the loop), or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class Capture(logging.Handler):
    """Collects the records of one logger, whatever resolver.logs.configure did to it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]
