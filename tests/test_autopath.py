"""autopath over real sockets: the search-path walk, its reply shape, and the cache in front.

The client is 127.0.0.1 (a pod of namespace ``default`` in the ``searchpath`` stand-in
for kubernetes) or 127.0.0.2 (no pod), both loopback, by binding the client socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from plugins.kubernetes import manifests
from plugins.kubernetes.plugin import Kubernetes
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Capture, Running, wait_for
from tests.testplugins.autopath import AutoPath
from tests.testplugins.prometheus import Prometheus
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


async def ask(running: Running, name: str, rdtype: str = "A", client: str = POD) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, LOOPBACK, port=running.port, source=client, timeout=3)


def answer_text(reply: dns.message.Message) -> list[str]:
    return [line for rrset in reply.answer for line in rrset.to_text().splitlines()]


def tried(table: SearchPath) -> list[str]:
    return [name for name, _type, _client in table.asked]


# -- the walk and the reply's shape ---------------------------------------------------------


async def test_a_short_name_found_in_a_later_domain_comes_back_as_a_cname_to_it(start_server: StartServer) -> None:
    running, table = await start(start_server)
    reply = await ask(running, "db.default.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].to_text() == "db.default.svc.cluster.local. IN A"
    # CoreDNS's shape: the CNAME first (TTL of the record it points at), then the records.
    assert answer_text(reply) == [
        "db.default.svc.cluster.local. 30 IN CNAME db.example.com.",
        "db.example.com. 30 IN A 192.0.2.9",
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
        "google.com.default.svc.cluster.local. 60 IN CNAME google.com.",
        "google.com. 60 IN A 192.0.2.60",
    ]
    assert tried(table)[-2:] == ["google.com.example.com.", "google.com."]
    assert len(tried(table)) == len(SEARCH)


async def test_a_found_cname_chain_is_kept_behind_the_new_cname(start_server: StartServer) -> None:
    running, _table = await start(start_server)
    reply = await ask(running, "alias.default.svc.cluster.local")
    assert answer_text(reply) == [
        "alias.default.svc.cluster.local. 40 IN CNAME alias.example.com.",
        "alias.example.com. 40 IN CNAME target.example.net.",
        "target.example.net. 50 IN A 192.0.2.50",
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
    assert reply.answer[0].to_text() == "Db.DEFAULT.svc.Cluster.local. 30 IN CNAME db.example.com."


@pytest.mark.parametrize(
    ("name", "client"),
    [
        ("db.other.svc.cluster.local", POD),  # another namespace's domain: not this pod's first
        ("db.default.svc.cluster.local", OTHER),  # not a pod: no search path
        ("www.example.org", POD),  # outside the provider's zones: no search path
        ("default.svc.cluster.local", POD),  # the first domain itself: nothing to expand
        ("db.svc.cluster.local", POD),  # a later domain, not the first
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
    assert answer_text(reply)[0] == "db.default.svc.cluster.local. 30 IN CNAME db.example.com."
    assert reply.edns == 0  # the client's EDNS went down the walk and came back


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
    assert tried(table) == []  # both from the cache, each its own
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
    assert answer_text(pod_a)[0] == "db.default.svc.cluster.local. 30 IN CNAME db.example.com."
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
    assert answer_text(pod_aaaa)[-1] == "v6only.example.com. 30 IN AAAA 2001:db8::9"


async def test_an_answer_of_the_first_domain_is_shared(start_server: StartServer) -> None:
    """The asked name's own answer is what every client gets: the cache may share it."""
    running, table = await start(start_server, WITH_CACHE)
    await ask(running, "web.default.svc.cluster.local", client=POD)
    table.asked.clear()
    other = await ask(running, "web.default.svc.cluster.local", client=OTHER)
    assert tried(table) == []
    assert answer_text(other) == ["web.default.svc.cluster.local. 5 IN A 10.96.0.10"]


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
    log_line = 'log . "{remote} {name} {rcode} {/autopath/name} [{/autopath/search}]"'
    running, _table = await start(start_server, corefile(log_line, "autopath @searchpath", "searchpath"))
    await ask(running, "db.default.svc.cluster.local")
    await ask(running, "nothing.default.svc.cluster.local")
    await ask(running, "web.default.svc.cluster.local", client=OTHER)
    search = " ".join(domain or "." for domain in SEARCH)
    assert log_lines.messages == [
        f"127.0.0.1 db.default.svc.cluster.local. NOERROR db.example.com. [{search}]",
        f"127.0.0.1 nothing.default.svc.cluster.local. NXDOMAIN - [{search}]",
        "127.0.0.2 web.default.svc.cluster.local. NOERROR - [-]",
    ]


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
    running, _table = await start(
        start_server, corefile("prometheus 127.0.0.1:0", "autopath @searchpath", "searchpath")
    )
    await ask(running, "db.default.svc.cluster.local")
    await ask(running, "api.default.svc.cluster.local")
    await ask(running, "web.default.svc.cluster.local")
    await ask(running, "nothing.default.svc.cluster.local")
    await ask(running, "db.default.svc.cluster.local", client=OTHER)  # no walk
    samples = await scrape(running)
    server = frozenset({("server", "dns://127.0.0.1:0")})

    def answers(search: str) -> float | None:
        return samples.get(("corefile_resolver_autopath_answers_total", server | {("search", search)}))

    # CoreDNS counts every walk that found an answer, the asked name's own included.
    assert samples[("coredns_autopath_success_total", server)] == 3
    assert answers("example.com.") == 1
    assert answers("svc.cluster.local.") == 1
    assert answers("first") == 1
    assert answers("none") == 1


# -- end to end with the real kubernetes plugin (manifests) -----------------------------------

K8S_REGISTRY = Registry(("bind", "cache", "autopath", "kubernetes", "searchpath"), "tests.testplugins")


def k8s_object(kind: str, namespace: str | None, name: str, **fields: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    api = "v1"
    return {"apiVersion": api, "kind": kind, "metadata": metadata, **fields}


def k8s_pod(namespace: str, name: str, ip: str, phase: str = "Running") -> dict[str, Any]:
    status = {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}
    return k8s_object("Pod", namespace, name, spec={"nodeName": "node-1"}, status=status)


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


def k8s_corefile(directory: Path, cache: bool = False) -> str:
    """kubernetes with pods disabled: autopath must make it watch pods anyway. searchpath
    after it stands in for forward (names outside cluster.local)."""
    return corefile(
        "cache" if cache else "",
        "autopath @kubernetes",
        f"kubernetes cluster.local {{\n        manifests {directory}\n    }}",
        "searchpath",
    )


async def start_k8s(start_server: StartServer, directory: Path, cache: bool = False) -> tuple[Running, Kubernetes]:
    running = await start_server(k8s_corefile(directory, cache), registry=K8S_REGISTRY)
    assert running.server.config is not None
    block = running.server.config.blocks[0]
    kubernetes, upstream = block.find("kubernetes"), block.find("searchpath")
    assert isinstance(kubernetes, Kubernetes) and isinstance(upstream, SearchPath)
    kubernetes.search = ["example.com."]  # the node's resolv.conf search domains, fixed for the test
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
    assert answer_text(reply)[0] == "db.prod.svc.cluster.local. 30 IN CNAME db.example.com."
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
        assert answer_text(pod_a)[0] == f"{name}. 5 IN CNAME web.data.svc.cluster.local."
        assert pod_aaaa.rcode() == dns.rcode.NOERROR  # NODATA: the Service has no IPv6
        assert (await ask(running, name, "AAAA", client=OTHER)).rcode() == dns.rcode.NXDOMAIN
