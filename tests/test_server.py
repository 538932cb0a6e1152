"""The server end to end over real UDP and TCP sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.config import load
from resolver.server import Listener, Router, Server
from tests.conftest import StartServer
from tests.helpers import (
    LOOPBACK,
    TEST_REGISTRY,
    CollectReplies,
    Running,
    frame,
    query_bytes,
    raw_udp,
    rcode_of,
    read_frame,
    wait_for,
)

WHOAMI = ". {\n bind 127.0.0.1\n whoami\n}\n"


def additional(reply: dns.message.Message, rdtype: int) -> list[dns.rrset.RRset]:
    return [rrset for rrset in reply.additional if rrset.rdtype == rdtype]


# -- whoami proves the chain end to end ---------------------------------------------------


async def test_whoami_over_udp_reports_address_port_and_transport(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    reply = await running.udp("example.org")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert not reply.answer
    (address,) = additional(reply, dns.rdatatype.A)
    assert address.name.to_text() == "example.org." and address[0].address == LOOPBACK
    (service,) = additional(reply, dns.rdatatype.SRV)
    assert service.name.to_text() == "_udp.example.org."
    assert 1024 <= service[0].port <= 65535


async def test_whoami_over_tcp_reports_the_clients_port(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(frame(query_bytes("who.example.")))
    reply = dns.message.from_wire(await read_frame(reader))
    writer.close()
    (service,) = additional(reply, dns.rdatatype.SRV)
    assert service.name.to_text() == "_tcp.who.example."
    assert service[0].port == client_port


async def test_reply_copies_id_rd_and_the_question_exactly(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    query = query_bytes("wHoAmI.ExAmPlE.oRg", qid=0xBEEF)  # 0x20 mixed case
    reply = await raw_udp(running.port, query)
    assert reply is not None
    assert reply[:2] == b"\xbe\xef"
    assert reply[2] & 0x01  # RD copied
    question_end = 12 + len(b"\x06wHoAmI\x07ExAmPlE\x03oRg\x00") + 4
    assert reply[12:question_end] == query[12:question_end]


async def test_edns_is_reflected_with_do_bit(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    reply = await running.udp("example.org", use_edns=0, want_dnssec=True, payload=4096)
    assert reply.edns == 0
    assert reply.ednsflags & dns.flags.DO
    plain = await running.udp("example.org", use_edns=False)
    assert plain.edns == -1


# -- routing ------------------------------------------------------------------------------

ROUTED = """
example.org {
    bind 127.0.0.1
    erratic
}
sub.example.org {
    bind 127.0.0.1
    report
}
. {
    bind 127.0.0.1
    whoami
}
"""


async def test_longest_matching_zone_wins(start_server: StartServer) -> None:
    running = await start_server(ROUTED)
    erratic = await running.udp("www.example.org")
    assert erratic.answer[0][0].address == "192.0.2.53"
    report = await running.udp("a.b.Sub.Example.ORG", "TXT")
    assert report.answer[0].rdtype == dns.rdatatype.TXT
    apex = await running.udp("sub.example.org", "TXT")
    assert apex.answer[0].rdtype == dns.rdatatype.TXT
    other = await running.udp("example.net")
    assert not other.answer and additional(other, dns.rdatatype.A)  # whoami
    # "notexample.org" is not inside example.org: label boundaries, not string suffixes.
    lookalike = await running.udp("notexample.org")
    assert not lookalike.answer and additional(lookalike, dns.rdatatype.A)


async def test_zone_nobody_serves_is_refused(start_server: StartServer) -> None:
    running = await start_server("example.org {\n bind 127.0.0.1\n whoami\n}\n")
    reply = await running.udp("example.net")
    assert reply.rcode() == dns.rcode.REFUSED
    assert running.server.stats.refused == 1
    assert (await running.udp("a.example.org")).rcode() == dns.rcode.NOERROR


async def test_reverse_zone_from_cidr_key(start_server: StartServer) -> None:
    running = await start_server("10.0.0.0/24 {\n bind 127.0.0.1\n erratic\n}\n")
    assert (await running.udp("5.0.0.10.in-addr.arpa", "PTR")).rcode() == dns.rcode.NOERROR
    assert (await running.udp("5.1.0.10.in-addr.arpa", "PTR")).rcode() == dns.rcode.REFUSED


async def test_chain_in_which_nobody_answers_is_servfail(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n first\n second\n}\n")
    assert (await running.udp("example.org")).rcode() == dns.rcode.SERVFAIL


async def test_plugins_run_in_registry_order_and_find_each_other(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n report\n second\n first\n}\n")
    reply = await running.udp("example.org", "TXT")
    texts = [b"".join(rr.strings).decode() for rrset in reply.answer for rr in rrset]
    assert texts == ["first,second", "found:first"]


# -- truncation ---------------------------------------------------------------------------

BIG = ". {\n bind 127.0.0.1\n big 100\n}\n"  # 100 A records: about 1.7 kB


async def test_udp_reply_too_big_is_truncated_at_a_record_boundary(start_server: StartServer) -> None:
    running = await start_server(BIG)
    raw = await raw_udp(running.port, query_bytes("big.example."))
    assert raw is not None and len(raw) <= 512
    reply = dns.message.from_wire(raw)  # parses: the cut fell between records
    assert reply.flags & dns.flags.TC
    assert 0 < len(reply.answer[0]) < 100


async def test_edns_buffer_size_is_honoured(start_server: StartServer) -> None:
    running = await start_server(BIG)
    small = await running.udp("big.example.", use_edns=0, payload=1232)
    assert small.flags & dns.flags.TC and len(small.to_wire()) <= 1232
    assert small.edns == 0  # the OPT record survives truncation
    large = await running.udp("big.example.", use_edns=0, payload=4096)
    assert not large.flags & dns.flags.TC and len(large.answer[0]) == 100


async def test_tcp_retry_after_truncation_gets_everything(start_server: StartServer) -> None:
    running = await start_server(BIG)
    query = dns.message.make_query("big.example.", "A")
    reply, used_tcp = await asyncio.to_thread(
        dns.query.udp_with_fallback, query, LOOPBACK, timeout=3, port=running.port
    )
    assert used_tcp
    assert not reply.flags & dns.flags.TC
    assert len(reply.answer[0]) == 100


# -- malformed and unusual input -----------------------------------------------------------


async def test_short_packet_is_dropped_and_counted(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    assert await raw_udp(running.port, b"\x12\x34\x01", timeout=0.3) is None
    assert running.server.stats.dropped_short == 1
    assert (await running.udp("still.alive.")).rcode() == dns.rcode.NOERROR


async def test_responses_are_never_answered(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    response = bytearray(query_bytes("example.org"))
    response[2] |= 0x80
    assert await raw_udp(running.port, bytes(response), timeout=0.3) is None
    assert running.server.stats.dropped_responses == 1


async def test_malformed_body_gets_formerr_with_the_id(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    header = struct.pack("!HHHHHH", 0xCAFE, 0x0100, 1, 0, 0, 0)
    bodies = (
        b"\x07example",  # name runs past the end
        b"\x03com\x00\x00",  # QTYPE/QCLASS cut short
        b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer in the question
        b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01",  # label longer than 63
    )
    for body in bodies:
        reply = await raw_udp(running.port, header + body)
        assert reply is not None, body
        assert reply[:2] == b"\xca\xfe" and rcode_of(reply) == dns.rcode.FORMERR and reply[2] & 0x80


async def test_question_count_other_than_one_is_formerr(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    query = bytearray(query_bytes("example.org"))
    for count in (0, 2):
        query[4:6] = struct.pack("!H", count)
        reply = await raw_udp(running.port, bytes(query))
        assert reply is not None and rcode_of(reply) == dns.rcode.FORMERR


async def test_bad_opt_record_is_formerr(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    query = query_bytes("example.org", use_edns=0)
    assert rcode_of(await raw_udp(running.port, query[:-3]) or b"\0\0\0\0") == dns.rcode.FORMERR


async def test_other_opcodes_get_notimp(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    for opcode in (dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE):
        query = dns.message.make_query("example.org", "SOA")
        query.set_opcode(opcode)
        raw = await raw_udp(running.port, query.to_wire())
        assert raw is not None
        reply = dns.message.from_wire(raw)
        assert reply.rcode() == dns.rcode.NOTIMP
        assert reply.opcode() == opcode
        assert reply.question[0].name == query.question[0].name


async def test_unknown_edns_version_gets_badvers(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    reply = await running.udp("example.org", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0


async def test_plugin_exception_becomes_servfail_and_is_counted(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n crash\n whoami\n}\n")
    assert (await running.udp("crash.example.")).rcode() == dns.rcode.SERVFAIL
    assert (await running.tcp("crash-late.example.")).rcode() == dns.rcode.SERVFAIL
    assert running.server.stats.panics == 2
    assert (await running.udp("fine.example.")).rcode() == dns.rcode.NOERROR


@settings(max_examples=300, deadline=None)
@given(
    packet=st.one_of(
        st.binary(max_size=600),
        # Mostly-valid headers (QUERY, one question) so the body parsers get exercised.
        st.binary(min_size=12, max_size=600).map(lambda b: b[:2] + b"\x01\x00\x00\x01" + b[6:]),
    )
)
def test_random_packets_never_raise_and_any_reply_is_a_response(packet: bytes) -> None:
    """Property: whatever the bytes, handling them raises nothing, no plugin fails on
    them (no panic), and a reply (if any) carries the query's ID with QR set and parses.
    Runs ``Listener.handle`` directly, no sockets, so hypothesis can try many inputs
    quickly; the test below does it over sockets."""

    async def scenario() -> None:
        config = load(WHOAMI, "Corefile", TEST_REGISTRY, default_port=0)
        server = Server(config.runtime)
        listener = Listener(server, LOOPBACK, 0, Router({".": config.blocks[0]}))
        replies: list[bytes] = []
        task = listener.handle(packet, (LOOPBACK, 5353), "udp", lambda data, _addr: replies.append(data))
        if task is not None:
            await task
            await asyncio.sleep(0)  # let the done callback deliver
        for reply in replies:
            assert reply[:2] == packet[:2]
            assert reply[2] & 0x80
            dns.message.from_wire(reply)
        assert server.stats.panics == 0

    asyncio.run(scenario())


async def test_fuzzed_traffic_over_real_sockets_leaves_the_server_answering(start_server: StartServer) -> None:
    import random

    running = await start_server(WHOAMI)
    rng = random.Random(1234)
    base = query_bytes("example.org", use_edns=0)
    for _ in range(500):
        packet = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            packet[rng.randrange(len(packet))] = rng.randrange(256)
        packet = packet[: rng.randint(0, len(packet))]
        await raw_udp(running.port, bytes(packet), timeout=0.02)
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    garbage = struct.pack("!HHHHHH", 0x0102, 0x0100, 1, 0, 0, 0) + b"\x50garbage-that-is-not-a-name"
    writer.write(frame(garbage) + frame(query_bytes("after.garbage.", qid=7)))
    first = await read_frame(reader)
    assert rcode_of(first) == dns.rcode.FORMERR
    second = await read_frame(reader)
    assert second[:2] == b"\x00\x07" and rcode_of(second) == dns.rcode.NOERROR
    writer.close()
    assert (await running.udp("after.fuzz.")).rcode() == dns.rcode.NOERROR


# -- TCP ----------------------------------------------------------------------------------


async def test_pipelined_tcp_queries_are_answered_as_they_finish(start_server: StartServer) -> None:
    # Every 2nd query is delayed 300ms: the fast ones must not wait behind them.
    running = await start_server(". {\n bind 127.0.0.1\n erratic {\n  delay 2 300ms\n }\n}\n")
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    ids = list(range(1, 41))
    writer.write(b"".join(frame(query_bytes(f"q{i}.example.", qid=i)) for i in ids))
    order = []
    for _ in ids:
        reply = await read_frame(reader)
        order.append(struct.unpack("!H", reply[:2])[0])
        assert rcode_of(reply) == dns.rcode.NOERROR
    writer.close()
    assert sorted(order) == ids
    # The first 20 replies are the undelayed (odd-numbered) queries.
    assert sorted(order[:20]) == ids[0::2]


async def test_tcp_idle_connections_are_closed(start_server: StartServer) -> None:
    running = await start_server(WHOAMI, tcp_idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    writer.write(frame(query_bytes("example.org")))
    await read_frame(reader)
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # EOF: server closed it
    writer.close()


async def test_tcp_connection_cap(start_server: StartServer) -> None:
    running = await start_server(WHOAMI, max_tcp_connections=2)
    kept = [await asyncio.open_connection(LOOPBACK, running.port) for _ in range(2)]
    await wait_for(lambda: sum(len(listener.connections) for listener in running.server.listeners.values()) == 2)
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    assert running.server.stats.tcp_rejected == 1
    for kept_reader, kept_writer in kept:
        kept_writer.write(frame(query_bytes("still.served.")))
        assert rcode_of(await read_frame(kept_reader)) == dns.rcode.NOERROR
        kept_writer.close()
    writer.close()


# -- shutdown and reconfiguration -------------------------------------------------------------


async def test_graceful_shutdown_answers_queries_in_flight(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n erratic {\n  delay 1 400ms\n }\n}\n")
    udp_query = asyncio.create_task(running.udp("slow.example."))
    tcp_query = asyncio.create_task(running.tcp("slow-tcp.example."))
    await wait_for(lambda: len(running.server.in_flight) == 2)
    await running.server.shutdown()
    assert (await udp_query).answer[0][0].address == "192.0.2.53"
    assert (await tcp_query).answer[0][0].address == "192.0.2.53"
    # And nothing listens any more.
    assert await raw_udp(running.port, query_bytes("late.example."), timeout=0.3) is None


def test_answers_of_the_last_pass_leave_before_the_socket_closes() -> None:
    """UDP answers wait for the end of their event-loop pass (``send_later``): a cache
    hit read in the very pass that closes the listener is still sent, not dropped. On
    uvloop, as the server runs: its transport refuses to send once closed (asyncio's
    unconnected datagram transport still would)."""

    async def scenario() -> bytes:
        config = load(". {\n bind 127.0.0.1\n cache\n erratic\n}\n", "Corefile", TEST_REGISTRY, default_port=0)
        server = Server(config.runtime)
        await server.apply(config)
        running = Running(server, TEST_REGISTRY)
        loop = asyncio.get_running_loop()
        client, collected = await loop.create_datagram_endpoint(CollectReplies, local_addr=(LOOPBACK, 0))
        try:
            assert (await running.udp("hit.example.")).answer  # stored: the next one is a hit
            (listener,) = server.listeners.values()
            assert listener.udp_protocol is not None
            # As if read in one pass: the hit is answered, and the listener closes before
            # the pass ends (no await in between: the end-of-pass flush has not run).
            query = query_bytes("hit.example.", qid=0x1234)
            listener.udp_protocol.datagram_received(query, client.get_extra_info("sockname"))
            listener.close()
            return await asyncio.wait_for(collected.replies.get(), 3)
        finally:
            client.close()
            await server.shutdown()

    uvloop = pytest.importorskip("uvloop")  # a dependency on Linux only
    reply = uvloop.run(scenario())
    assert reply[:2] == b"\x12\x34" and rcode_of(reply) == dns.rcode.NOERROR


async def test_shutdown_gives_up_after_the_grace_period(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n erratic {\n  delay 1 30s\n }\n}\n", shutdown_grace=0.2)
    pending = asyncio.create_task(raw_udp(running.port, query_bytes("stuck.example."), timeout=5))
    await wait_for(lambda: len(running.server.in_flight) == 1)
    await asyncio.wait_for(running.server.shutdown(), timeout=5)
    assert not running.server.in_flight
    pending.cancel()


async def test_apply_swaps_configuration_on_the_same_port(start_server: StartServer) -> None:
    running = await start_server(WHOAMI)
    assert not (await running.udp("example.org")).answer
    await running.reconfigure(". {\n bind 127.0.0.1\n erratic\n}\n")
    assert (await running.udp("example.org")).answer[0][0].address == "192.0.2.53"


async def test_reload_lets_queries_in_the_old_chain_finish_before_stopping_it(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n slowstop\n}\n")
    old_plugin = running.server.config.blocks[0].find("slowstop")  # type: ignore[union-attr]
    in_flight = asyncio.create_task(running.udp("old.example.", "TXT"))
    await wait_for(lambda: len(running.server.in_flight) == 1)
    await running.reconfigure(". {\n bind 127.0.0.1\n whoami\n}\n")
    assert not (await running.udp("new.example.")).answer  # the new chain (whoami) answers now
    reply = await in_flight
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].strings == (b"ok",)
    await wait_for(lambda: old_plugin.stopped)  # and the old plugin was stopped afterwards
