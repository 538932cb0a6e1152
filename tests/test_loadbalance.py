"""loadbalance over real sockets: shuffled A/AAAA/MX, CNAMEs first, wire replies too."""

from __future__ import annotations

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest
from dnslib import CNAME, MX, QTYPE, RR, A, DNSRecord

import plugins.loadbalance as loadbalance
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Running, query_bytes, raw_udp
from tests.testplugins.manyrecords import ADDRESSES

REGISTRY = Registry(("bind", "acl", "loadbalance", "manyrecords", "whoami"), "tests.testplugins")
QUERIES = 20  # orders of 8 (or 6, or 4) records: the chance that 20 replies agree is nil


def corefile(loadbalance_line: str = "loadbalance", packed: bool = False) -> str:
    many = "manyrecords wire" if packed else "manyrecords"
    return f". {{\n    bind 127.0.0.1\n    {loadbalance_line}\n    {many}\n}}\n"


async def ask(running: Running, name: str, rdtype: str = "A", **options: object) -> dns.message.Message:
    """A query whose reply keeps one record per RRset, so the wire order is visible."""
    query = dns.message.make_query(name, rdtype, **options)  # type: ignore[arg-type]
    return await dns.asyncquery.udp(query, LOOPBACK, port=running.port, timeout=3, one_rr_per_rrset=True)


def section(records: list) -> list[tuple[str, str, str]]:
    return [(dns.rdatatype.to_text(rrset.rdtype), rrset.name.to_text(), rrset[0].to_text()) for rrset in records]


def values(records: list[tuple[str, str, str]], rdtype: str) -> tuple[str, ...]:
    return tuple(value for kind, _name, value in records if kind == rdtype)


@pytest.mark.parametrize("packed", [False, True], ids=["message", "wire"])
async def test_address_records_are_shuffled_and_the_cname_stays_first(start_server: StartServer, packed: bool) -> None:
    running = await start_server(corefile(packed=packed), registry=REGISTRY)
    answer_orders = set()
    additional_orders = set()
    for _ in range(QUERIES):
        reply = await ask(running, "chain.example.org")
        answer = section(reply.answer)
        assert answer[0] == ("CNAME", "chain.example.org.", "target.chain.example.org.")
        assert [kind for kind, _name, _value in answer[1:]] == ["A"] * 8
        # Owner names survive the move (on the wire they are pointers into the CNAME).
        assert {name for _kind, name, _value in answer[1:]} == {"target.chain.example.org."}
        addresses = values(answer, "A")
        assert sorted(addresses) == sorted(ADDRESSES)
        answer_orders.add(addresses)
        extra = section(reply.additional)
        assert {name for _kind, name, _value in extra} == {"target.chain.example.org."}
        assert sorted(values(extra, "AAAA")) == [f"2001:db8::{n}" for n in range(1, 5)]
        additional_orders.add(values(extra, "AAAA"))
    assert len(answer_orders) > 1
    assert len(additional_orders) > 1


async def test_without_loadbalance_the_order_is_the_plugins(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n manyrecords\n}\n", registry=REGISTRY)
    for _ in range(3):
        reply = await ask(running, "chain.example.org")
        assert values(section(reply.answer), "A") == tuple(ADDRESSES)


@pytest.mark.parametrize("packed", [False, True], ids=["message", "wire"])
async def test_mx_records_are_shuffled_and_glue_names_stay_intact(start_server: StartServer, packed: bool) -> None:
    running = await start_server(corefile(packed=packed), registry=REGISTRY)
    orders = set()
    for _ in range(QUERIES):
        reply = await ask(running, "mx.example.org", "MX")
        exchanges = [(rrset[0].preference, rrset[0].exchange.to_text()) for rrset in reply.answer]
        assert sorted(exchanges) == [(10 * n, f"mx{n}.mx.example.org.") for n in range(1, 7)]
        orders.add(tuple(exchanges))
        # On the wire the glue owners point into the MX data: moving the MX records there
        # would break them, so the plugin must have repacked this reply.
        glue = {(rrset.name.to_text(), rrset[0].address) for rrset in reply.additional}
        assert glue == {(f"mx{n}.mx.example.org.", f"10.0.1.{n}") for n in range(1, 7)}
    assert len(orders) > 1


@pytest.mark.parametrize("packed", [False, True], ids=["message", "wire"])
async def test_mixed_answer_is_ordered_cname_others_addresses_mx(start_server: StartServer, packed: bool) -> None:
    running = await start_server(corefile(packed=packed), registry=REGISTRY)
    address_orders = set()
    mx_orders = set()
    for _ in range(QUERIES):
        answer = section((await ask(running, "mixed.example.org", "ANY")).answer)
        assert [kind for kind, _name, _value in answer] == ["CNAME", "TXT", "A", "A", "A", "MX", "MX"]
        assert sorted(values(answer, "A")) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        address_orders.add(values(answer, "A"))
        mx_orders.add(values(answer, "MX"))
    assert len(address_orders) > 1
    assert len(mx_orders) == 2


@pytest.mark.parametrize("packed", [False, True], ids=["message", "wire"])
async def test_opt_record_stays_last(start_server: StartServer, packed: bool) -> None:
    running = await start_server(corefile(packed=packed), registry=REGISTRY)
    for _ in range(5):
        raw = await raw_udp(running.port, query_bytes("chain.example.org", "A", use_edns=0))
        assert raw is not None
        reply = DNSRecord.parse(raw)
        assert [record.rtype for record in reply.ar] == [QTYPE.AAAA] * 4 + [QTYPE.OPT]


