"""The manifests source and the index it fills: changes become answers, bad files and bad
objects are logged and skipped, readiness and SERVFAIL before the first sync, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import dns.rcode
import pytest
import yaml

from plugins.kubernetes import manifests
from plugins.kubernetes.index import Index
from plugins.kubernetes.manifests import ManifestsSource, parse_file
from plugins.kubernetes.objects import TRIGGER_TIME_ANNOTATION
from plugins.kubernetes.settings import Settings
from plugins.ready import Ready
from tests.conftest import StartServer
from tests.helpers import Capture, Running, wait_for
from tests.test_kubernetes_records import (
    HTTP,
    REGISTRY,
    endpoint,
    endpoint_slice,
    external,
    namespace,
    plugin_of,
    pod,
    service,
    soa_of,
    texts,
)

T = "testns.svc.cluster.local."


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifests, "POLL_INTERVAL", 0.02)


@pytest.fixture
def captured() -> Iterator[Capture]:
    logger = logging.getLogger("plugin.kubernetes")
    capture = Capture()
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)


def dump(path: Path, *objects: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(objects))
    return path


def corefile(directory: Path, options: str = "", extra: str = "") -> str:
    return f"""\
.:0 {{
    bind 127.0.0.1
    {extra}
    kubernetes cluster.local in-addr.arpa {{
        manifests {directory}
        {options}
    }}
    whoami
}}
"""


async def start(start_server: StartServer, directory: Path, options: str = "", extra: str = "") -> Running:
    return await start_server(corefile(directory, options, extra), registry=REGISTRY)


async def addresses(running: Running, name: str) -> list[str]:
    return [line.split()[-1] for line in texts((await running.udp(name, "A")).answer)]


# -- changes become answers ------------------------------------------------------------------------


async def test_changes_to_the_files_become_answers(start_server: StartServer, tmp_path: Path) -> None:
    first = dump(tmp_path / "a.yaml", namespace("testns"), service("testns", "a", ["10.0.0.1"], HTTP))
    running = await start(start_server, tmp_path)
    index = plugin_of(running).index
    assert await addresses(running, f"a.{T}") == ["10.0.0.1"]
    assert (await running.udp(f"b.{T}", "A")).rcode() == dns.rcode.NXDOMAIN

    second = dump(tmp_path / "b.yml", service("testns", "b", ["10.0.0.2"], HTTP))  # a new file
    await wait_for(lambda: index.service("testns", "b") is not None)
    assert await addresses(running, f"b.{T}") == ["10.0.0.2"]

    dump(first, namespace("testns"), service("testns", "a", ["10.0.0.9"], HTTP, extra="grows the file"))
    await wait_for(lambda: index.service("testns", "a").ips == ("10.0.0.9",))  # type: ignore[union-attr]
    assert await addresses(running, f"a.{T}") == ["10.0.0.9"]
    assert "10.0.0.1" not in index.service_ips  # the old IP's PTR is gone too

    second.unlink()  # a file removed: its objects go
    await wait_for(lambda: index.service("testns", "b") is None)
    assert (await running.udp(f"b.{T}", "A")).rcode() == dns.rcode.NXDOMAIN


async def test_endpoints_and_pods_follow_the_files(start_server: StartServer, tmp_path: Path) -> None:
    objects = [
        namespace("testns"),
        service("testns", "h", ["None"], HTTP),
        endpoint_slice("testns", "h-1", "h", [endpoint("172.0.0.1"), endpoint("172.0.0.2", ready=False)], HTTP),
        pod("testns", "p", "10.1.0.1"),
    ]
    path = dump(tmp_path / "c.yaml", *objects)
    running = await start(start_server, tmp_path, "pods verified")
    index = plugin_of(running).index
    assert await addresses(running, f"h.{T}") == ["172.0.0.1"]
    assert index.pod_namespaces("10.1.0.1") == ["testns"]

    objects[2] = endpoint_slice("testns", "h-1", "h", [endpoint("172.0.0.1"), endpoint("172.0.0.2")], HTTP)
    objects[3] = pod("testns", "p", "10.1.0.1", phase="Succeeded")  # finished: no longer a client
    dump(path, *objects)
    await wait_for(lambda: not index.pod_namespaces("10.1.0.1"))
    assert sorted(await addresses(running, f"h.{T}")) == ["172.0.0.1", "172.0.0.2"]
    assert (await running.udp("10-1-0-1.testns.pod.cluster.local.", "A")).rcode() == dns.rcode.NXDOMAIN


async def test_malformed_yaml_keeps_the_previous_objects(
    start_server: StartServer, tmp_path: Path, captured: Capture
) -> None:
    path = dump(tmp_path / "a.yaml", namespace("testns"), service("testns", "a", ["10.0.0.1"], HTTP))
    running = await start(start_server, tmp_path)
    source = plugin_of(running)
    path.write_text("kind: Service\nmetadata: {name: a\n  broken: [\n")
    await wait_for(lambda: any("a.yaml" in message for message in captured.messages))
    [message] = [message for message in captured.messages if "a.yaml" in message]
    assert message.startswith(f"manifests: {path}: invalid YAML at line ")
    assert message.endswith("(keeping its previous objects)") and "\n" not in message
    assert await addresses(running, f"a.{T}") == ["10.0.0.1"]  # the last good version serves

    dump(path, namespace("testns"), service("testns", "a", ["10.0.0.3"], HTTP))
    await wait_for(lambda: source.index.service("testns", "a").ips == ("10.0.0.3",))  # type: ignore[union-attr]
    assert await addresses(running, f"a.{T}") == ["10.0.0.3"]


async def test_malformed_objects_are_logged_and_skipped(
    start_server: StartServer, tmp_path: Path, captured: Capture
) -> None:
    dump(
        tmp_path / "a.yaml",
        namespace("testns"),
        service("testns", "bad", ["not-an-ip"], HTTP),
        {"kind": "Service", "metadata": "nonsense"},
        {"kind": "EndpointSlice", "metadata": {"name": "orphan", "namespace": "testns"}},  # no service label
        {"kind": "Pod", "metadata": {"name": "p", "namespace": "testns"}, "status": {"podIP": 12}},
        service("testns", "good", ["10.0.0.1"], HTTP),
    )
    running = await start(start_server, tmp_path, "pods verified")
    assert await addresses(running, f"good.{T}") == ["10.0.0.1"]
    assert (await running.udp(f"bad.{T}", "A")).rcode() == dns.rcode.NXDOMAIN
    joined = "\n".join(captured.messages)
    assert "ignored malformed Service testns/bad: not an IP address: 'not-an-ip'" in joined
    assert "ignored malformed EndpointSlice testns/orphan: no kubernetes.io/service-name label" in joined
    assert "ignored malformed Pod testns/p" in joined


async def test_names_that_cannot_be_labels(start_server: StartServer, tmp_path: Path, captured: Capture) -> None:
    """Names that could not be packed into a reply are refused at the index (logged), or,
    for an endpoint's hostname, replaced by the dashed address."""
    long_host = endpoint("172.0.0.1", hostname="h" * 64)
    dump(
        tmp_path / "a.yaml",
        namespace("testns"),
        service("testns", "dotted.name", ["10.0.0.1"], HTTP),
        service("testns", "x" * 64, ["10.0.0.2"], HTTP),
        service("testns", "ext", None, type="ExternalName", externalName="bad name.example"),
        service("testns", "h", ["None"], HTTP),
        endpoint_slice("testns", "h-1", "h", [long_host], HTTP),
    )
    running = await start(start_server, tmp_path)
    assert plugin_of(running).index.counts()["Service"] == 1
    joined = "\n".join(captured.messages)
    assert "service name 'dotted.name' cannot be a DNS label" in joined
    assert "spec.externalName 'bad name.example' is not a host name" in joined
    reply = await running.udp(f"h.{T}", "SRV")
    assert texts(reply.answer) == [f"h.{T} 5 SRV 0 100 80 172-0-0-1.h.{T}"]


