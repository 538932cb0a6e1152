"""autopath over real sockets: the search-path walk, its reply shape, and the cache in front.

The client is 127.0.0.1 (a pod of namespace ``default`` in the ``searchpath`` stand-in
for kubernetes) or 127.0.0.2 (no pod), both loopback, by binding the client socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from plugins.kubernetes import manifests
from plugins.kubernetes import plugin as kubernetes_plugin
from plugins.kubernetes.plugin import Kubernetes
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Capture, CollectReplies, Running, query_bytes, wait_for
from tests.testplugins.autopath import AutoPath
from tests.testplugins.cache import Cache
from tests.testplugins.prometheus import Prometheus
from tests.testplugins.scripted import ManualClock
from tests.testplugins.searchpath import SearchPath

REGISTRY = Registry(
    ("bind", "prometheus", "log", "cache", "autopath", "searchpath", "whoami"),
    "tests.testplugins",
)
POD = "127.0.0.1"  # a pod of namespace "default"
OTHER = "127.0.0.2"  # no pod at all
SEARCH = ["default.svc.cluster.local.", "svc.cluster.local.", "cluster.local.", "example.com.", ""]

RECORDS = """
web.default.svc.cluster.local. 5 IN A 10.96.0.10
api.svc.cluster.local. 5 IN A 10.96.0.11
db.example.com. 30 IN A 192.0.2.9
v6only.example.com. 30 IN AAAA 2001:db8::9
alias.example.com. 40 IN CNAME target.example.net.
target.example.net. 50 IN A 192.0.2.50
google.com. 60 IN A 192.0.2.60
"""


def corefile(*lines: str) -> str:
    body = "\n".join(f"    {line}" for line in lines)
    return f". {{\n    bind 127.0.0.1\n{body}\n}}\n"


KUBERNETES_MODE = corefile("autopath @searchpath", "searchpath")
WITH_CACHE = corefile("prometheus 127.0.0.1:0", "cache", "autopath @searchpath", "searchpath")


def provider(running: Running) -> SearchPath:
    assert running.server.config is not None
    found = running.server.config.blocks[0].find("searchpath")
    assert isinstance(found, SearchPath)
    return found


async def start(start_server: StartServer, text: str = KUBERNETES_MODE) -> tuple[Running, SearchPath]:
    running = await start_server(text, registry=REGISTRY)
    table = provider(running)
    table.pods[POD] = "default"
    table.host = ["example.com."]
    table.load(RECORDS)
    return running, table


async def ask(running: Running, name: str | dns.name.Name, rdtype: str = "A", client: str = POD) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, LOOPBACK, port=running.port, source=client, timeout=3)


def answer_text(reply: dns.message.Message) -> list[str]:
    return [line for rrset in reply.answer for line in rrset.to_text().splitlines()]


def tried(table: SearchPath) -> list[str]:
    return [name for name, _type, _client in table.asked]


def find_cache(running: Running) -> Cache:
    assert running.server.config is not None
    cache = running.server.config.blocks[0].find("cache")
    assert isinstance(cache, Cache)
    return cache


def manual_clock(running: Running) -> ManualClock:
    """The cache's clock, from now on moved by the test (expiry without sleeping)."""
    cache = find_cache(running)
    cache.clock.stop()
    clock = ManualClock(cache.clock.now)
    cache.clock = clock
    return clock


@pytest.fixture
def plugin_log() -> Iterator[Capture]:
    """Warnings of the autopath and kubernetes plugins."""
    loggers = [logging.getLogger(name) for name in ("plugin.autopath", "plugin.kubernetes")]
    capture = Capture()
    for logger in loggers:
        logger.addHandler(capture)
    yield capture
    for logger in loggers:
        logger.removeHandler(capture)


# -- the walk and the reply's shape ---------------------------------------------------------


