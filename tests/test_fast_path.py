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
from plugins.errors import Errors
from resolver import wire
from resolver.config import load
from resolver.logs import core_logger
from resolver.plugin import Handler, Registry
from resolver.reply import Reply
from resolver.request import Request
from resolver.server import fast_path
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, TEST_REGISTRY, Capture, Running, query_bytes, raw_udp, wait_for
from tests.testplugins.scripted import ManualClock, Scripted, build
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
    same = compare(fast, slow)
    for data in asked:
        await same(data)
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


def compare(fast: Running, slow: Running) -> Any:
    """An async check that a query gets the same bytes (but ID and TTLs) from ``fast`` and
    ``slow``, over UDP and TCP."""

    async def same(data: bytes) -> bytes:
        fast_udp, slow_udp = await raw_udp(fast.port, data), await raw_udp(slow.port, data)
        assert fast_udp is not None and slow_udp is not None
        assert normalized(fast_udp, data) == normalized(slow_udp, data)
        assert fast_udp[:2] == data[:2]
        fast_tcp, slow_tcp = await tcp_query(fast.port, data), await tcp_query(slow.port, data)
        assert normalized(fast_tcp, data) == normalized(slow_tcp, data)
        return fast_udp

    return same


def two_blocks() -> str:
    """Two blocks (routing by zone) of the observed chain in front of hosts, with a name
    whose 80 addresses fill more than 512 bytes (truncation at each UDP size)."""
    many = "\n".join(f"  10.0.{i // 250}.{i % 250 + 1} big.example.org" for i in range(80))

    def block(zone: str) -> str:
        return (
            f"{zone}:0 {{\n bind 127.0.0.1\n errors\n prometheus 127.0.0.1:0\n cache\n"
            f" hosts {{\n{many}\n  10.9.9.9 small.example.org\n  10.9.9.10 small.example.net\n }}\n}}\n"
        )

    return block("example.org") + block(".")


async def test_fast_path_across_blocks_udp_sizes_and_truncation_is_the_chain(start_server: StartServer) -> None:
    fast = await start_server(two_blocks(), REGISTRY)
    slow = await start_server(two_blocks(), REGISTRY, fast_paths=False)
    cd = dns.message.make_query("big.example.org", "A", use_edns=0, payload=700)
    cd.flags |= dns.flags.CD
    asked = [
        query_bytes("big.example.org", "A", qid=1),  # no EDNS: 512 bytes, truncated
        query_bytes("BIG.example.ORG", "A", qid=2, use_edns=0, payload=600),
        query_bytes("big.example.org", "A", qid=3, use_edns=0, payload=1232),  # fits
        query_bytes("big.example.org", "A", qid=4, use_edns=0, payload=4096, want_dnssec=True),
        query_bytes("small.example.org", "A", qid=5, use_edns=0, payload=100),  # below 512: 512
        query_bytes("nothing.example.org", "A", qid=6),  # NXDOMAIN
        query_bytes("small.example.org", "AAAA", qid=7),  # NODATA
        query_bytes("small.example.net", "A", qid=8),  # the "." block
        query_bytes("small.example.org", "A", qid=9) + b"\x00\x01trailing",  # bytes after the question
        cd.to_wire(),
    ]
    same = compare(fast, slow)
    for data in asked:  # misses
        await same(data)
    hits_before = cache_hits(fast)
    for data in asked:
        await same(data)
    truncated = await same(asked[0])
    assert truncated[2] & 0x02  # TC: the hit was cut as the chain cuts it
    assert cache_hits(fast) - hits_before == 2 * (len(asked) + 1)  # UDP and TCP, all hits
    assert samples(fast) == samples(slow)