async def test_file_forms(start_server: StartServer, tmp_path: Path) -> None:
    """Multi-document YAML, kind: List, API lists whose items have no kind, JSON; other
    kinds, other suffixes, hidden files and subdirectories are ignored; namespaces named
    only by objects exist."""
    dump(tmp_path / "multi.yaml", service("ns1", "one", ["10.0.0.1"]), {"kind": "Deployment", "metadata": {}})
    dump(tmp_path / "list.yaml", {"apiVersion": "v1", "kind": "List", "items": [service("ns1", "two", ["10.0.0.2"])]})
    bare = service("ns1", "three", ["10.0.0.3"])
    del bare["kind"]
    dump(tmp_path / "api.yaml", {"kind": "ServiceList", "items": [bare]})
    (tmp_path / "four.json").write_text(json.dumps(service("ns1", "four", ["10.0.0.4"])))
    dump(tmp_path / "notes.txt", service("ns1", "txt", ["10.0.0.5"]))
    dump(tmp_path / ".hidden.yaml", service("ns1", "hidden", ["10.0.0.6"]))
    (tmp_path / "sub").mkdir()
    dump(tmp_path / "sub" / "deep.yaml", service("ns1", "deep", ["10.0.0.7"]))
    running = await start(start_server, tmp_path)
    for name, ip in (("one", "10.0.0.1"), ("two", "10.0.0.2"), ("three", "10.0.0.3"), ("four", "10.0.0.4")):
        assert await addresses(running, f"{name}.ns1.svc.cluster.local.") == [ip]
    for name in ("txt", "hidden", "deep"):
        assert (await running.udp(f"{name}.ns1.svc.cluster.local.", "A")).rcode() == dns.rcode.NXDOMAIN
    assert (await running.udp("ns1.svc.cluster.local.", "A")).rcode() == dns.rcode.NOERROR  # implicit namespace
    assert plugin_of(running).index.counts() == {"Namespace": 1, "Service": 4, "EndpointSlice": 0, "Pod": 0}


