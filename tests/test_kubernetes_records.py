"""The kubernetes plugin's answers, over real sockets, from manifests written by the test.

The table follows CoreDNS's plugin/kubernetes handler tests as a checklist (the same
record kinds and NXDOMAIN/NODATA rules), against a server started on 127.0.0.1 with the
manifests source; the cluster is ``CLUSTER`` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from plugins.kubernetes import Kubernetes
from resolver.plugin import Registry
from resolver.request import Request
from resolver.wire import parse_question
from tests.conftest import StartServer
from tests.helpers import Running, query_bytes

REGISTRY = Registry.default()
NXDOMAIN = dns.rcode.NXDOMAIN
NOERROR = dns.rcode.NOERROR
SERVFAIL = dns.rcode.SERVFAIL
SOA_TEXT = "ns.dns.cluster.local. hostmaster.cluster.local."


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def service(ns: str, name: str, ips: list[str] | None, ports: list[tuple[str, int, str]] = (), **spec: Any) -> dict:
    body: dict[str, Any] = {"ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports], **spec}
    if ips is not None:
        body["clusterIP"] = ips[0]
        body["clusterIPs"] = ips
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": body}


def external(ns: str, name: str, target: str) -> dict[str, Any]:
    return service(ns, name, None, type="ExternalName", externalName=target)


def endpoint(ip: str, hostname: str | None = None, ready: bool | None = True, pod: str | None = None) -> dict:
    found: dict[str, Any] = {"addresses": [ip]}
    if ready is not None:
        found["conditions"] = {"ready": ready}
    if hostname:
        found["hostname"] = hostname
    if pod:
        found["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "testns"}
    return found


def endpoint_slice(ns: str, name: str, svc: str, endpoints: list[dict], ports=(), family: str = "IPv4") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def pod(ns: str, name: str, ip: str, phase: str = "Running", node: str = "node-1", **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
    }


HTTP = [("http", 80, "TCP")]
CLUSTER: list[dict[str, Any]] = [
    namespace("testns"),
    namespace("other", env="prod"),
    namespace("emptyns"),
    namespace("kube-system"),
    service("kube-system", "kube-dns", ["10.0.0.10"], [("dns", 53, "UDP")]),
    service("testns", "svc1", ["10.0.0.1"], HTTP),
    service("testns", "svcempty", ["10.0.0.2"], HTTP),
    service("testns", "svc6", ["1234:abcd::1"], HTTP),
    service("testns", "dual", ["10.0.0.3", "10::3"], HTTP),
    service("testns", "noports", ["10.0.0.5"]),
    service("testns", "multi", ["10.0.0.6"], [("http", 80, "TCP"), ("dns", 53, "UDP"), ("", 8080, "TCP")]),
    endpoint_slice("testns", "svc1-a", "svc1", [endpoint("172.0.1.1", pod="svc1-pod")], [("http", 8080, "TCP")]),
    # The same pod behind two more services: ready behind "also", not ready behind "spare".
    service("testns", "also", ["10.0.0.7"], HTTP),
    endpoint_slice("testns", "also-a", "also", [endpoint("172.0.1.1", pod="svc1-pod")], HTTP),
    service("testns", "spare", ["10.0.0.8"], HTTP),
    endpoint_slice("testns", "spare-a", "spare", [endpoint("172.0.1.1", ready=False, pod="svc1-pod")], HTTP),
    service("testns", "hdls1", ["None"], HTTP),
    endpoint_slice(
        "testns",
        "hdls1-v4",
        "hdls1",
        [
            endpoint("172.0.0.2"),
            endpoint("172.0.0.3", ready=None),  # no conditions.ready: counts as ready
            endpoint("172.0.0.4", hostname="dup-name"),
            endpoint("172.0.0.5", hostname="dup-name"),
            endpoint("172.0.0.9", ready=False),
        ],
        HTTP,
    ),
    endpoint_slice(
        "testns",
        "hdls1-v6",
        "hdls1",
        [endpoint("5678:abcd::1"), endpoint("5678:abcd::2")],
        HTTP,
        family="IPv6",
    ),
    service("testns", "hdlsprtls", ["None"]),
    endpoint_slice("testns", "hdlsprtls-a", "hdlsprtls", [endpoint("172.0.0.20")]),
    service("testns", "notready", ["None"], HTTP, publishNotReadyAddresses=True),
    endpoint_slice("testns", "notready-a", "notready", [endpoint("172.0.0.30", ready=False)], HTTP),
    service("testns", "podnamed", ["None"], HTTP),
    endpoint_slice("testns", "podnamed-a", "podnamed", [endpoint("172.0.0.40", pod="web-0")], HTTP),
    external("testns", "external", "ext.interwebs.test"),
    external("testns", "external-to-service", "svc1.testns.svc.cluster.local"),
    external("testns", "ext-ip", "1.2.3.4"),
    external("testns", "ext-loop", "ext-loop2.testns.svc.cluster.local"),
    external("testns", "ext-loop2", "ext-loop.testns.svc.cluster.local"),
    external("testns", "ext-missing", "nothing.testns.svc.cluster.local"),
    service("other", "web", ["10.0.1.1"], HTTP),
    pod("testns", "pod1", "10.240.0.1"),
    pod("testns", "done", "10.240.0.9", phase="Succeeded"),
    pod("testns", "pod6", "fd00::10"),
    pod("other", "pod2", "10.240.0.2"),
]


def write_cluster(directory: Path, objects: list[dict[str, Any]] = CLUSTER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(objects))
    return directory


def corefile(manifests: Path, options: str = "pods verified", extra: str = "") -> str:
    """A root block with hosts before kubernetes (it answers the ExternalName target
    ext.interwebs.test) and whoami after it (what fallthrough reaches)."""
    return f"""\
