"""The prometheus plugin over real DNS sockets and real HTTP scrapes of /metrics."""

from __future__ import annotations

import socket
import struct

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

import resolver
from plugins.prometheus import DEFAULT_ADDRESS, Prometheus
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.metrics import GaugeVec
from resolver.plugin import Plugin, Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Running, ipv6_loopback, query_bytes, raw_udp, wait_for

REGISTRY = Registry.default()
SERVER = "dns://127.0.0.1:0"  # the server label: bind 127.0.0.1, port 0 in the Corefile

ERRATIC = """
. {
    bind 127.0.0.1
    prometheus 127.0.0.1:0
    erratic
}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One GET /metrics, parsed into samples."""

    def __init__(self, status: int, content_type: str, text: str) -> None:
        self.status = status
        self.content_type = content_type
        self.text = text
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, /, **labels: str) -> float | None:
        """The sample with exactly these labels, or None."""
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, /, **labels: str) -> float:
        """The sum of the samples whose labels include these."""
        wanted = set(labels.items())
        return sum(value for (sample, have), value in self.samples.items() if sample == name and wanted <= have)

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


def plugin_of(running: Running, block: int = 0) -> Prometheus:
    assert running.server.config is not None
    plugin = running.server.config.blocks[block].find("prometheus")
    assert isinstance(plugin, Prometheus)
    return plugin


