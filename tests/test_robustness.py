"""Hard cases for the core: task semantics, odd names, lost replies, leaked sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from tests.conftest import StartServer
from tests.helpers import LOOPBACK, frame, query_bytes, raw_udp, rcode_of, read_frame, wait_for

CONTEXTS = ". {\n bind 127.0.0.1\n contexts\n}\n"


def txt(reply: dns.message.Message) -> str:
    return b"".join(reply.answer[0][0].strings).decode()


# -- every query runs as a real task with its own context ---------------------------------


async def test_asyncio_timeout_works_in_a_plugins_first_step(start_server: StartServer) -> None:
    running = await start_server(CONTEXTS)
    for name in ("now.example.", "wait.example."):
        for query in (running.udp, running.tcp):
            reply = await query(name, "TXT")
            assert reply.rcode() == dns.rcode.NOERROR, name
    assert running.server.stats.panics == 0


async def test_each_query_has_its_own_context(start_server: StartServer) -> None:
    running = await start_server(CONTEXTS)
    assert txt(await running.udp("first.example.", "TXT")) == "-"
    assert txt(await running.udp("second.example.", "TXT")) == "-"  # nothing left over from "first"


async def test_a_chain_that_never_waits_is_answered_without_a_loop_pass(start_server: StartServer) -> None:
    """On Python 3.12+ the eager task finishes inside ``handle``; on 3.11 it is a Task."""
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")
    listener = running.server.listeners[(LOOPBACK, 0)]
    sent: list[bytes] = []
    task = listener.handle(query_bytes("now.example."), (LOOPBACK, 5353), "udp", lambda data, _c: sent.append(data))
    if sys.version_info >= (3, 12):
        assert task is None and len(sent) == 1
    else:
        assert task is not None
        await task
        await wait_for(lambda: len(sent) == 1)


# -- names and replies that are hard to build --------------------------------------------------


async def test_labels_with_dots_and_binary_bytes_are_answered(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")
    name = dns.name.Name([b"a.b", b"\xff\xfe\xe9", b"\xc2\x87", b"Example", b""])
    query = dns.message.make_query(name, "A")
    raw = await raw_udp(running.port, query.to_wire())
    assert raw is not None
    reply = dns.message.from_wire(raw)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].name.labels == name.labels  # exactly as sent
    owners = {rrset.name.labels for rrset in reply.additional}
    assert (b"a.b", b"\xff\xfe\xe9", b"\xc2\x87", b"example", b"") in owners
    assert (b"_udp", b"a.b", b"\xff\xfe\xe9", b"\xc2\x87", b"example", b"") in owners
    assert running.server.stats.panics == 0


async def test_a_reply_that_cannot_be_packed_is_servfail_not_silence(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")
    # 255 octets: the name fits a query, but whoami's "_udp." + name does not fit a reply.
    longest = dns.name.Name([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61, b""])
    raw = await raw_udp(running.port, dns.message.make_query(longest, "A").to_wire())
    assert raw is not None and rcode_of(raw) == dns.rcode.SERVFAIL
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    writer.write(frame(dns.message.make_query(longest, "A").to_wire()) + frame(query_bytes("fine.example.", qid=9)))
    assert rcode_of(await read_frame(reader)) == dns.rcode.SERVFAIL
    assert rcode_of(await read_frame(reader)) == dns.rcode.NOERROR
    writer.close()
    assert running.server.stats.panics == 2


# -- TCP: no answer is lost --------------------------------------------------------------------

DELAYED = ". {\n bind 127.0.0.1\n erratic {\n  delay 1 200ms\n }\n}\n"


async def test_half_closed_tcp_client_still_gets_its_answer(start_server: StartServer) -> None:
    running = await start_server(DELAYED)
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    writer.write(frame(query_bytes("slow.example.", qid=77)))
    writer.write_eof()  # SHUT_WR: "that was all"
    reply = await read_frame(reader)
    assert reply[:2] == struct.pack("!H", 77) and rcode_of(reply) == dns.rcode.NOERROR
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # then the server closes
    writer.close()


async def test_zero_length_frame_after_a_query_closes_only_after_the_answer(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    writer.write(frame(query_bytes("last.example.", qid=5)) + b"\x00\x00")
    reply = await read_frame(reader)
    assert reply[:2] == b"\x00\x05"
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()


async def test_a_pipeline_deeper_than_the_read_pause_is_fully_answered(start_server: StartServer) -> None:
    # 300 queries in flight at once: reading pauses at 256 and must resume.
    running = await start_server(". {\n bind 127.0.0.1\n erratic {\n  delay 1 100ms\n }\n}\n")
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    ids = set(range(1, 301))
    writer.write(b"".join(frame(query_bytes(f"q{i}.example.", qid=i)) for i in sorted(ids)))
    seen = set()
    for _ in ids:
        seen.add(struct.unpack("!H", (await read_frame(reader, timeout=10))[:2])[0])
    assert seen == ids
    writer.close()


# -- reloads leave no sockets behind ------------------------------------------------------------


async def test_a_listener_dropped_by_a_reload_is_closed(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")
    old_port = running.port
    await running.reconfigure(". {\n bind 127.0.0.2\n whoami\n}\n")
    await wait_for(lambda: not running.server.retiring)
    assert set(running.server.listeners) == {("127.0.0.2", 0)}
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # both ports are free again
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind((LOOPBACK, old_port))


# -- IPv6 reverse zones route end to end --------------------------------------------------------


async def test_ipv6_reverse_zone_from_a_cidr_key(start_server: StartServer) -> None:
    running = await start_server("fd00::/64 {\n bind 127.0.0.1\n erratic\n}\n")
    inside = dns.name.from_text("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.")
    outside = dns.name.from_text("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.")
    assert (await running.udp(inside.to_text(), "PTR")).rcode() == dns.rcode.NOERROR
    assert (await running.udp(outside.to_text(), "PTR")).rcode() == dns.rcode.REFUSED


async def test_a_bug_while_delivering_still_gets_the_client_a_servfail(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")

    def broken_deliver(*_args: object) -> None:
        raise RuntimeError("a bug in the reply path")

    running.server.deliver = broken_deliver  # type: ignore[method-assign]
    raw = await raw_udp(running.port, query_bytes("bug.example.", qid=3))
    assert raw is not None and raw[:2] == b"\x00\x03" and rcode_of(raw) == dns.rcode.SERVFAIL
    assert running.server.stats.panics == 1


async def test_a_fatal_shutdown_skips_the_lameduck(start_server: StartServer) -> None:
    from resolver.plugin import Registry

    running = await start_server(
        ". {\n bind 127.0.0.1\n health 127.0.0.1:0 {\n  lameduck 30s\n }\n whoami\n}\n", registry=Registry.default()
    )
    await asyncio.wait_for(running.server.shutdown(lameduck=False), timeout=5)  # not 30s
    assert running.server.stopped.is_set()