.:0 {{
    bind 127.0.0.1
    hosts {{
        1.2.3.4 ext.interwebs.test
        fallthrough
    }}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        manifests {manifests}
        {options}
    }}
    whoami
    {extra}
}}
"""


async def start(start_server: StartServer, tmp_path: Path, options: str = "pods verified", objects=CLUSTER) -> Running:
    return await start_server(corefile(write_cluster(tmp_path / "manifests", objects), options), registry=REGISTRY)


def plugin_of(running: Running) -> Kubernetes:
    assert running.server.config is not None
    found = running.server.config.blocks[0].find("kubernetes")
    assert isinstance(found, Kubernetes)
    return found


def texts(section: list[Any]) -> list[str]:
    """Records as ``name ttl TYPE rdata`` lines, sorted (order is not part of the contract)."""
    return sorted(
        f"{rrset.name} {rrset.ttl} {dns.rdatatype.to_text(rrset.rdtype)} {rdata.to_text()}"
        for rrset in section
        for rdata in rrset
    )


def soa_of(reply: dns.message.Message) -> list[str]:
    return [line for line in texts(reply.authority) if " SOA " in line]


def is_whoami(reply: dns.message.Message) -> bool:
    return not reply.answer and any(rrset.rdtype == dns.rdatatype.SRV for rrset in reply.additional)


Z = "cluster.local."
T = "testns.svc.cluster.local."

# (name, type, rcode, answer lines, additional lines); negative answers must carry the SOA.
CASES: list[tuple[str, str, int, list[str], list[str]]] = [
    # ClusterIP services, per family
    (f"svc1.{T}", "A", NOERROR, [f"svc1.{T} 5 A 10.0.0.1"], []),
    ("SVC1.TestNS.svc.Cluster.Local.", "A", NOERROR, ["SVC1.TestNS.svc.Cluster.Local. 5 A 10.0.0.1"], []),
    (f"svc1.{T}", "AAAA", NOERROR, [], []),
    (f"svc6.{T}", "AAAA", NOERROR, [f"svc6.{T} 5 AAAA 1234:abcd::1"], []),
    (f"svc6.{T}", "A", NOERROR, [], []),
    (f"dual.{T}", "A", NOERROR, [f"dual.{T} 5 A 10.0.0.3"], []),
    (f"dual.{T}", "AAAA", NOERROR, [f"dual.{T} 5 AAAA 10::3"], []),
    (f"svcempty.{T}", "A", NOERROR, [f"svcempty.{T} 5 A 10.0.0.2"], []),
    (f"noports.{T}", "A", NOERROR, [f"noports.{T} 5 A 10.0.0.5"], []),
    (f"web.other.svc.{Z}", "A", NOERROR, [f"web.other.svc.{Z} 5 A 10.0.1.1"], []),
    # SRV: named ports, plain SRV on the service name, glue
    (f"svc1.{T}", "SRV", NOERROR, [f"svc1.{T} 5 SRV 0 100 80 svc1.{T}"], [f"svc1.{T} 5 A 10.0.0.1"]),
    (
        f"_http._tcp.svc1.{T}",
        "SRV",
        NOERROR,
        [f"_http._tcp.svc1.{T} 5 SRV 0 100 80 svc1.{T}"],
        [f"svc1.{T} 5 A 10.0.0.1"],
    ),
    (f"_https._tcp.svc1.{T}", "SRV", NXDOMAIN, [], []),
    (f"_http._udp.svc1.{T}", "SRV", NXDOMAIN, [], []),
    # One label in front of a service is an endpoint name, as CoreDNS parses it: a lone
    # _port or _proto label names no endpoint
    (f"_tcp.svc1.{T}", "SRV", NXDOMAIN, [], []),
    (f"_http.svc1.{T}", "SRV", NXDOMAIN, [], []),
    (f"_http.svc1.{T}", "A", NXDOMAIN, [], []),
    (f"_tcp.hdls1.{T}", "SRV", NXDOMAIN, [], []),
    (f"_http._tcp.svc1.{T}", "A", NOERROR, [f"_http._tcp.svc1.{T} 5 A 10.0.0.1"], []),
    (f"svc6.{T}", "SRV", NOERROR, [f"svc6.{T} 5 SRV 0 100 80 svc6.{T}"], [f"svc6.{T} 5 AAAA 1234:abcd::1"]),
    (
        f"dual.{T}",
        "SRV",
        NOERROR,
        [f"dual.{T} 5 SRV 0 50 80 dual.{T}"],
        [f"dual.{T} 5 A 10.0.0.3", f"dual.{T} 5 AAAA 10::3"],
    ),
    (
        f"multi.{T}",
        "SRV",
        NOERROR,
        [
            f"multi.{T} 5 SRV 0 33 53 multi.{T}",
            f"multi.{T} 5 SRV 0 33 80 multi.{T}",
            f"multi.{T} 5 SRV 0 33 8080 multi.{T}",
        ],
        [f"multi.{T} 5 A 10.0.0.6"],
    ),
    (
        f"_dns._udp.multi.{T}",
        "SRV",
        NOERROR,
        [f"_dns._udp.multi.{T} 5 SRV 0 100 53 multi.{T}"],
        [f"multi.{T} 5 A 10.0.0.6"],
    ),
    (f"noports.{T}", "SRV", NOERROR, [], []),
    # Headless: ready endpoints (ready unset counts), per-endpoint names, SRV per endpoint
    (
        f"hdls1.{T}",
        "A",
        NOERROR,
        [f"hdls1.{T} 5 A 172.0.0.{n}" for n in (2, 3, 4, 5)],
        [],
    ),
    (f"hdls1.{T}", "AAAA", NOERROR, [f"hdls1.{T} 5 AAAA 5678:abcd::1", f"hdls1.{T} 5 AAAA 5678:abcd::2"], []),
    (
        f"_http._tcp.hdls1.{T}",
        "SRV",
        NOERROR,
        [
            f"_http._tcp.hdls1.{T} 5 SRV 0 16 80 {name}.hdls1.{T}"
            for name in ("172-0-0-2", "172-0-0-3", "dup-name", "5678-abcd--1", "5678-abcd--2")
        ],
        [
            f"172-0-0-2.hdls1.{T} 5 A 172.0.0.2",
            f"172-0-0-3.hdls1.{T} 5 A 172.0.0.3",
            f"dup-name.hdls1.{T} 5 A 172.0.0.4",
            f"dup-name.hdls1.{T} 5 A 172.0.0.5",
            f"5678-abcd--1.hdls1.{T} 5 AAAA 5678:abcd::1",
            f"5678-abcd--2.hdls1.{T} 5 AAAA 5678:abcd::2",
        ],
    ),
    (f"172-0-0-2.hdls1.{T}", "A", NOERROR, [f"172-0-0-2.hdls1.{T} 5 A 172.0.0.2"], []),
    (
        f"dup-name.hdls1.{T}",
        "A",
        NOERROR,
        [f"dup-name.hdls1.{T} 5 A 172.0.0.4", f"dup-name.hdls1.{T} 5 A 172.0.0.5"],
        [],
    ),
    (f"5678-abcd--1.hdls1.{T}", "AAAA", NOERROR, [f"5678-abcd--1.hdls1.{T} 5 AAAA 5678:abcd::1"], []),
    (f"5678-abcd--1.hdls1.{T}", "A", NOERROR, [], []),
    (f"172-0-0-9.hdls1.{T}", "A", NXDOMAIN, [], []),  # not ready
    (f"bogusendpoint.hdls1.{T}", "A", NXDOMAIN, [], []),
    (f"bogusendpoint.svc0.{T}", "A", NXDOMAIN, [], []),
    (f"a.b.c.hdls1.{T}", "A", NXDOMAIN, [], []),
    (f"hdlsprtls.{T}", "A", NOERROR, [f"hdlsprtls.{T} 5 A 172.0.0.20"], []),
    (f"172-0-0-20.hdlsprtls.{T}", "A", NOERROR, [f"172-0-0-20.hdlsprtls.{T} 5 A 172.0.0.20"], []),
    (f"hdlsprtls.{T}", "SRV", NOERROR, [], []),
    (f"notready.{T}", "A", NOERROR, [f"notready.{T} 5 A 172.0.0.30"], []),  # publishNotReadyAddresses
    (f"172-0-0-40.podnamed.{T}", "A", NOERROR, [f"172-0-0-40.podnamed.{T} 5 A 172.0.0.40"], []),
    (f"web-0.podnamed.{T}", "A", NXDOMAIN, [], []),  # only with endpoint_pod_names
    # An endpoint name under a ClusterIP service resolves too (as in CoreDNS)
    (f"172-0-1-1.svc1.{T}", "A", NOERROR, [f"172-0-1-1.svc1.{T} 5 A 172.0.1.1"], []),
    # ExternalName: CNAME, target records from the zone or through the server
    (f"external.{T}", "CNAME", NOERROR, [f"external.{T} 5 CNAME ext.interwebs.test."], []),
    (
        f"external.{T}",
        "A",
        NOERROR,
        [f"external.{T} 5 CNAME ext.interwebs.test.", "ext.interwebs.test. 3600 A 1.2.3.4"],
        [],
    ),
    (
        f"external-to-service.{T}",
        "A",
        NOERROR,
        [f"external-to-service.{T} 5 CNAME svc1.{T}", f"svc1.{T} 5 A 10.0.0.1"],
        [],
    ),
    (f"ext-missing.{T}", "A", NOERROR, [], []),
    (f"ext-loop.{T}", "A", NOERROR, [], []),
    (f"external.{T}", "SRV", NOERROR, [], []),
    (f"external.{T}", "TXT", NOERROR, [], []),
    (f"svc1.{T}", "CNAME", NOERROR, [], []),
    (f"endpoint.external.{T}", "CNAME", NXDOMAIN, [], []),
    (f"subdomain.subdomain.external.{T}", "CNAME", NXDOMAIN, [], []),
    (f"_http._tcp.external.{T}", "SRV", NXDOMAIN, [], []),
    (f"ext-ip.{T}", "A", NXDOMAIN, [], []),
    # Names that do not exist; namespaces and intermediate names that do
    (f"svc0.{T}", "A", NXDOMAIN, [], []),
    (f"svc0.{T}", "AAAA", NXDOMAIN, [], []),
    (f"svc1.nsnoexist.svc.{Z}", "A", NXDOMAIN, [], []),
    (T, "A", NOERROR, [], []),
    (f"emptyns.svc.{Z}", "A", NOERROR, [], []),
    (f"nsnoexist.svc.{Z}", "A", NXDOMAIN, [], []),
    (f"svc.{Z}", "A", NOERROR, [], []),
    (f"svc.{Z}", "SRV", NOERROR, [], []),
    (f"svc.{Z}", "TXT", NOERROR, [], []),
    (T, "SRV", NOERROR, [], []),
    (f"pod.{Z}", "A", NOERROR, [], []),
    (Z, "A", NOERROR, [], []),
    (f"foo.{Z}", "A", NXDOMAIN, [], []),
    (f"foo.{Z}", "NS", NXDOMAIN, [], []),
    (f"foo.svc.{Z}", "NS", NXDOMAIN, [], []),
    (f"svc.{Z}", "NS", NOERROR, [], []),
    (T, "NS", NOERROR, [], []),
    # Other types on existing and missing names: NODATA and NXDOMAIN agree with A
    (f"svc1.{T}", "TXT", NOERROR, [], []),
    (f"svc0.{T}", "TXT", NXDOMAIN, [], []),
    (T, "TXT", NOERROR, [], []),
    (f"svc1.{T}", "SOA", NOERROR, [], []),
    (f"svc0.{T}", "SOA", NXDOMAIN, [], []),
    (f"svc1.{T}", "MX", NOERROR, [], []),
    (f"svc0.{T}", "MX", NXDOMAIN, [], []),
    (f"svc1.{T}", "HINFO", NOERROR, [], []),
    # The apex, the name server, the schema version
    (Z, "SOA", NOERROR, [f"{Z} 5 SOA {SOA_TEXT} SERIAL 7200 1800 86400 5"], []),
    (Z, "NS", NOERROR, [f"{Z} 5 NS ns.dns.{Z}"], [f"ns.dns.{Z} 5 A 10.0.0.10"]),
    (f"ns.dns.{Z}", "A", NOERROR, [f"ns.dns.{Z} 5 A 10.0.0.10"], []),
    (f"ns.dns.{Z}", "AAAA", NOERROR, [], []),
    (f"dns-version.{Z}", "TXT", NOERROR, [f'dns-version.{Z} 28800 TXT "1.1.0"'], []),
    (f"dns-version.{Z}", "A", NOERROR, [], []),
    # Pods (verified: a Running pod with that IP in that namespace)
    (f"10-240-0-1.testns.pod.{Z}", "A", NOERROR, [f"10-240-0-1.testns.pod.{Z} 5 A 10.240.0.1"], []),
    (f"10-240-0-1.testns.pod.{Z}", "AAAA", NOERROR, [], []),
    (f"fd00--10.testns.pod.{Z}", "AAAA", NOERROR, [f"fd00--10.testns.pod.{Z} 5 AAAA fd00::10"], []),
    (f"10-240-0-1.other.pod.{Z}", "A", NXDOMAIN, [], []),  # another namespace's pod
    (f"10-240-0-9.testns.pod.{Z}", "A", NXDOMAIN, [], []),  # Succeeded: not Running
    (f"10-240-0-77.testns.pod.{Z}", "A", NXDOMAIN, [], []),
    (f"not-an-ip.testns.pod.{Z}", "A", NXDOMAIN, [], []),
    (f"x.10-240-0-1.testns.pod.{Z}", "A", NXDOMAIN, [], []),
    (f"testns.pod.{Z}", "A", NOERROR, [], []),
    (f"nsnoexist.pod.{Z}", "A", NXDOMAIN, [], []),
    # PTR for service IPs and endpoint IPs
    ("1.0.0.10.in-addr.arpa.", "PTR", NOERROR, [f"1.0.0.10.in-addr.arpa. 5 PTR svc1.{T}"], []),
    ("2.0.0.172.in-addr.arpa.", "PTR", NOERROR, [f"2.0.0.172.in-addr.arpa. 5 PTR 172-0-0-2.hdls1.{T}"], []),
    ("4.0.0.172.in-addr.arpa.", "PTR", NOERROR, [f"4.0.0.172.in-addr.arpa. 5 PTR dup-name.hdls1.{T}"], []),
    ("30.0.0.172.in-addr.arpa.", "PTR", NOERROR, [f"30.0.0.172.in-addr.arpa. 5 PTR 172-0-0-30.notready.{T}"], []),
    # An endpoint behind several services: one PTR per service it is ready behind
    (
        "1.1.0.172.in-addr.arpa.",
        "PTR",
        NOERROR,
        [f"1.1.0.172.in-addr.arpa. 5 PTR 172-0-1-1.svc1.{T}", f"1.1.0.172.in-addr.arpa. 5 PTR 172-0-1-1.also.{T}"],
        [],
    ),
    # Other types on reverse names: NODATA where the PTR exists, NXDOMAIN where it does not
    ("1.0.0.10.in-addr.arpa.", "A", NOERROR, [], []),
    ("1.0.0.10.in-addr.arpa.", "TXT", NOERROR, [], []),
    ("1.1.0.172.in-addr.arpa.", "MX", NOERROR, [], []),
    ("1.1.0.172.in-addr.arpa.", "SRV", NOERROR, [], []),
    ("1.1.0.172.in-addr.arpa.", "CNAME", NOERROR, [], []),
    ("99.0.0.10.in-addr.arpa.", "A", NXDOMAIN, [], []),
    ("9.0.0.172.in-addr.arpa.", "TXT", NXDOMAIN, [], []),  # a not-ready endpoint has no PTR
    ("0.0.10.in-addr.arpa.", "A", NXDOMAIN, [], []),
    (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa.",
        "PTR",
        NOERROR,
        [f"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa. 5 PTR svc6.{T}"],
        [],
    ),
    (
        "in-addr.arpa.",
        "SOA",
        NOERROR,
        ["in-addr.arpa. 5 SOA ns.dns.in-addr.arpa. hostmaster.in-addr.arpa. SERIAL 7200 1800 86400 5"],
        [],
    ),
    # A PTR query in the forward zone: CoreDNS's PTR of an ExternalName
    (f"external.{T}", "PTR", NOERROR, [f"external.{T} 5 PTR ext.interwebs.test."], []),
    (f"svc1.{T}", "PTR", NOERROR, [], []),
]


def _normal(lines: list[str]) -> list[str]:
    """SOA serials are times: compare them as SERIAL."""
    out = []
    for line in lines:
        if " SOA " in line:
            fields = line.split()
            fields[5] = "SERIAL"
            line = " ".join(fields)
        out.append(line)
    return sorted(out)


@pytest.fixture
async def cluster(start_server: StartServer, tmp_path: Path) -> Running:
    return await start(start_server, tmp_path)


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "answer", "additional"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
async def test_query_table(
    cluster: Running, name: str, rdtype: str, rcode: int, answer: list[str], additional: list[str]
) -> None:
    reply = await cluster.udp(name, rdtype, use_edns=0, payload=4096)  # room for all the glue
    assert reply.rcode() == rcode, reply
    assert reply.flags & dns.flags.AA
    assert _normal(texts(reply.answer)) == _normal(answer)
    assert _normal(texts(reply.additional)) == _normal(additional)
    if not answer:  # NXDOMAIN and NODATA carry the zone's SOA, with CoreDNS's TTLs
        zone = "in-addr.arpa." if name.endswith("in-addr.arpa.") else Z
        assert _normal(soa_of(reply)) == [f"{zone} 5 SOA ns.dns.{zone} hostmaster.{zone} SERIAL 7200 1800 86400 5"]


async def test_answers_over_tcp_too(cluster: Running) -> None:
    reply = await cluster.tcp(f"hdls1.{T}", "A")
    assert len(texts(reply.answer)) == 4


async def test_axfr_is_refused(cluster: Running) -> None:
    reply = await cluster.tcp(Z, "AXFR")
    assert reply.rcode() == dns.rcode.REFUSED


async def test_names_outside_the_zones_go_to_the_next_plugin(cluster: Running) -> None:
    assert is_whoami(await cluster.udp("example.org.", "A"))
    # in-addr.arpa is served, but unknown addresses fall through (fallthrough in-addr.arpa)
    # only when the Corefile says so: here it does not, so NXDOMAIN.
    reply = await cluster.udp("9.9.9.9.in-addr.arpa.", "PTR")
    assert reply.rcode() == NXDOMAIN and soa_of(reply)
    assert (await cluster.udp("9.0.0.172.in-addr.arpa.", "PTR")).rcode() == NXDOMAIN  # not ready endpoint
    assert (await cluster.udp("0.0.10.in-addr.arpa.", "PTR")).rcode() == NXDOMAIN  # not a full address


async def test_fallthrough_passes_name_errors_on(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, tmp_path, "pods verified\n        fallthrough in-addr.arpa ip6.arpa")
    assert is_whoami(await running.udp("9.9.9.9.in-addr.arpa.", "PTR"))
    assert texts((await running.udp("1.0.0.10.in-addr.arpa.", "PTR")).answer)  # known: answered
    assert (await running.udp(f"svc0.{T}", "A")).rcode() == NXDOMAIN  # cluster.local is not listed
    everything = await start(start_server, tmp_path / "b", "fallthrough")
    assert is_whoami(await everything.udp(f"svc0.{T}", "A"))
    assert (await everything.udp(f"svc1.{T}", "AAAA")).rcode() == NOERROR  # NODATA never falls through
    assert not is_whoami(await everything.udp(f"svc1.{T}", "AAAA"))


async def test_ignore_empty_service(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, tmp_path, "ignore empty_service")
    assert (await running.udp(f"svcempty.{T}", "A")).rcode() == NXDOMAIN
    assert texts((await running.udp(f"svc1.{T}", "A")).answer) == [f"svc1.{T} 5 A 10.0.0.1"]
    assert len(texts((await running.udp(f"hdls1.{T}", "A")).answer)) == 4  # headless: unaffected
    assert texts((await running.udp(f"external.{T}", "CNAME")).answer)


async def test_endpoint_pod_names(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, tmp_path, "endpoint_pod_names")
    assert texts((await running.udp(f"web-0.podnamed.{T}", "A")).answer) == [f"web-0.podnamed.{T} 5 A 172.0.0.40"]
    assert (await running.udp(f"172-0-0-40.podnamed.{T}", "A")).rcode() == NXDOMAIN
    srv = await running.udp(f"podnamed.{T}", "SRV")
    assert texts(srv.answer) == [f"podnamed.{T} 5 SRV 0 100 80 web-0.podnamed.{T}"]
    ptr = await running.udp("40.0.0.172.in-addr.arpa.", "PTR")
    assert texts(ptr.answer) == [f"40.0.0.172.in-addr.arpa. 5 PTR web-0.podnamed.{T}"]
    # A hostname still wins over the pod name
    assert texts((await running.udp(f"dup-name.hdls1.{T}", "A")).answer)


async def test_namespaces_option_hides_other_namespaces(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, tmp_path, "namespaces testns")
    assert texts((await running.udp(f"svc1.{T}", "A")).answer)
    assert (await running.udp(f"web.other.svc.{Z}", "A")).rcode() == NXDOMAIN
    assert (await running.udp(f"other.svc.{Z}", "A")).rcode() == NXDOMAIN
    assert (await running.udp("1.1.0.10.in-addr.arpa.", "PTR")).rcode() == NXDOMAIN
    # ns.dns still has the DNS service's address although kube-system is not served
    assert texts((await running.udp(f"ns.dns.{Z}", "A")).answer) == [f"ns.dns.{Z} 5 A 10.0.0.10"]
    assert (await running.udp(f"kube-dns.kube-system.svc.{Z}", "A")).rcode() == NXDOMAIN


async def test_namespace_labels(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, tmp_path, "namespace_labels env in (prod, staging)")
    assert texts((await running.udp(f"web.other.svc.{Z}", "A")).answer)
    assert (await running.udp(f"svc1.{T}", "A")).rcode() == NXDOMAIN
    assert (await running.udp(T, "A")).rcode() == NXDOMAIN


async def test_labels_select_services(start_server: StartServer, tmp_path: Path) -> None:
    labelled = service("testns", "picked", ["10.0.0.50"], HTTP)
    labelled["metadata"]["labels"] = {"dns": "yes"}
    running = await start(start_server, tmp_path, "labels dns=yes", [*CLUSTER, labelled])
    assert texts((await running.udp(f"picked.{T}", "A")).answer) == [f"picked.{T} 5 A 10.0.0.50"]
    assert (await running.udp(f"svc1.{T}", "A")).rcode() == NXDOMAIN
    # The DNS service is not labelled: not served by name nor by PTR, yet it still
    # gives ns.dns its address.
    assert (await running.udp(f"kube-dns.kube-system.svc.{Z}", "A")).rcode() == NXDOMAIN
    assert (await running.udp("10.0.0.10.in-addr.arpa.", "PTR")).rcode() == NXDOMAIN
    assert texts((await running.udp(f"ns.dns.{Z}", "A")).answer) == [f"ns.dns.{Z} 5 A 10.0.0.10"]


async def test_pods_disabled_and_insecure(start_server: StartServer, tmp_path: Path) -> None:
    disabled = await start(start_server, tmp_path / "a", "pods disabled")
    assert (await disabled.udp(f"10-240-0-1.testns.pod.{Z}", "A")).rcode() == NXDOMAIN
    assert (await disabled.udp(f"testns.pod.{Z}", "A")).rcode() == NXDOMAIN
    insecure = await start(start_server, tmp_path / "b", "pods insecure")
    for name in ("10-240-0-1", "10-9-9-9", "10-240-0-9"):  # any address, no pod needed
        reply = await insecure.udp(f"{name}.testns.pod.{Z}", "A")
        assert texts(reply.answer) == [f"{name}.testns.pod.{Z} 5 A {name.replace('-', '.')}"]
    assert (await insecure.udp(f"10-9-9-9.nsnoexist.pod.{Z}", "A")).rcode() == NXDOMAIN
    assert (await insecure.udp(f"10-9-9.testns.pod.{Z}", "A")).rcode() == NXDOMAIN
    # insecure needs no pod: none is watched nor held (CoreDNS watches pods for verified only)
    kubernetes = plugin_of(insecure)
    assert not kubernetes.settings.watch_pods and kubernetes.index.counts()["Pod"] == 0


async def test_pods_local_answers_like_insecure_and_keeps_only_its_node(
    start_server: StartServer, tmp_path: Path
) -> None:
    other_node = pod("testns", "far", "10.240.0.50", node="node-2")
    running = await start(start_server, tmp_path, "pods local node-1", [*CLUSTER, other_node])
    reply = await running.udp(f"10-240-0-50.testns.pod.{Z}", "A")
    assert texts(reply.answer) == [f"10-240-0-50.testns.pod.{Z} 5 A 10.240.0.50"]
    index = plugin_of(running).index
    assert index.pod_namespaces("10.240.0.1") == ["testns"]
    assert index.pod_namespaces("10.240.0.50") == []  # another node's pod is not kept


@pytest.mark.parametrize(("ttl", "soa_ttl"), [(0, 0), (30, 30), (600, 300), (3600, 300)])
async def test_ttl(start_server: StartServer, tmp_path: Path, ttl: int, soa_ttl: int) -> None:
    running = await start(start_server, tmp_path, f"ttl {ttl}")
    assert texts((await running.udp(f"svc1.{T}", "A")).answer) == [f"svc1.{T} {ttl} A 10.0.0.1"]
    negative = await running.udp(f"svc0.{T}", "A")
    fields = soa_of(negative)[0].split()
    assert fields[1] == str(soa_ttl) and fields[-1] == str(ttl)  # TTL min(ttl, 300), minimum ttl
    version = await running.udp(f"dns-version.{Z}", "TXT")
    assert texts(version.answer)[0].split()[1] == "28800"


async def test_noendpoints(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, tmp_path, "noendpoints")
    assert (await running.udp(f"hdls1.{T}", "A")).rcode() == NXDOMAIN
    assert (await running.udp(f"172-0-1-1.svc1.{T}", "A")).rcode() == NXDOMAIN
    assert texts((await running.udp(f"svc1.{T}", "A")).answer)
    assert plugin_of(running).index.counts()["EndpointSlice"] == 0


async def test_zones_default_to_the_block_and_dot_zone_works(start_server: StartServer, tmp_path: Path) -> None:
    directory = write_cluster(tmp_path / "manifests")
    text = f"example.:0 {{\n bind 127.0.0.1\n kubernetes {{\n manifests {directory}\n }}\n}}\n"
    running = await start_server(text, registry=REGISTRY)
    reply = await running.udp("svc1.testns.svc.example.", "A")
    assert texts(reply.answer) == ["svc1.testns.svc.example. 5 A 10.0.0.1"]
    assert plugin_of(running).settings.zones == ["example."]
    root = await start_server(f".:0 {{\n bind 127.0.0.1\n kubernetes . {{\n manifests {directory}\n }}\n}}\n", REGISTRY)
    assert texts((await root.udp("svc1.testns.svc.", "A")).answer) == ["svc1.testns.svc. 5 A 10.0.0.1"]
    assert soa_of(await root.udp("svc0.testns.svc.", "A"))[0].split()[3:5] == ["ns.dns.", "hostmaster."]


async def test_ns_glue_falls_back_to_bound_addresses(start_server: StartServer, tmp_path: Path) -> None:
    without_dns = [obj for obj in CLUSTER if obj["metadata"]["name"] != "kube-dns"]
    running = await start(start_server, tmp_path, "", without_dns)
    # Bound to 127.0.0.1 only (loopback): no address to give, so no NS record, as CoreDNS
    assert (await running.udp(Z, "NS")).rcode() == NOERROR
    assert not texts((await running.udp(Z, "NS")).answer)
    assert not texts((await running.udp(f"ns.dns.{Z}", "A")).answer)


async def test_external_lookup_depth_is_bounded(start_server: StartServer, tmp_path: Path) -> None:
    """An ExternalName whose target is another zone's ExternalName pointing back: each
    lookup goes through the server again, and the depth limit ends it."""
    objects = [
        *CLUSTER,
        external("testns", "ping", "pong.testns.svc.other.local"),
        external("testns", "pong", "ping.testns.svc.cluster.local"),
    ]
    directory = write_cluster(tmp_path / "manifests", objects)
    text = f"""\
