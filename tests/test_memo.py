"""The UDP listener's memo (``resolver.memo``): a repeat of a query the fast path answered
is answered from a remembered function. It must be invisible: the chain's bytes (but ID
and TTLs) and metrics, TTLs that still count down, nothing served once the cache no
longer holds the entry or the chain changed, and a bound on what it keeps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import dns.message
import pytest

from resolver import wire
from resolver.server import Listener
from tests.conftest import StartServer
from tests.helpers import TEST_REGISTRY, Running, query_bytes, raw_udp
from tests.test_fast_path import REGISTRY, cache_hits, compare, observed, queries, samples, two_blocks
from tests.testplugins.scripted import ManualClock, Scripted, build
from tests.upstreams import FakeUpstream

SCRIPTED = ".:0 {\n bind 127.0.0.1\n errors\n prometheus 127.0.0.1:0\n cache\n scripted\n}\n"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


def listener(running: Running) -> Listener:
    (only,) = running.server.listeners.values()
    return only


def scripted_parts(running: Running, ttl: int = 100) -> tuple[ManualClock, Scripted]:
    """The server's cache on a clock the test moves, and its scripted upstream."""
    block = running.server.config.blocks[0]  # type: ignore[union-attr]
    cache, scripted = block.find("cache"), block.find("scripted")
    assert isinstance(scripted, Scripted)
    cache.clock = clock = ManualClock()  # type: ignore[union-attr]
    scripted.answer_with = lambda req: build(req, ttl=ttl)
    return clock, scripted


def first_ttl(reply: bytes) -> int:
    message = dns.message.from_wire(reply)
    return message.answer[0].ttl


