"""cache: Corefile syntax, what is cached for how long, the key, the hit path, prefetch, serve_stale.

Most tests call the block's chain directly (cache in front of the ``scripted`` upstream)
with requests built as the server builds them, and move a ``ManualClock`` by hand;
tests/test_cache_e2e.py does the same over real sockets.
"""

from __future__ import annotations

import asyncio
import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from plugins.cache.clock import TickingClock
from plugins.cache.config import effective_capacity
from plugins.cache.store import SUCCESS, Entry, Store
from resolver import wire
from resolver.config import ServerBlock, load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from resolver.reply import Reply
from resolver.request import Request
from tests.helpers import wait_for
from tests.testplugins.cache import Cache
from tests.testplugins.scripted import SERVER, ManualClock, Scripted, build, query, request

REGISTRY = Registry(("bind", "prometheus", "errors", "cache", "scripted", "erratic", "whoami"), "tests.testplugins")


class Chain:
    """A server block's chain (cache, then scripted) driven without sockets."""

    def __init__(self, cache_lines: str = "cache", keys: str = ".") -> None:
        config = load(f"{keys} {{\n {cache_lines}\n scripted\n}}\n", "Corefile", REGISTRY, default_port=0)
        self.block: ServerBlock = config.blocks[0]
        self.cache = self.block.find("cache")
        self.upstream = self.block.find("scripted")
        assert isinstance(self.cache, Cache) and isinstance(self.upstream, Scripted)
        self.clock = ManualClock()
        self.cache.clock = self.clock
        self.metrics = config.runtime.metrics

    async def raw(self, data: bytes, client: str = "10.0.0.1") -> bytes:
        reply = await self.block.handler(request(data, client))
        assert reply is not None
        return reply.wire

    async def ask(
        self, name: str, rdtype: str = "A", client: str = "10.0.0.1", **options: object
    ) -> dns.message.Message:
        return dns.message.from_wire(await self.raw(query(name, rdtype, **options), client))

    def asked(self, name: str, rdtype: str | None = None) -> int:
        qtype = dns.rdatatype.from_text(rdtype) if rdtype else None
        return self.upstream.count(name if name.endswith(".") else name + ".", qtype)

    def counter(self, metric: str, *labels: str) -> float:
        family = self.metrics[metric]
        return family.values.get((SERVER, *labels, ".", ""), 0.0)  # type: ignore[union-attr]


def ttls(message: dns.message.Message) -> list[int]:
    return [rrset.ttl for section in (message.answer, message.authority, message.additional) for rrset in section]


def parse_error(text: str) -> str:
    with pytest.raises(CorefileError) as caught:
        load(f". {{\n {text}\n scripted\n}}\n", "Corefile", REGISTRY, default_port=0)
    return str(caught.value)


# -- the Corefile --------------------------------------------------------------------------


def test_defaults_are_coredns_defaults() -> None:
    config = Chain().cache.config
    assert (config.success_capacity, config.success_ttl, config.success_min_ttl) == (9984, 3600, 5)
    assert (config.denial_capacity, config.denial_ttl, config.denial_min_ttl) == (9984, 1800, 5)
    assert config.servfail_ttl == 5 and config.prefetch == 0 and config.stale == 0 and not config.keepttl
    assert config.zones == ["."]


def test_zones_default_to_the_server_block_and_a_number_first_is_the_ttl() -> None:
    assert Chain(keys="example.org example.net").cache.config.zones == ["example.org.", "example.net."]
    config = Chain("cache 300 Example.ORG 10.0.0.0/24").cache.config
    assert (config.success_ttl, config.denial_ttl) == (300, 300)
    assert config.zones == ["example.org.", "0.0.10.in-addr.arpa."]
    assert config.zones_label == "example.org.,0.0.10.in-addr.arpa."


def test_block_options() -> None:
    config = Chain(
        """cache 100 {
            success 5000 200 10
            denial 2500 60 2
            prefetch 3 30s 20%
            serve_stale 2h verify
            servfail 1m
            disable denial sub.example.org
            keepttl
        }"""
    ).cache.config
    assert (config.success_capacity, config.success_ttl, config.success_min_ttl) == (4864, 200, 10)
    assert (config.denial_capacity, config.denial_ttl, config.denial_min_ttl) == (2304, 60, 2)
    assert (config.prefetch, config.prefetch_duration, config.prefetch_percentage) == (3, 30.0, 20)
    assert (config.stale, config.verify) == (7200, True)
    assert config.servfail_ttl == 60
    assert config.denial_disabled == ["sub.example.org."] and config.success_disabled == []
    assert config.keepttl
    assert Chain("cache {\n serve_stale\n disable success\n }").cache.config.stale == 3600
    assert Chain("cache {\n disable success\n }").cache.config.success_disabled == ["."]