.:0 {{
    bind 127.0.0.1
    kubernetes cluster.local other.local {{
        manifests {directory}
    }}
}}
"""
    running = await start_server(text, registry=REGISTRY)
    reply = await running.udp(f"ping.{T}", "A")
    assert reply.rcode() == NOERROR  # no loop, no hang: an answer
    # Each lookup through the server adds its CNAME until the depth limit gives no
    # records; the chain shows both lookups did run (the same two CNAMEs, repeated).
    assert texts(reply.answer) == [
        f"ping.{T} 5 CNAME pong.testns.svc.other.local.",
        f"pong.testns.svc.other.local. 5 CNAME ping.{T}",
    ]


def _request(name: str, client: str = "127.0.0.1") -> Request:
    wire = query_bytes(name)
    return Request(wire, parse_question(wire), (client, 5353), "udp")


async def test_autopath_search_uses_running_pods_only(start_server: StartServer, tmp_path: Path) -> None:
    objects = [*CLUSTER, pod("testns", "me", "127.0.0.1"), pod("other", "old", "127.0.0.2", phase="Succeeded")]
    running = await start(start_server, tmp_path, "pods verified", objects)
    kubernetes = plugin_of(running)
    kubernetes.search = ["corp.example.", "example."]
    assert kubernetes.autopath_search(_request(f"svc1.{Z}")) == [
        f"testns.svc.{Z}",
        f"svc.{Z}",
        Z,
        "corp.example.",
        "example.",
        "",
    ]
    assert kubernetes.autopath_search(_request("svc1.example.org.")) is None  # not our zone
    assert kubernetes.autopath_search(_request(f"svc1.{Z}", client="127.0.0.2")) is None  # finished pod
    assert kubernetes.autopath_search(_request(f"svc1.{Z}", client="127.0.0.3")) is None  # no pod


async def test_autopath_makes_pods_watched(start_server: StartServer, tmp_path: Path) -> None:
    """pods disabled keeps no pods, unless autopath asked for them (watch_pods)."""
    objects = [*CLUSTER, pod("testns", "me", "127.0.0.1")]
    alone = await start(start_server, tmp_path / "a", "pods disabled", objects)
    assert not plugin_of(alone).settings.watch_pods and plugin_of(alone).index.counts()["Pod"] == 0
    assert plugin_of(alone).autopath_search(_request(f"svc1.{Z}")) is None
    directory = write_cluster(tmp_path / "b", objects)
    running = await start_server(corefile(directory, "pods disabled", "autopath @kubernetes"), registry=REGISTRY)
    kubernetes = plugin_of(running)
    assert kubernetes.settings.watch_pods
    assert kubernetes.index.counts()["Pod"] == 4  # the Running ones: pod1, pod6, pod2, me
    search = kubernetes.autopath_search(_request(f"svc1.{Z}"))
    assert search is not None and search[0] == f"testns.svc.{Z}"
    assert (await running.udp(f"10-240-0-1.testns.pod.{Z}", "A")).rcode() == NXDOMAIN  # still disabled


# -- watch events on a serving index (as the API source applies them) ---------------------------


async def test_an_endpoint_ptr_survives_the_deletion_of_another_service(
    start_server: StartServer, tmp_path: Path
) -> None:
    """172.0.1.1 is behind svc1, also (ready) and spare (not ready). Deleting the slices
    one by one leaves the PTRs of the rest, whatever order they were applied in."""
    running = await start(start_server, tmp_path)
    index = plugin_of(running).index
    name = "1.1.0.172.in-addr.arpa."
    index.apply("EndpointSlice", "DELETED", endpoint_slice("testns", "also-a", "also", []))
    assert texts((await running.udp(name, "PTR")).answer) == [f"{name} 5 PTR 172-0-1-1.svc1.{T}"]
    index.apply("EndpointSlice", "ADDED", endpoint_slice("testns", "also-a", "also", [endpoint("172.0.1.1")]))
    index.apply("EndpointSlice", "DELETED", endpoint_slice("testns", "svc1-a", "svc1", []))
    assert texts((await running.udp(name, "PTR")).answer) == [f"{name} 5 PTR 172-0-1-1.also.{T}"]
    index.apply("EndpointSlice", "DELETED", endpoint_slice("testns", "also-a", "also", []))
    assert (await running.udp(name, "PTR")).rcode() == NXDOMAIN  # only the not-ready copy is left
    index.apply("Service", "MODIFIED", service("testns", "spare", ["10.0.0.8"], HTTP, publishNotReadyAddresses=True))
    assert texts((await running.udp(name, "PTR")).answer) == [f"{name} 5 PTR 172-0-1-1.spare.{T}"]


async def test_a_cluster_ip_held_by_two_services(start_server: StartServer, tmp_path: Path) -> None:
    """An IP reused while its old Service is still being deleted: the PTR names one of
    them, and deleting either leaves the other's."""
    objects = [*CLUSTER, service("testns", "reused", ["10.0.0.1"], HTTP)]
    running = await start(start_server, tmp_path, "", objects)
    index = plugin_of(running).index
    name = "1.0.0.10.in-addr.arpa."
    assert len(texts((await running.udp(name, "PTR")).answer)) == 1  # one service per IP, as CoreDNS
    index.apply("Service", "DELETED", service("testns", "reused", ["10.0.0.1"]))
    assert texts((await running.udp(name, "PTR")).answer) == [f"{name} 5 PTR svc1.{T}"]
    index.apply("Service", "ADDED", service("testns", "reused", ["10.0.0.1"]))
    index.apply("Service", "DELETED", service("testns", "svc1", ["10.0.0.1"]))
    assert texts((await running.udp(name, "PTR")).answer) == [f"{name} 5 PTR reused.{T}"]
    index.apply("Service", "MODIFIED", service("testns", "reused", ["None"]))  # now headless
    assert (await running.udp(name, "PTR")).rcode() == NXDOMAIN
    assert (await running.udp(name, "A")).rcode() == NXDOMAIN