async def test_a_short_name_found_in_a_later_domain_comes_back_as_a_cname_to_it(start_server: StartServer) -> None:
    running, table = await start(start_server)
    reply = await ask(running, "db.default.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].to_text() == "db.default.svc.cluster.local. IN A"
    # CoreDNS's shape: the CNAME first (TTL of the record it points at), then the records;
    # every TTL cut to the provider's (5 s): the answer is this client's only.
    assert answer_text(reply) == [
        "db.default.svc.cluster.local. 5 IN CNAME db.example.com.",
        "db.example.com. 5 IN A 192.0.2.9",
    ]
    assert tried(table) == [
        "db.default.svc.cluster.local.",
        "db.svc.cluster.local.",
        "db.cluster.local.",
        "db.example.com.",
    ]
    assert table.settings.watch_pods  # connect() asked the provider to watch pods


async def test_each_domain_is_tried_in_order_and_the_first_non_nxdomain_wins(start_server: StartServer) -> None:
    running, table = await start(start_server)
    reply = await ask(running, "api.default.svc.cluster.local")
    assert answer_text(reply) == [
        "api.default.svc.cluster.local. 5 IN CNAME api.svc.cluster.local.",
        "api.svc.cluster.local. 5 IN A 10.96.0.11",
    ]
    assert tried(table) == ["api.default.svc.cluster.local.", "api.svc.cluster.local."]


async def test_the_bare_name_is_tried_last(start_server: StartServer) -> None:
    running, table = await start(start_server)
    reply = await ask(running, "google.com.default.svc.cluster.local")
    assert answer_text(reply) == [
        "google.com.default.svc.cluster.local. 5 IN CNAME google.com.",
        "google.com. 5 IN A 192.0.2.60",
    ]
    assert tried(table)[-2:] == ["google.com.example.com.", "google.com."]
    assert len(tried(table)) == len(SEARCH)


async def test_a_found_cname_chain_is_kept_behind_the_new_cname(start_server: StartServer) -> None:
    running, _table = await start(start_server, corefile("autopath @searchpath", "searchpath {\n ttl 45\n }"))
    reply = await ask(running, "alias.default.svc.cluster.local")
    # TTLs above the provider's (45 s) are cut to it, lower ones kept.
    assert answer_text(reply) == [
        "alias.default.svc.cluster.local. 40 IN CNAME alias.example.com.",
        "alias.example.com. 40 IN CNAME target.example.net.",
        "target.example.net. 45 IN A 192.0.2.50",
    ]


async def test_nodata_under_a_later_domain_wins_without_a_cname(start_server: StartServer) -> None:
    """NODATA is not NXDOMAIN: the name exists there; there is no record to point at."""
    running, table = await start(start_server)
    reply = await ask(running, "db.default.svc.cluster.local", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    assert reply.question[0].to_text() == "db.default.svc.cluster.local. IN AAAA"
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
    assert tried(table)[-1] == "db.example.com."


async def test_the_name_in_the_first_domain_answers_as_it_is(start_server: StartServer) -> None:
    running, table = await start(start_server)
    reply = await ask(running, "web.default.svc.cluster.local")
    assert answer_text(reply) == ["web.default.svc.cluster.local. 5 IN A 10.96.0.10"]
    assert tried(table) == ["web.default.svc.cluster.local."]


async def test_when_every_try_is_nxdomain_the_asked_names_own_nxdomain_comes_back(start_server: StartServer) -> None:
    running, table = await start(start_server)
    reply = await ask(running, "nothing.default.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.question[0].to_text() == "nothing.default.svc.cluster.local. IN A"
    assert reply.answer == []
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
    assert reply.authority[0].ttl == 5  # the provider's TTL, not the SOA's 30: this client's answer only
    assert tried(table) == [
        "nothing.default.svc.cluster.local.",
        "nothing.svc.cluster.local.",
        "nothing.cluster.local.",
        "nothing.example.com.",
        "nothing.",
    ]


async def test_an_error_stops_the_walk(start_server: StartServer) -> None:
    running, table = await start(start_server)
    table.failing.add("db.svc.cluster.local.")
    reply = await ask(running, "db.default.svc.cluster.local")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.question[0].to_text() == "db.default.svc.cluster.local. IN A"
    assert tried(table) == ["db.default.svc.cluster.local.", "db.svc.cluster.local."]


async def test_the_clients_letter_case_is_kept_in_the_question_and_the_cname(start_server: StartServer) -> None:
    running, _table = await start(start_server)
    query = dns.message.make_query("Db.DEFAULT.svc.Cluster.local", "A")
    reply = await dns.asyncquery.udp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert str(reply.question[0].name) == "Db.DEFAULT.svc.Cluster.local."
    assert reply.answer[0].to_text() == "Db.DEFAULT.svc.Cluster.local. 5 IN CNAME db.example.com."


@pytest.mark.parametrize(
    ("name", "client"),
    [
        ("db.other.svc.cluster.local", POD),  # another namespace's domain: not this pod's first
        ("db.default.svc.cluster.local", OTHER),  # not a pod: no search path
        ("www.example.org", POD),  # outside the provider's zones: no search path
        ("default.svc.cluster.local", POD),  # the first domain itself: nothing to expand
        ("db.svc.cluster.local", POD),  # a later domain, not the first
        ("db.x\\.default.svc.cluster.local", POD),  # "x.default" is one label: not below the first domain
    ],
)
async def test_names_outside_the_clients_first_domain_pass_through_untouched(
    start_server: StartServer, name: str, client: str
) -> None:
    running, table = await start(start_server)
    reply = await ask(running, name, client=client)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.answer == []
    assert tried(table) == [name.lower() + "."]


async def test_autopath_zones_limit_where_it_walks(start_server: StartServer) -> None:
    running, table = await start(start_server, corefile("autopath example.org @searchpath", "searchpath"))
    reply = await ask(running, "db.default.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == ["db.default.svc.cluster.local."]


async def test_over_tcp_too(start_server: StartServer) -> None:
    running, _table = await start(start_server)
    query = dns.message.make_query("db.default.svc.cluster.local", "A", use_edns=0)
    reply = await dns.asyncquery.tcp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert answer_text(reply)[0] == "db.default.svc.cluster.local. 5 IN CNAME db.example.com."
    assert reply.edns == 0  # the client's EDNS went down the walk and came back


async def test_over_udp_the_clients_edns_and_do_bit_come_back(start_server: StartServer) -> None:
    running, _table = await start(start_server)
    query = dns.message.make_query("db.default.svc.cluster.local", "A", use_edns=0, want_dnssec=True)
    reply = await dns.asyncquery.udp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert answer_text(reply)[0] == "db.default.svc.cluster.local. 5 IN CNAME db.example.com."
    assert reply.edns == 0
    assert reply.ednsflags & dns.flags.DO


async def test_a_rebuilt_reply_too_big_for_udp_is_truncated(start_server: StartServer) -> None:
    running, table = await start(start_server)
    table.load("\n".join(f"big.example.com. 30 IN A 192.0.2.{i}" for i in range(1, 41)))
    query = dns.message.make_query("big.default.svc.cluster.local", "A")  # no EDNS: 512 octets at most
    udp = await dns.asyncquery.udp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert udp.flags & dns.flags.TC
    assert len(answer_text(udp)) < 41
    tcp = await dns.asyncquery.tcp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert not tcp.flags & dns.flags.TC
    assert answer_text(tcp)[0] == "big.default.svc.cluster.local. 5 IN CNAME big.example.com."
    assert len(answer_text(tcp)) == 41


async def test_an_unparseable_answer_under_another_name_is_servfail(start_server: StartServer) -> None:
    running, table = await start(start_server)
    table.garbage.add("db.svc.cluster.local.")
    reply = await ask(running, "db.default.svc.cluster.local")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.question[0].to_text() == "db.default.svc.cluster.local. IN A"
    assert tried(table) == ["db.default.svc.cluster.local.", "db.svc.cluster.local."]


async def test_a_dropped_try_ends_the_walk_with_no_reply(start_server: StartServer) -> None:
    """The client's own resolver would have got nothing for that name (acl drop): an
    answer from a later domain would be one it could never have reached."""
    running, table = await start(start_server)
    table.dropping.add("db.svc.cluster.local.")
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        CollectReplies, local_addr=(POD, 0), remote_addr=(LOOPBACK, running.port)
    )
    try:
        # Both from one socket, in order: had the first been answered, its reply would
        # come first. So the first reply being the second query's proves the drop.
        transport.sendto(query_bytes("db.default.svc.cluster.local", "A", qid=1))
        transport.sendto(query_bytes("web.default.svc.cluster.local", "A", qid=2))
        first = await asyncio.wait_for(protocol.replies.get(), 3)
    finally:
        transport.close()
    assert first[:2] == b"\x00\x02"
    assert tried(table) == [
        "db.default.svc.cluster.local.",
        "db.svc.cluster.local.",
        "web.default.svc.cluster.local.",
    ]


async def test_a_query_of_another_class_never_walks(start_server: StartServer) -> None:
    """Search paths are an IN matter: the CNAME autopath would build is of class IN."""
    running, table = await start(start_server)
    table.load('db.example.com. 30 CH TXT "chaos"')
    query = dns.message.make_query("db.default.svc.cluster.local", "TXT", rdclass="CH")
    reply = await dns.asyncquery.udp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.answer == []
    assert tried(table) == ["db.default.svc.cluster.local."]


@pytest.mark.parametrize("rdtype", ["AXFR", "IXFR"])
async def test_a_zone_transfer_never_walks(start_server: StartServer, rdtype: str) -> None:
    running, table = await start(start_server)
    query = dns.message.make_query("db.default.svc.cluster.local", rdtype)
    reply = await dns.asyncquery.tcp(query, LOOPBACK, port=running.port, source=POD, timeout=3)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == ["db.default.svc.cluster.local."]


async def test_a_search_domain_with_an_empty_label_is_never_asked(start_server: StartServer) -> None:
    running, table = await start(start_server)
    table.host = ["a..b.", "example.com."]
    reply = await ask(running, "db.default.svc.cluster.local")
    assert answer_text(reply)[0] == "db.default.svc.cluster.local. 5 IN CNAME db.example.com."
    assert tried(table) == [
        "db.default.svc.cluster.local.",
        "db.svc.cluster.local.",
        "db.cluster.local.",
        "db.example.com.",
    ]


async def test_an_expansion_longer_than_dns_allows_is_skipped(start_server: StartServer) -> None:
    running, table = await start(start_server)
    table.host = ["h" * 63 + "." + "i" * 20 + ".example.com.", "example.com."]
    base = ".".join(letter * 60 for letter in "xyz")  # 183 octets: fits below every domain but the first host one
    table.load(f"{base}. 30 IN A 192.0.2.77")
    reply = await ask(running, f"{base}.default.svc.cluster.local")
    assert answer_text(reply) == [
        f"{base}.default.svc.cluster.local. 5 IN CNAME {base}.",
        f"{base}. 5 IN A 192.0.2.77",
    ]
    domains = ["default.svc.cluster.local.", "svc.cluster.local.", "cluster.local.", "example.com.", ""]
    assert tried(table) == [f"{base}.{domain}" for domain in domains]


async def test_with_the_root_as_the_cluster_zone_the_bare_name_is_asked_once(start_server: StartServer) -> None:
    """Zone "." makes the path "ns.svc. svc. . HOST..." and then the bare name: "." again."""
    running, table = await start(start_server, corefile("autopath @searchpath", "searchpath ."))
    reply = await ask(running, "nothing.default.svc")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == ["nothing.default.svc.", "nothing.svc.", "nothing.", "nothing.example.com."]


async def test_a_provider_that_shows_no_zones_makes_every_nxdomain_uncacheable(start_server: StartServer) -> None:
    """Without the provider's zones any name may be some pod's to expand."""
    text = corefile("cache", "autopath @searchpath", "searchpath {\n        opaque\n    }")
    running, table = await start(start_server, text)
    walked = await ask(running, "db.default.svc.cluster.local")
    assert answer_text(walked)[0] == "db.default.svc.cluster.local. 5 IN CNAME db.example.com."
    table.asked.clear()
    for _round in range(2):
        assert (await ask(running, "nothing.example.org", client=OTHER)).rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == ["nothing.example.org.", "nothing.example.org."]


# -- resolv.conf mode -------------------------------------------------------------------------


def resolv_conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return path


async def test_a_resolv_conf_search_path_is_every_clients(start_server: StartServer, tmp_path: Path) -> None:
    path = resolv_conf(
        tmp_path, "nameserver 10.0.0.1\nsearch ignored.example.\n# comment\nsearch Corp.Example. example.com\n"
    )
    running, table = await start(start_server, corefile(f"autopath {path}", "searchpath"))
    for client in (POD, OTHER):
        table.asked.clear()
        reply = await ask(running, "db.corp.example", client=client)
        assert answer_text(reply) == [
            "db.corp.example. 30 IN CNAME db.example.com.",
            "db.example.com. 30 IN A 192.0.2.9",
        ]
        assert tried(table) == ["db.corp.example.", "db.example.com."]


async def test_a_resolv_conf_answer_is_shared_by_the_cache(start_server: StartServer, tmp_path: Path) -> None:
    """With one search path for everybody the answer depends on the question only."""
    path = resolv_conf(tmp_path, "search corp.example. example.com.\n")
    running, table = await start(start_server, corefile("cache", f"autopath {path}", "searchpath"))
    first = await ask(running, "db.corp.example", client=POD)
    table.asked.clear()
    second = await ask(running, "db.corp.example", client=OTHER)
    assert tried(table) == []  # a cache hit
    assert answer_text(second) == answer_text(first)


async def test_a_relative_resolv_conf_is_read_next_to_the_corefile(tmp_path: Path) -> None:
    resolv_conf(tmp_path, "domain corp.example\n")
    config = load(corefile("autopath resolv.conf", "searchpath"), str(tmp_path / "Corefile"), REGISTRY)
    plugin = config.blocks[0].find("autopath")
    assert isinstance(plugin, AutoPath)
    assert plugin.search == ["corp.example.", ""]
    assert not plugin.per_client


async def test_search_dot_asks_the_name_once(start_server: StartServer, tmp_path: Path) -> None:
    """ "." and the bare name are one name: asked once."""
    path = resolv_conf(tmp_path, "search .\n")
    running, table = await start(start_server, corefile(f"autopath {path}", "searchpath"))
    reply = await ask(running, "nothing.example.org")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == ["nothing.example.org."]


async def test_a_long_search_path_is_cut_and_then_the_bare_name_is_not_tried(
    start_server: StartServer, tmp_path: Path, plugin_log: Capture
) -> None:
    domains = [f"d{number}.example." for number in range(1, 12)]
    path = resolv_conf(tmp_path, "search " + " ".join(domains) + "\n")
    running, table = await start(start_server, corefile(f"autopath {path}", "searchpath"))
    assert plugin_log.messages == [
        f"{path} has 11 search domains: autopath tries the first 9 (and then not the bare name)"
    ]
    reply = await ask(running, "nothing.d1.example")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    # The bare name would come before d10 and d11, which the client tries first.
    assert tried(table) == [f"nothing.{domain}" for domain in domains[:9]]


async def test_a_resolv_conf_without_search_domains_walks_nothing(start_server: StartServer, tmp_path: Path) -> None:
    path = resolv_conf(tmp_path, "nameserver 10.0.0.1\n")
    running, table = await start(start_server, corefile(f"autopath {path}", "searchpath"))
    reply = await ask(running, "db.corp.example")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == ["db.corp.example."]


# -- Corefile errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["autopath"], "Corefile:3: autopath: no resolv-conf specified (a resolv.conf file, or @kubernetes)"),
        (["autopath @"], 'Corefile:3: autopath: "@" must name a plugin, as in "@kubernetes"'),
        (
            ["autopath @kubernetes"],
            'Corefile:3: autopath: no "kubernetes" plugin in this server block '
            "(autopath @kubernetes takes each client's search path from it)",
        ),
        (["autopath @whoami", "whoami"], 'Corefile:3: autopath: plugin "whoami" cannot give search paths'),
        (["autopath /nonexistent/resolv.conf"], 'Corefile:3: autopath: failed to parse "/nonexistent/resolv.conf"'),
        (["autopath @searchpath {", "}", "searchpath"], "Corefile:3: autopath: takes no block"),
        (["autopath @searchpath", "autopath @searchpath", "searchpath"], "Corefile:4: autopath: given twice"),
        (["autopath bad..zone @searchpath", "searchpath"], 'Corefile:3: autopath: invalid zone "bad..zone"'),
    ],
)
def test_corefile_errors_are_one_line(lines: list[str], message: str) -> None:
    with pytest.raises(CorefileError) as caught:
        load(corefile(*lines), "Corefile", REGISTRY)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_bad_search_domain_names_the_file_and_line(tmp_path: Path) -> None:
    path = resolv_conf(tmp_path, "nameserver 10.0.0.1\nsearch ok.example a..b\n")
    with pytest.raises(CorefileError) as caught:
        load(corefile(f"autopath {path}"), "Corefile", REGISTRY)
    assert str(caught.value) == f'Corefile:3: autopath: {path} line 2: bad domain "a..b"'


# -- the cache in front (DESIGN.md failure #4) ------------------------------------------------


async def test_a_pods_walk_answer_is_never_served_to_another_client(start_server: StartServer) -> None:
    running, table = await start(start_server, WITH_CACHE)
    pod = await ask(running, "db.default.svc.cluster.local", client=POD)
    assert pod.answer[0].rdtype == dns.rdatatype.CNAME
    other = await ask(running, "db.default.svc.cluster.local", client=OTHER)
    assert other.rcode() == dns.rcode.NXDOMAIN  # the name's own answer, not the pod's
    table.asked.clear()
    again_pod = await ask(running, "db.default.svc.cluster.local", client=POD)
    again_other = await ask(running, "db.default.svc.cluster.local", client=OTHER)
    # The pod's from the cache, its own; the other client's NXDOMAIN is never cached.
    assert tried(table) == ["db.default.svc.cluster.local."]
    assert answer_text(again_pod) == answer_text(pod)
    assert again_other.rcode() == dns.rcode.NXDOMAIN


async def test_another_clients_nxdomain_is_not_served_to_a_pod_that_would_walk(start_server: StartServer) -> None:
    """The order that broke glibc: a shared NXDOMAIN for A first, then the pod asks."""
    running, _table = await start(start_server, WITH_CACHE)
    other = await ask(running, "db.default.svc.cluster.local", client=OTHER)
    assert other.rcode() == dns.rcode.NXDOMAIN
    pod_a, pod_aaaa = await asyncio.gather(
        ask(running, "db.default.svc.cluster.local", "A", client=POD),
        ask(running, "db.default.svc.cluster.local", "AAAA", client=POD),
    )
    assert pod_a.rcode() == pod_aaaa.rcode() == dns.rcode.NOERROR
    assert answer_text(pod_a)[0] == "db.default.svc.cluster.local. 5 IN CNAME db.example.com."
    # Asked again (now from the cache) the pod still sees the name exist for both types.
    again = [await ask(running, "db.default.svc.cluster.local", rdtype, client=POD) for rdtype in ("A", "AAAA")]
    assert [reply.rcode() for reply in again] == [dns.rcode.NOERROR, dns.rcode.NOERROR]


async def test_a_and_aaaa_stay_consistent_for_each_client(start_server: StartServer) -> None:
    running, _table = await start(start_server, WITH_CACHE)
    name = "v6only.default.svc.cluster.local"
    for _round in range(2):  # the second round comes from the cache
        for client, expected in ((POD, dns.rcode.NOERROR), (OTHER, dns.rcode.NXDOMAIN)):
            replies = await asyncio.gather(*(ask(running, name, rdtype, client=client) for rdtype in ("A", "AAAA")))
            assert [reply.rcode() for reply in replies] == [expected, expected], client
    pod_aaaa = await ask(running, name, "AAAA", client=POD)
    assert answer_text(pod_aaaa)[-1] == "v6only.example.com. 5 IN AAAA 2001:db8::9"


async def test_an_answer_of_the_first_domain_is_shared(start_server: StartServer) -> None:
    """The asked name's own answer is what every client gets: the cache may share it."""
    running, table = await start(start_server, WITH_CACHE)
    await ask(running, "web.default.svc.cluster.local", client=POD)
    table.asked.clear()
    other = await ask(running, "web.default.svc.cluster.local", client=OTHER)
    assert tried(table) == []
    assert answer_text(other) == ["web.default.svc.cluster.local. 5 IN A 10.96.0.10"]


async def test_the_nxdomain_of_a_name_a_walk_could_expand_is_never_cached(start_server: StartServer) -> None:
    """Shared, it would hide the walk from the pods of that namespace; kept per client,
    it would make the cache hold a name for every query (a flood of random names from
    anyone would grow it without bound)."""
    running, table = await start(start_server, WITH_CACHE)
    cache = find_cache(running)
    names = [f"n{number}.ns{number}.svc.cluster.local" for number in range(20)]
    for name in names:
        assert (await ask(running, name, client=OTHER)).rcode() == dns.rcode.NXDOMAIN
    assert not cache.store.dependent
    assert len(cache.store) == 0
    table.asked.clear()
    await ask(running, names[0], client=OTHER)
    assert tried(table) == [names[0] + "."]


async def test_an_escaped_dot_is_no_label_boundary_for_what_a_walk_could_expand(start_server: StartServer) -> None:
    """ "a.b" is one label: a.b.svc.cluster.local has no namespace, no walk reaches it,
    so its NXDOMAIN is the same for everyone and is cached shared."""
    running, table = await start(start_server, WITH_CACHE)
    name = dns.name.Name([b"a.b", b"svc", b"cluster", b"local", b""])
    assert (await ask(running, name, client=OTHER)).rcode() == dns.rcode.NXDOMAIN
    table.asked.clear()
    assert (await ask(running, name, client=POD)).rcode() == dns.rcode.NXDOMAIN
    assert tried(table) == []


async def test_nxdomains_no_walk_can_reach_stay_shared(start_server: StartServer) -> None:
    """Only names of the form NAME.NAMESPACE.svc.ZONE may differ between clients."""
    running, table = await start(start_server, WITH_CACHE)
    for name in ("nothing.example.org", "nothing.svc.cluster.local"):
        await ask(running, name, client=OTHER)
        table.asked.clear()
        reply = await ask(running, name, client=POD)
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert tried(table) == [], name


# -- what operators see (DESIGN.md failure #5) ------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[Capture]:
    logger = logging.getLogger("resolver.log")
    capture = Capture()
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(level)


async def test_the_log_shows_which_expansion_answered(start_server: StartServer, log_lines: Capture) -> None:
    log_line = 'log . "{remote} {name} {rcode} {/pod} {/autopath/name} [{/autopath/search}]"'
    running, _table = await start(start_server, corefile(log_line, "autopath @searchpath", "searchpath"))
    await ask(running, "db.default.svc.cluster.local")
    await ask(running, "nothing.default.svc.cluster.local")
    await ask(running, "web.default.svc.cluster.local", client=OTHER)
    await ask(running, "web.svc.cluster.local")  # a pod's query that does not walk: its namespace still shows
    search = " ".join(domain or "." for domain in SEARCH)
    assert log_lines.messages == [
        f"127.0.0.1 db.default.svc.cluster.local. NOERROR default db.example.com. [{search}]",
        f"127.0.0.1 nothing.default.svc.cluster.local. NXDOMAIN default - [{search}]",
        "127.0.0.2 web.default.svc.cluster.local. NOERROR - - [-]",
        "127.0.0.1 web.svc.cluster.local. NXDOMAIN default - [-]",
    ]


async def test_the_json_log_names_the_clients_namespace(start_server: StartServer, log_lines: Capture) -> None:
    running, _table = await start(start_server, corefile("log . json", "autopath @searchpath", "searchpath"))
    await ask(running, "db.default.svc.cluster.local")
    await ask(running, "db.default.svc.cluster.local", client=OTHER)
    entries = [json.loads(message) for message in log_lines.messages]
    assert [(entry["client"], entry.get("pod")) for entry in entries] == [(POD, "default"), (OTHER, None)]


async def scrape(running: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert running.server.config is not None
    metrics = running.server.config.blocks[0].find("prometheus")
    assert isinstance(metrics, Prometheus)
    url = f"http://{LOOPBACK}:{metrics.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_walks_and_which_domain_answered(start_server: StartServer) -> None:
    running, table = await start(start_server, corefile("prometheus 127.0.0.1:0", "autopath @searchpath", "searchpath"))
    table.failing.add("broken.svc.cluster.local.")
    table.garbage.add("junk.svc.cluster.local.")
    await ask(running, "db.default.svc.cluster.local")
    await ask(running, "api.default.svc.cluster.local")
    await ask(running, "web.default.svc.cluster.local")
    await ask(running, "nothing.default.svc.cluster.local")
    await ask(running, "broken.default.svc.cluster.local")  # SERVFAIL at the second try
    await ask(running, "junk.default.svc.cluster.local")  # an answer that cannot be parsed
    await ask(running, "db.default.svc.cluster.local", client=OTHER)  # no walk
    samples = await scrape(running)
    server = frozenset({("server", "dns://127.0.0.1:0")})
    answers = {
        dict(labels)["search"]: value
        for (name, labels), value in samples.items()
        if name == "corefile_resolver_autopath_answers_total"
    }
    # CoreDNS counts every walk that found an answer, the asked name's own included.
    assert samples[("coredns_autopath_success_total", server)] == 3
    assert answers == {"example.com.": 1, "svc.cluster.local.": 1, "first": 1, "none": 1, "error": 2}


# -- end to end with the real kubernetes plugin (manifests) -----------------------------------

K8S_REGISTRY = Registry(("bind", "log", "cache", "autopath", "kubernetes", "searchpath"), "tests.testplugins")


def k8s_object(kind: str, namespace: str | None, name: str, **fields: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    api = "v1"
    return {"apiVersion": api, "kind": kind, "metadata": metadata, **fields}


def k8s_pod(namespace: str, name: str, ip: str, phase: str = "Running", host_network: bool = False) -> dict[str, Any]:
    status = {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}
    spec: dict[str, Any] = {"nodeName": "node-1"}
    if host_network:
        spec["hostNetwork"] = True
    return k8s_object("Pod", namespace, name, spec=spec, status=status)


def k8s_service(namespace: str, name: str, ip: str) -> dict[str, Any]:
    spec = {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    return k8s_object("Service", namespace, name, spec=spec)


CLUSTER = [
    k8s_object("Namespace", None, "prod"),
    k8s_object("Namespace", None, "data"),
    k8s_object("Namespace", None, "old"),
    k8s_service("data", "web", "10.96.1.1"),
    k8s_service("prod", "api", "10.96.2.2"),
]


def write_manifests(directory: Path, *objects: dict[str, Any]) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all([*CLUSTER, *objects]))
    return directory


def k8s_corefile(directory: Path, cache: bool = False, options: tuple[str, ...] = (), log: str = "") -> str:
    """kubernetes with pods disabled (unless OPTIONS say otherwise): autopath must make it
    watch pods anyway. searchpath after it stands in for forward (names outside cluster.local)."""
    body = "".join(f"        {option}\n" for option in (f"manifests {directory}", *options))
    return corefile(
        log,
        "cache" if cache else "",
        "autopath @kubernetes",
        f"kubernetes cluster.local {{\n{body}    }}",
        "searchpath",
    )


async def start_k8s(
    start_server: StartServer,
    directory: Path,
    cache: bool = False,
    options: tuple[str, ...] = (),
    host_search: list[str] | None = ["example.com."],  # noqa: B006 (never changed)
    log: str = "",
) -> tuple[Running, Kubernetes]:
    running = await start_server(k8s_corefile(directory, cache, options, log), registry=K8S_REGISTRY)
    assert running.server.config is not None
    block = running.server.config.blocks[0]
    kubernetes, upstream = block.find("kubernetes"), block.find("searchpath")
    assert isinstance(kubernetes, Kubernetes) and isinstance(upstream, SearchPath)
    if host_search is not None:
        kubernetes.search = host_search  # the node's resolv.conf search domains, fixed for the test
    upstream.load(RECORDS)
    return running, kubernetes


async def test_e2e_a_running_pod_gets_its_namespaces_search_path(start_server: StartServer, tmp_path: Path) -> None:
    directory = write_manifests(tmp_path / "m", k8s_pod("prod", "client", POD))
    running, kubernetes = await start_k8s(start_server, directory)
    assert kubernetes.settings.watch_pods  # pods disabled, but autopath needs them
    # "web.data" typed in namespace prod: found one search domain further, as a Service.
    reply = await ask(running, "web.data.prod.svc.cluster.local")
    assert answer_text(reply) == [
        "web.data.prod.svc.cluster.local. 5 IN CNAME web.data.svc.cluster.local.",
        "web.data.svc.cluster.local. 5 IN A 10.96.1.1",
    ]
    # "db" is no Service: found under the node's search domain, outside the cluster.
    reply = await ask(running, "db.prod.svc.cluster.local")
    assert answer_text(reply)[0] == "db.prod.svc.cluster.local. 5 IN CNAME db.example.com."
    # The pod's own namespace answers as asked.
    reply = await ask(running, "api.prod.svc.cluster.local")
    assert answer_text(reply) == ["api.prod.svc.cluster.local. 5 IN A 10.96.2.2"]
    # Another client is no pod: no walk.
    reply = await ask(running, "web.data.prod.svc.cluster.local", client=OTHER)
    assert reply.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("stale_first", [True, False])
async def test_e2e_a_finished_pod_holding_the_same_ip_is_never_the_client(
    start_server: StartServer, tmp_path: Path, stale_first: bool
) -> None:
    """DESIGN.md failure #3: the IP was reused; the Succeeded pod in "old" still holds it."""
    stale, live = k8s_pod("old", "job", POD, phase="Succeeded"), k8s_pod("prod", "client", POD)
    directory = write_manifests(tmp_path / "m", *((stale, live) if stale_first else (live, stale)))
    running, _kubernetes = await start_k8s(start_server, directory)
    walked = await ask(running, "web.data.prod.svc.cluster.local")
    assert answer_text(walked)[0] == "web.data.prod.svc.cluster.local. 5 IN CNAME web.data.svc.cluster.local."
    not_walked = await ask(running, "web.data.old.svc.cluster.local")
    assert not_walked.rcode() == dns.rcode.NXDOMAIN
    assert not_walked.answer == []


async def test_e2e_only_a_finished_pod_holds_the_ip_no_walk(start_server: StartServer, tmp_path: Path) -> None:
    directory = write_manifests(tmp_path / "m", k8s_pod("old", "job", POD, phase="Succeeded"))
    running, kubernetes = await start_k8s(start_server, directory)
    assert kubernetes.index.pod_namespaces(POD) == []
    reply = await ask(running, "web.data.old.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NXDOMAIN


async def test_e2e_a_pod_that_finishes_stops_being_the_client(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifests, "POLL_INTERVAL", 0.02)
    directory = write_manifests(tmp_path / "m", k8s_pod("old", "job", POD))
    running, kubernetes = await start_k8s(start_server, directory)
    assert answer_text(await ask(running, "web.data.old.svc.cluster.local"))[0].endswith("web.data.svc.cluster.local.")
    write_manifests(directory, k8s_pod("old", "job", POD, phase="Succeeded"), k8s_pod("prod", "client", POD))
    await wait_for(lambda: kubernetes.index.pod_namespaces(POD) == ["prod"])
    assert (await ask(running, "web.data.old.svc.cluster.local")).rcode() == dns.rcode.NXDOMAIN
    assert answer_text(await ask(running, "web.data.prod.svc.cluster.local"))[0].endswith("web.data.svc.cluster.local.")


async def test_e2e_with_the_cache_each_client_keeps_its_own_view(start_server: StartServer, tmp_path: Path) -> None:
    directory = write_manifests(tmp_path / "m", k8s_pod("prod", "client", POD))
    running, _kubernetes = await start_k8s(start_server, directory, cache=True)
    name = "web.data.prod.svc.cluster.local"
    other = await ask(running, name, client=OTHER)  # a shared NXDOMAIN would hide the walk from the pod
    assert other.rcode() == dns.rcode.NXDOMAIN
    for _round in range(2):  # the second round comes from the cache
        pod_a, pod_aaaa = await asyncio.gather(ask(running, name, "A"), ask(running, name, "AAAA"))
        owner, ttl, rest = answer_text(pod_a)[0].split(" ", 2)
        assert (owner, rest) == (f"{name}.", "IN CNAME web.data.svc.cluster.local.")
        assert 0 < int(ttl) <= 5  # from the cache the TTL may have ticked down a second
        assert pod_aaaa.rcode() == dns.rcode.NOERROR  # NODATA: the Service has no IPv6
        assert (await ask(running, name, "AAAA", client=OTHER)).rcode() == dns.rcode.NXDOMAIN


async def test_e2e_an_ip_held_by_running_pods_of_two_namespaces_gives_no_walk(
    start_server: StartServer, tmp_path: Path
) -> None:
    """An IP being reused while the old pod still shows Running: either namespace's path
    could be the wrong one, so neither is walked (the client's resolver walks its own)."""
    directory = write_manifests(tmp_path / "m", k8s_pod("old", "job", POD), k8s_pod("prod", "client", POD))
    running, _kubernetes = await start_k8s(start_server, directory)
    for namespace in ("old", "prod"):
        reply = await ask(running, f"web.data.{namespace}.svc.cluster.local")
        assert reply.rcode() == dns.rcode.NXDOMAIN, namespace
        assert reply.answer == []


@pytest.mark.parametrize("with_pod", [False, True])
async def test_e2e_a_pod_on_the_host_network_is_never_the_client(
    start_server: StartServer, tmp_path: Path, with_pod: bool
) -> None:
    """Its IP is its node's, which the node's own processes and every other such pod send
    from: queries from it are no more its own than anyone's on that node."""
    agent = k8s_pod("infra", "agent", POD, host_network=True)
    pods = (agent, k8s_pod("prod", "client", POD)) if with_pod else (agent,)
    directory = write_manifests(tmp_path / "m", k8s_object("Namespace", None, "infra"), *pods)
    running, _kubernetes = await start_k8s(start_server, directory, options=("pods verified",))
    assert (await ask(running, "web.data.infra.svc.cluster.local")).rcode() == dns.rcode.NXDOMAIN
    prod = await ask(running, "web.data.prod.svc.cluster.local")
    if with_pod:
        assert answer_text(prod)[0] == "web.data.prod.svc.cluster.local. 5 IN CNAME web.data.svc.cluster.local."
    else:
        assert prod.rcode() == dns.rcode.NXDOMAIN
    # It is still a Running pod of infra at that IP for `pods verified`, as in CoreDNS.
    verified = await ask(running, "127-0-0-1.infra.pod.cluster.local")
    assert answer_text(verified) == ["127-0-0-1.infra.pod.cluster.local. 5 IN A 127.0.0.1"]


async def test_e2e_a_reused_ip_sees_the_old_pods_cached_view_for_the_kubernetes_ttl_at_most(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN.md failure #3 through the cache: the cache keys private answers by address,
    so autopath keeps them no longer than kubernetes' ttl (5 s)."""
    monkeypatch.setattr(manifests, "POLL_INTERVAL", 0.02)
    directory = write_manifests(tmp_path / "m", k8s_pod("prod", "client", POD))
    running, kubernetes = await start_k8s(start_server, directory, cache=True)
    clock = manual_clock(running)
    reply = await ask(running, "db.prod.svc.cluster.local")
    assert answer_text(reply) == [
        "db.prod.svc.cluster.local. 5 IN CNAME db.example.com.",
        "db.example.com. 5 IN A 192.0.2.9",  # 30 s upstream
    ]
    # The pod finishes, and a pod of namespace data gets its IP.
    write_manifests(directory, k8s_pod("prod", "client", POD, phase="Succeeded"), k8s_pod("data", "new", POD))
    await wait_for(lambda: kubernetes.index.client_namespaces(POD) == ["data"])
    clock.advance(6)
    reply = await ask(running, "db.prod.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NXDOMAIN  # the new pod's own view: prod is not its namespace
    assert reply.answer == []


async def test_e2e_the_log_names_the_clients_namespace(
    start_server: StartServer, tmp_path: Path, log_lines: Capture
) -> None:
    directory = write_manifests(tmp_path / "m", k8s_pod("prod", "client", POD))
    log = 'log . "{remote} {name} {/pod} {/autopath/name}"'
    running, _kubernetes = await start_k8s(start_server, directory, log=log)
    await ask(running, "web.data.prod.svc.cluster.local")
    await ask(running, "web.data.prod.svc.cluster.local", client=OTHER)
    assert log_lines.messages == [
        "127.0.0.1 web.data.prod.svc.cluster.local. prod web.data.svc.cluster.local.",
        "127.0.0.2 web.data.prod.svc.cluster.local. - -",
    ]


@pytest.mark.parametrize(
    ("text", "warnings"),
    [
        # A word that is no domain name is left out, with a warning (the node's file is at fault).
        ("search a..b Example.com.\n", ["line 1: 'a..b' is no domain name: left out of the search path"]),
        # "domain" gives one domain, as glibc reads it; the last search/domain line wins.
        ("search other.example\ndomain example.com other.example\n", []),
        # The root is the bare name, which comes last anyway.
        ("search . example.com\n", []),
    ],
)
async def test_e2e_the_hosts_resolv_conf_is_read_as_autopath_reads_one(
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    plugin_log: Capture,
    text: str,
    warnings: list[str],
) -> None:
    host = tmp_path / "resolv.conf"
    host.write_text(text)
    monkeypatch.setattr(kubernetes_plugin, "RESOLV_CONF", str(host))
    directory = write_manifests(tmp_path / "m", k8s_pod("prod", "client", POD))
    running, kubernetes = await start_k8s(start_server, directory, host_search=None)
    assert kubernetes.search == ["example.com."]
    assert plugin_log.messages == [f"{host} {warning}" for warning in warnings]
    assert running.server.config is not None
    upstream = running.server.config.blocks[0].find("searchpath")
    assert isinstance(upstream, SearchPath)
    upstream.load("only.other.example. 30 IN A 192.0.2.8")
    reply = await ask(running, "db.prod.svc.cluster.local")
    assert answer_text(reply)[0] == "db.prod.svc.cluster.local. 5 IN CNAME db.example.com."
    assert (await ask(running, "only.prod.svc.cluster.local")).rcode() == dns.rcode.NXDOMAIN
    # What went past the cluster zone: the host's domains as read, and nothing malformed.
    assert tried(upstream) == ["db.example.com.", "only.example.com.", "only."]


async def test_e2e_a_long_host_search_path_is_cut_with_a_warning(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugin_log: Capture
) -> None:
    domains = [f"d{number}.example." for number in range(1, 9)]
    host = tmp_path / "resolv.conf"
    host.write_text("search " + " ".join(domains) + "\n")
    monkeypatch.setattr(kubernetes_plugin, "RESOLV_CONF", str(host))
    directory = write_manifests(tmp_path / "m", k8s_pod("prod", "client", POD))
    running, kubernetes = await start_k8s(start_server, directory, host_search=None)
    assert kubernetes.search == domains
    assert plugin_log.messages == [
        "the host resolv.conf has 8 search domains: autopath tries the cluster's 3 and the first 6"
    ]
    assert (await ask(running, "nothing.prod.svc.cluster.local")).rcode() == dns.rcode.NXDOMAIN
    assert running.server.config is not None
    upstream = running.server.config.blocks[0].find("searchpath")
    assert isinstance(upstream, SearchPath)
    # Past the cluster's 3 domains: the first 6 of the node's, and not the bare name.
    assert tried(upstream) == [f"nothing.{domain}" for domain in domains[:6]]