@pytest.mark.parametrize(("asked", "held"), [(0, 1024), (1000, 1024), (1024, 1024), (5000, 4864), (10000, 9984)])
def test_capacity_is_rounded_to_whole_shards_like_coredns(asked: int, held: int) -> None:
    assert effective_capacity(asked) == held


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cache 0", "Corefile:2: cache: cache TTL can not be zero or negative: 0"),
        ("cache -5", "Corefile:2: cache: cache TTL can not be zero or negative: -5"),
        ("cache {\n success\n }", "Corefile:3: success: expected 1 to 3 arguments, got 0"),
        ("cache {\n success many\n }", 'Corefile:3: success: "many" is not a number'),
        ("cache {\n denial 100 0\n }", "Corefile:3: denial: cache TTL can not be zero or negative: 0"),
        ("cache {\n denial 100 10 -1\n }", "Corefile:3: denial: cache min TTL can not be negative: -1"),
        ("cache {\n success -1\n }", "Corefile:3: success: capacity can not be negative: -1"),
        ("cache {\n prefetch\n }", "Corefile:3: prefetch: expected 1 to 3 arguments, got 0"),
        ("cache {\n prefetch -1\n }", "Corefile:3: prefetch: prefetch amount should be positive: -1"),
        ("cache {\n prefetch 2 20%\n }", 'Corefile:3: prefetch: invalid duration "20%" (use e.g. 30s, 500ms, 1m30s)'),
        ("cache {\n prefetch 2 1m 5%\n }", "Corefile:3: prefetch: percentage should fall in range [10, 90]: 5"),
        (
            "cache {\n prefetch 2 1m 50\n }",
            'Corefile:3: prefetch: last character of percentage should be "%", but is: "0"',
        ),
        (
            "cache {\n serve_stale 1h sometimes\n }",
            "serve_stale: invalid value for serve_stale refresh mode: sometimes",
        ),
        ("cache {\n serve_stale 1h verify 100ms\n }", "VERIFY_TIMEOUT, RESPONSE_TTL and FAILURE_RECHECK are not"),
        (
            "cache {\n servfail 6m\n }",
            "Corefile:3: servfail: caching SERVFAIL responses over 5 minutes is not permitted",
        ),
        ("cache {\n servfail\n }", "Corefile:3: servfail: expected exactly 1 argument, got 0"),
        (
            "cache {\n disable everything\n }",
            'Corefile:3: disable: cache type for disable must be "success" or "denial"',
        ),
        ("cache {\n keepttl now\n }", "Corefile:3: keepttl: expected exactly 0 arguments, got 1"),
        ("cache {\n shards 12\n }", 'Corefile:3: cache: unknown option "shards"'),
        ("cache example..org", 'Corefile:2: cache: invalid zone "example..org"'),
        ("cache\n cache", "Corefile:3: cache: given twice in one server block (first at line 2)"),
        ("cache {\n serve_stale_policy prefer_positive\n }", "Corefile:3: serve_stale_policy: is not supported"),
        ("cache {\n keepttl {\n now\n }\n }", "Corefile:3: keepttl: takes no block"),
    ],
)
def test_setup_errors_name_file_line_and_problem(text: str, message: str) -> None:
    assert message in parse_error(text)


# -- hits ----------------------------------------------------------------------------------


async def test_second_query_is_answered_from_the_cache() -> None:
    chain = Chain()
    first = await chain.ask("www.example.org")
    second = await chain.ask("www.example.org")
    assert chain.asked("www.example.org") == 1
    assert first.answer == second.answer
    assert chain.counter("coredns_cache_hits_total", "success") == 1
    assert chain.counter("coredns_cache_misses_total") == 1
    assert chain.counter("coredns_cache_requests_total") == 2


