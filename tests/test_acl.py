"""acl over real sockets: allow, block, filter and drop by query type, client net and zone."""

from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest

import plugins.acl as acl
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, CollectReplies, Running, frame, ipv6_loopback, query_bytes, read_frame

REGISTRY = Registry(("bind", "acl", "loadbalance", "manyrecords", "whoami"), "tests.testplugins")
SERVER = "dns://127.0.0.1:0"  # the server label of a ". {bind 127.0.0.1}" block on port 0


def corefile(*rules: str, zones: str = "", bind: str = "127.0.0.1") -> str:
    body = "\n".join(f"        {rule}" for rule in rules)
    return f". {{\n    bind {bind}\n    acl {zones} {{\n{body}\n    }}\n    whoami\n}}\n"


def counter(running: Running, name: str) -> dict[tuple[str, ...], float]:
    return dict(running.server.runtime.metrics[f"coredns_acl_{name}_requests_total"].values)  # type: ignore[union-attr]


def outcome(reply: dns.message.Message) -> str:
    """allowed (whoami answered), refused (block) or filtered (empty NOERROR)."""
    if reply.rcode() == dns.rcode.REFUSED:
        return "refused"
    assert reply.rcode() == dns.rcode.NOERROR
    return "allowed" if reply.additional else "filtered"


def ede_codes(reply: dns.message.Message) -> list[int]:
    return [error.code for error in reply.extended_errors()]


# -- actions ------------------------------------------------------------------------------


async def test_block_refuses_with_extended_error_blocked(start_server: StartServer) -> None:
    running = await start_server(corefile("block type A"), registry=REGISTRY)
    reply = await running.udp("www.example.org", "A", use_edns=0)
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.answer and not reply.additional
    assert ede_codes(reply) == [dns.edns.EDECode.BLOCKED]
    plain = await running.udp("www.example.org", "A", use_edns=False)
    assert plain.rcode() == dns.rcode.REFUSED and plain.edns == -1  # no OPT for a query without one
    assert outcome(await running.udp("www.example.org", "AAAA")) == "allowed"


async def test_filter_answers_noerror_without_records(start_server: StartServer) -> None:
    running = await start_server(corefile("filter type AAAA"), registry=REGISTRY)
    reply = await running.udp("www.example.org", "AAAA", use_edns=0, want_dnssec=True)
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer and not reply.authority and not reply.additional
    assert ede_codes(reply) == [dns.edns.EDECode.FILTERED]
    assert reply.ednsflags & dns.flags.DO  # DO mirrored, as every reply of this server
    assert outcome(await running.udp("www.example.org", "A")) == "allowed"


async def test_drop_sends_nothing_over_udp(start_server: StartServer) -> None:
    running = await start_server(corefile("drop type A"), registry=REGISTRY)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(CollectReplies, remote_addr=(LOOPBACK, running.port))
    try:
        # Both from one socket, in order: had the first been answered, its reply would
        # arrive first. So the first reply being the second query's proves the drop.
        transport.sendto(query_bytes("www.example.org", "A", qid=1))
        transport.sendto(query_bytes("www.example.org", "AAAA", qid=2))
        first = await asyncio.wait_for(protocol.replies.get(), 3)
    finally:
        transport.close()
    assert first[:2] == b"\x00\x02"
    assert counter(running, "dropped") == {(SERVER, ".", ""): 1.0}


async def test_drop_sends_nothing_over_tcp(start_server: StartServer) -> None:
    running = await start_server(corefile("drop type A"), registry=REGISTRY)
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    try:
        writer.write(frame(query_bytes("www.example.org", "A", qid=1)) + frame(query_bytes("x.org", "TXT", qid=2)))
        first = await read_frame(reader)
    finally:
        writer.close()
    assert first[:2] == b"\x00\x02"