async def test_repeats_are_answered_from_the_memo_as_the_chain_answers_them(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    fast = await start_server(observed(upstream), REGISTRY)
    slow = await start_server(observed(upstream), REGISTRY, fast_paths=False)
    same = compare(fast, slow)
    asked = queries()
    for data in asked:
        await same(data)  # misses (some are hits of an earlier one: letter case)
    hits_before = cache_hits(fast)
    for _round in range(3):
        for data in asked:
            await same(data)
    # Every distinct question (letter case, type, EDNS, DO, CD, RD) is remembered apart.
    assert len(listener(fast).memo) == len(asked)
    assert cache_hits(fast) - hits_before == 3 * 2 * len(asked)  # UDP and TCP, all hits
    assert samples(fast) == samples(slow)
    assert len(listener(slow).memo) == 0  # no fast path, nothing remembered


async def test_a_remembered_answer_counts_its_ttls_down_and_expires(start_server: StartServer) -> None:
    running = await start_server(SCRIPTED, TEST_REGISTRY)
    clock, scripted = scripted_parts(running, ttl=100)
    data = query_bytes("ticking.example.org")
    for _ in range(3):  # a miss, a hit (remembered), a hit from the memo
        reply = await raw_udp(running.port, data)
        assert reply is not None and first_ttl(reply) == 100
    assert len(listener(running).memo) == 1
    clock.advance(30)
    reply = await raw_udp(running.port, data)
    assert reply is not None and first_ttl(reply) == 70
    assert reply[:2] == data[:2]
    clock.advance(70)  # expired: the upstream is asked again
    reply = await raw_udp(running.port, data)
    assert reply is not None and first_ttl(reply) == 100
    assert scripted.asked[("ticking.example.org.", 1)] == 2


async def test_an_entry_the_cache_dropped_is_not_served_from_the_memo(start_server: StartServer) -> None:
    """An NXDOMAIN for the name removes its cached A (never NXDOMAIN for one type and an
    address for another): the A remembered for repeats must go with it."""
    running = await start_server(SCRIPTED, TEST_REGISTRY)
    _clock, scripted = scripted_parts(running)
    a_query, aaaa_query = query_bytes("gone.example.org", "A"), query_bytes("gone.example.org", "AAAA")
    for _ in range(3):
        reply = await raw_udp(running.port, a_query)
        assert reply is not None and wire.rcode_of(reply) == wire.NOERROR
    assert len(listener(running).memo) == 1
    scripted.answer_with = lambda req: build(req, rcode=wire.NXDOMAIN, soa=(300, 60))
    reply = await raw_udp(running.port, aaaa_query)
    assert reply is not None and wire.rcode_of(reply) == wire.NXDOMAIN
    reply = await raw_udp(running.port, a_query)
    assert reply is not None and wire.rcode_of(reply) == wire.NXDOMAIN
    assert scripted.asked[("gone.example.org.", 1)] == 2


async def test_a_reload_forgets_what_the_old_chain_answered(start_server: StartServer) -> None:
    def hosts(address: str) -> str:
        return (
            ".:0 {\n bind 127.0.0.1\n errors\n prometheus 127.0.0.1:0\n cache\n"
            f" hosts {{\n  {address} reloaded.example.org\n }}\n}}\n"
        )

    running = await start_server(hosts("10.0.0.1"), REGISTRY)
    data = query_bytes("reloaded.example.org")
    for _ in range(3):
        reply = await raw_udp(running.port, data)
        assert reply is not None and reply.endswith(bytes([10, 0, 0, 1]))
    await running.reconfigure(hosts("10.0.0.2").replace(".:0", f".:{running.port}"))
    reply = await raw_udp(running.port, data)
    assert reply is not None and reply.endswith(bytes([10, 0, 0, 2]))


async def test_a_plugin_leaving_the_chain_is_not_answered_for_by_the_memo(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    """``loop`` leaves the chain at runtime by relinking it; here the cache leaves: a
    remembered hit must not keep answering (and counting) for it."""
    running = await start_server(observed(upstream), REGISTRY)
    data = query_bytes("host.example.org")
    for _ in range(3):
        assert await raw_udp(running.port, data) is not None
    hits = cache_hits(running)
    block = running.server.config.blocks[0]  # type: ignore[union-attr]
    cache = block.find("cache")
    assert cache is not None
    cache.in_chain = False
    block.link()
    asked = len(upstream.received())
    reply = await raw_udp(running.port, data)
    assert reply is not None and wire.rcode_of(reply) == wire.NOERROR
    assert cache_hits(running) == hits
    assert len(upstream.received()) == asked + 1


async def test_answers_cut_for_the_client_are_cut_again_not_remembered(start_server: StartServer) -> None:
    fast = await start_server(two_blocks(), REGISTRY)
    slow = await start_server(two_blocks(), REGISTRY, fast_paths=False)
    same = compare(fast, slow)
    big = query_bytes("big.example.org", "A")  # no EDNS: cut at 512 bytes
    for _ in range(3):
        reply = await same(big)
        assert reply[2] & 0x02 and len(reply) <= 512
    assert len(listener(fast).memo) == 0


async def test_the_memo_keeps_at_most_its_capacity(start_server: StartServer, upstream: FakeUpstream) -> None:
    running = await start_server(observed(upstream), REGISTRY)
    memo = listener(running).memo
    memo.capacity = 4
    names = [f"n{i}.example.org" for i in range(10)]
    for _round in range(3):
        for name in names:
            data = query_bytes(name)
            reply = await raw_udp(running.port, data)
            assert reply is not None and wire.rcode_of(reply) == wire.NOERROR
            assert reply[12 : len(data)] == data[12:]  # its own question
    assert len(memo) == 4
    # Full, it is emptied for the next answer: asked in order, 10 names over a capacity of
    # 4 leave the last four remembered.
    assert set(memo.table) == {query_bytes(name)[2:] for name in names[-4:]}


async def test_an_answer_for_one_client_is_not_remembered_for_another(start_server: StartServer) -> None:
    """Answers that depend on the client (autopath's) are cached per client address, and
    the same bytes from another client must not get the first one's answer."""
    running = await start_server(SCRIPTED, TEST_REGISTRY)
    _clock, scripted = scripted_parts(running)
    own = {"127.0.0.1": "10.1.1.1", "127.0.0.2": "10.2.2.2"}
    scripted.answer_with = lambda req: build(req, addresses=[own[req.remote_ip]], client_specific=True)
    data = query_bytes("mine.example.org")
    for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.1"):
        reply = await raw_udp(running.port, data, source=source)
        assert reply is not None and reply.endswith(bytes(int(part) for part in own[source].split(".")))


async def test_a_memo_of_no_capacity_remembers_nothing(start_server: StartServer, upstream: FakeUpstream) -> None:
    running = await start_server(observed(upstream), REGISTRY)
    memo = listener(running).memo
    memo.capacity = 0
    data = query_bytes("host.example.org")
    for _ in range(3):
        reply = await raw_udp(running.port, data)
        assert reply is not None and wire.rcode_of(reply) == wire.NOERROR
    assert len(memo) == 0 and running.server.stats.panics == 0


async def test_answers_larger_than_1232_bytes_are_not_remembered(start_server: StartServer) -> None:
    """Each remembered answer holds a copy of its bytes: only answers of the usual size are."""
    fast = await start_server(two_blocks(), REGISTRY)
    slow = await start_server(two_blocks(), REGISTRY, fast_paths=False)
    same = compare(fast, slow)
    big = query_bytes("big.example.org", "A", use_edns=0, payload=4096)
    for _ in range(3):
        reply = await same(big)
        assert len(reply) > 1232 and not reply[2] & 0x02
    assert len(listener(fast).memo) == 0


async def test_a_remembered_answer_that_fails_turns_the_memo_off(
    start_server: StartServer, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a remembered function: the query is still answered, the panic logged
    once, and nothing more is remembered (the same bug would miscount every repeat)."""
    running = await start_server(observed(upstream), REGISTRY)
    cache = running.server.config.blocks[0].find("cache")  # type: ignore[union-attr]
    remembering = type(cache).replay

    def broken_replay(self: object, req: object, reply: object) -> object:
        def replay(_query: bytes) -> bytes:
            raise RuntimeError("replay bug")

        remembering(self, req, reply)  # type: ignore[arg-type]
        return replay

    monkeypatch.setattr(type(cache), "replay", broken_replay)
    data = query_bytes("host.example.org")
    for _ in range(6):
        reply = await raw_udp(running.port, data)
        assert reply is not None and wire.rcode_of(reply) == wire.NOERROR
    memo = listener(running).memo
    assert running.server.stats.panics == 1
    assert len(memo) == 0 and memo.capacity == 0


async def test_a_chain_failure_whose_description_fails_still_gets_servfail(start_server: StartServer) -> None:
    """The last resort covers building the failure reply too: an exception whose repr
    raises (logging it fails) still gets the client a SERVFAIL."""

    class Unprintable(Exception):
        def __repr__(self) -> str:
            raise ValueError("no repr")

    def broken(_req: object) -> None:
        raise Unprintable()

    for chain in (SCRIPTED, ".:0 {\n bind 127.0.0.1\n log\n cache\n scripted\n}\n"):
        running = await start_server(chain, TEST_REGISTRY)
        scripted = running.server.config.blocks[0].find("scripted")  # type: ignore[union-attr]
        assert isinstance(scripted, Scripted)
        scripted.answer_with = broken
        reply = await raw_udp(running.port, query_bytes("unprintable.example.org"))
        assert reply is not None and wire.rcode_of(reply) == wire.SERVFAIL
