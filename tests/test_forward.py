"""forward against upstream servers the tests start on 127.0.0.x (tests/upstreams.py)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

import plugins.forward.udp as udp_module
from plugins.forward import Forward, Target, in_zone
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Running, query_bytes, raw_udp, wait_for
from tests.upstreams import FakeUpstream

REGISTRY = Registry.default()
MakeUpstream = Callable[..., Awaitable[FakeUpstream]]
# Short timeouts so that a silent upstream costs the tests little time.
FAST = "read_timeout 200ms\n health_check 50ms\n max_fails 1"


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    started: list[FakeUpstream] = []

    async def make(host: str = "127.0.0.2", address: str = "192.0.2.1", **options: Any) -> FakeUpstream:
        upstream = await FakeUpstream(host, address).start(**options)
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()


def block(body: str, zone: str = ".") -> str:
    return f"{zone} {{\n bind 127.0.0.1\n {body}\n}}\n"


async def serve(start_server: StartServer, body: str) -> Running:
    return await start_server(block(body), registry=REGISTRY)


def forward_of(running: Running, index: int = 0) -> Forward:
    assert running.server.config is not None
    plugin = running.server.config.blocks[0].find_all("forward")[index]
    assert isinstance(plugin, Forward)
    return plugin


def values(running: Running, name: str) -> dict[tuple[str, ...], float]:
    return dict(running.server.runtime.metrics[name].values)  # type: ignore[union-attr]


def addresses(reply: dns.message.Message) -> list[str]:
    return [record.address for rrset in reply.answer for record in rrset]


class Collect(asyncio.DatagramProtocol):
    """One client socket that keeps every datagram it gets."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(data)


# -- answers pass through --------------------------------------------------------------------