async def test_a_vanished_directory_keeps_the_objects(
    start_server: StartServer, tmp_path: Path, captured: Capture
) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    dump(directory / "a.yaml", service("ns1", "one", ["10.0.0.1"]))
    running = await start(start_server, directory)
    # Gone in one step: rmtree would empty it first, and a poll in between rightly reads
    # an empty directory (its objects removed), which is not what this test is about.
    directory.rename(tmp_path / "elsewhere")
    await wait_for(lambda: any("cannot be read" in message for message in captured.messages))
    assert await addresses(running, "one.ns1.svc.cluster.local.") == ["10.0.0.1"]


def test_a_directory_gone_during_a_scan_is_unreadable_not_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed away between listing it and reading its files: its files seem to vanish
    one by one, which must not read as an empty directory (that drops every object)."""
    directory = tmp_path / "m"
    directory.mkdir()
    dump(directory / "a.yaml", service("ns1", "one", ["10.0.0.1"]))
    real_stat = os.stat

    def stat_after_a_rename(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path).startswith(f"{directory}/") and directory.exists():
            directory.rename(tmp_path / "elsewhere")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_after_a_rename)
    assert manifests.scan(str(directory)) is None


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("a.yaml", "a: [1, 2\n", "invalid YAML at line 2 column 1: "),
        ("a.yaml", "a: b: c\n", "invalid YAML at line 1 column 5: mapping values are not allowed"),
        ("a.json", '{"kind": "Service",\n "x": }', "invalid JSON at line 2 column 7: Expecting value"),
        ("a.yaml", b"\xff\xfe bad".decode("latin-1"), None),
    ],
)
def test_parse_problems_are_one_line(tmp_path: Path, name: str, text: str, problem: str | None) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="latin-1" if problem is None else "utf-8")
    objects, found = parse_file(str(path))
    assert objects == []
    if problem is None:
        assert found is not None and found.startswith("cannot read:")
    else:  # the wording is libyaml's or PyYAML's: the place and the gist are ours
        assert found is not None and found.startswith(problem) and "\n" not in found


# -- before the first sync ------------------------------------------------------------------------


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Hold the manifests source before its first read: a source that has not synced."""
    opened = asyncio.Event()
    original = ManifestsSource.run

    async def gated(self: ManifestsSource) -> None:
        await opened.wait()
        await original(self)

    monkeypatch.setattr(ManifestsSource, "run", gated)
    return opened


async def test_servfail_and_not_ready_until_the_first_sync(
    start_server: StartServer, tmp_path: Path, gate: asyncio.Event, captured: Capture
) -> None:
    dump(tmp_path / "a.yaml", namespace("testns"), service("testns", "a", ["10.0.0.1"], HTTP))
    running = await start(start_server, tmp_path, "startup_timeout 50ms", extra="ready 127.0.0.1:0")
    kubernetes = plugin_of(running)
    assert "starting server with unsynced Kubernetes API (waited 0.05s)" in captured.messages
    ready = running.server.config.blocks[0].find("ready")  # type: ignore[union-attr]
    assert isinstance(ready, Ready) and ready.route is not None
    url = f"http://127.0.0.1:{ready.route.port}/ready"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 503 and await response.text() == "kubernetes"
        assert kubernetes.ready() is False

        for name in (f"a.{T}", f"b.{T}"):  # unknown yet: SERVFAIL (with the SOA), not NXDOMAIN
            reply = await running.udp(name, "A")
            assert reply.rcode() == dns.rcode.SERVFAIL and soa_of(reply)
        assert (await running.udp("svc.cluster.local.", "A")).rcode() == dns.rcode.NOERROR  # exists anyway

        gate.set()
        await wait_for(lambda: kubernetes.index.synced)
        async with session.get(url) as response:
            assert response.status == 200
    assert await addresses(running, f"a.{T}") == ["10.0.0.1"]
    assert (await running.udp(f"b.{T}", "A")).rcode() == dns.rcode.NXDOMAIN