def _ttl_offsets(message: bytes) -> list[int]:
    """Offsets of every TTL field but OPT's, found independently of the plugin's walker."""
    counts = struct.unpack_from("!HHHH", message, 4)
    offset = 12
    for _ in range(counts[0]):
        offset = wire.skip_name(message, offset) + 4
    found = []
    for _ in range(sum(counts[1:])):
        offset = wire.skip_name(message, offset)
        rtype, _class, _ttl, rdlength = struct.unpack_from("!HHIH", message, offset)
        if rtype != wire.TYPE_OPT:
            found.append(offset + 4)
        offset += 10 + rdlength
    return found


def _rich(req: Request) -> Reply:
    """An answer, an NS in authority, glue in additional, and EDNS when asked."""
    reply = build(req, ttl=120)
    message = reply.parsed
    assert message is not None
    from dnslib import NS, QTYPE, RR, A

    message.add_auth(RR("example.org.", QTYPE.NS, 1, 90, NS("ns1.example.org.")))
    message.ar.insert(0, RR("ns1.example.org.", QTYPE.A, 1, 90, A("192.0.2.53")))
    return reply


async def test_a_hit_is_byte_identical_to_the_slow_path_reply_except_id_and_ttl() -> None:
    chain = Chain()
    chain.upstream.answer_with = _rich
    miss = await chain.raw(query("Www.Example.org", "A", qid=1, use_edns=0, want_dnssec=True))
    chain.clock.advance(7)
    hit = await chain.raw(query("Www.Example.org", "A", qid=2, use_edns=0, want_dnssec=True))
    assert len(hit) == len(miss) and hit[:2] == b"\x00\x02" and miss[:2] == b"\x00\x01"
    offsets = _ttl_offsets(miss)
    assert len(offsets) == 3 and offsets == _ttl_offsets(hit)
    assert {miss[o : o + 4] for o in offsets} == {struct.pack("!I", 90)}  # CoreDNS: every TTL the entry's
    assert {hit[o : o + 4] for o in offsets} == {struct.pack("!I", 83)}
    expected = bytearray(hit[:2] + miss[2:])
    for offset in offsets:
        expected[offset : offset + 4] = hit[offset : offset + 4]
    assert hit == bytes(expected)


async def test_a_hit_uses_the_clients_id_rd_and_question_letter_case() -> None:
    chain = Chain()
    await chain.raw(query("host.example.org", qid=7))
    asked = bytearray(query("HoSt.ExAmPlE.oRg", qid=0xBEEF))
    asked[2] &= ~0x01  # RD clear
    hit = await chain.raw(bytes(asked))
    end = wire.parse_question(bytes(asked)).end
    assert hit[:2] == b"\xbe\xef"
    assert hit[12:end] == asked[12:end]
    assert not hit[2] & 0x01
    assert dns.message.from_wire(hit).answer[0][0].address == "192.0.2.1"
    assert chain.asked("host.example.org") == 1


async def test_a_hit_never_waits() -> None:
    """The chain's coroutine finishes on its first step: no await on a hit, so on Python
    3.12 an eager Task answers it without a pass through the event loop."""
    chain = Chain()
    await chain.ask("fast.example.org")
    step = chain.block.handler(request(query("fast.example.org")))
    with pytest.raises(StopIteration) as finished:
        step.send(None)
    reply = finished.value.value
    assert isinstance(reply, Reply) and reply.plugin == "cache" and reply.packed is not None
    assert reply.parsed is None  # no dnslib object was built


async def test_ttls_count_down_and_the_entry_expires() -> None:
    chain = Chain()
    assert ttls(await chain.ask("tick.example.org")) == [300]
    chain.clock.advance(100)
    assert ttls(await chain.ask("tick.example.org")) == [200]
    chain.clock.advance(199)
    assert ttls(await chain.ask("tick.example.org")) == [1]
    assert chain.asked("tick.example.org") == 1
    chain.clock.advance(1)
    assert ttls(await chain.ask("tick.example.org")) == [300]
    assert chain.asked("tick.example.org") == 2


async def test_keepttl_serves_the_stored_ttl_until_expiry() -> None:
    chain = Chain("cache {\n keepttl\n }")
    await chain.ask("keep.example.org")
    chain.clock.advance(250)
    assert ttls(await chain.ask("keep.example.org")) == [300]
    chain.clock.advance(50)
    await chain.ask("keep.example.org")
    assert chain.asked("keep.example.org") == 2