# -- matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "qtype", "expected"),
    [
        # by net: the client is 127.0.0.1
        (["allow net 127.0.0.0/8", "block"], "A", "allowed"),
        (["allow net 10.0.0.0/8", "block"], "A", "refused"),
        (["block net 127.0.0.1"], "A", "refused"),  # a single address
        (["block net 127.0.0.2"], "A", "allowed"),
        (["block net 10.0.0.0/8 127.0.0.0/8"], "A", "refused"),  # any of several
        (["block net *"], "A", "refused"),
        (["block net ::1 ::/0"], "A", "allowed"),  # IPv6 networks never hold an IPv4 client
        (["block net 127.1.2.3/8"], "A", "refused"),  # host bits ignored, as Go's ParseCIDR
        # by type
        (["block type MX A"], "A", "refused"),
        (["block type MX A"], "AAAA", "allowed"),
        (["block type *"], "TXT", "refused"),
        (["block type TYPE65"], "HTTPS", "refused"),
        (["BLOCK TYPE a"], "A", "refused"),  # keywords and types in any case
        # type and net must both match; sections in either order
        (["block type AAAA net 127.0.0.0/8"], "A", "allowed"),
        (["block net 127.0.0.0/8 type A"], "A", "refused"),
        (["block type A net 10.0.0.0/8"], "A", "allowed"),
        # first match wins; no match allows
        (["block net 127.0.0.1", "allow"], "A", "refused"),
        (["allow net 127.0.0.1", "block"], "A", "allowed"),
        (["filter type A", "block"], "A", "filtered"),
        (["block type AAAA", "filter type A"], "A", "filtered"),
        (["allow type AAAA", "block type AAAA"], "AAAA", "allowed"),
        (["block type AAAA", "filter net 10.0.0.0/8"], "A", "allowed"),
        ([], "A", "allowed"),
    ],
)
async def test_rules(start_server: StartServer, rules: list[str], qtype: str, expected: str) -> None:
    running = await start_server(corefile(*rules), registry=REGISTRY)
    assert outcome(await running.udp("www.example.org", qtype)) == expected
    assert outcome(await running.tcp("www.example.org", qtype)) == expected


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
async def test_ipv6_clients_match_ipv6_networks(start_server: StartServer) -> None:
    running = await start_server(corefile("block net ::1/128", bind="127.0.0.1 ::1"), registry=REGISTRY)
    query = dns.message.make_query("www.example.org", "A")
    over_v6 = await dns.asyncquery.udp(query, "::1", port=running.port, timeout=3)
    assert outcome(over_v6) == "refused"
    assert outcome(await running.udp("www.example.org")) == "allowed"

    await running.reconfigure(corefile("block net 127.0.0.0/8", bind="127.0.0.1 ::1"))
    over_v6 = await dns.asyncquery.udp(query, "::1", port=running.port, timeout=3)
    assert outcome(over_v6) == "allowed"
    assert outcome(await running.udp("www.example.org")) == "refused"

    await running.reconfigure(corefile("block net *", bind="127.0.0.1 ::1"))
    over_v6 = await dns.asyncquery.udp(query, "::1", port=running.port, timeout=3)
    assert outcome(over_v6) == "refused"


# -- zones ----------------------------------------------------------------------------------


async def test_zones_restrict_the_acl(start_server: StartServer) -> None:
    running = await start_server(corefile("block", zones="Internal.Example.org"), registry=REGISTRY)
    assert outcome(await running.udp("internal.example.org")) == "refused"
    assert outcome(await running.udp("a.b.INTERNAL.example.org")) == "refused"
    assert outcome(await running.udp("example.org")) == "allowed"
    assert outcome(await running.udp("notinternal.example.org")) == "allowed"  # labels, not suffixes
    # The zone label is the acl zone that matched; queries outside count as allowed.
    assert counter(running, "blocked") == {(SERVER, "internal.example.org.", ""): 2.0}
    assert counter(running, "allowed") == {(SERVER, ""): 2.0}


async def test_reverse_zone_from_a_network(start_server: StartServer) -> None:
    running = await start_server(corefile("block", zones="10.0.0.0/24"), registry=REGISTRY)
    assert outcome(await running.udp("5.0.0.10.in-addr.arpa", "PTR")) == "refused"
    assert outcome(await running.udp("5.1.0.10.in-addr.arpa", "PTR")) == "allowed"


async def test_default_zones_are_the_server_blocks(start_server: StartServer) -> None:
    text = "example.org {\n bind 127.0.0.1\n acl {\n  block\n }\n whoami\n}\n. {\n bind 127.0.0.1\n whoami\n}\n"
    running = await start_server(text, registry=REGISTRY)
    assert outcome(await running.udp("www.example.org")) == "refused"
    assert outcome(await running.udp("www.example.net")) == "allowed"
    assert counter(running, "blocked") == {(SERVER, "example.org.", ""): 1.0}


