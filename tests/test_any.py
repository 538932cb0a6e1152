"""The any plugin: RFC 8482's short answer to ANY queries, everything else passed on."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import query_bytes, raw_udp

REGISTRY = Registry.default()
COREFILE = ". {\n    bind 127.0.0.1\n    any\n    whoami\n}\n"


async def test_any_query_gets_the_rfc8482_hinfo(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    for ask in (running.udp, running.tcp):
        reply = await ask("example.org", "ANY")
        assert reply.rcode() == dns.rcode.NOERROR
        assert not reply.flags & dns.flags.AA  # CoreDNS's SetReply: not authoritative
        (rrset,) = reply.answer
        assert rrset.rdtype == dns.rdatatype.HINFO and rrset.ttl == 8482
        assert rrset.name.to_text() == "example.org."
        (hinfo,) = rrset
        assert (hinfo.cpu, hinfo.os) == (b"ANY obsoleted", b"See RFC 8482")
        assert not reply.additional  # whoami did not run


async def test_any_answer_keeps_the_query_names_case(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    raw = await raw_udp(running.port, query_bytes("ExAmPlE.OrG", "ANY"))
    assert raw is not None
    reply = dns.message.from_wire(raw)
    assert reply.answer[0].name.to_text() == "ExAmPlE.OrG."


async def test_other_types_go_to_the_next_plugin(start_server: StartServer) -> None:
    running = await start_server(COREFILE, registry=REGISTRY)
    for rdtype in ("A", "AAAA", "TXT", "HINFO"):
        reply = await running.udp("example.org", rdtype)
        assert not reply.answer
        assert any(rrset.rdtype == dns.rdatatype.SRV for rrset in reply.additional)  # whoami answered


@pytest.mark.parametrize(
    ("line", "problem"), [("any now", "any: takes no arguments"), ("any {\n  x\n }", "any: takes no block")]
)
def test_any_takes_nothing(line: str, problem: str) -> None:
    with pytest.raises(CorefileError, match=problem):
        load(f". {{\n {line}\n}}\n", "Corefile", REGISTRY, default_port=0)