@pytest.mark.parametrize(
    ("lines", "upstream_ttl", "served"),
    [
        ("cache", 7200, 3600),
        ("cache 30", 300, 30),
        ("cache", 1, 5),
        ("cache {\n success 1024 3600 2\n }", 1, 2),
        ("cache {\n success 1024 20 60\n }", 300, 20),  # the maximum wins, as in CoreDNS
    ],
)
async def test_positive_ttl_is_capped_and_raised_to_the_minimum(lines: str, upstream_ttl: int, served: int) -> None:
    chain = Chain(lines)
    chain.upstream.answer_with = lambda req: build(req, ttl=upstream_ttl)
    assert ttls(await chain.ask("cap.example.org")) == [served]
    chain.clock.advance(served - 1)
    await chain.ask("cap.example.org")
    assert chain.asked("cap.example.org") == 1
    chain.clock.advance(1)
    await chain.ask("cap.example.org")
    assert chain.asked("cap.example.org") == 2


async def test_a_zero_ttl_with_zero_minimum_is_not_cached() -> None:
    chain = Chain("cache {\n success 1024 3600 0\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=0)
    await chain.ask("zero.example.org")
    await chain.ask("zero.example.org")
    assert chain.asked("zero.example.org") == 2


# -- the key -------------------------------------------------------------------------------


async def test_key_ignores_name_case_udp_size_and_edns_options() -> None:
    chain = Chain()
    await chain.ask("key.example.org", use_edns=0, payload=1232)
    await chain.ask("KEY.example.ORG", use_edns=0, payload=4096)
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)
    await chain.ask("key.example.org", use_edns=0, payload=512, options=[cookie])
    assert chain.asked("key.example.org") == 1


async def test_key_separates_type_class_do_cd_and_edns() -> None:
    chain = Chain()
    await chain.ask("split.example.org", use_edns=0)
    await chain.ask("split.example.org", "AAAA", use_edns=0)
    await chain.ask("split.example.org", "A", rdclass="CH", use_edns=0)
    await chain.ask("split.example.org", use_edns=0, want_dnssec=True)
    await chain.ask("split.example.org", use_edns=0, flags=dns.flags.RD | dns.flags.CD)
    await chain.ask("split.example.org", use_edns=False)
    assert chain.asked("split.example.org") == 6
    plain = await chain.ask("split.example.org", use_edns=False)
    assert plain.edns == -1  # the reply stored for a query without EDNS has no OPT
    assert chain.asked("split.example.org") == 6


async def test_types_whose_code_is_a_letter_are_not_confused() -> None:
    """HTTPS is type 65, the byte "A"; the key lower-cases the question bytes, so type 97
    ("a") has the same key: the entry's own type is checked before it is served."""
    chain = Chain()
    chain.upstream.answer_with = lambda req: build(req, addresses=[], txt=f"type{req.qtype}")
    await chain.ask("letters.example.org", "HTTPS")
    other = await chain.ask("letters.example.org", "TYPE97")
    assert chain.asked("letters.example.org") == 2
    assert other.answer[0][0].strings == (b"type97",)


async def test_an_edns_version_above_zero_bypasses_the_cache() -> None:
    chain = Chain()
    await chain.ask("version.example.org", use_edns=0)
    await chain.ask("version.example.org", use_edns=1)
    await chain.ask("version.example.org", use_edns=1)
    assert chain.asked("version.example.org") == 3


# -- what is cached, and for how long ------------------------------------------------------


@pytest.mark.parametrize(
    ("rcode", "soa", "served"),
    [
        (wire.NXDOMAIN, (600, 60), 60),  # RFC 2308: min(SOA TTL, SOA MINIMUM)
        (wire.NXDOMAIN, (30, 900), 30),
        (wire.NOERROR, (45, 600), 45),  # NODATA
        (wire.NXDOMAIN, (7200, 7200), 1800),  # the denial maximum
        (wire.NXDOMAIN, (1, 1), 5),  # the denial minimum
    ],
)
async def test_negative_answers_are_kept_for_the_soa_ttl(rcode: int, soa: tuple[int, int], served: int) -> None:
    chain = Chain()
    chain.upstream.answer_with = lambda req: build(req, rcode=rcode, addresses=[], soa=soa)
    assert ttls(await chain.ask("neg.example.org")) == [served]
    chain.clock.advance(served - 1)
    reply = await chain.ask("neg.example.org")
    assert reply.rcode() == rcode and ttls(reply) == [1]
    assert chain.asked("neg.example.org") == 1
    assert chain.counter("coredns_cache_hits_total", "denial") == 1
    chain.clock.advance(1)
    await chain.ask("neg.example.org")
    assert chain.asked("neg.example.org") == 2


