"""Cache defects found in review, each pinned by a test that fails without its fix."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode

from resolver import wire
from resolver.reply import Reply
from resolver.request import Request
from tests.test_cache import Chain
from tests.testplugins.scripted import build, query

NXDOMAIN = {"rcode": wire.NXDOMAIN, "addresses": [], "soa": (60, 60)}


async def test_a_prefetch_never_turns_a_shared_name_into_a_private_mix() -> None:
    """Client 2 hits the shared AAAA; the prefetch that hit starts is asked on its behalf
    and upstream gives it a client-specific NXDOMAIN. The shared entries must not become
    client 2's private NXDOMAIN: its next A would be NXDOMAIN after NOERROR for AAAA."""
    chain = Chain("cache {\n prefetch 1 1m 50%\n }")

    def answer(req):  # type: ignore[no-untyped-def]
        if req.remote_ip == "10.0.0.2":
            return build(req, client_specific=True, **NXDOMAIN)
        return build(req, ttl=0 if req.qtype == 1 else 300)

    chain.upstream.answer_with = answer
    await chain.ask("db.example", "AAAA", client="10.0.0.1")
    await chain.ask("db.example", "A", client="10.0.0.1")  # A kept 5s; the AAAA is aligned to it
    chain.clock.advance(3)  # 2s left of 5: inside the 50% prefetch window
    first = await chain.ask("db.example", "AAAA", client="10.0.0.2")  # a hit, starting a prefetch
    await chain.cache.settle()
    assert chain.asked("db.example", "AAAA") == 2  # the prefetch did ask upstream (as client 2)
    second = await chain.ask("db.example", "A", client="10.0.0.2")
    assert first.rcode() == dns.rcode.NOERROR
    assert second.rcode() == dns.rcode.NOERROR


async def test_an_aligned_pair_is_not_refreshed_on_every_hit() -> None:
    """An IPv4-only name: A TTL 300, AAAA NODATA 30. The A lives 30s (aligned); prefetch
    must count that lifetime, not the 300s, or every hit starts another refresh."""
    chain = Chain("cache {\n prefetch 2 1m 10%\n }")
    chain.upstream.answer_with = lambda req: (
        build(req, ttl=300) if req.qtype == 1 else build(req, addresses=[], soa=(30, 30))
    )
    await chain.ask("v4only.example.org", "A")
    await chain.ask("v4only.example.org", "AAAA")
    for _ in range(100):
        await chain.ask("v4only.example.org", "A")
        await chain.cache.settle()
    assert chain.asked("v4only.example.org", "A") == 1  # nothing is near expiry yet


async def test_serve_stale_verify_passes_a_truncated_answer_on() -> None:
    chain = Chain("cache {\n serve_stale 1h verify\n }")
    await chain.ask("gone.example.org", "A")
    chain.clock.advance(400)  # expired, still servable as stale
    chain.upstream.answer_with = lambda req: build(req, truncated=True, **NXDOMAIN)
    reply = await chain.ask("gone.example.org", "A")
    assert reply.flags & dns.flags.TC  # upstream is up: its answer, not the stale one
    assert not reply.answer


def _opt_first(req: Request) -> Reply:
    """Answer A, then in the additional section: an OPT carrying an NSID option, an A for
    ns1.<zone> and an AAAA whose owner is a compression pointer to that A's owner."""
    query_wire, end = req.wire, req.question.end
    header = query_wire[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 3)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 1])
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 12) + struct.pack("!HH", 3, 8) + b"upstream"
    before = len(header) + (end - 12) + len(answer) + len(opt)
    ns1 = b"\x03ns1\xc0\x10" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 53])
    ns1_v6 = struct.pack("!H", 0xC000 | before) + struct.pack("!HHIH", 28, 1, 300, 16) + bytes(16)
    return Reply(wire=header + query_wire[12:end] + answer + opt + ns1 + ns1_v6, plugin="scripted")


async def test_a_reply_with_options_in_an_opt_that_is_not_last_is_not_cached_broken() -> None:
    chain = Chain()
    chain.upstream.answer_with = _opt_first
    for _ in range(2):  # the first answer, and the second query (a hit, if it were cached)
        reply = await chain.ask("www.example.org", "A", use_edns=0)
        owners = sorted(rrset.name.to_text() for rrset in reply.additional if rrset.rdtype != 41)
        assert owners == ["ns1.example.org.", "ns1.example.org."]


async def test_names_that_were_client_specific_are_forgotten_once_empty() -> None:
    chain = Chain("cache {\n success 1024\n denial 1024\n }")
    chain.upstream.answer_with = lambda req: build(req, client_specific=True)
    for index in range(3000):
        await chain.ask(f"n{index}.example.org", "A", client="10.0.0.9")
    # Within their window the names stay marked (even when evicted); once it has ended,
    # the empty marks are swept as new names come: the table does not grow for good.
    chain.clock.advance(3600 + 1)  # past the longest TTL the cache keeps
    for index in range(3000, 9000):
        await chain.ask(f"n{index}.example.org", "A", client="10.0.0.9")
    store = chain.cache.store
    # Left: the 6000 new names, and at most the old ones still holding entries when swept.
    assert len(store.dependent) <= 6000 + store.capacity[0]


async def test_a_name_is_dependent_only_while_its_client_specific_answer_lives() -> None:
    # An autopath answer lives 5 s; its name must not stay private for the cache's longest
    # TTL (an hour), or random names from one pod pile up in the table for that long.
    chain = Chain("cache")
    chain.upstream.answer_with = lambda req: build(req, ttl=5, client_specific=True)
    await chain.ask("walked.example.org", "A", client="10.0.0.9")
    store = chain.cache.store
    assert b"\x06walked\x07example\x03org\x00" in store.dependent
    chain.clock.advance(6)
    chain.upstream.answer_with = lambda req: build(req, ttl=300)
    await chain.ask("walked.example.org", "A", client="10.0.0.1")
    # The window ended with the answer: the name is shared again, so a second client hits.
    assert b"\x06walked\x07example\x03org\x00" not in store.dependent
    asked = chain.asked("walked.example.org")
    await chain.ask("walked.example.org", "A", client="10.0.0.2")
    assert chain.asked("walked.example.org") == asked


async def test_a_reply_shorter_than_a_header_never_breaks_a_refresh() -> None:
    chain = Chain("cache {\n serve_stale 1h verify\n }")
    await chain.ask("short.example.org", "A")
    chain.clock.advance(400)
    chain.upstream.answer_with = lambda req: Reply(wire=b"\x12", plugin="scripted")
    reply = await chain.raw(query("short.example.org"))  # must not raise (it would be a panic)
    assert reply is not None


async def test_whoami_behind_the_cache_is_never_cached() -> None:
    from resolver.config import load
    from resolver.plugin import Registry
    from tests.testplugins.scripted import request

    registry = Registry(("bind", "cache", "whoami"), "tests.testplugins")
    block = load(". {\n cache\n whoami\n}\n", "Corefile", registry, default_port=0).blocks[0]
    for client in ("10.0.0.1", "10.0.0.2"):
        reply = await block.handler(request(query("who.example.org"), client))
        assert reply is not None
        address = dns.message.from_wire(reply.wire).additional
        assert any(rr.address == client for rrset in address if rrset.rdtype == 1 for rr in rrset)