@pytest.mark.parametrize("packed", [False, True], ids=["message", "wire"])
async def test_errors_and_zone_transfers_are_not_shuffled(start_server: StartServer, packed: bool) -> None:
    running = await start_server(corefile(packed=packed), registry=REGISTRY)
    for _ in range(10):
        reply = await ask(running, "nx.example.org")
        assert reply.rcode() == 3
        assert values(section(reply.answer), "A") == tuple(ADDRESSES)
        raw = await raw_udp(running.port, query_bytes("plain.example.org", "AXFR"))
        assert raw is not None
        assert [str(record.rdata) for record in DNSRecord.parse(raw).rr] == ADDRESSES


@pytest.mark.parametrize("packed", [False, True], ids=["message", "wire"])
async def test_prefer_puts_preferred_networks_first(start_server: StartServer, packed: bool) -> None:
    line = "loadbalance round_robin {\n        prefer 10.0.0.5/32 10.0.0.0/30\n    }"
    running = await start_server(corefile(line, packed=packed), registry=REGISTRY)
    orders = set()
    for _ in range(QUERIES):
        answer = section((await ask(running, "chain.example.org")).answer)
        assert answer[0][0] == "CNAME"
        addresses = values(answer, "A")
        assert addresses[0] == "10.0.0.5"
        assert set(addresses[1:4]) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}  # 10.0.0.0/30
        assert set(addresses[4:]) == {"10.0.0.4", "10.0.0.6", "10.0.0.7", "10.0.0.8"}
        orders.add(addresses)
    assert len(orders) > 1  # still shuffled within each group


async def test_whoami_additional_section_is_reordered_like_coredns(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n loadbalance\n whoami\n}\n", registry=REGISTRY)
    reply = await running.tcp("example.org")
    # CoreDNS's order: CNAMEs, others (SRV), then addresses.
    assert [rrset.rdtype for rrset in reply.additional] == [dns.rdatatype.SRV, dns.rdatatype.A]


# -- the wire reordering, with a predictable shuffle --------------------------------------


def _reverse(items: list[int]) -> None:
    items.reverse()


def _chain_reply() -> DNSRecord:
    reply = DNSRecord.question("chain.example.org").reply()
    reply.add_answer(RR("chain.example.org", QTYPE.CNAME, rdata=CNAME("target.chain.example.org")))
    for address in ADDRESSES[:3]:
        reply.add_answer(RR("target.chain.example.org", QTYPE.A, rdata=A(address)))
    return reply


def test_wire_moves_records_whose_pointers_stay_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadbalance, "shuffle", _reverse)
    packed = bytes(_chain_reply().pack())
    moved = loadbalance.reorder_wire(packed)
    assert moved is not None and moved != packed and len(moved) == len(packed)
    parsed = DNSRecord.parse(moved)
    assert [str(record.rdata) for record in parsed.rr] == ["target.chain.example.org.", *reversed(ADDRESSES[:3])]
    assert {str(record.rname) for record in parsed.rr[1:]} == {"target.chain.example.org."}


def test_wire_refuses_when_a_pointer_targets_a_moving_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadbalance, "shuffle", _reverse)
    reply = DNSRecord.question("mx.example.org", "MX").reply()
    reply.add_answer(RR("mx.example.org", QTYPE.MX, rdata=MX("a.mx.example.org", 10)))
    reply.add_answer(RR("mx.example.org", QTYPE.MX, rdata=MX("b.mx.example.org", 20)))
    reply.add_ar(RR("a.mx.example.org", QTYPE.A, rdata=A("10.0.1.1")))
    assert loadbalance.reorder_wire(bytes(reply.pack())) is None
    # ... while the dnslib path reorders it, and packing compresses anew.
    message = loadbalance.reorder_message(DNSRecord.parse(reply.pack()))
    assert message is not None
    parsed = DNSRecord.parse(message.pack())
    assert [str(record.rdata) for record in parsed.rr] == ["20 b.mx.example.org.", "10 a.mx.example.org."]
    assert str(parsed.ar[0].rname) == "a.mx.example.org."


def test_wire_returns_the_same_bytes_when_nothing_moves() -> None:
    reply = DNSRecord.question("one.example.org").reply()
    reply.add_answer(RR("one.example.org", QTYPE.CNAME, rdata=CNAME("two.example.org")))
    reply.add_answer(RR("two.example.org", QTYPE.A, rdata=A("10.0.0.1")))
    packed = bytes(reply.pack())
    assert loadbalance.reorder_wire(packed) is packed


# -- Corefile errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("loadbalance weighted db.weights", 'Corefile:3: loadbalance: policy "weighted" is not supported'),
        ("loadbalance random", 'Corefile:3: loadbalance: unknown policy "random"'),
        ("loadbalance round_robin extra", "Corefile:3: loadbalance: round_robin takes no more arguments"),
        (
            "loadbalance {\n        prefer 10.0.0.0/33\n    }",
            'Corefile:4: loadbalance: prefer: invalid CIDR "10.0.0.0/33"',
        ),
        ("loadbalance {\n        prefer 10.0.0.1\n    }", 'Corefile:4: loadbalance: prefer: invalid CIDR "10.0.0.1"'),
        ("loadbalance {\n        reload 10s\n    }", 'Corefile:4: loadbalance: unknown option "reload"'),
    ],
)
def test_corefile_errors_name_file_and_line(line: str, message: str) -> None:
    with pytest.raises(CorefileError) as error:
        load(corefile(line), "Corefile", REGISTRY, default_port=0)
    assert str(error.value).startswith(message)