@pytest.mark.parametrize("rcode", [wire.NXDOMAIN, wire.NOERROR])
@pytest.mark.parametrize(("lines", "kept"), [("cache", 5), ("cache {\n denial 1024 1800 20\n }", 20)])
async def test_negative_answers_without_soa_are_kept_for_the_denial_minimum(rcode: int, lines: str, kept: int) -> None:
    chain = Chain(lines)
    chain.upstream.answer_with = lambda req: build(req, rcode=rcode, addresses=[])
    await chain.ask("nosoa.example.org")
    chain.clock.advance(kept - 1)
    assert (await chain.ask("nosoa.example.org")).rcode() == rcode
    assert chain.asked("nosoa.example.org") == 1
    chain.clock.advance(1)
    await chain.ask("nosoa.example.org")
    assert chain.asked("nosoa.example.org") == 2


@pytest.mark.parametrize(
    "answer",
    [
        lambda req: build(req, truncated=True),
        lambda req: build(req, rcode=wire.REFUSED, addresses=[]),
        lambda req: build(req, rcode=wire.FORMERR, addresses=[]),
        lambda req: build(req, rcode=wire.NOTIMP, addresses=[]),
        lambda req: build(req, rcode=wire.NXDOMAIN, addresses=[], txt="a name error with records"),
    ],
    ids=["truncated", "refused", "formerr", "notimp", "nxdomain-with-records"],
)
async def test_replies_that_are_never_cached(answer: object) -> None:
    chain = Chain()
    chain.upstream.answer_with = answer  # type: ignore[assignment]
    await chain.ask("never.example.org")
    await chain.ask("never.example.org")
    assert chain.asked("never.example.org") == 2
    assert len(chain.cache.store) == 0


async def test_a_reply_for_another_question_is_not_cached_and_counted_as_a_drop() -> None:
    chain = Chain()

    def elsewhere(req: Request) -> Reply:
        other = request(query("other.example.org", qid=req.id))
        return build(other)

    chain.upstream.answer_with = elsewhere
    await chain.ask("asked.example.org")
    await chain.ask("asked.example.org")
    assert chain.asked("asked.example.org") == 2
    assert chain.counter("coredns_cache_drops_total") == 2


def _with_options(req: Request) -> Reply:
    """A positive answer whose OPT record carries an NSID and a cookie for this one client."""
    response = dns.message.make_response(dns.message.from_wire(req.wire))
    response.use_edns(0, options=[dns.edns.NSIDOption(b"upstream-7"), dns.edns.CookieOption(b"\x01" * 8, b"\x02" * 16)])
    response.answer.append(dns.rrset.from_text(response.question[0].name, 300, "IN", "A", "192.0.2.1"))
    return Reply(wire=response.to_wire(), plugin="scripted")


async def test_edns_options_of_a_reply_are_not_kept() -> None:
    chain = Chain()
    chain.upstream.answer_with = _with_options
    first = await chain.ask("opts.example.org", use_edns=0)
    second = await chain.ask("opts.example.org", use_edns=0)
    assert chain.asked("opts.example.org") == 1
    for reply in (first, second):
        assert reply.edns == 0 and not reply.options
        assert reply.answer[0][0].address == "192.0.2.1"


def _damaged(how: str) -> object:
    def answer(req: Request) -> Reply:
        good = build(req, rcode=wire.NXDOMAIN, addresses=[], soa=(60, 60)).wire
        if how == "cut":
            return Reply(wire=good[:-3], plugin="scripted")
        if how == "trailing":
            return Reply(wire=good + b"\x00", plugin="scripted")
        soa = good.rindex(b"\x00\x06\x00\x01")  # TYPE SOA, CLASS IN of the authority record
        rdlength = struct.unpack_from("!H", good, soa + 8)[0]
        # The SOA is the last record: four more octets of rdata make its fields not fit.
        bad = good[: soa + 8] + struct.pack("!H", rdlength + 4) + good[soa + 10 :] + b"\x00" * 4
        return Reply(wire=bad, plugin="scripted")

    return answer


@pytest.mark.parametrize("how", ["cut", "trailing", "soa"])
async def test_a_malformed_reply_is_passed_on_but_not_cached(how: str) -> None:
    chain = Chain()
    chain.upstream.answer_with = _damaged(how)  # type: ignore[assignment]
    for _ in range(2):
        await chain.raw(query("damaged.example.org"))
    assert chain.asked("damaged.example.org") == 2
    assert chain.counter("coredns_cache_drops_total") == 2