async def test_a_plugin_raising_on_the_fast_path_is_answered_and_counted_once_as_the_chain_does(
    start_server: StartServer, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An observer that raises (here prometheus) on a hit: SERVFAIL, one panic logged, the
    hit counted once, and every metric as the chain leaves them (it does not run the
    chain again after the fast path's plugins already ran)."""
    fast = await start_server(observed(upstream), REGISTRY)
    slow = await start_server(observed(upstream), REGISTRY, fast_paths=False)
    prometheus = type(fast.server.config.blocks[0].find("prometheus"))  # type: ignore[union-attr]

    def broken(_self: Any, _req: Any, _reply: Any, _elapsed: float) -> None:
        raise RuntimeError("observer bug")

    monkeypatch.setattr(prometheus, "observe", broken)
    capture = Capture()
    core_logger().addHandler(capture)
    try:
        data = query_bytes("host.example.org")
        for server in (fast, slow):
            miss = await raw_udp(server.port, data)  # the chain: cached, then prometheus raises
            assert miss is not None and miss[3] & 0x0F == wire.SERVFAIL
        hits = cache_hits(fast), cache_hits(slow)
        for server in (fast, slow):
            hit = await raw_udp(server.port, data)
            assert hit is not None and hit[3] & 0x0F == wire.SERVFAIL
            assert server.server.stats.panics == 2
    finally:
        core_logger().removeHandler(capture)
    assert (cache_hits(fast) - hits[0], cache_hits(slow) - hits[1]) == (1, 1)
    assert samples(fast) == samples(slow)
    assert len([line for line in capture.messages if "Recovered from panic" in line]) == 4


async def test_a_reply_that_cannot_be_delivered_on_the_fast_path_still_gets_servfail(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while writing a hit (here truncation raising) is answered SERVFAIL and counted,
    as when the chain answers, not dropped."""
    fast = await start_server(two_blocks(), REGISTRY)
    slow = await start_server(two_blocks(), REGISTRY, fast_paths=False)
    data = query_bytes("big.example.org", "A")
    for server in (fast, slow):
        assert await raw_udp(server.port, data) is not None  # cached (and cut, before the bug)

    def broken(_data: bytes, _limit: int) -> bytes:
        raise RuntimeError("truncate bug")

    monkeypatch.setattr(resolver.server.wire, "truncate", broken)
    for server in (fast, slow):
        reply = await raw_udp(server.port, data)
        assert reply is not None and reply[3] & 0x0F == wire.SERVFAIL
        assert server.server.stats.panics == 1


async def test_fast_path_serves_stale_prefetches_and_keeps_client_answers_as_the_chain(
    start_server: StartServer,
) -> None:
    """What the cache does beyond a plain hit (prefetching a popular entry, answering from
    an expired one with serve_stale, a client-specific entry) is the same with and
    without the fast path."""
    chain = (
        ".:0 {\n bind 127.0.0.1\n errors\n prometheus 127.0.0.1:0\n"
        " cache {\n  prefetch 2 1m 50%\n  serve_stale 1h immediate\n }\n scripted\n}\n"
    )
    fast = await start_server(chain, TEST_REGISTRY)
    slow = await start_server(chain, TEST_REGISTRY, fast_paths=False)
    clocks, caches, upstreams = [], [], []
    for server in (fast, slow):
        block = server.server.config.blocks[0]  # type: ignore[union-attr]
        cache, scripted = block.find("cache"), block.find("scripted")
        assert isinstance(scripted, Scripted)
        cache.clock = clock = ManualClock()  # type: ignore[union-attr]
        clocks.append(clock)
        caches.append(cache)
        upstreams.append(scripted)
        scripted.answer_with = lambda req: build(req, ttl=100, client_specific=req.qname.startswith("mine."))

    async def same(data: bytes) -> None:
        """One query to each server; then their refreshes (background) are done."""
        fast_reply, slow_reply = await raw_udp(fast.port, data), await raw_udp(slow.port, data)
        assert fast_reply is not None and slow_reply is not None
        assert normalized(fast_reply, data) == normalized(slow_reply, data)
        await wait_for(lambda: not any(cache._tasks for cache in caches))  # the cache's refresh tasks

    popular, mine = query_bytes("popular.example.org"), query_bytes("mine.example.org")
    for data in (popular, mine, popular, mine):  # misses, then hits
        await same(data)
    for clock in clocks:
        clock.advance(60)  # 40 s left of 100: within prefetch's 50%
    await same(popular)  # a popular entry's hit starts a refresh
    await same(mine)
    for clock in clocks:
        clock.advance(200)  # every entry expired: served stale, refreshed in the background
    for data in (mine, popular, mine, popular):
        await same(data)
    assert upstreams[0].asked == upstreams[1].asked
    assert samples(fast) == samples(slow)
    found = samples(fast)
    prefetched = [value for (name, _labels), value in found.items() if name == "coredns_cache_prefetch_total"]
    stale = [value for (name, _labels), value in found.items() if name == "coredns_cache_served_stale_total"]
    assert prefetched and prefetched[0] >= 1 and stale and stale[0] >= 2  # both happened


async def test_a_subclass_that_overrides_serve_is_not_skipped_on_hits(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    """A plugin takes part in a fast path only through methods its own ``serve``'s class
    defines: a subclass that changes ``serve`` but inherits ``observe`` runs its ``serve``
    for every query, hits included."""
    seen: list[str] = []

    class Counting(Errors):
        async def serve(self, req: Request, next: Handler) -> Reply | None:
            seen.append(req.qname)
            return await super().serve(req, next)

    registry = Registry.default()
    registry._classes["errors"] = Counting  # the subclass answers to the directive
    running = await start_server(observed(upstream), registry)
    handler = running.server.config.blocks[0].handler  # type: ignore[union-attr]
    assert fast_path(handler) is None
    for _ in range(3):
        assert await raw_udp(running.port, query_bytes("host.example.org")) is not None
    assert seen == ["host.example.org."] * 3
    assert cache_hits(running) == 2


async def test_a_miss_whose_chain_raises_is_answered_and_counted_as_the_chain_does(
    start_server: StartServer,
) -> None:
    """A miss runs the chain from the cache on, with the observers' bookkeeping done
    after it in the same frame (``Server._answer_observed``): an exception from behind
    the cache must still pass prometheus (counted as a failure) and reach the server
    (SERVFAIL, a panic), as when every plugin runs as a coroutine."""
    chain = ".:0 {\n bind 127.0.0.1\n errors\n prometheus 127.0.0.1:0\n cache\n scripted\n}\n"
    fast = await start_server(chain, TEST_REGISTRY)
    slow = await start_server(chain, TEST_REGISTRY, fast_paths=False)

    def broken(_req: Request) -> Reply:
        raise RuntimeError("upstream bug")

    for server in (fast, slow):
        scripted = server.server.config.blocks[0].find("scripted")  # type: ignore[union-attr]
        assert isinstance(scripted, Scripted)
        scripted.answer_with = broken
    for name in ("boom.example.org", "boom.example.org", "other.example.org"):
        data = query_bytes(name)
        for server in (fast, slow):
            reply = await raw_udp(server.port, data)
            assert reply is not None and reply[3] & 0x0F == wire.SERVFAIL
    assert fast.server.stats.panics == slow.server.stats.panics == 3
    assert samples(fast) == samples(slow)
    failures = [v for (name, _labels), v in samples(fast).items() if name == "coredns_dns_responses_total"]
    assert sum(failures) == 3
