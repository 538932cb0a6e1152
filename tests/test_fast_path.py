"""The server's fast path (``resolver.server.fast_path``): a cache hit behind plugins that
only observe replies is answered by plain calls instead of the chain's coroutines and a
Task. It must be invisible: the same bytes (but ID and TTLs) and the same metrics as the
chain gives, over real sockets against a real upstream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import dns.flags
import dns.message
import pytest
from prometheus_client.parser import text_string_to_metric_families

import resolver.server
from plugins.cache.message import analyze
from resolver import wire
from resolver.config import load
from resolver.plugin import Registry
from resolver.server import fast_path
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Capture, Running, query_bytes, raw_udp
from tests.upstreams import FakeUpstream

REGISTRY = Registry.default()


def corefile(upstream: FakeUpstream, *chain: str) -> str:
    lines = "\n".join(f" {line}" for line in chain)
    return f".:0 {{\n bind 127.0.0.1\n{lines}\n forward . {upstream.target}\n}}\n"


def observed(upstream: FakeUpstream) -> str:
    return corefile(upstream, "errors", "prometheus 127.0.0.1:0", "cache")


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


def normalized(reply: bytes, query: bytes) -> bytes:
    """The reply with ID and every TTL zeroed (the only bytes a hit may change)."""
    data = bytearray(reply)
    data[0:2] = b"\x00\x00"
    end = wire.parse_question(query).end
    for offset in analyze(bytes(reply), end).ttl_offsets:
        data[offset : offset + 4] = b"\x00\x00\x00\x00"
    return bytes(data)


def queries() -> list[bytes]:
    """Questions whose hits take different bytes: letter case, types, NODATA, EDNS, DO,
    CD, RD clear."""
    asked = [
        query_bytes("host.example.org", "A", qid=1),
        query_bytes("HoSt.ExAmPlE.oRg", "A", qid=2),
        query_bytes("host.example.org", "AAAA", qid=3),  # NODATA from the fake upstream
        query_bytes("host.example.org", "A", qid=4, use_edns=0, payload=1232),
        query_bytes("host.example.org", "A", qid=5, want_dnssec=True),
        query_bytes("mail.example.org", "MX", qid=6, use_edns=0),
    ]
    cd = dns.message.make_query("host.example.org", "A")
    cd.flags |= dns.flags.CD
    asked.append(cd.to_wire())
    no_rd = bytearray(query_bytes("host.example.org", "A", qid=8))
    no_rd[2] &= ~0x01
    asked.append(bytes(no_rd))
    return asked


async def tcp_query(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
        return await asyncio.wait_for(reader.readexactly(size), 3)
    finally:
        writer.close()


def samples(running: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every metric sample but durations (time differs run to run), with the listener's
    port taken out of the ``server`` label (the two servers have different ports)."""
    text = running.server.runtime.metrics.render().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if "duration" in family.name:
            continue
        for sample in family.samples:
            labels = {key: value.replace(f":{running.port}", ":PORT") for key, value in sample.labels.items()}
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


class StartCounter:
    """Counts the Tasks the server starts: a hit on the fast path starts none."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = resolver.server.start_task

        def counting(loop: Any, coro: Any) -> Any:
            self.count += 1
            return original(loop, coro)

        monkeypatch.setattr(resolver.server, "start_task", counting)


async def test_fast_path_replies_and_metrics_are_the_chains(
    start_server: StartServer, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = await start_server(observed(upstream), REGISTRY)
    slow = await start_server(observed(upstream), REGISTRY, fast_paths=False)
    asked = queries()
    for server in (fast, slow):
        for data in asked:  # misses: both run the chain and forward
            assert await raw_udp(server.port, data) is not None
    hits_before = cache_hits(fast)
    tasks = StartCounter(monkeypatch)
    for data in asked:
        fast_udp, slow_udp = await raw_udp(fast.port, data), await raw_udp(slow.port, data)
        assert fast_udp is not None and slow_udp is not None
        assert normalized(fast_udp, data) == normalized(slow_udp, data)
        assert fast_udp[:2] == data[:2]
        fast_tcp, slow_tcp = await tcp_query(fast.port, data), await tcp_query(slow.port, data)
        assert normalized(fast_tcp, data) == normalized(slow_tcp, data)
    assert tasks.count == 2 * len(asked)  # the slow server's hits only
    assert samples(fast) == samples(slow)
    assert cache_hits(fast) - hits_before == 2 * len(asked)  # every query of this round was a hit


def cache_hits(running: Running) -> float:
    return sum(value for (name, _labels), value in samples(running).items() if name == "coredns_cache_hits_total")


async def test_chains_with_a_plugin_that_must_see_every_query_have_no_fast_path(upstream: FakeUpstream) -> None:
    def handler(*chain: str) -> Any:
        config = load(corefile(upstream, *chain), "Corefile", REGISTRY, default_port=0)
        return config.blocks[0].handler

    assert fast_path(handler("errors", "prometheus 127.0.0.1:0", "cache")) is not None
    assert fast_path(handler("cache")) is not None
    assert fast_path(handler("errors", "log", "cache")) is None
    assert fast_path(handler("loadbalance", "cache")) is None
    assert fast_path(handler("errors", "prometheus 127.0.0.1:0")) is None  # no cache


async def test_a_hit_behind_log_is_still_logged(start_server: StartServer, upstream: FakeUpstream) -> None:
    logger = logging.getLogger("resolver.log")  # where the log plugin writes query lines
    capture, level = Capture(), logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        running = await start_server(corefile(upstream, "log", "cache"), REGISTRY)
        for _ in range(2):
            assert await raw_udp(running.port, query_bytes("seen.example.org")) is not None
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
    assert len([line for line in capture.messages if "seen.example.org." in line]) == 2


async def test_a_fast_path_that_raises_is_answered_by_the_chain_once(
    start_server: StartServer, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_server(observed(upstream), REGISTRY)
    block = running.server.config.blocks[0]  # type: ignore[union-attr]
    cache = block.find("cache")

    def broken(_req: Any, _next: Any) -> None:
        raise RuntimeError("broken cache")

    monkeypatch.setattr(cache, "serve_at_once", broken)
    reply = await raw_udp(running.port, query_bytes("boom.example.org"))
    assert reply is not None and reply[3] & 0x0F == wire.SERVFAIL
    assert running.server.stats.panics == 1
    counted = samples(running)
    requests = [value for (name, _labels), value in counted.items() if name == "coredns_dns_requests_total"]
    responses = [value for (name, labels), value in counted.items() if name == "coredns_dns_responses_total"]
    assert requests == [1.0] and responses == [1.0]