async def test_zone_transfers_are_not_cached() -> None:
    chain = Chain()
    await chain.ask("example.org", "AXFR")
    await chain.ask("example.org", "AXFR")
    assert chain.asked("example.org", "AXFR") == 2


@pytest.mark.parametrize(
    ("lines", "kept"), [("cache", 5), ("cache {\n servfail 20s\n }", 20), ("cache {\n servfail 0\n }", 0)]
)
async def test_servfail_is_kept_for_the_servfail_duration(lines: str, kept: int) -> None:
    chain = Chain(lines)
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.SERVFAIL, addresses=[])
    await chain.ask("broken.example.org")
    chain.clock.advance(max(kept - 1, 0))
    assert (await chain.ask("broken.example.org")).rcode() == dns.rcode.SERVFAIL
    assert chain.asked("broken.example.org") == (1 if kept else 2)
    chain.clock.advance(1)
    await chain.ask("broken.example.org")
    assert chain.asked("broken.example.org") == (2 if kept else 3)


async def test_only_names_inside_the_cache_zones_are_cached_and_counted() -> None:
    chain = Chain("cache example.org")
    for _ in range(2):
        await chain.ask("in.example.org")
        await chain.ask("out.example.net")
    assert chain.asked("in.example.org") == 1 and chain.asked("out.example.net") == 2
    family = chain.metrics["coredns_cache_requests_total"]
    assert family.values == {(SERVER, "example.org.", ""): 2.0}  # type: ignore[union-attr]


async def test_disable_keeps_a_kind_out_of_the_listed_zones() -> None:
    chain = Chain("cache {\n disable denial sub.example.org\n disable success other.example.org\n }")
    nx = {"gone.sub.example.org.", "gone.example.org."}
    chain.upstream.answer_with = lambda req: (
        build(req, rcode=wire.NXDOMAIN, addresses=[], soa=(60, 60)) if req.qname in nx else build(req)
    )
    for _ in range(2):
        for name in ("gone.sub.example.org", "gone.example.org", "www.other.example.org", "www.sub.example.org"):
            await chain.ask(name)
    assert chain.asked("gone.sub.example.org") == 2 and chain.asked("gone.example.org") == 1
    assert chain.asked("www.other.example.org") == 2 and chain.asked("www.sub.example.org") == 1


# -- capacity --------------------------------------------------------------------------------


async def test_a_full_cache_evicts_and_counts_evictions() -> None:
    chain = Chain("cache {\n success 1024\n }")
    for index in range(1100):
        await chain.ask(f"n{index}.example.org")
    store = chain.cache.store
    assert len(store.kinds[SUCCESS]) == 1024
    assert chain.counter("coredns_cache_evictions_total", "success") == 1100 - 1024
    assert sum(len(table) for table in store.tables) == 1024
    assert sum(len(group.entries) for group in store.groups.values()) == 1024


class _First(random.Random):
    def random(self) -> float:
        return 0.0


def _entry(name: bytes, qtype: int) -> Entry:
    qkey = name + qtype.to_bytes(2, "big") + b"\x00\x01"
    return Entry(qkey, 4, qtype, wire.NOERROR, SUCCESS, (b"",) * 4, b"", (), 100, 100)  # type: ignore[arg-type]


def test_evicting_an_a_entry_takes_its_aaaa_along() -> None:
    store = Store(3, 3, rng=_First())
    first = b"\x05first\x00"
    store.add(_entry(first, 1), None)
    store.add(_entry(first, 28), None)
    store.add(_entry(b"\x05other\x00", 1), None)
    evicted = store.add(_entry(b"\x05third\x00", 1), None)
    assert {entry.qkey[:-4] for entry in evicted} == {first}
    assert first not in store.groups and len(store) == 2


# -- prefetch --------------------------------------------------------------------------------


