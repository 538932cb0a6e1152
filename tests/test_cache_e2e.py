"""cache end to end over real UDP and TCP sockets on 127.0.0.1 (and ::1), with /metrics."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from plugins.cache.clock import TickingClock
from resolver import wire
from resolver.request import Request
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, frame, ipv6_loopback, query_bytes, raw_udp, read_frame, wait_for
from tests.test_cache import REGISTRY, _ttl_offsets
from tests.testplugins.cache import Cache
from tests.testplugins.scripted import Scripted, build

COREFILE = ". {\n bind 127.0.0.1\n prometheus 127.0.0.1:0\n errors\n cache\n scripted\n}\n"


def parts(running: object) -> tuple[Cache, Scripted]:
    block = running.server.config.blocks[0]  # type: ignore[attr-defined]
    cache, upstream = block.find("cache"), block.find("scripted")
    assert isinstance(cache, Cache) and isinstance(upstream, Scripted)
    return cache, upstream


async def tcp_exchange(port: int, packet: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(frame(packet))
        return await read_frame(reader)
    finally:
        writer.close()


def masked(message: bytes) -> bytes:
    """The message with ID and TTLs zeroed: what a hit must share with the miss."""
    data = bytearray(message)
    data[0:2] = b"\x00\x00"
    for offset in _ttl_offsets(message):
        data[offset : offset + 4] = b"\x00\x00\x00\x00"
    return bytes(data)


async def test_hits_over_udp_and_tcp_repeat_the_miss_with_the_clients_id_and_case(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    cache, upstream = parts(running)
    assert isinstance(cache.clock, TickingClock)  # the real clock, started with the server
    miss = await raw_udp(running.port, query_bytes("www.example.org", qid=1, use_edns=0))
    udp_hit = await raw_udp(running.port, query_bytes("wWw.ExAmple.ORG", qid=2, use_edns=0))
    tcp_hit = await tcp_exchange(running.port, query_bytes("WWW.example.org", qid=3, use_edns=0))
    assert miss is not None and udp_hit is not None
    assert upstream.count("www.example.org.") == 1
    assert udp_hit[:2] == b"\x00\x02" and tcp_hit[:2] == b"\x00\x03"
    end = 12 + len(b"\x03www\x07example\x03org\x00") + 4
    assert udp_hit[12:end] == query_bytes("wWw.ExAmple.ORG")[12:end]
    assert tcp_hit[12:end] == query_bytes("WWW.example.org")[12:end]
    lowered = [bytearray(m) for m in (miss, udp_hit, tcp_hit)]
    for message in lowered:
        message[12:end] = message[12:end].lower()
    assert masked(bytes(lowered[1])) == masked(bytes(lowered[0])) == masked(bytes(lowered[2]))


def _many(req: Request) -> object:
    return build(req, addresses=[f"10.0.{i // 256}.{i % 256}" for i in range(60)])


async def test_a_cached_reply_too_big_for_the_client_is_truncated_by_the_server(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    _cache, upstream = parts(running)
    upstream.answer_with = _many  # type: ignore[assignment]
    full = dns.message.from_wire(await tcp_exchange(running.port, query_bytes("big.example.org")))
    assert len(full.answer[0]) == 60
    small = await raw_udp(running.port, query_bytes("big.example.org", use_edns=False))
    assert small is not None and len(small) <= 512 and small[2] & 0x02  # TC
    again = dns.message.from_wire(await tcp_exchange(running.port, query_bytes("big.example.org")))
    assert len(again.answer[0]) == 60
    assert upstream.count("big.example.org.") == 1


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback to act as a second client")
async def test_a_client_specific_answer_is_not_served_to_another_address(start_server: StartServer) -> None:
    running = await start_server(
        ". {\n bind 127.0.0.1 ::1\n cache\n scripted\n}\n",
        registry=REGISTRY,
    )
    _cache, upstream = parts(running)

    def autopath(req: Request) -> object:
        if req.remote_ip == LOOPBACK:
            return build(req, addresses=["10.99.0.1"], client_specific=True)
        return build(req)

    upstream.answer_with = autopath  # type: ignore[assignment]
    query = dns.message.make_query("db.example.org", "A")
    for _ in range(2):
        mine = await dns.asyncquery.udp(query, LOOPBACK, port=running.port, timeout=3)
        theirs = await dns.asyncquery.udp(query, "::1", port=running.port, timeout=3)
        assert mine.answer[0][0].address == "10.99.0.1"
        assert theirs.answer[0][0].address == "192.0.2.1"
    assert upstream.clients == [LOOPBACK, "::1"]  # each asked once, then answered from its own entry


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://{LOOPBACK}:{port}/metrics") as response:
        return await response.text()


async def test_metrics_have_coredns_names_and_labels(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    cache, upstream = parts(running)
    upstream.answer_with = lambda req: (  # type: ignore[assignment]
        build(req, rcode=wire.NXDOMAIN, addresses=[], soa=(60, 60)) if req.qname.startswith("nx") else build(req)
    )
    await running.udp("a.example.org")
    await running.udp("a.example.org")
    await running.tcp("nx.example.org")
    await running.udp("nx.example.org")
    prometheus = running.server.config.blocks[0].find("prometheus")
    text = await scrape(prometheus.port)  # type: ignore[union-attr]
    server = 'server="dns://127.0.0.1:0"'
    expected = [
        f'coredns_cache_entries{{{server},type="success",view="",zones="."}} 1.0',
        f'coredns_cache_entries{{{server},type="denial",view="",zones="."}} 1.0',
        f'coredns_cache_requests_total{{{server},view="",zones="."}} 4.0',
        f'coredns_cache_hits_total{{{server},type="success",view="",zones="."}} 1.0',
        f'coredns_cache_hits_total{{{server},type="denial",view="",zones="."}} 1.0',
        f'coredns_cache_misses_total{{{server},view="",zones="."}} 2.0',
        f'coredns_dns_responses_total{{plugin="cache",rcode="NOERROR",{server},view="",zone="."}} 1.0',
        f'coredns_dns_responses_total{{plugin="scripted",rcode="NXDOMAIN",{server},view="",zone="."}} 1.0',
    ]
    for line in expected:
        assert line in text, line
    for family in ("prefetch", "drops", "served_stale", "evictions"):
        assert f"# TYPE coredns_cache_{family}_total counter" in text
    assert cache.store.kinds[0] and cache.store.kinds[1]


async def test_a_reload_starts_an_empty_cache_and_retires_the_old_one(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    old, _upstream = parts(running)
    await running.udp("a.example.org")
    await running.reconfigure(COREFILE.replace("cache", "cache 60"))
    new, upstream = parts(running)
    assert new is not old
    reply = await running.udp("a.example.org")
    assert reply.answer[0].ttl == 60 and upstream.count("a.example.org.") == 1
    gauge = running.server.runtime.metrics["coredns_cache_entries"]
    await wait_for(lambda: old not in gauge.callbacks)  # type: ignore[union-attr]
    assert old.clock._timer is None  # type: ignore[attr-defined]


async def test_pipelined_tcp_hits_are_answered_in_one_read(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    _cache, upstream = parts(running)
    await running.tcp("p.example.org")
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    try:
        writer.write(b"".join(frame(query_bytes("p.example.org", qid=i)) for i in range(1, 51)))
        ids = [struct.unpack("!H", (await read_frame(reader))[:2])[0] for _ in range(50)]
    finally:
        writer.close()
    assert sorted(ids) == list(range(1, 51))
    assert upstream.count("p.example.org.") == 1