async def test_an_object_turned_malformed_stops_being_answered(start_server: StartServer, tmp_path: Path) -> None:
    """A MODIFIED whose body no longer converts (logged) removes the old version, as the
    next relist would; a DELETED needs only the name."""
    running = await start(start_server, tmp_path)
    index = plugin_of(running).index
    broken = external("testns", "svc1", "not a host name")
    index.apply("Service", "MODIFIED", broken)
    assert (await running.udp(f"svc1.{T}", "A")).rcode() == NXDOMAIN
    assert (await running.udp("1.0.0.10.in-addr.arpa.", "PTR")).rcode() == NXDOMAIN
    garbage = {"metadata": {"name": "svc6", "namespace": "testns"}, "spec": {"clusterIP": "garbage"}}
    index.apply("Service", "DELETED", garbage)
    assert (await running.udp(f"svc6.{T}", "AAAA")).rcode() == NXDOMAIN


async def test_answers_keep_the_letter_case_of_the_query(start_server: StartServer, tmp_path: Path) -> None:
    """As CoreDNS: the owner is the name as asked, and names made from the zone (SRV
    targets, glue, the SOA) take the zone as the query spelled it; names from the data
    (an ExternalName's target) stay as they are."""
    running = await start(start_server, tmp_path)
    cased = "TestNS.svc.Cluster.LOCAL."
    reply = await running.udp(f"_HTTP._tcp.Svc1.{cased}", "SRV")
    assert texts(reply.answer) == [f"_HTTP._tcp.Svc1.{cased} 5 SRV 0 100 80 svc1.testns.svc.Cluster.LOCAL."]
    assert texts(reply.additional) == ["svc1.testns.svc.Cluster.LOCAL. 5 A 10.0.0.1"]
    reply = await running.udp(f"External-To-Service.{cased}", "A")
    assert texts(reply.answer) == [f"External-To-Service.{cased} 5 CNAME svc1.{T}", f"svc1.{T} 5 A 10.0.0.1"]
    reply = await running.udp(f"nothing.{cased}", "A")
    assert reply.rcode() == NXDOMAIN
    assert [line.split()[0] for line in soa_of(reply)] == ["Cluster.LOCAL."]
    assert soa_of(reply)[0].split()[3:5] == ["ns.dns.Cluster.LOCAL.", "hostmaster.Cluster.LOCAL."]
    reply = await running.udp("1.0.0.10.IN-ADDR.arpa.", "PTR")
    assert texts(reply.answer) == [f"1.0.0.10.IN-ADDR.arpa. 5 PTR svc1.{T}"]
    reply = await running.udp("Cluster.Local.", "NS")
    assert texts(reply.answer) == ["Cluster.Local. 5 NS ns.dns.Cluster.Local."]
    assert texts(reply.additional) == ["ns.dns.Cluster.Local. 5 A 10.0.0.10"]


async def test_the_root_zone_makes_no_empty_labels(start_server: StartServer, tmp_path: Path) -> None:
    """``kubernetes .``: SRV targets and PTRs are under the root, not ``svc..``."""
    directory = write_cluster(tmp_path / "manifests")
    text = f".:0 {{\n bind 127.0.0.1\n kubernetes . in-addr.arpa {{\n manifests {directory}\n }}\n}}\n"
    root = await start_server(text, REGISTRY)
    reply = await root.udp("svc1.testns.svc.", "SRV")
    assert texts(reply.answer) == ["svc1.testns.svc. 5 SRV 0 100 80 svc1.testns.svc."]
    assert texts(reply.additional) == ["svc1.testns.svc. 5 A 10.0.0.1"]
    assert texts((await root.udp("1.0.0.10.in-addr.arpa.", "PTR")).answer) == [
        "1.0.0.10.in-addr.arpa. 5 PTR svc1.testns.svc."
    ]