async def test_a_directory_not_readable_at_first_is_not_synced(
    start_server: StartServer, tmp_path: Path, gate: asyncio.Event, captured: Capture
) -> None:
    """The directory existed at setup but is gone at the first read (a ConfigMap not
    mounted yet): SERVFAIL and 503 until it can be read, not NXDOMAIN for everything."""
    directory = tmp_path / "m"
    directory.mkdir()
    running = await start(start_server, directory, "startup_timeout 0", extra="ready 127.0.0.1:0")
    kubernetes = plugin_of(running)
    directory.rmdir()
    gate.set()
    await wait_for(lambda: any("cannot be read" in message for message in captured.messages))
    assert not kubernetes.index.synced and not kubernetes.ready()
    ready = running.server.config.blocks[0].find("ready")  # type: ignore[union-attr]
    assert isinstance(ready, Ready) and ready.route is not None
    url = f"http://127.0.0.1:{ready.route.port}/ready"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 503
    assert (await running.udp(f"a.{T}", "A")).rcode() == dns.rcode.SERVFAIL
    directory.mkdir()
    dump(directory / "a.yaml", service("testns", "a", ["10.0.0.1"], HTTP))
    await wait_for(lambda: kubernetes.index.synced)
    assert await addresses(running, f"a.{T}") == ["10.0.0.1"]
    assert (await running.udp(f"b.{T}", "A")).rcode() == dns.rcode.NXDOMAIN


async def test_fallthrough_applies_before_the_first_sync(
    start_server: StartServer, tmp_path: Path, gate: asyncio.Event
) -> None:
    running = await start(start_server, tmp_path, "startup_timeout 0\n        fallthrough")
    reply = await running.udp(f"a.{T}", "A")
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer  # whoami answered
    gate.set()


async def test_start_waits_for_the_first_sync(start_server: StartServer, tmp_path: Path) -> None:
    dump(tmp_path / "a.yaml", service("ns1", "one", ["10.0.0.1"]))
    running = await start(start_server, tmp_path)
    assert plugin_of(running).index.synced  # no waiting needed: start() waited


async def test_a_reload_starts_a_new_index_and_stops_the_old_source(start_server: StartServer, tmp_path: Path) -> None:
    dump(tmp_path / "a.yaml", service("ns1", "one", ["10.0.0.1"]))
    running = await start(start_server, tmp_path)
    old = plugin_of(running)
    await running.reconfigure(corefile(tmp_path, "ttl 42"))
    new = plugin_of(running)
    assert new is not old and new.index.synced
    assert texts((await running.udp("one.ns1.svc.cluster.local.", "A")).answer) == [
        "one.ns1.svc.cluster.local. 42 A 10.0.0.1"
    ]
    await wait_for(lambda: old._task is None)  # stopped once its queries were answered


# -- metrics ---------------------------------------------------------------------------------------