async def scrape(port: int) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(f"http://{LOOPBACK}:{port}/metrics") as response:
        return Scrape(response.status, response.headers["Content-Type"], await response.text())


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def send_udp(port: int, packet: bytes) -> None:
    """Send one datagram and do not wait for any reply."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(packet, (LOOPBACK, port))


# -- setup ------------------------------------------------------------------------------


def test_default_address_is_localhost_9153() -> None:
    config = load(". {\n bind 127.0.0.1\n prometheus\n whoami\n}\n", "Corefile", REGISTRY, default_port=0)
    plugin = config.blocks[0].find("prometheus")
    assert isinstance(plugin, Prometheus)
    assert plugin.address == DEFAULT_ADDRESS == "localhost:9153"


@pytest.mark.parametrize("address", [":9153", "localhost:9253", "[::1]:9153", "0.0.0.0:9153"])
def test_addresses_with_a_port_are_accepted(address: str) -> None:
    config = load(f". {{\n prometheus {address}\n whoami\n}}\n", "Corefile", REGISTRY, default_port=0)
    plugin = config.blocks[0].find("prometheus")
    assert isinstance(plugin, Prometheus) and plugin.address == address


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("prometheus localhost", "missing port"),
        ("prometheus ::1:9153", "too many colons"),
        ("prometheus :http", 'invalid port "http"'),
        ("prometheus :70000", 'invalid port "70000"'),
        ("prometheus :9153 :9154", "expected 0 to 1 argument"),
        ("prometheus {\n  tls /etc/web.yml\n }", "tls is not supported"),
        ("prometheus {\n  histograms\n }", 'unknown option "histograms"'),
        ("prometheus :9153\n prometheus :9154", "given twice"),
    ],
)
def test_bad_lines_are_one_line_errors(line: str, message: str) -> None:
    with pytest.raises(CorefileError, match=message) as caught:
        load(f". {{\n {line}\n whoami\n}}\n", "Corefile", REGISTRY, default_port=0)
    assert str(caught.value).startswith("Corefile:")


def test_runtime_metrics_option_is_accepted() -> None:
    config = load(". {\n prometheus :9153 {\n  runtime_metrics\n }\n whoami\n}\n", "Corefile", REGISTRY)
    assert config.blocks[0].find("prometheus") is not None


# -- per-query metrics --------------------------------------------------------------------


async def test_queries_are_counted_with_coredns_labels(start_server: StartServer) -> None:
    running = await start_server(ERRATIC, registry=REGISTRY)
    port = plugin_of(running).port
    before = await scrape(port)
    assert before.status == 200
    assert before.value("coredns_dns_requests_total", **_request_labels("udp", "A")) is None

    query_a = query_bytes("a.example.org", "A")
    reply_a = await raw_udp(running.port, query_a)
    query_other = query_bytes("b.example.org", "NAPTR")
    reply_other = await raw_udp(running.port, query_other)
    assert reply_a is not None and reply_other is not None
    await running.tcp("c.example.org", "AAAA")

    after = await scrape(port)
    assert after.value("coredns_dns_requests_total", **_request_labels("udp", "A")) == 1
    assert after.value("coredns_dns_requests_total", **_request_labels("udp", "other")) == 1
    assert after.value("coredns_dns_requests_total", **_request_labels("tcp", "AAAA")) == 1
    zone = {"server": SERVER, "zone": ".", "view": ""}
    assert after.value("coredns_dns_responses_total", **zone, rcode="NOERROR", plugin="erratic") == 3
    assert after.value("coredns_dns_request_duration_seconds_count", **zone) == 3
    assert after.value("coredns_dns_request_duration_seconds_sum", **zone) > 0
    udp = {**zone, "proto": "udp"}
    assert after.value("coredns_dns_request_size_bytes_count", **udp) == 2
    assert after.value("coredns_dns_request_size_bytes_sum", **udp) == len(query_a) + len(query_other)
    assert after.value("coredns_dns_request_size_bytes_bucket", **udp, le="0.0") == 0
    assert after.value("coredns_dns_request_size_bytes_bucket", **udp, le="100.0") == 2
    assert after.value("coredns_dns_response_size_bytes_sum", **udp) == len(reply_a) + len(reply_other)
    assert after.value("coredns_dns_response_size_bytes_count", **zone, proto="tcp") == 1

    await running.udp("d.example.org", "A")
    again = await scrape(port)
    assert again.value("coredns_dns_requests_total", **_request_labels("udp", "A")) == 2
    assert again.value("coredns_dns_responses_total", **zone, rcode="NOERROR", plugin="erratic") == 4


def _request_labels(proto: str, qtype: str, family: str = "1") -> dict[str, str]:
    return {"server": SERVER, "zone": ".", "view": "", "proto": proto, "family": family, "type": qtype}


async def test_monitored_types_keep_their_name_and_do_bit_is_counted(start_server: StartServer) -> None:
    running = await start_server(ERRATIC, registry=REGISTRY)
    for qtype in ("HTTPS", "SVCB", "MX", "CAA"):
        await running.udp("example.org", qtype)
    await running.udp("example.org", "A", use_edns=0, want_dnssec=True)
    result = await scrape(plugin_of(running).port)
    for qtype in ("HTTPS", "SVCB", "MX", "A"):
        assert result.value("coredns_dns_requests_total", **_request_labels("udp", qtype)) == 1
    assert result.value("coredns_dns_requests_total", **_request_labels("udp", "other")) == 1  # CAA
    assert result.value("coredns_dns_do_requests_total", server=SERVER, zone=".", view="") == 1


async def test_ipv6_clients_are_family_2(start_server: StartServer) -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this host")
    running = await start_server(". {\n bind 127.0.0.1 ::1\n prometheus 127.0.0.1:0\n erratic\n}\n", registry=REGISTRY)
    query = dns.message.make_query("example.org", "A")
    await dns.asyncquery.udp(query, "::1", port=running.port, timeout=3)
    result = await scrape(plugin_of(running).port)
    labels = {"server": "dns://[::1]:0", "zone": ".", "view": "", "proto": "udp", "family": "2", "type": "A"}
    assert result.value("coredns_dns_requests_total", **labels) == 1


async def test_end_of_chain_servfail_has_an_empty_plugin_label(start_server: StartServer) -> None:
    corefile = """