async def test_answer_carries_the_clients_id_and_question_case(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.lowercase_question = True  # the upstream's reply does not keep the 0x20 case
    running = await serve(start_server, f"forward . {upstream.target}")
    query = query_bytes("wWw.ExAmPlE.oRg", qid=0xBEEF)
    reply = await raw_udp(running.port, query)
    assert reply is not None
    question_end = len(query)
    assert reply[:2] == b"\xbe\xef"
    assert reply[12:question_end] == query[12:question_end]
    assert addresses(dns.message.from_wire(reply)) == ["192.0.2.1"]
    (received,) = upstream.received()
    assert received.wire[12:question_end] == query[12:question_end]  # sent upstream as the client wrote it


async def test_every_udp_query_gets_a_random_id_and_ports_change(
    start_server: StartServer, make_upstream: MakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp_module, "MAX_USES", 2)  # a pooled socket answers two queries, then a new port
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    for _ in range(6):
        reply = await raw_udp(running.port, query_bytes("example.org", qid=0x1234))
        assert reply is not None and reply[:2] == b"\x12\x34"
    received = upstream.received("udp")
    assert len({query.source[1] for query in received}) == 3
    assert len({query.wire[:2] for query in received}) >= 5


async def test_edns_do_cd_and_options_reach_the_upstream(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    reply = await running.udp("example.org", use_edns=0, payload=1232, want_dnssec=True, options=[cookie])
    assert reply.edns == 0
    (received,) = upstream.received()
    message = received.message
    assert message.edns == 0 and message.payload == 1232
    assert message.ednsflags & dns.flags.DO
    assert [option.otype for option in message.options] == [dns.edns.COOKIE]
    query = dns.message.make_query("example.org", "A")
    query.flags |= dns.flags.CD
    await dns.asyncquery.udp(query, LOOPBACK, port=running.port, timeout=3)
    assert upstream.received()[-1].message.flags & dns.flags.CD


@pytest.mark.parametrize("ids", [(0x1111, 0x2222), (0x3333, 0x3333)])
async def test_a_and_aaaa_sent_together_from_one_socket_are_both_answered(
    start_server: StartServer, make_upstream: MakeUpstream, ids: tuple[int, int]
) -> None:
    """glibc sends A and AAAA back to back from one socket (same ID or not): both must come back."""
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(Collect, remote_addr=(LOOPBACK, running.port))
    replies = client.replies
    try:
        transport.sendto(query_bytes("pod.example.org", "A", qid=ids[0]))
        transport.sendto(query_bytes("pod.example.org", "AAAA", qid=ids[1]))
        got = [dns.message.from_wire(await asyncio.wait_for(replies.get(), 3)) for _ in range(2)]
    finally:
        transport.close()
    assert sorted(reply.question[0].rdtype for reply in got) == [dns.rdatatype.A, dns.rdatatype.AAAA]
    assert all(reply.rcode() == dns.rcode.NOERROR for reply in got)
    assert sorted(reply.id for reply in got) == sorted(ids)


# -- failures, health checks -------------------------------------------------------------------


async def test_silent_upstreams_give_servfail_within_the_bound(
    start_server: StartServer, make_upstream: MakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Default timeouts: three silent upstreams, yet the client hears SERVFAIL (not silence)
    before its own 7 s timeout, and the errors plugin logs why."""
    silent = [await make_upstream(f"127.0.0.{n}") for n in (2, 3, 4)]
    for upstream in silent:
        upstream.silent = True
    targets = " ".join(upstream.target for upstream in silent)
    running = await serve(start_server, f"errors\n forward . {targets}")
    query = dns.message.make_query("example.org", "A")
    with caplog.at_level(logging.ERROR, logger="plugin.errors"):
        reply = await dns.asyncquery.udp(query, LOOPBACK, port=running.port, timeout=7)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert "2 example.org. A: read udp 127.0.0.1:" in caplog.text
    assert caplog.text.rstrip().endswith(": i/o timeout")


async def test_failed_upstream_is_marked_down_skipped_and_comes_back(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    first = await make_upstream("127.0.0.2", "192.0.2.1")
    second = await make_upstream("127.0.0.3", "192.0.2.2")
    first.silent = True
    running = await serve(start_server, f"forward . {first.target} {second.target} {{\n policy sequential\n {FAST}\n}}")
    upstream = forward_of(running).upstreams[0]
    assert addresses(await running.udp("a.example.org")) == ["192.0.2.2"]  # after the first timed out
    await wait_for(lambda: upstream.down)
    assert values(running, "coredns_proxy_healthcheck_failures_total")[("forward", first.target)] >= 2
    asked = len(first.received())
    assert addresses(await running.udp("b.example.org")) == ["192.0.2.2"]
    assert len(first.received()) == asked  # a down upstream is not asked
    first.silent = False
    await wait_for(lambda: not upstream.down)
    assert addresses(await running.udp("c.example.org")) == ["192.0.2.1"]


@pytest.mark.parametrize(
    ("option", "name", "rd"), [("", ".", True), (" no_rec domain Health.Example.", "health.example.", False)]
)
async def test_health_check_query(
    start_server: StartServer, make_upstream: MakeUpstream, option: str, name: str, rd: bool
) -> None:
    upstream = await make_upstream()
    upstream.silent = True
    running = await serve(
        start_server, f"forward . {upstream.target} {{\n read_timeout 100ms\n health_check 50ms{option}\n}}"
    )
    assert (await running.udp("example.org")).rcode() == dns.rcode.SERVFAIL

    def checks() -> list[dns.message.Message]:
        messages = [query.message for query in upstream.queries]
        return [message for message in messages if message.question[0].rdtype == dns.rdatatype.NS]

    await wait_for(lambda: len(checks()) >= 2)  # repeated while it fails
    check = checks()[0]
    assert check.question[0].name.to_text() == name
    assert bool(check.flags & dns.flags.RD) == rd


async def test_max_fails_zero_never_checks_nor_marks_down(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.silent = True
    running = await serve(start_server, f"forward . {upstream.target} {{\n read_timeout 100ms\n max_fails 0\n}}")
    assert (await running.udp("example.org")).rcode() == dns.rcode.SERVFAIL
    (state,) = forward_of(running).upstreams
    assert state.probe is None and not state.down
    assert len(upstream.received("udp")) == 2  # CoreDNS's budget: two attempts per upstream


async def test_max_connect_attempts_caps_the_tries(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    silent = [await make_upstream(f"127.0.0.{n}") for n in (2, 3)]
    for upstream in silent:
        upstream.silent = True
    targets = " ".join(upstream.target for upstream in silent)
    running = await serve(start_server, f"forward . {targets} {{\n read_timeout 100ms\n max_connect_attempts 1\n}}")
    assert (await running.udp("example.org")).rcode() == dns.rcode.SERVFAIL
    assert sum(len(upstream.received()) for upstream in silent) == 1


@pytest.mark.parametrize("failfast", [False, True])
async def test_when_every_upstream_is_down(
    start_server: StartServer, make_upstream: MakeUpstream, failfast: bool
) -> None:
    """CoreDNS: one upstream is tried anyway (health checks may be what is broken);
    with failfast_all_unhealthy_upstreams the client gets SERVFAIL at once."""
    upstream = await make_upstream()
    upstream.silent = True
    upstream.ignore_health_checks = True
    option = "failfast_all_unhealthy_upstreams" if failfast else ""
    running = await serve(start_server, f"forward . {upstream.target} {{\n {FAST}\n {option}\n}}")
    assert (await running.udp("a.example.org")).rcode() == dns.rcode.SERVFAIL
    await wait_for(lambda: forward_of(running).upstreams[0].down)
    upstream.silent = False  # answers queries again, still not health checks: stays down
    asked = len(upstream.received())
    reply = await running.udp("b.example.org")
    assert values(running, "coredns_forward_healthcheck_broken_total")[()] >= 1
    if failfast:
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert len(upstream.received()) == asked
    else:
        assert addresses(reply) == ["192.0.2.1"]


async def test_refused_port_fails_over_to_the_next_upstream(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    gone = await make_upstream("127.0.0.2")
    await gone.stop()  # nothing listens there any more: ICMP port unreachable
    alive = await make_upstream("127.0.0.3", "192.0.2.2")
    running = await serve(start_server, f"forward . {gone.target} {alive.target} {{\n policy sequential\n}}")
    assert addresses(await running.udp("example.org")) == ["192.0.2.2"]


# -- transports ------------------------------------------------------------------------------


async def test_truncated_udp_answer_is_asked_again_over_tcp(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.truncate_udp = True
    running = await serve(start_server, f"forward . {upstream.target}")
    reply = await running.udp("example.org")
    assert not reply.flags & dns.flags.TC
    assert addresses(reply) == ["192.0.2.1"]
    assert [query.transport for query in upstream.received()] == ["udp", "tcp"]


async def test_force_tcp_never_sends_udp_and_reuses_the_connection(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n force_tcp\n}}")
    for name in ("a.example.org", "b.example.org", "c.example.org"):
        assert addresses(await running.udp(name)) == ["192.0.2.1"]
    assert not upstream.received("udp")
    assert len(upstream.received("tcp")) == 3
    assert upstream.connections == 1
    labels = ("forward", upstream.target, "tcp")
    assert values(running, "coredns_proxy_conn_cache_misses_total")[labels] == 1
    assert values(running, "coredns_proxy_conn_cache_hits_total")[labels] == 2


async def test_concurrent_queries_are_pipelined_on_one_connection(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n force_tcp\n}}")
    replies = await asyncio.gather(*(running.udp(f"q{n}.example.org") for n in range(20)))
    assert all(addresses(reply) == ["192.0.2.1"] for reply in replies)
    assert [reply.question[0].name.to_text() for reply in replies] == [f"q{n}.example.org." for n in range(20)]
    assert upstream.connections == 1


@pytest.mark.parametrize(("option", "expected"), [("", "tcp"), ("prefer_udp", "udp")])
async def test_upstream_transport_follows_the_client_unless_prefer_udp(
    start_server: StartServer, make_upstream: MakeUpstream, option: str, expected: str
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n {option}\n}}")
    assert addresses(await running.tcp("example.org")) == ["192.0.2.1"]
    assert [query.transport for query in upstream.received()] == [expected]


async def test_idle_connections_expire_and_closed_ones_are_replaced(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n force_tcp\n expire 100ms\n}}")
    assert addresses(await running.udp("a.example.org")) == ["192.0.2.1"]
    await wait_for(lambda: upstream.open_connections == 0)  # closed by forward after 100ms idle
    assert addresses(await running.udp("b.example.org")) == ["192.0.2.1"]
    assert upstream.connections == 2
    upstream.close_after_answer = True  # the upstream hangs up after each answer
    for name in ("c.example.org", "d.example.org"):
        assert addresses(await running.udp(name)) == ["192.0.2.1"]


async def test_a_pooled_connection_closed_under_a_query_is_retried_on_a_new_one(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n force_tcp\n}}")
    assert addresses(await running.udp("a.example.org")) == ["192.0.2.1"]
    upstream.hang_up_once = True  # reads the next query on the pooled connection, then hangs up
    assert addresses(await running.udp("b.example.org")) == ["192.0.2.1"]
    assert upstream.connections == 2
    assert forward_of(running).upstreams[0].probe is None  # not counted as a failure


async def test_stop_closes_pooled_connections(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n force_tcp\n}}")
    await running.udp("example.org")
    assert upstream.open_connections == 1
    await running.reconfigure(block("whoami"))
    await wait_for(lambda: upstream.open_connections == 0)


async def test_tls_upstream_with_a_self_signed_certificate(
    start_server: StartServer, make_upstream: MakeUpstream, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("dns.test").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    upstream = await make_upstream(tls=server_context)
    target = f"tls://{upstream.target}"
    running = await serve(start_server, f"forward . {target} {{\n tls {ca_file}\n tls_servername dns.test\n}}")
    assert addresses(await running.udp("a.example.org")) == ["192.0.2.1"]
    assert addresses(await running.udp("b.example.org")) == ["192.0.2.1"]
    assert not upstream.received("udp")
    assert upstream.connections == 1
    assert values(running, "coredns_proxy_conn_cache_hits_total")[("forward", upstream.target, "tcp-tls")] == 1
    # The certificate is checked against the server name: another name is refused.
    await running.reconfigure(block(f"forward . {target} {{\n tls {ca_file}\n tls_servername other.test\n}}"))
    assert (await running.udp("c.example.org")).rcode() == dns.rcode.SERVFAIL
    # The server name may also come with the address.
    named = f"tls://{upstream.host}%dns.test:{upstream.port}"
    await running.reconfigure(block(f"forward . {named} {{\n tls {ca_file}\n}}"))
    assert addresses(await running.udp("d.example.org")) == ["192.0.2.1"]


# -- spoofing, limits ------------------------------------------------------------------------


@pytest.mark.parametrize("spoof", ["id", "question"])
async def test_a_spoofed_reply_arriving_first_is_ignored(
    start_server: StartServer, make_upstream: MakeUpstream, spoof: str
) -> None:
    upstream = await make_upstream()
    upstream.spoof_first = spoof
    running = await serve(start_server, f"forward . {upstream.target}")
    assert addresses(await running.udp("example.org")) == ["192.0.2.1"]  # not the spoofed 6.6.6.6
    ignored = values(running, "corefile_resolver_forward_ignored_replies_total")
    assert ignored == {(upstream.target, spoof): 1}


async def test_max_concurrent_refuses_queries_beyond_the_limit(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.hold = asyncio.Event()
    running = await serve(start_server, f"forward . {upstream.target} {{\n max_concurrent 2\n}}")
    waiting = [asyncio.ensure_future(running.udp(f"q{n}.example.org")) for n in range(2)]
    await wait_for(lambda: len(upstream.received()) == 2)
    assert (await running.udp("third.example.org")).rcode() == dns.rcode.REFUSED
    assert values(running, "coredns_forward_max_concurrent_rejects_total") == {(): 1}
    upstream.hold.set()
    assert [addresses(reply) for reply in await asyncio.gather(*waiting)] == [["192.0.2.1"]] * 2


# -- policies, zones, next -------------------------------------------------------------------


async def three_upstreams(make_upstream: MakeUpstream) -> list[FakeUpstream]:
    return [await make_upstream(f"127.0.0.{n + 2}", f"192.0.2.{n + 1}") for n in range(3)]


async def test_sequential_policy_always_asks_the_first(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstreams = await three_upstreams(make_upstream)
    targets = " ".join(upstream.target for upstream in upstreams)
    running = await serve(start_server, f"forward . {targets} {{\n policy sequential\n}}")
    for n in range(4):
        assert addresses(await running.udp(f"q{n}.example.org")) == ["192.0.2.1"]


async def test_round_robin_policy_rotates(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstreams = await three_upstreams(make_upstream)
    targets = " ".join(upstream.target for upstream in upstreams)
    running = await serve(start_server, f"forward . {targets} {{\n policy round_robin\n}}")
    answers = [addresses(await running.udp(f"q{n}.example.org"))[0] for n in range(6)]
    # CoreDNS's counter starts at 1: the second upstream goes first.
    assert answers == ["192.0.2.2", "192.0.2.3", "192.0.2.1"] * 2


async def test_random_policy_spreads_queries(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstreams = await three_upstreams(make_upstream)
    running = await serve(start_server, f"forward . {upstreams[0].target} {upstreams[1].target}")
    answers = {addresses(await running.udp(f"q{n}.example.org"))[0] for n in range(30)}
    assert answers == {"192.0.2.1", "192.0.2.2"}


async def test_only_from_and_not_except_is_forwarded(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstream = await make_upstream()
    running = await serve(
        start_server, f"forward example.org {upstream.target} {{\n except internal.example.org\n}}\n whoami"
    )
    assert addresses(await running.udp("www.Example.org")) == ["192.0.2.1"]
    for name in ("x.internal.example.org", "example.net", "notexample.org"):
        reply = await running.udp(name)
        assert not reply.answer and reply.additional  # whoami answered
    assert len(upstream.received()) == 1


async def test_next_hands_listed_rcodes_to_the_next_forward(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    first = await make_upstream("127.0.0.2", "192.0.2.1")
    second = await make_upstream("127.0.0.3", "192.0.2.2")
    first.rcode = dns.rcode.NXDOMAIN
    running = await serve(start_server, f"forward . {first.target} {{\n next NXDOMAIN\n}}\n forward . {second.target}")
    assert addresses(await running.udp("example.org")) == ["192.0.2.2"]
    first.rcode = dns.rcode.REFUSED  # not listed: the first forward's answer stands
    assert (await running.udp("example.org")).rcode() == dns.rcode.REFUSED


async def test_next_is_ignored_without_a_following_forward(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.rcode = dns.rcode.NXDOMAIN
    running = await serve(start_server, f"forward . {upstream.target} {{\n next NXDOMAIN\n}}\n whoami")
    assert (await running.udp("example.org")).rcode() == dns.rcode.NXDOMAIN


async def test_failover_rcodes_try_the_next_upstream(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    first = await make_upstream("127.0.0.2", "192.0.2.1")
    second = await make_upstream("127.0.0.3", "192.0.2.2")
    first.rcode = dns.rcode.SERVFAIL
    body = f"forward . {first.target} {second.target} {{\n policy sequential\n failover SERVFAIL REFUSED\n}}"
    running = await serve(start_server, body)
    assert addresses(await running.udp("example.org")) == ["192.0.2.2"]
    second.rcode = dns.rcode.REFUSED  # every upstream tried: the last answer stands
    assert (await running.udp("example.org")).rcode() == dns.rcode.REFUSED


async def test_next_on_nodata_hands_empty_answers_on(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    first = await make_upstream("127.0.0.2", "192.0.2.1")
    second = await make_upstream("127.0.0.3", "192.0.2.2")
    first.empty = True
    running = await serve(start_server, f"forward . {first.target} {{\n next_on_nodata\n}}\n forward . {second.target}")
    assert addresses(await running.udp("example.org")) == ["192.0.2.2"]


def test_zone_matching_respects_label_boundaries() -> None:
    assert in_zone("a.example.org.", "example.org.")
    assert in_zone("example.org.", "example.org.")
    assert not in_zone("notexample.org.", "example.org.")
    assert not in_zone("a\\.example.org.", "example.org.")  # one label "a.example" under org.
    assert in_zone("a\\\\.example.org.", "example.org.")  # a label ending in a backslash


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_requests_responses_and_durations(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.rcode = dns.rcode.NXDOMAIN
    running = await serve(start_server, f"forward . {upstream.target}")
    await running.udp("example.org")
    to = upstream.target
    metrics = running.server.runtime.metrics
    assert metrics["coredns_proxy_request_duration_seconds"].count(("forward", to, "NXDOMAIN")) == 1  # type: ignore[union-attr]
    assert values(running, "coredns_forward_requests_total") == {(to,): 1}
    assert values(running, "coredns_forward_responses_total") == {("NXDOMAIN", to): 1}
    assert values(running, "coredns_proxy_conn_cache_misses_total") == {("forward", to, "udp"): 1}
    text = metrics.render().decode()
    series = f'coredns_proxy_request_duration_seconds_count{{proxy_name="forward",rcode="NXDOMAIN",to="{to}"}}'
    assert f"{series} 1.0" in text


# -- configuration ---------------------------------------------------------------------------


def test_targets_and_zone_for_other_plugins(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# generated\nsearch example.org\nnameserver 127.0.0.53\noptions ndots:5\nnameserver ::1\n"
        "nameserver 127.0.0.53\n"
    )
    text = block(f"forward Example.ORG {resolv} 127.0.0.1:5353 dns://[::1]:54 tls://127.0.0.2 127.0.0.1:5353")
    config = load(text, "Corefile", REGISTRY, default_port=0)
    forward = config.blocks[0].find("forward")
    assert isinstance(forward, Forward)
    assert forward.zone == "example.org."
    assert forward.targets == [
        Target("127.0.0.53", 53, "dns", f"{resolv} line 3: nameserver 127.0.0.53"),
        Target("::1", 53, "dns", f"{resolv} line 5: nameserver ::1"),
        Target("127.0.0.1", 5353, "dns", "127.0.0.1:5353"),
        Target("::1", 54, "dns", "dns://[::1]:54"),
        Target("127.0.0.2", 853, "tls", "tls://127.0.0.2"),
    ]
    assert [target.address for target in forward.targets][1] == "[::1]:53"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("forward .", "Corefile:3: forward: expected at least 2 arguments, got 1"),
        ("forward . 300.1.1.1", 'Corefile:3: forward: not an IP address or file: "300.1.1.1"'),
        ("forward . dns://dns.example.com", 'Corefile:3: forward: not an IP address: "dns://dns.example.com"'),
        ("forward . 127.0.0.1:99999", 'Corefile:3: forward: invalid port "99999" in "127.0.0.1:99999"'),
        ("forward . https://1.1.1.1", "Corefile:3: forward: 'https' is not supported as a destination protocol"),
        ("forward . " + " ".join(f"127.0.0.{n}" for n in range(1, 17)), "more than 15 TOs configured: 16"),
        ("forward . 127.0.0.1 {\n policy fastest\n}", "Corefile:4: policy: unknown policy 'fastest'"),
        ("forward . 127.0.0.1 {\n expire 10\n}", 'Corefile:4: expire: invalid duration "10"'),
        ("forward . 127.0.0.1 {\n health_check 1s fast\n}", "Corefile:4: health_check: unknown option fast"),
        ("forward . tls://127.0.0.1 {\n tls /nonexistent/c.pem /nonexistent/k.pem\n}", "tls: cannot read"),
        ("forward . 127.0.0.1 {\n next NOTACODE\n}", "Corefile:4: next: NOTACODE is not a valid rcode"),
        ("forward . 127.0.0.1 {\n max_fails -1\n}", "Corefile:4: max_fails: -1 is out of range"),
        ("forward . 127.0.0.1 {\n force_tcp yes\n}", "Corefile:4: force_tcp: expected exactly 0 arguments"),
        ("forward . 127.0.0.1 {\n bogus\n}", 'Corefile:4: forward: unknown option "bogus"'),
        ("forward . /nonexistent/resolv.conf", 'not an IP address or file: "/nonexistent/resolv.conf"'),
        ("forward . tls://127.0.0.1%dns.test {\n tls_servername dns.test\n}", "both tls_servername"),
    ],
)
def test_corefile_errors_are_one_line(body: str, message: str) -> None:
    with pytest.raises(CorefileError) as caught:
        load(block(body), "Corefile", REGISTRY, default_port=0)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