async def test_prefetch_refreshes_a_popular_entry_before_it_expires() -> None:
    chain = Chain("cache {\n prefetch 2 1m 50%\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=100)
    await chain.ask("popular.example.org")
    await chain.ask("popular.example.org")
    chain.clock.advance(49)
    await chain.ask("popular.example.org")  # 51 s left: not yet
    await chain.cache.settle()
    assert chain.asked("popular.example.org") == 1
    chain.clock.advance(1)
    reply = await chain.ask("popular.example.org")  # 50 s left: prefetch, answered from the cache
    assert ttls(reply) == [50]
    await chain.cache.settle()
    assert chain.asked("popular.example.org") == 2
    assert chain.counter("coredns_cache_prefetch_total") == 1
    assert ttls(await chain.ask("popular.example.org")) == [100]


async def test_prefetch_needs_amount_hits_without_a_gap() -> None:
    chain = Chain("cache {\n prefetch 3 10s 90%\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=100)
    await chain.ask("rare.example.org")
    for _ in range(3):
        chain.clock.advance(11)  # a gap of more than DURATION each time: never popular
        await chain.ask("rare.example.org")
    await chain.cache.settle()
    assert chain.asked("rare.example.org") == 1


async def test_prefetch_sends_at_most_one_refresh_per_entry() -> None:
    chain = Chain("cache {\n prefetch 1 1m 90%\n }")
    release = asyncio.Event()

    async def slow(req: Request) -> Reply:
        await release.wait()
        return build(req, ttl=100)

    await chain.ask("hot.example.org")
    chain.upstream.answer_with = slow
    chain.clock.advance(40)
    for _ in range(20):
        assert ttls(await chain.ask("hot.example.org")) == [260]
    release.set()
    await chain.cache.settle()
    assert chain.asked("hot.example.org") == 2
    assert chain.counter("coredns_cache_prefetch_total") == 1


async def test_prefetch_refreshes_the_aaaa_of_an_a_entry_with_it() -> None:
    chain = Chain("cache {\n prefetch 1 1m 50%\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=100)
    await chain.ask("pair.example.org", "A")
    await chain.ask("pair.example.org", "AAAA")
    chain.clock.advance(60)
    await chain.ask("pair.example.org", "A")
    await chain.cache.settle()
    assert chain.asked("pair.example.org", "AAAA") == 2
    chain.clock.advance(1)
    assert ttls(await chain.ask("pair.example.org", "A")) == [99]
    assert ttls(await chain.ask("pair.example.org", "AAAA")) == [99]


async def test_a_failed_prefetch_keeps_the_entry() -> None:
    chain = Chain("cache {\n prefetch 1 1m 50%\n }")
    await chain.ask("keepme.example.org")
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.SERVFAIL, addresses=[])
    chain.clock.advance(200)
    await chain.ask("keepme.example.org")
    await chain.cache.settle()
    assert chain.asked("keepme.example.org") == 2
    reply = await chain.ask("keepme.example.org")
    assert reply.rcode() == dns.rcode.NOERROR and ttls(reply) == [100]


# -- serve_stale -----------------------------------------------------------------------------


async def test_serve_stale_immediate_answers_expired_entries_and_refreshes_behind() -> None:
    chain = Chain("cache {\n serve_stale 1h\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=10)
    await chain.ask("stale.example.org")
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.SERVFAIL, addresses=[])
    chain.clock.advance(30)
    reply = await chain.ask("stale.example.org")
    assert reply.rcode() == dns.rcode.NOERROR and ttls(reply) == [0]
    await chain.cache.settle()
    assert chain.asked("stale.example.org") == 2  # the refresh failed, the entry stays
    assert chain.counter("coredns_cache_served_stale_total") == 1
    chain.upstream.answer_with = lambda req: build(req, ttl=10, addresses=["192.0.2.99"])
    assert ttls(await chain.ask("stale.example.org")) == [0]
    await chain.cache.settle()
    fresh = await chain.ask("stale.example.org")
    assert ttls(fresh) == [10] and fresh.answer[0][0].address == "192.0.2.99"
    assert chain.asked("stale.example.org") == 3


async def test_serve_stale_immediate_survives_an_upstream_that_raises() -> None:
    chain = Chain("cache {\n serve_stale 1h\n }")
    await chain.ask("flaky.example.org")

    def broken(req: Request) -> Reply:
        raise ConnectionError("upstream unreachable")

    chain.upstream.answer_with = broken
    chain.clock.advance(400)
    assert ttls(await chain.ask("flaky.example.org")) == [0]
    await chain.cache.settle()
    assert ttls(await chain.ask("flaky.example.org")) == [0]
    await chain.cache.settle()
    assert chain.asked("flaky.example.org") == 3


async def test_serve_stale_ends_after_its_duration() -> None:
    chain = Chain("cache {\n serve_stale 60s\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=10)
    await chain.ask("old.example.org")
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.SERVFAIL, addresses=[])
    chain.clock.advance(70)
    assert (await chain.ask("old.example.org")).rcode() == dns.rcode.SERVFAIL


async def test_without_serve_stale_an_expired_entry_is_a_miss() -> None:
    chain = Chain()
    chain.upstream.answer_with = lambda req: build(req, ttl=10)
    await chain.ask("gone.example.org")
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.SERVFAIL, addresses=[])
    chain.clock.advance(10)
    assert (await chain.ask("gone.example.org")).rcode() == dns.rcode.SERVFAIL
    assert chain.counter("coredns_cache_served_stale_total") == 0


async def test_serve_stale_verify_asks_upstream_first() -> None:
    chain = Chain("cache {\n serve_stale 1h verify\n }")
    chain.upstream.answer_with = lambda req: build(req, ttl=10)
    await chain.ask("verify.example.org")
    chain.clock.advance(20)
    chain.upstream.answer_with = lambda req: build(req, ttl=10, addresses=["192.0.2.7"])
    fresh = await chain.ask("verify.example.org")
    assert fresh.answer[0][0].address == "192.0.2.7" and ttls(fresh) == [10]
    assert chain.counter("coredns_cache_served_stale_total") == 0

    chain.clock.advance(20)
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.SERVFAIL, addresses=[])
    stale = await chain.ask("verify.example.org")
    assert stale.rcode() == dns.rcode.NOERROR and ttls(stale) == [0]

    def broken(req: Request) -> Reply:
        raise ConnectionError("upstream unreachable")

    chain.upstream.answer_with = broken
    assert (await chain.ask("verify.example.org")).answer[0][0].address == "192.0.2.7"
    assert chain.counter("coredns_cache_served_stale_total") == 2
    assert chain.asked("verify.example.org") == 4