example.org {
    bind 127.0.0.1
    prometheus 127.0.0.1:0
    erratic
}
example.net {
    bind 127.0.0.1
    prometheus 127.0.0.1:0
}
"""
    running = await start_server(corefile, registry=REGISTRY)
    reply = await running.udp("www.example.net", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL
    result = await scrape(plugin_of(running).port)
    net = {"server": SERVER, "zone": "example.net.", "view": ""}
    assert result.value("coredns_dns_responses_total", **net, rcode="SERVFAIL", plugin="") == 1


async def test_a_dropped_reply_counts_the_request_but_no_response(start_server: StartServer) -> None:
    corefile = ". {\n bind 127.0.0.1\n prometheus 127.0.0.1:0\n erratic {\n  drop 2\n }\n}\n"
    running = await start_server(corefile, registry=REGISTRY)
    plugin = plugin_of(running)
    assert (await running.udp("one.example.org")).rcode() == dns.rcode.NOERROR
    await send_udp(running.port, query_bytes("two.example.org"))  # the 2nd query is dropped
    labels = _request_labels("udp", "A")
    await wait_for(lambda: plugin.requests.get(tuple(labels.values())) == 2)
    result = await scrape(plugin.port)
    zone = {"server": SERVER, "zone": ".", "view": ""}
    assert result.value("coredns_dns_requests_total", **labels) == 2
    assert result.total("coredns_dns_responses_total", **zone) == 1
    assert result.value("coredns_dns_request_duration_seconds_count", **zone) == 2
    assert result.value("coredns_dns_request_size_bytes_count", **zone, proto="udp") == 2
    assert result.value("coredns_dns_response_size_bytes_count", **zone, proto="udp") == 1


class _WithCrash(Registry):
    """The real plugins plus the test-only ``crash`` plugin, which raises."""

    def __init__(self) -> None:
        super().__init__(("bind", "prometheus", "crash", "erratic"), "tests.testplugins")

    def load(self, name: str) -> type[Plugin]:
        return Prometheus if name == "prometheus" else super().load(name)


async def test_a_plugin_that_raises_counts_a_servfail_and_a_panic(start_server: StartServer) -> None:
    corefile = ". {\n bind 127.0.0.1\n prometheus 127.0.0.1:0\n crash\n erratic\n}\n"
    running = await start_server(corefile, registry=_WithCrash())
    reply = await running.udp("crash.example.org")
    assert reply.rcode() == dns.rcode.SERVFAIL
    result = await scrape(plugin_of(running).port)
    assert result.value("coredns_panics_total") == 1
    assert result.value("coredns_dns_requests_total", **_request_labels("udp", "A")) == 1
    zone = {"server": SERVER, "zone": ".", "view": ""}
    assert result.value("coredns_dns_responses_total", **zone, rcode="SERVFAIL", plugin="") == 1


# -- packets that never reach a plugin ---------------------------------------------------


async def test_core_rejections_show_in_the_rejected_counter(start_server: StartServer) -> None:
    corefile = "example.org {\n bind 127.0.0.1\n prometheus 127.0.0.1:0\n erratic\n}\n"
    running = await start_server(corefile, registry=REGISTRY)
    stats = running.server.stats
    assert (await running.udp("www.example.com")).rcode() == dns.rcode.REFUSED
    assert (await running.udp("www.example.org", use_edns=1)).rcode() == dns.rcode.BADVERS
    await send_udp(running.port, b"\x12\x34\x01")  # shorter than a header
    await send_udp(running.port, b"\x12\x34\x81\x80" + struct.pack("!HHHH", 1, 0, 0, 0))  # a response
    await wait_for(lambda: stats.dropped_short == 1 and stats.dropped_responses == 1)
    result = await scrape(plugin_of(running).port)
    dropped = "corefile_resolver_rejected_packets_total"
    assert result.value(dropped, reason="refused") == 1
    assert result.value(dropped, reason="badvers") == 1
    assert result.value(dropped, reason="short") == 1
    assert result.value(dropped, reason="response") == 1
    assert result.value(dropped, reason="formerr") == 0
    assert result.value(dropped, reason="notimp") == 0
    assert result.value(dropped, reason="tcp_rejected") == 0
    # The REFUSED query never entered the chain, so the per-query metrics did not see it.
    assert result.total("coredns_dns_requests_total") == 0


# -- process-wide metrics ----------------------------------------------------------------


async def test_build_info_process_metrics_and_content_type(start_server: StartServer) -> None:
    running = await start_server(ERRATIC, registry=REGISTRY)
    running.server.stats.reloads_failed += 2  # what the CLI counts when a reload fails
    result = await scrape(plugin_of(running).port)
    assert result.content_type == "text/plain; version=0.0.4; charset=utf-8"
    (build,) = result.label_sets("coredns_build_info")
    assert build["version"] == resolver.__version__
    assert build["goversion"].startswith("python3.")
    assert result.value("coredns_build_info", **build) == 1
    assert result.value("coredns_reload_failed_total") == 2
    assert result.value("coredns_panics_total") == 0
    assert "# TYPE coredns_panics_total counter" in result.text
    assert (result.value("process_resident_memory_bytes") or 0) > 0


async def test_head_has_the_scrapes_headers_and_no_body(start_server: StartServer) -> None:
    running = await start_server(ERRATIC, registry=REGISTRY)
    url = f"http://{LOOPBACK}:{plugin_of(running).port}/metrics"
    async with aiohttp.ClientSession() as session, session.head(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(response.headers["Content-Length"]) > 1000  # the length the GET would have
        assert await response.read() == b""


async def test_two_blocks_on_one_address_share_one_http_server(start_server: StartServer) -> None:
    corefile = """