async def test_several_acl_directives_act_as_one_list(start_server: StartServer) -> None:
    text = (
        ". {\n bind 127.0.0.1\n"
        " acl other.example {\n  block\n }\n"  # not this query's zone: skipped
        " acl {\n  allow net 127.0.0.1\n }\n"  # allow ends the checking ...
        " acl {\n  block\n }\n"  # ... so this block never applies
        " whoami\n}\n"
    )
    running = await start_server(text, registry=REGISTRY)
    assert outcome(await running.udp("www.example.org")) == "allowed"
    assert outcome(await running.udp("www.other.example")) == "refused"
    assert counter(running, "allowed") == {(SERVER, ""): 1.0}  # counted once, not per directive

    await running.reconfigure(". {\n bind 127.0.0.1\n acl {\n  allow type A\n }\n acl {\n  filter\n }\n whoami\n}\n")
    assert outcome(await running.udp("www.example.org", "A")) == "allowed"
    assert outcome(await running.udp("www.example.org", "AAAA")) == "filtered"  # no match in the first


# -- metrics --------------------------------------------------------------------------------


async def test_every_action_is_counted(start_server: StartServer) -> None:
    running = await start_server(
        corefile("block type A", "filter type AAAA", "drop type MX", "allow type TXT"), registry=REGISTRY
    )
    for _ in range(2):
        await running.udp("www.example.org", "A")
    await running.udp("www.example.org", "AAAA")
    await running.udp("www.example.org", "TXT")
    await running.udp("www.example.org", "SRV")  # matches no rule: allowed
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    try:
        writer.write(frame(query_bytes("www.example.org", "MX", qid=1)) + frame(query_bytes("a.org", "TXT", qid=2)))
        assert (await read_frame(reader))[:2] == b"\x00\x02"
    finally:
        writer.close()
    assert counter(running, "blocked") == {(SERVER, ".", ""): 2.0}
    assert counter(running, "filtered") == {(SERVER, ".", ""): 1.0}
    assert counter(running, "dropped") == {(SERVER, ".", ""): 1.0}
    assert counter(running, "allowed") == {(SERVER, ""): 3.0}


def test_client_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acl, "MAX_CACHED_CLIENTS", 2)
    config = load(corefile("block net 10.0.0.0/8"), "Corefile", REGISTRY, default_port=0)
    plugin = config.blocks[0].find("acl")
    assert isinstance(plugin, acl.Acl)
    masks = [plugin._match(client) for client in ("10.1.1.1", "192.0.2.1", "10.2.2.2", "fe80::1%lo")]
    assert masks == [1, 0, 1, 0]
    assert len(plugin.matches) <= 2


# -- Corefile errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "deny net 10.0.0.0/8",
            "Corefile:5: acl: unexpected token \"deny\"; expect 'allow', 'block', 'filter' or 'drop'",
        ),
        ("block net 10.0.0.0/33", 'Corefile:5: acl: illegal CIDR notation "10.0.0.0/33"'),
        ("block net 10.0.0.256", 'Corefile:5: acl: illegal CIDR notation "10.0.0.256"'),
        ("block net * 10.0.0.0/8 net nonsense", 'Corefile:5: acl: illegal CIDR notation "nonsense"'),
        ("block type A NOTATYPE", 'Corefile:5: acl: unexpected token "NOTATYPE"; expect legal QTYPE'),
        ("block type", 'Corefile:5: acl: no token specified in "type" section'),
        ("block net 10.0.0.0/8 type", 'Corefile:5: acl: no token specified in "type" section'),
        ("block A", "Corefile:5: acl: unexpected token \"A\"; expect 'type' or 'net'"),
        ("block file blocklist.txt", "Corefile:5: acl: file sources are not supported"),
        ("block {\n        }", "Corefile:5: acl: block takes no block"),
    ],
)
def test_corefile_errors_name_file_and_line(rule: str, message: str) -> None:
    with pytest.raises(CorefileError) as error:
        load(corefile("allow net 127.0.0.1", rule), "Corefile", REGISTRY, default_port=0)
    assert str(error.value).startswith(message)


def test_bad_zone_is_an_error() -> None:
    with pytest.raises(CorefileError, match=r"^Corefile:3: acl: invalid zone \"10\.0\.0\.0/40\""):
        load(corefile("block", zones="10.0.0.0/40"), "Corefile", REGISTRY, default_port=0)