async def test_serve_stale_verify_takes_a_fresh_nxdomain() -> None:
    chain = Chain("cache {\n serve_stale 1h verify\n }")
    await chain.ask("deleted.example.org")
    chain.clock.advance(400)
    chain.upstream.answer_with = lambda req: build(req, rcode=wire.NXDOMAIN, addresses=[], soa=(60, 60))
    assert (await chain.ask("deleted.example.org")).rcode() == dns.rcode.NXDOMAIN
    assert (await chain.ask("deleted.example.org")).rcode() == dns.rcode.NXDOMAIN
    assert chain.asked("deleted.example.org") == 2


# -- lifecycle -------------------------------------------------------------------------------


async def test_stop_cancels_refreshes_in_flight() -> None:
    chain = Chain("cache {\n prefetch 1 1m 90%\n }")
    await chain.ask("slow.example.org")
    never = asyncio.Event()

    async def hang(req: Request) -> Reply:
        await never.wait()
        raise AssertionError("unreachable")

    chain.upstream.answer_with = hang
    chain.clock.advance(290)
    await chain.ask("slow.example.org")
    (task,) = chain.cache._tasks
    await chain.cache.stop()
    assert task.cancelled() and not chain.cache._tasks


async def test_the_real_clock_ticks_and_stops() -> None:
    cache = Chain().cache
    cache.clock = TickingClock()
    await cache.start()
    try:
        before = cache.clock.now
        await wait_for(lambda: cache.clock.now != before)
    finally:
        await cache.stop()
    assert cache.clock._timer is None  # type: ignore[attr-defined]


async def test_an_answer_stored_after_the_fast_path_declined_is_still_a_hit() -> None:
    """The server's fast path asks the cache first; on Python 3.11 the chain runs a loop
    pass later, and an answer for the same question may have been stored in between (a
    concurrent query). The cache skips asking itself again, but still answers that as a
    hit: upstream not asked, counted once as a hit, the entry kept."""
    chain = Chain()
    await chain.ask("www.example.org")  # stored
    req = request(query("www.example.org", "A"))
    req.declined_by = chain.cache  # as if the fast path had looked just before the store
    reply = await chain.block.handler(req)
    assert reply is not None and wire.rcode_of(reply.wire) == wire.NOERROR
    assert chain.asked("www.example.org") == 1
    assert chain.counter("coredns_cache_hits_total", "success") == 1
    assert chain.counter("coredns_cache_misses_total") == 1
    await chain.ask("www.example.org")
    assert chain.asked("www.example.org") == 1