async def test_object_counts_and_programming_latency(start_server: StartServer, tmp_path: Path) -> None:
    dump(
        tmp_path / "a.yaml",
        namespace("testns"),
        service("testns", "a", ["10.0.0.1"], HTTP),
        service("testns", "h", ["None"], HTTP),
        endpoint_slice("testns", "a-1", "a", [endpoint("172.0.0.1")], HTTP),
        pod("testns", "p", "10.1.0.1"),
    )
    running = await start(start_server, tmp_path, "pods verified")
    metrics = running.server.runtime.metrics
    gauge = metrics["coredns_kubernetes_objects"]
    assert gauge.current() == {("Namespace",): 1, ("Service",): 2, ("EndpointSlice",): 1, ("Pod",): 1}  # type: ignore[union-attr]
    text = metrics.render().decode()
    assert 'coredns_kubernetes_objects{kind="Service"} 2.0' in text

    histogram = metrics["coredns_kubernetes_dns_programming_duration_seconds"]
    assert histogram.count(("cluster_ip",)) == 0  # type: ignore[union-attr]  # the initial list says nothing
    index = plugin_of(running).index
    changed = endpoint_slice("testns", "a-1", "a", [endpoint("172.0.0.2")], HTTP)
    when = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    changed["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: when}
    index.apply("EndpointSlice", "MODIFIED", changed)  # a watch event after the sync
    assert histogram.count(("cluster_ip",)) == 1  # type: ignore[union-attr]
    headless = endpoint_slice("testns", "h-1", "h", [endpoint("172.0.0.3")], HTTP)
    headless["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: when}
    index.apply("EndpointSlice", "ADDED", headless)
    assert histogram.count(("headless_with_selector",)) == 1  # type: ignore[union-attr]
    assert 'coredns_kubernetes_dns_programming_duration_seconds_bucket{le="4.096",service_kind="cluster_ip"} 1.0' in (
        metrics.render().decode()
    )
    await plugin_of(running).stop()
    assert gauge.current() == {}  # type: ignore[union-attr]  # a stopped plugin reports nothing


async def test_object_counts_of_several_blocks_add_up(start_server: StartServer, tmp_path: Path) -> None:
    """Two server blocks, each with its own kubernetes (and index): the gauge is their sum;
    after a reload, the new configuration's alone (the old one is not counted twice)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    dump(one / "a.yaml", service("ns1", "a", ["10.0.0.1"]), service("ns1", "b", ["10.0.0.2"]))
    dump(two / "a.yaml", service("ns2", "c", ["10.0.0.3"]))

    def text(ttl: int) -> str:
        return "".join(
            f"{zone}:0 {{\n bind 127.0.0.1\n kubernetes {zone} {{\n  manifests {directory}\n  ttl {ttl}\n }}\n}}\n"
            for zone, directory in (("one.local", one), ("two.local", two))
        )

    running = await start_server(text(5), registry=REGISTRY)
    gauge = running.server.runtime.metrics["coredns_kubernetes_objects"]
    assert gauge.current() == {("Namespace",): 2, ("Service",): 3, ("EndpointSlice",): 0, ("Pod",): 0}  # type: ignore[union-attr]
    await running.reconfigure(text(6))
    assert gauge.current()[("Service",)] == 3  # type: ignore[union-attr]
    assert texts((await running.udp("c.ns2.svc.two.local.", "A")).answer) == ["c.ns2.svc.two.local. 6 A 10.0.0.3"]


def test_manifests_with_api_settings_warns(tmp_path: Path, captured: Capture) -> None:
    from resolver.config import load

    text = f"cluster.local:0 {{\n kubernetes {{\n  endpoint https://10.0.0.1:6443\n  manifests {tmp_path}\n }}\n}}\n"
    load(text, "Corefile", REGISTRY, default_port=0)
    assert captured.messages == ["Corefile:2: kubernetes: manifests is set: endpoint, tls and kubeconfig are not used"]


# -- the index on its own ---------------------------------------------------------------------------


def test_a_relist_removes_what_it_did_not_name() -> None:
    index = Index(Settings(zones=["cluster.local."], pods="verified"))
    index.begin_list("Service")
    index.apply("Service", "ADDED", service("ns", "a", ["10.0.0.1"]))
    index.apply("Service", "ADDED", service("ns", "b", ["10.0.0.2"]))
    index.end_list("Service")
    index.mark_synced()
    index.apply("Service", "ADDED", service("ns", "c", ["10.0.0.3"]))  # a watch event
    index.begin_list("Service")  # relist after 410 Gone: b was deleted meanwhile
    index.apply("Service", "ADDED", service("ns", "a", ["10.0.0.1"]))
    index.apply("Service", "ADDED", service("ns", "c", ["10.0.0.3"]))
    index.end_list("Service")
    assert sorted(index.services) == [("ns", "a"), ("ns", "c")]
    assert sorted(index.service_ips) == ["10.0.0.1", "10.0.0.3"]
    index.apply("Service", "DELETED", service("ns", "a", ["10.0.0.1"]))
    assert sorted(index.services) == [("ns", "c")]
    assert index.counts()["Service"] == 1


def test_slices_pods_and_namespaces_relist() -> None:
    index = Index(Settings(zones=["cluster.local."], pods="verified"))
    for kind, objects in (
        ("Namespace", [namespace("a"), namespace("b")]),
        ("EndpointSlice", [endpoint_slice("a", "s1", "svc", [endpoint("10.1.0.1")])]),
        ("Pod", [pod("a", "p1", "10.2.0.1"), pod("b", "p2", "10.2.0.2")]),
    ):
        index.begin_list(kind)
        for obj in objects:
            index.apply(kind, "ADDED", obj)
        index.end_list(kind)
    for kind in ("Namespace", "EndpointSlice", "Pod"):
        index.begin_list(kind)
        index.end_list(kind)
    assert index.counts() == {"Namespace": 0, "Service": 0, "EndpointSlice": 0, "Pod": 0}
    assert not index.endpoint_ips and not index.pod_ips and not index.service_slices


def test_pods_only_running_and_shared_addresses() -> None:
    index = Index(Settings(zones=["cluster.local."], pods="verified"))
    index.apply("Pod", "ADDED", pod("a", "pending", "10.0.0.1", phase="Pending"))
    assert index.pod_namespaces("10.0.0.1") == []
    index.apply("Pod", "MODIFIED", pod("a", "pending", "10.0.0.1"))
    assert index.pod_namespaces("10.0.0.1") == ["a"]
    index.apply("Pod", "ADDED", pod("b", "host-network", "10.0.0.1"))  # same IP (host network)
    assert index.pod_namespaces("10.0.0.1") == ["a", "b"]
    index.apply("Pod", "MODIFIED", pod("a", "pending", "10.0.0.1", phase="Succeeded"))
    assert index.pod_namespaces("10.0.0.1") == ["b"]
    terminating = pod("b", "host-network", "10.0.0.1")
    terminating["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    index.apply("Pod", "MODIFIED", terminating)
    assert index.pod_namespaces("10.0.0.1") == [] and index.counts()["Pod"] == 0
    dual = pod("c", "dual", "10.0.0.5")
    dual["status"]["podIPs"] = [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]
    index.apply("Pod", "ADDED", dual)
    assert index.pod_namespaces("fd00::5") == ["c"] and index.pod_namespaces("10.0.0.5") == ["c"]
    index.apply("Pod", "DELETED", dual)
    assert not index.pod_ips


def test_pods_are_not_kept_unless_needed() -> None:
    index = Index(Settings(zones=["cluster.local."]))  # pods disabled, no autopath
    index.apply("Pod", "ADDED", pod("a", "p", "10.0.0.1"))
    assert index.counts()["Pod"] == 0
    local = Index(Settings(zones=["cluster.local."], pods="local", pods_node="node-1"))
    local.apply("Pod", "ADDED", pod("a", "here", "10.0.0.1", node="node-1"))
    local.apply("Pod", "ADDED", pod("a", "there", "10.0.0.2", node="node-2"))
    assert local.pod_namespaces("10.0.0.1") == ["a"] and local.pod_namespaces("10.0.0.2") == []


def held_at(index: Index, ip: str) -> list[tuple[str, bool]]:
    return sorted((piece.name, found.ready) for piece, found in index.endpoints_at(ip))


def test_an_endpoint_moving_between_slices_stays_findable() -> None:
    index = Index(Settings(zones=["cluster.local."]))
    index.apply("EndpointSlice", "ADDED", endpoint_slice("ns", "s1", "svc", [endpoint("10.0.0.1")]))
    index.apply("EndpointSlice", "ADDED", endpoint_slice("ns", "s2", "svc", [endpoint("10.0.0.1")]))
    index.apply("EndpointSlice", "DELETED", endpoint_slice("ns", "s2", "svc", []))
    assert held_at(index, "10.0.0.1") == [("s1", True)]
    index.apply("EndpointSlice", "DELETED", endpoint_slice("ns", "s1", "svc", []))
    assert held_at(index, "10.0.0.1") == [] and not index.service_slices and not index.endpoint_ips


def test_an_address_behind_several_services_is_held_for_each() -> None:
    """A pod behind two Services is in a slice of each; deleting one leaves the other
    (whatever order they came in), and a not-ready copy never hides a ready one."""
    index = Index(Settings(zones=["cluster.local."]))
    a = endpoint_slice("ns", "a-1", "a", [endpoint("10.1.0.1")])
    b = endpoint_slice("ns", "b-1", "b", [endpoint("10.1.0.1")])
    c = endpoint_slice("ns", "c-1", "c", [endpoint("10.1.0.1", ready=False), endpoint("10.1.0.2")])
    for piece in (a, b, c):
        index.apply("EndpointSlice", "ADDED", piece)
    assert held_at(index, "10.1.0.1") == [("a-1", True), ("b-1", True), ("c-1", False)]
    index.apply("EndpointSlice", "DELETED", b)  # the last one holding it with a ready copy
    assert held_at(index, "10.1.0.1") == [("a-1", True), ("c-1", False)]
    index.apply("EndpointSlice", "MODIFIED", endpoint_slice("ns", "c-1", "c", [endpoint("10.1.0.2")]))
    assert held_at(index, "10.1.0.1") == [("a-1", True)] and held_at(index, "10.1.0.2") == [("c-1", True)]
    index.apply("EndpointSlice", "DELETED", a)
    index.apply("EndpointSlice", "DELETED", c)
    assert not index.endpoint_ips


def test_services_sharing_a_cluster_ip() -> None:
    """Two Services may hold one cluster IP for a while (an IP reused as its old Service
    goes): removing either leaves the other's PTR; so does a change of type."""
    index = Index(Settings(zones=["cluster.local."]))
    index.apply("Service", "ADDED", service("ns", "x", ["10.0.0.1"]))
    index.apply("Service", "ADDED", service("ns", "y", ["10.0.0.1", "fd00::1"]))
    assert [held.name for held in index.services_at("10.0.0.1")] == ["x", "y"]
    index.apply("Service", "DELETED", service("ns", "y", ["10.0.0.1"]))
    assert [held.name for held in index.services_at("10.0.0.1")] == ["x"]
    assert list(index.service_ips) == ["10.0.0.1"]
    index.apply("Service", "ADDED", service("ns", "y", ["10.0.0.1"]))
    index.apply("Service", "MODIFIED", service("ns", "x", ["None"]))  # ClusterIP -> headless
    assert [held.name for held in index.services_at("10.0.0.1")] == ["y"]
    index.apply("Service", "MODIFIED", external("ns", "y", "example.org"))  # -> ExternalName
    assert index.services_at("10.0.0.1") == () and not index.service_ips
    index.apply("Service", "MODIFIED", service("ns", "y", ["10.0.0.2"]))  # and back
    assert [held.name for held in index.services_at("10.0.0.2")] == ["y"]


BROKEN = {
    "Service": {"metadata": {"name": "x", "namespace": "ns"}, "spec": {"clusterIP": "garbage"}},
    "EndpointSlice": {"metadata": {"name": "s", "namespace": "ns"}, "endpoints": [{"addresses": ["10.1.0.1"]}]},
    "Pod": {"metadata": {"name": "p", "namespace": "ns"}, "status": {"phase": "Running", "podIP": "bad"}},
}


@pytest.mark.parametrize("event", ["MODIFIED", "DELETED", "ADDED"])
@pytest.mark.parametrize("kind", list(BROKEN))
def test_an_object_that_turns_malformed_is_dropped(kind: str, event: str, captured: Capture) -> None:
    """An event whose body no longer converts still names the object: what was held under
    that name goes (logged), as a relist would drop it, instead of staying served."""
    index = Index(Settings(zones=["cluster.local."], pods="verified"))
    index.apply("Service", "ADDED", service("ns", "x", ["10.0.0.1"]))
    index.apply("EndpointSlice", "ADDED", endpoint_slice("ns", "s", "x", [endpoint("10.1.0.1")]))
    index.apply("Pod", "ADDED", pod("ns", "p", "10.2.0.1"))
    index.apply(kind, event, BROKEN[kind])
    assert {other: count for other, count in index.counts().items() if other in BROKEN} == {
        other: int(other != kind) for other in BROKEN
    }
    ips = {"Service": index.service_ips, "EndpointSlice": index.endpoint_ips, "Pod": index.pod_ips}
    assert [kind for kind, table in ips.items() if not table] == [kind]  # its PTR/client entry too
    if event != "DELETED":  # a DELETED needs no body: nothing to complain about
        assert any(f"ignored malformed {kind}" in message for message in captured.messages)


def test_an_external_name_turning_invalid_stops_being_answered() -> None:
    index = Index(Settings(zones=["cluster.local."]))
    index.apply("Service", "ADDED", service("ns", "x", ["10.0.0.1"]))
    index.apply("Service", "MODIFIED", external("ns", "x", "not a host name"))
    assert index.service("ns", "x") is None and not index.service_ips


class CountingEndpoints(tuple):  # type: ignore[type-arg]
    """An endpoints tuple that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Iterator[Any]:
        CountingEndpoints.walks += 1
        return super().__iter__()


def test_a_relist_of_a_big_service_walks_each_slice_once() -> None:
    """A relist (410 Gone) of a Service of many slices re-applies every slice: each one
    replaced must cost its own endpoints, not a walk of all the others (quadratic: seconds
    of a blocked event loop at 10k endpoints). Counted in walks of the old slices'
    endpoint lists, so no timing is involved."""
    index = Index(Settings(zones=["cluster.local."]))
    slices = [
        endpoint_slice("ns", f"big-{n}", "big", [endpoint(f"10.{n}.0.{i}") for i in range(1, 21)], HTTP)
        for n in range(40)
    ]
    index.begin_list("EndpointSlice")
    for piece in slices:
        index.apply("EndpointSlice", "ADDED", piece)
    index.end_list("EndpointSlice")
    for held in index.slices.values():
        held.endpoints = CountingEndpoints(held.endpoints)
    CountingEndpoints.walks = 0
    index.begin_list("EndpointSlice")
    for piece in slices:
        index.apply("EndpointSlice", "ADDED", piece)
    index.end_list("EndpointSlice")
    assert CountingEndpoints.walks == len(slices)  # each old slice once, when replaced
    assert len(index.service_slices[("ns", "big")]) == 40 and len(index.endpoint_ips) == 800
    assert held_at(index, "10.39.0.20") == [("big-39", True)]
    for held in index.slices.values():
        held.endpoints = CountingEndpoints(held.endpoints)
    CountingEndpoints.walks = 0
    index.apply("EndpointSlice", "MODIFIED", slices[0])  # one slice changed: the others untouched
    assert CountingEndpoints.walks == 1


def test_the_dns_service_follows_the_filters_but_names_the_server() -> None:
    """kube-system/kube-dns gives ns.dns.<zone> its address whatever the filters say, but
    is answered by name (and PTR) only when they want it."""
    index = Index(Settings(zones=["cluster.local."], labels="dns=yes"))
    index.begin_list("Service")
    index.apply("Service", "ADDED", service("kube-system", "kube-dns", ["10.0.0.10"]))
    index.end_list("Service")
    assert index.dns_service is not None and index.dns_service.ips == ("10.0.0.10",)
    assert index.service("kube-system", "kube-dns") is None and not index.service_ips
    index.begin_list("Service")  # a relist without it: gone
    index.end_list("Service")
    assert index.dns_service is None
    index.apply("Service", "ADDED", service("kube-system", "kube-dns", ["10.0.0.10"]))
    index.apply("Service", "DELETED", service("kube-system", "kube-dns", ["10.0.0.10"]))
    assert index.dns_service is None


@pytest.mark.parametrize(
    "obj",
    [
        None,
        "text",
        [],
        {},
        {"metadata": None},
        {"metadata": {"name": 5}},
        {"metadata": {"name": "x", "namespace": []}},
        {"metadata": {"name": "x"}, "spec": "nope"},
        {"metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}},
        {"metadata": {"name": "x"}, "spec": {"ports": [{"port": 70000}]}},
        {"metadata": {"name": "x"}, "spec": {"clusterIPs": "10.0.0.1"}},
        {"metadata": {"name": "x"}, "spec": {"type": "ExternalName"}},
        {"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "s"}}, "endpoints": [{"addresses": [1]}]},
        {"metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "s"}}, "endpoints": "x"},
        {"metadata": {"name": "x"}, "status": {"podIPs": [{"ip": "bad"}], "phase": "Running"}},
    ],
)
def test_malformed_objects_never_raise(obj: Any) -> None:
    index = Index(Settings(zones=["cluster.local."], pods="verified"))
    for kind in ("Namespace", "Service", "EndpointSlice", "Pod"):
        for event in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            index.apply(kind, event, obj)
    index.apply("Unknown", "ADDED", {"metadata": {"name": "x"}})
    assert index.counts()["Service"] == 0 and index.counts()["Pod"] == 0


def test_malformed_objects_are_logged_a_few_times_only(captured: Capture) -> None:
    index = Index()
    for number in range(50):
        index.apply("Service", "ADDED", {"metadata": {"name": f"s{number}"}, "spec": {"clusterIP": "x"}})
    assert 5 <= len(captured.messages) <= 6


def test_scale_of_the_index_stays_compact() -> None:
    """A guard on per-object size (tracemalloc): Services with their EndpointSlices and
    Pods, all indexes included, stay well under a kilobyte per object."""
    import tracemalloc

    tracemalloc.start()
    index = Index(Settings(zones=["cluster.local."], pods="verified"))
    for number in range(2000):
        index.apply("Service", "ADDED", service("ns", f"svc-{number}", [f"10.96.{number // 250}.{number % 250}"], HTTP))
        ips = [f"10.{100 + number // 250}.{number % 250}.{i}" for i in range(3)]
        piece = endpoint_slice("ns", f"svc-{number}-x", f"svc-{number}", [endpoint(ip) for ip in ips], HTTP)
        index.apply("EndpointSlice", "ADDED", piece)
    for number in range(5000):
        index.apply("Pod", "ADDED", pod("ns", f"pod-{number}", f"10.{200 + number // 250}.{number % 250}.1"))
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert index.counts() == {"Namespace": 0, "Service": 2000, "EndpointSlice": 2000, "Pod": 5000}
    per_object = current / 9000
    assert per_object < 1000, per_object  # bytes per object, all indexes included
