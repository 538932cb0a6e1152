"""Corefile.example serves what its comments promise (with ephemeral ports for the test)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import dns.rcode
import dns.rdatatype

from resolver.plugin import Registry
from tests.conftest import StartServer

EXAMPLE = Path(__file__).resolve().parent.parent / "Corefile.example"


def ephemeral(text: str) -> str:
    """The example with its DNS port and HTTP ports replaced by port 0, and its manifests
    directory (relative to the example's own directory) made absolute."""
    text = text.replace(".:1053 {", ".:0 {")
    text = text.replace("manifests demo/manifests", f"manifests {EXAMPLE.parent / 'demo' / 'manifests'}")
    return re.sub(r"127\.0\.0\.1:1\d{4}", "127.0.0.1:0", text)


async def test_example_corefile_answers_hosts_kubernetes_whoami_health_and_metrics(start_server: StartServer) -> None:
    text = EXAMPLE.read_text()
    assert ".:1053 {" in text and "bind 127.0.0.1" in text
    running = await start_server(ephemeral(text), registry=Registry.default())
    web = await running.udp("web.demo.local", "A")
    assert sorted(rr.address for rr in web.answer[0]) == ["10.0.0.11", "10.0.0.12"]
    assert (await running.udp("web.demo.local", "AAAA")).answer[0][0].address == "fd00::11"
    service = await running.udp("web.demo.svc.cluster.local", "A")  # kubernetes, from demo/manifests
    assert [rr.address for rr in service.answer[0]] == ["10.96.100.10"]
    docs = await running.udp("docs.demo.svc.cluster.local", "A")  # ExternalName, target from hosts
    assert [rrset.rdtype for rrset in docs.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert "manifests demo/manifests" in text  # relative to the Corefile, as the comment runs it
    other = await running.udp("whoami.example.org", "A")  # falls through hosts and kubernetes to whoami
    assert other.rcode() == dns.rcode.NOERROR
    assert {rrset.rdtype for rrset in other.additional} == {dns.rdatatype.A, dns.rdatatype.SRV}
    block = running.server.config.blocks[0]  # type: ignore[union-attr]
    health_port = block.find("health").route.port  # type: ignore[union-attr]
    metrics_port = block.find("prometheus").route.port  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{health_port}/health") as response:
            assert response.status == 200 and await response.text() == "OK"
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            body = await response.text()
    requests = [
        float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith("coredns_dns_requests_total{")
    ]
    # The five queries above, and the ExternalName's lookup of its target, which goes
    # through the chain again (prometheus included) as CoreDNS's upstream lookups do.
    assert sum(requests) == 6
    assert re.search(r'coredns_dns_responses_total\{[^}]*plugin="hosts"[^}]*rcode="NOERROR"', body)