example.org {
    bind 127.0.0.1
    prometheus 127.0.0.1:0
    erratic
}
example.net {
    bind 127.0.0.1
    prometheus 127.0.0.1:0
    whoami
}
"""
    running = await start_server(corefile, registry=REGISTRY)
    first, second = plugin_of(running, 0), plugin_of(running, 1)
    assert first.port == second.port != 0
    await running.udp("www.example.org")
    await running.udp("www.example.net")
    result = await scrape(first.port)
    org = {"server": SERVER, "zone": "example.org.", "view": ""}
    net = {"server": SERVER, "zone": "example.net.", "view": ""}
    assert result.value("coredns_dns_responses_total", **org, rcode="NOERROR", plugin="erratic") == 1
    assert result.value("coredns_dns_responses_total", **net, rcode="NOERROR", plugin="whoami") == 1
    assert result.value("coredns_plugin_enabled", **org, name="erratic") == 1
    assert result.value("coredns_plugin_enabled", **net, name="whoami") == 1


def _enabled(result: Scrape) -> set[tuple[str, str, str]]:
    return {(s["server"], s["zone"], s["name"]) for s in result.label_sets("coredns_plugin_enabled")}


async def test_plugin_enabled_lists_the_blocks_handlers_and_follows_a_reload(start_server: StartServer) -> None:
    corefile = """
example.org example.net:{port} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:0
    erratic
}}
example.com {{
    bind 127.0.0.1
    whoami
}}
"""
    running = await start_server(corefile.format(port=0), registry=REGISTRY)
    port = plugin_of(running).port
    # bind is not a handler (CoreDNS does not list it either); example.com has no prometheus.
    assert _enabled(await scrape(port)) == {
        (SERVER, "example.org.", "prometheus"),
        (SERVER, "example.org.", "erratic"),
        (SERVER, "example.net.", "prometheus"),
        (SERVER, "example.net.", "erratic"),
    }

    await running.reconfigure(". {\n bind 127.0.0.1\n prometheus 127.0.0.1:0\n whoami\n}\n")
    # The old configuration's series go when its plugins stop, after its queries are done.
    enabled = running.server.runtime.metrics["coredns_plugin_enabled"]
    assert isinstance(enabled, GaugeVec)
    expected = {(SERVER, ".", "prometheus"), (SERVER, ".", "whoami")}
    await wait_for(lambda: {(s, z, n) for s, z, _v, n in enabled.current()} == expected)
    assert _enabled(await scrape(port)) == expected


async def test_reload_without_prometheus_closes_the_port_and_a_new_address_is_served(
    start_server: StartServer,
) -> None:
    running = await start_server(ERRATIC, registry=REGISTRY)
    old_port = plugin_of(running).port
    assert (await scrape(old_port)).status == 200

    await running.reconfigure(". {\n bind 127.0.0.1\n erratic\n}\n")
    await wait_for(lambda: refused(old_port))

    new_port = free_port()
    await running.reconfigure(f". {{\n bind 127.0.0.1\n prometheus 127.0.0.1:{new_port}\n erratic\n}}\n")
    assert plugin_of(running).port == new_port
    await running.udp("example.org")
    result = await scrape(new_port)
    assert result.value("coredns_dns_requests_total", **_request_labels("udp", "A")) == 1
