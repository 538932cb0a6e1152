"""The kubernetes plugin's API source, with the real kubernetes-asyncio client against the
fake API server of ``tests/kubeapi.py`` (over HTTP on 127.0.0.1).

The first part runs the source directly into an ``Index`` and looks at the index and at the
requests the server saw: paginated lists, watch events, resume points, 410 relists,
failures and backoff, selectors, client configuration (kubeconfig, endpoint, TLS,
in-cluster). The second part runs whole servers and asks DNS questions over UDP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import json
import logging
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.flags
import dns.message
import dns.rcode
import pytest
import trustme
import yaml

from plugins.kubernetes import api as kapi
from plugins.kubernetes.index import Index
from plugins.kubernetes.settings import Settings
from resolver.metrics import Metrics
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Capture, Running, ipv6_loopback, wait_for
from tests.kubeapi import FakeKubeAPI, endpointslice, namespace, pod, service, status

ZONE = "cluster.local."
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
PODS = "/api/v1/pods"
NAMESPACES = "/api/v1/namespaces"


class RecordingIndex(Index):
    """The real index, remembering the calls a source made (in order)."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)
        self.calls: list[tuple[str, ...]] = []

    def begin_list(self, kind: str) -> None:
        self.calls.append(("begin_list", kind))
        super().begin_list(kind)

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        self.calls.append(("apply", kind, event, str(obj.get("metadata", {}).get("name"))))
        super().apply(kind, event, obj)

    def end_list(self, kind: str) -> None:
        self.calls.append(("end_list", kind))
        super().end_list(kind)

    def mark_synced(self) -> None:
        self.calls.append(("mark_synced",))
        super().mark_synced()

    def events(self, kind: str) -> list[tuple[str, str]]:
        return [(call[2], call[3]) for call in self.calls if call[0] == "apply" and call[1] == kind]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries within tens of milliseconds, so failure tests finish quickly."""
    monkeypatch.setattr(kapi, "BACKOFF_INITIAL", 0.02)
    monkeypatch.setattr(kapi, "BACKOFF_MAX", 0.2)


@pytest.fixture(params=["returned", "raised"])
def client_errors(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways kubernetes-asyncio reports an error status to a caller that does not preload
    the body: releases up to 36 return the response ("returned"); later ones raise
    ApiException before returning ("raised", emulated here by wrapping its REST call)."""
    if request.param == "raised":
        from kubernetes_asyncio.client import rest

        plain = rest.RESTClientObject.request

        async def raising(self: Any, *args: Any, **kwargs: Any) -> Any:
            response = await plain(self, *args, **kwargs)
            if isinstance(response, aiohttp.ClientResponse) and not 200 <= response.status <= 299:
                body = await response.read()
                raise rest.ApiException(http_resp=rest.RESTResponse(response, body))
            return response

        monkeypatch.setattr(rest.RESTClientObject, "request", raising)
    return str(request.param)


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as server:
        yield server


class Sources:
    """Runs sources as tasks and cancels them at the end of the test."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def run(
        self, settings: Settings, index: Index | None = None, corefile_dir: str = "/"
    ) -> tuple[kapi.ApiSource, RecordingIndex]:
        index = index if index is not None else RecordingIndex(settings)
        assert isinstance(index, RecordingIndex)
        source = kapi.api_source(settings, index, Metrics(), corefile_dir)
        self.tasks.append(asyncio.create_task(source.run()))
        return source, index

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def sources() -> AsyncIterator[Sources]:
    running = Sources()
    yield running
    await running.close()


def settings_for(server: FakeKubeAPI, **options: Any) -> Settings:
    return Settings(zones=[ZONE], endpoint=server.url, **options)


async def synced(index: Index, timeout: float = 10.0) -> None:
    await wait_for(lambda: index.synced, timeout)


def names(index: Index) -> set[str]:
    return {f"{namespace}/{name}" for namespace, name in index.services}


# -- lists and watches -------------------------------------------------------------------------


async def test_initial_sync_lists_every_kind_from_the_watch_cache(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), namespace("other"))
    fake.add(*(service(f"svc-{i:04d}", "default", f"10.0.{i // 200}.{i % 200 + 1}") for i in range(1203)))
    fake.add(endpointslice("svc-0000-abc", "default", "svc-0000", [{"ip": "10.1.0.1"}]))
    _, index = sources.run(settings_for(fake))
    await synced(index)
    assert index.counts() == {"Namespace": 2, "Service": 1203, "EndpointSlice": 1, "Pod": 0}
    # client-go's first list: resourceVersion=0 (the watch cache, not a quorum read of etcd),
    # with a limit the cache ignores: one response.
    (listed,) = fake.lists(SERVICES)
    assert listed.query == {"resourceVersion": "0", "limit": "500"}
    assert not fake.lists(PODS) and not fake.watches(PODS)  # pods: only when asked for
    # Each kind: begin_list, its objects, end_list; mark_synced once all kinds are listed.
    synced_at = index.calls.index(("mark_synced",))
    for kind in ("Namespace", "Service", "EndpointSlice"):
        assert index.calls.index(("begin_list", kind)) < index.calls.index(("end_list", kind)) < synced_at
    # Then each kind watches from its list's resourceVersion, with bookmarks.
    await wait_for(lambda: fake.open_watches() == 3)
    for path in (SERVICES, SLICES, NAMESPACES):
        (watch,) = fake.watches(path)
        assert watch.query["resourceVersion"] == str(fake.rv)
        assert watch.query["allowWatchBookmarks"].lower() == "true"
        assert int(watch.query["timeoutSeconds"]) >= 300


async def test_a_server_without_a_watch_cache_pages_every_list(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.watch_cache = False
    fake.add(
        namespace("default"),
        *(service(f"svc-{i:04d}", "default", f"10.0.{i // 200}.{i % 200 + 1}") for i in range(1203)),
    )
    source, index = sources.run(settings_for(fake))
    await synced(index)
    assert index.counts()["Service"] == 1203
    pages = fake.lists(SERVICES)
    assert [page.query.get("limit") for page in pages] == ["500", "500", "500"]
    assert pages[0].query.get("resourceVersion") == "0"
    # Continue pages carry no resourceVersion (the token holds it; the server refuses both).
    assert all("continue" in page.query and "resourceVersion" not in page.query for page in pages[1:])
    # A relist pages too (an unpaged read at a version would be one huge read of etcd).
    await wait_for(lambda: fake.open_watches() == 3, 10)
    fake.gone(1, path=SERVICES)
    fake.drop_watches()
    await wait_for(lambda: len(fake.lists(SERVICES)) == 6, 10)
    assert [page.query.get("limit") for page in fake.lists(SERVICES)[3:]] == ["500", "500", "500"]
    assert source.relists.get(("Service",)) == 1


async def test_a_relist_asks_for_the_last_version_seen(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3, 10)
    fake.add(service("api", "default", "10.0.0.2"))
    await wait_for(lambda: "default/api" in names(index), 10)
    seen = fake.rv
    fake.add(namespace("other"))  # the server moves on; the Services watch does not see it
    fake.gone(1, path=SERVICES)
    fake.drop_watches()
    await wait_for(lambda: len(fake.lists(SERVICES)) == 2, 10)
    # client-go: at the last resourceVersion seen, not older than it, unpaged (the cache).
    assert fake.lists(SERVICES)[1].query == {"resourceVersion": str(seen), "resourceVersionMatch": "NotOlderThan"}
    assert source.relists.get(("Service",)) == 1
    await wait_for(lambda: len(fake.watches(SERVICES)) == 3, 10)
    assert fake.watches(SERVICES)[2].query["resourceVersion"] == str(fake.rv)


@pytest.mark.parametrize(
    ("status", "message"),
    [(410, "too old resource version: 3 (9)"), (504, "Too large resource version: 9, current: 5")],
)
async def test_a_list_at_a_version_the_server_lacks_falls_back_to_a_consistent_read(
    fake: FakeKubeAPI, sources: Sources, client_errors: str, status: int, message: str
) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    fake.fail(1, status, path=SERVICES, message=message)
    source, index = sources.run(settings_for(fake))
    await synced(index)
    first, second = fake.lists(SERVICES)
    assert first.query.get("resourceVersion") == "0"
    assert "resourceVersion" not in second.query and second.query["limit"] == "500"  # a consistent read
    assert source.restarts.values == {} and source.relists.values == {}  # at once, not a failure
    # After a watch 410, the relist tries the last version seen again (client-go's order).
    await wait_for(lambda: fake.open_watches() == 3, 10)
    fake.gone(1, path=SERVICES)
    fake.drop_watches()
    await wait_for(lambda: len(fake.lists(SERVICES)) == 3, 10)
    assert fake.lists(SERVICES)[2].query.get("resourceVersionMatch") == "NotOlderThan"


async def test_watch_events_update_the_index(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.10"))
    _, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)

    fake.add(service("api", "default", "10.0.0.11"))
    await wait_for(lambda: "default/api" in names(index))
    assert index.service_ips["10.0.0.11"].name == "api"

    fake.update(service("web", "default", "10.0.0.20"))
    await wait_for(lambda: "10.0.0.20" in index.service_ips)
    assert "10.0.0.10" not in index.service_ips

    fake.delete("Service", "default", "web")
    await wait_for(lambda: "default/web" not in names(index))
    assert index.events("Service")[-3:] == [("ADDED", "api"), ("MODIFIED", "web"), ("DELETED", "web")]

    fake.add(endpointslice("api-1", "default", "api", [{"ip": "10.2.0.1"}, {"ip": "10.2.0.2", "ready": False}]))
    await wait_for(lambda: ("default", "api-1") in index.slices)
    api_service = index.service("default", "api")
    assert api_service is not None
    assert [endpoint.addresses for endpoint in index.endpoints(api_service)] == [("10.2.0.1",)]


async def test_a_410_error_event_relists_and_drops_what_was_deleted_meanwhile(
    fake: FakeKubeAPI, sources: Sources
) -> None:
    fake.add(namespace("default"), service("keep", "default", "10.0.0.1"), service("gone", "default", "10.0.0.2"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    await fake.stop()  # the watches break off; the index keeps what it has
    fake.delete("Service", "default", "gone")
    fake.add(service("new", "default", "10.0.0.3"))
    fake.compact()  # the deletion is no longer in the history
    assert names(index) == {"default/keep", "default/gone"}
    await fake.start()
    await wait_for(lambda: names(index) == {"default/keep", "default/new"})
    assert source.relists.get(("Service",)) >= 1
    # The resumed watch was answered with an ERROR event (HTTP 200), then a new list came.
    assert len(fake.lists(SERVICES)) == 2
    await wait_for(lambda: fake.watches(SERVICES)[-1].query["resourceVersion"] == str(fake.rv))


async def test_an_http_410_on_watch_relists(fake: FakeKubeAPI, sources: Sources, client_errors: str) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    fake.gone(1, path=SERVICES)
    fake.drop_watches()
    await wait_for(lambda: len(fake.lists(SERVICES)) == 2)
    assert source.relists.get(("Service",)) == 1
    assert source.relists.get(("Namespace",)) == 0
    fake.add(service("after", "default", "10.0.0.2"))
    await wait_for(lambda: "default/after" in names(index))


async def test_an_expired_continue_token_restarts_the_list(
    fake: FakeKubeAPI, sources: Sources, client_errors: str
) -> None:
    fake.watch_cache = False  # so that lists are paged
    fake.add(
        namespace("default"), *(service(f"s{i:04d}", "default", f"10.0.{i // 200}.{i % 200 + 1}") for i in range(1200))
    )
    compactions = []

    def compact_once_mid_list(entry: Any) -> None:
        # Between the first and second page of the first Services list: its snapshot goes.
        if entry.path == SERVICES and "continue" in entry.query and not compactions:
            fake.delete("Service", "default", "s1100")  # deleted meanwhile
            fake.compact()
            compactions.append(entry)

    fake.on_list = compact_once_mid_list
    source, index = sources.run(settings_for(fake))
    await synced(index)
    assert compactions
    assert index.counts()["Service"] == 1199
    assert "default/s1100" not in names(index)
    assert source.relists.get(("Service",)) == 1
    pages = fake.lists(SERVICES)
    # The second page got 410; the list started over from its first page.
    assert "continue" in pages[1].query and "continue" not in pages[2].query
    assert len(pages) == 5


async def test_bookmarks_advance_the_resume_point(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"))
    _, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    listed_at = fake.rv
    fake.add(namespace("other"))  # a Namespace event: Services see nothing of it
    fake.bookmark()
    bookmarked_at = fake.rv
    assert bookmarked_at > listed_at
    await asyncio.sleep(0)  # let the server write the bookmark before the connection ends
    fake.end_watches()  # as timeoutSeconds ends a watch
    await wait_for(lambda: len(fake.watches(SERVICES)) == 2)
    assert fake.watches(SERVICES)[0].query["resourceVersion"] == str(listed_at)
    assert fake.watches(SERVICES)[1].query["resourceVersion"] == str(bookmarked_at)
    assert len(fake.lists(SERVICES)) == 1  # resumed, not relisted


async def test_a_watch_that_ends_resumes_without_counting_a_failure(
    fake: FakeKubeAPI, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kapi, "SHORT_WATCH", 0.0)  # the other kinds' watches end empty, and soon
    fake.add(namespace("default"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    fake.add(service("web", "default", "10.0.0.1"))
    await wait_for(lambda: "default/web" in names(index))
    fake.end_watches()
    await wait_for(lambda: len(fake.watches(SERVICES)) == 2 and fake.open_watches() == 3)
    assert fake.watches(SERVICES)[1].query["resourceVersion"] == str(fake.rv)
    assert source.restarts.values == {}
    assert source.relists.values == {}


async def test_a_dropped_watch_resumes_from_the_last_event(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    fake.add(service("web", "default", "10.0.0.1"))
    await wait_for(lambda: "default/web" in names(index))
    seen = fake.rv
    fake.drop_watches()
    fake.add(service("meanwhile", "default", "10.0.0.2"))  # after the drop, before the resume
    await wait_for(lambda: "default/meanwhile" in names(index))
    assert fake.watches(SERVICES)[1].query["resourceVersion"] == str(seen)
    assert source.restarts.get(("Service",)) >= 1
    assert len(fake.lists(SERVICES)) == 1


async def test_server_errors_back_off_and_recover(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    fake.fail(4, 500, path=SERVICES)
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await synced(index)
    assert "default/web" in names(index)
    assert source.restarts.get(("Service",)) == 4
    assert fake.requests[SERVICES] >= 5
    # Each retry waited twice as long as the one before (0.02 s doubling, ±25% jitter).
    delays = retry_delays(capture, "Service")
    assert len(delays) == 4
    assert all(later > earlier for earlier, later in itertools.pairwise(delays)), delays
    assert delays[0] <= 0.025 < 0.12 <= delays[3]


def retry_delays(capture: Capture, kind: str) -> list[float]:
    """The delays the failure log lines of ``kind`` announced, in order."""
    found = (
        re.search(r"retrying in ([0-9.]+)s$", message)
        for message in capture.messages
        if message.startswith(f"{kind}: list/watch failed")
    )
    return [float(match.group(1)) for match in found if match]


async def test_not_synced_until_every_kind_listed(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    fake.fail(10**6, 503, path=SLICES)
    source, index = sources.run(settings_for(fake))
    await wait_for(lambda: source.restarts.get(("EndpointSlice",)) >= 3)
    assert "default/web" in names(index)  # the other kinds are there already
    assert not index.synced
    fake._failures.clear()
    await synced(index)


async def test_api_server_restart_keeps_state_and_resumes(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    fake.add(endpointslice("web-1", "default", "web", [{"ip": "10.2.0.1"}]))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    before = index.counts()
    seen = fake.rv
    await fake.stop()
    await wait_for(lambda: source.restarts.get(("Service",)) >= 2)  # refused while down
    assert index.counts() == before and index.synced
    await fake.start()
    fake.add(service("api", "default", "10.0.0.2"))
    await wait_for(lambda: "default/api" in names(index))
    assert len(fake.lists(SERVICES)) == 1  # resumed from the resourceVersion, no relist
    assert fake.watches(SERVICES)[-1].query["resourceVersion"] == str(seen)
    assert source.relists.values == {}


async def test_malformed_data_is_skipped(fake: FakeKubeAPI, sources: Sources) -> None:
    bad = service("bad", "default", "10.0.0.9")
    bad["spec"]["ports"] = "not a list"
    fake.add(namespace("default"), bad, service("good", "default", "10.0.0.1"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    assert names(index) == {"default/good"}
    await wait_for(lambda: fake.open_watches() == 3)
    # An event whose object the index cannot use: skipped by the index, the watch goes on.
    (watcher,) = [w for w in fake.watchers if w.resource.plural == "services"]
    watcher.queue.put_nowait(("ADDED", {"metadata": "not an object"}))
    fake.add(service("later", "default", "10.0.0.2"))
    await wait_for(lambda: "default/later" in names(index))
    assert "default/good" in names(index)
    assert len(fake.watches(SERVICES)) == 1 and source.restarts.values == {}


async def test_other_errors_in_the_stream_resume_without_relisting(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3)
    fake.add(service("api", "default", "10.0.0.2"))
    await wait_for(lambda: "default/api" in names(index))
    seen = fake.rv
    (watcher,) = [w for w in fake.watchers if w.resource.plural == "services"]
    watcher.queue.put_nowait(("ERROR", status(500, "InternalError", "etcd is sad")))
    await wait_for(lambda: len(fake.watches(SERVICES)) == 2)
    assert fake.watches(SERVICES)[1].query["resourceVersion"] == str(seen)
    assert source.restarts.get(("Service",)) == 1
    assert source.relists.values == {}
    assert names(index) == {"default/web", "default/api"}


async def test_cancel_closes_the_client_session(fake: FakeKubeAPI) -> None:
    fake.add(namespace("default"))
    loop = asyncio.get_running_loop()
    complaints: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: complaints.append(str(context.get("message"))))
    try:
        index = RecordingIndex()
        source = kapi.api_source(settings_for(fake), index, None, "/")
        task = asyncio.create_task(source.run())
        await synced(index)
        await wait_for(lambda: fake.open_watches() == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del source, task
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not [message for message in complaints if "Unclosed" in message]
    await wait_for(lambda: fake.open_watches() == 0)


# -- keeping the API server's load down, and the reflectors going --------------------------------


async def test_a_relist_needed_again_soon_waits_a_growing_backoff(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    fake.gone(10**6, path=SERVICES)  # every Services watch: 410, though every list succeeds
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await wait_for(lambda: source.relists.get(("Service",)) >= 5, 20)
    # Each relist came within a minute of the previous list: each waited, twice as long as
    # the one before (0.02 s doubling, ±25% jitter), instead of listing again at once.
    waits = [
        float(match.group(1))
        for message in capture.messages
        if (match := re.search(r"^Service: relisting again within .* listing in ([0-9.]+)s$", message))
    ]
    assert len(waits) >= 4, capture.messages
    assert all(later > earlier for earlier, later in itertools.pairwise(waits[:4])), waits
    assert len(fake.lists(SERVICES)) <= source.relists.get(("Service",)) + 1
    assert index.synced and "default/web" in names(index)


async def test_a_relist_long_after_the_last_list_does_not_wait(
    fake: FakeKubeAPI, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kapi, "RELIST_GUARD", 0.0)  # as if the last list were long ago
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await synced(index)
        await wait_for(lambda: fake.open_watches() == 3, 10)
        fake.gone(1, path=SERVICES)
        fake.drop_watches()
        await wait_for(lambda: len(fake.lists(SERVICES)) == 2, 10)
    assert not [message for message in capture.messages if "relisting again within" in message]
    assert source.relists.get(("Service",)) == 1


async def test_a_watch_that_ends_at_once_with_nothing_backs_off(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3, 10)
    fake.empty_watches(10**6, path=SERVICES)  # 200, then the stream ends: no event, no bookmark
    fake.drop_watches()
    # Each such watch is a failure (backoff, counted), not a clean end resumed at once.
    await wait_for(lambda: source.restarts.get(("Service",)) >= 4, 20)
    assert len(fake.watches(SERVICES)) <= source.restarts.get(("Service",)) + 1
    assert len(fake.lists(SERVICES)) == 1  # resumed from the same resourceVersion, no relist
    assert {watch.query["resourceVersion"] for watch in fake.watches(SERVICES)[1:]} == {str(fake.rv)}


async def test_a_silent_watch_is_resumed_without_counting_a_failure(
    fake: FakeKubeAPI, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection that died without a word reads as silence: no event and no bookmark for
    # WATCH_READ_TIMEOUT (a real API server sends a bookmark about every minute).
    monkeypatch.setattr(kapi, "WATCH_READ_TIMEOUT", 0.5)
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await synced(index)
        listed_at = fake.rv
        await wait_for(lambda: len(fake.watches(SERVICES)) >= 3, 20)
    assert {watch.query["resourceVersion"] for watch in fake.watches(SERVICES)} == {str(listed_at)}
    assert source.restarts.values == {} and source.relists.values == {}
    assert not [record for record in capture.records if record.levelno >= logging.WARNING]
    assert any("the watch was silent" in message for message in capture.messages)


async def test_unreadable_watch_data_is_relisted_past(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    source, index = sources.run(settings_for(fake))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3, 10)
    listed_at = fake.rv
    # A line no client can read, in the history: every resume from before it gets it again.
    fake.inject("Service", b'{"type": "ADDED", "object": {"metadata": {"name": "cut-sh')
    fake.add(service("after", "default", "10.0.0.2"))
    await wait_for(lambda: "default/after" in names(index), 20)
    # BAD_EVENT_LIMIT watches from the same point failed on it, then a relist went past it.
    assert [watch.query["resourceVersion"] for watch in fake.watches(SERVICES)[: kapi.BAD_EVENT_LIMIT]] == [
        str(listed_at)
    ] * kapi.BAD_EVENT_LIMIT
    assert source.relists.get(("Service",)) == 1
    assert source.restarts.get(("Service",)) == kapi.BAD_EVENT_LIMIT - 1
    await wait_for(lambda: fake.open_watches("services") == 1, 10)
    fake.add(service("later", "default", "10.0.0.3"))
    await wait_for(lambda: "default/later" in names(index), 10)


async def test_retry_after_is_honoured(fake: FakeKubeAPI, sources: Sources, client_errors: str) -> None:
    fake.add(namespace("default"))
    fake.fail(1, 429, path=SERVICES, retry_after=0.6)
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await synced(index)
    # The backoff alone would have been 0.02 s.
    assert retry_delays(capture, "Service") == [0.6]
    assert source.restarts.get(("Service",)) == 1


async def test_queries_get_turns_while_a_long_list_is_applied(
    fake: FakeKubeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kapi, "LIST_CHUNK", 4096)
    fake.add(
        namespace("default"), *(service(f"s{i:04d}", "default", f"10.0.{i // 200}.{i % 200 + 1}") for i in range(1000))
    )
    ticks = 0

    async def ticker() -> None:  # stands for the DNS server's work on the same loop
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    class TickIndex(RecordingIndex):
        def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
            self.calls.append(("tick", str(ticks)))
            super().apply(kind, event, obj)

    index = TickIndex(settings_for(fake))
    running = Sources()
    ticking = asyncio.create_task(ticker())
    try:
        running.run(settings_for(fake), index)
        await synced(index)
    finally:
        ticking.cancel()
        await running.close()
    applied_per_tick = collections.Counter(call[1] for call in index.calls if call[0] == "tick")
    # 4 KiB of list at a time (about 13 Services), then the loop's other tasks run.
    assert sum(applied_per_tick.values()) == 1001
    assert max(applied_per_tick.values()) <= 30, applied_per_tick.most_common(3)


async def test_a_reflector_that_dies_is_started_again(
    fake: FakeKubeAPI, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    crashes = {"left": 1}
    failed = kapi.Reflector._failed

    def crash_once(self: kapi.Reflector, error: Exception, delay: float) -> None:
        if self.kind == "Service" and crashes["left"]:  # a bug in the failure path kills the task
            crashes["left"] -= 1
            raise RuntimeError("a bug")
        failed(self, error, delay)

    monkeypatch.setattr(kapi.Reflector, "_failed", crash_once)
    fake.fail(1, 500, path=SERVICES)
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await synced(index)  # before the first sync: the dead task is noticed and restarted
        assert "default/web" in names(index)
        # After the first sync too: the index keeps following the API server.
        crashes["left"] = 1
        await wait_for(lambda: fake.open_watches() == 3, 10)
        fake.drop_watches()
        fake.add(service("api", "default", "10.0.0.2"))
        await wait_for(lambda: "default/api" in names(index), 20)
    assert source.restarts.get(("Service",)) >= 3  # the 500, and the two deaths
    ended = [message for message in capture.messages if message.startswith("Service: the list/watch task ended")]
    assert len(ended) == 2, capture.messages


async def test_a_second_cancellation_still_closes_the_client(
    fake: FakeKubeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = []
    close = kapi.ApiClient.close

    async def counted_close(self: Any) -> None:
        closed.append(self)
        await close(self)

    ending, release = asyncio.Event(), asyncio.Event()
    run = kapi.Reflector.run

    async def slow_to_end(self: kapi.Reflector) -> None:
        try:
            await run(self)
        finally:  # a reflector that takes its time to unwind (cancelled again, it ends)
            ending.set()
            await release.wait()

    monkeypatch.setattr(kapi.ApiClient, "close", counted_close)
    monkeypatch.setattr(kapi.Reflector, "run", slow_to_end)
    fake.add(namespace("default"))
    fake.hold()
    index = RecordingIndex()
    task = asyncio.create_task(kapi.api_source(settings_for(fake), index, None, "/").run())
    await wait_for(lambda: fake.held == 3, 10)
    task.cancel()
    await wait_for(ending.is_set, 10)  # the source is in its cleanup, waiting for its reflectors
    task.cancel()  # a second cancellation (a stop during a stop)
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    fake.release()
    await wait_for(lambda: len(closed) == 1, 10)


async def test_not_synced_failures_are_warned_about_again(
    fake: FakeKubeAPI, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kapi, "UNSYNCED_WARNING_INTERVAL", 0.0)
    fake.add(namespace("default"))
    fake.fail(5, 503, path=SERVICES)
    with kubernetes_log() as capture:
        source, index = sources.run(settings_for(fake))
        await synced(index)
        # Once synced, one warning per outage again.
        await wait_for(lambda: fake.open_watches() == 3, 10)
        fake.fail(5, 503, path=SERVICES)
        fake.drop_watches()
        await wait_for(lambda: source.restarts.get(("Service",)) >= 10, 20)
        await wait_for(lambda: fake.open_watches() == 3, 20)
    warnings = [
        record.getMessage()
        for record in capture.records
        if record.levelno == logging.WARNING and record.getMessage().startswith("Service: list/watch failed")
    ]
    # Five before the sync (each says why the server is not ready), then one for the outage.
    assert len(warnings) == 6, warnings
    assert all("503" in warning for warning in warnings[:5])


# -- what is watched ---------------------------------------------------------------------------


async def test_selectors_go_to_the_api_server(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default", {"team": "a"}), namespace("other", {"team": "b"}))
    fake.add(service("web", "default", "10.0.0.1", labels={"app": "web"}))
    fake.add(service("db", "default", "10.0.0.2", labels={"app": "db"}))
    fake.add(endpointslice("web-1", "default", "web", [{"ip": "10.2.0.1"}], labels={"app": "web"}))
    fake.add(endpointslice("db-1", "default", "db", [{"ip": "10.2.0.2"}], labels={"app": "db"}))
    settings = settings_for(fake, labels="app in (web, api)", namespace_labels="team=a")
    _, index = sources.run(settings)
    await synced(index)
    assert fake.lists(SLICES)[0].query["labelSelector"] == "app in (web, api)"
    assert fake.lists(NAMESPACES)[0].query["labelSelector"] == "team=a"
    # Services are listed whole: kube-dns must be seen whatever its labels; the index
    # applies `labels` to them itself.
    assert "labelSelector" not in fake.lists(SERVICES)[0].query
    assert names(index) == {"default/web"}
    assert set(index.slices) == {("default", "web-1")}
    assert index.namespaces == {"default"}
    await wait_for(lambda: fake.open_watches() == 3)
    assert fake.watches(SLICES)[0].query["labelSelector"] == "app in (web, api)"
    # A slice that gains the label arrives (ADDED); one that loses it leaves (DELETED).
    fake.update(endpointslice("db-1", "default", "db", [{"ip": "10.2.0.2"}], labels={"app": "api"}))
    await wait_for(lambda: ("default", "db-1") in index.slices)
    fake.update(endpointslice("web-1", "default", "web", [{"ip": "10.2.0.1"}], labels={"app": "other"}))
    await wait_for(lambda: ("default", "web-1") not in index.slices)
    assert index.events("EndpointSlice")[-2:] == [("ADDED", "db-1"), ("DELETED", "web-1")]
    # A Service that gains the label is served, one that loses it is not.
    fake.update(service("db", "default", "10.0.0.2", labels={"app": "api"}))
    await wait_for(lambda: "default/db" in names(index))
    fake.update(service("web", "default", "10.0.0.1", labels={"app": "other"}))
    await wait_for(lambda: "default/web" not in names(index))


async def test_namespaces_option_keeps_only_those_namespaces(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"), namespace("kube-system"), namespace("other"))
    fake.add(service("web", "default", "10.0.0.1"), service("dns", "kube-system", "10.0.0.10"))
    fake.add(service("x", "other", "10.0.0.3"))
    _, index = sources.run(settings_for(fake, namespaces=["default", "kube-system"]))
    await synced(index)
    assert names(index) == {"default/web", "kube-system/dns"}
    assert index.namespaces == {"default", "kube-system"}
    assert "fieldSelector" not in fake.lists(SERVICES)[0].query  # watched cluster-wide, as CoreDNS does
    fake.add(service("y", "other", "10.0.0.4"), service("api", "default", "10.0.0.5"))
    await wait_for(lambda: "default/api" in names(index))
    assert "other/y" not in names(index)
    # Objects outside the list never reach the index at all.
    assert all(call[3] not in ("x", "y", "other") for call in index.calls if call[0] == "apply")


@pytest.mark.parametrize("options", [{"namespaces": ["default"]}, {"labels": "expose=true"}])
async def test_kube_dns_is_seen_whatever_the_filters(
    fake: FakeKubeAPI, sources: Sources, options: dict[str, Any]
) -> None:
    fake.add(namespace("default"), namespace("kube-system"))
    fake.add(service("web", "default", "10.0.0.10", labels={"expose": "true"}))
    fake.add(service("kube-dns", "kube-system", "10.0.0.53"), service("other", "kube-system", "10.0.0.54"))
    _, index = sources.run(settings_for(fake, **options))
    await synced(index)
    # ns.dns.<zone> is its address; by name it is served only as the filters say.
    assert index.dns_service is not None and index.dns_service.ips == ("10.0.0.53",)
    assert names(index) == {"default/web"}
    await wait_for(lambda: fake.open_watches("services") == 1, 10)
    fake.update(service("kube-dns", "kube-system", "10.0.0.153"))
    await wait_for(lambda: index.dns_service is not None and index.dns_service.ips == ("10.0.0.153",), 10)
    fake.delete("Service", "kube-system", "kube-dns")
    await wait_for(lambda: index.dns_service is None, 10)
    # Other objects of namespaces not served still never reach the index.
    assert ("apply", "Service", "ADDED", "other") not in index.calls or "labels" in options


async def test_pods_are_watched_only_when_needed(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(
        namespace("default"), pod("a", "default", "10.3.0.1"), pod("done", "default", "10.3.0.2", phase="Succeeded")
    )
    _, index = sources.run(settings_for(fake, pods="verified"))
    await synced(index)
    (listed,) = fake.lists(PODS)
    # CoreDNS's selector for its cluster-wide pod watch: no finished pods.
    assert listed.query["fieldSelector"] == "status.phase!=Succeeded,status.phase!=Failed,status.phase!=Unknown"
    assert index.pods == {"default/a": "10.3.0.1"}
    assert index.pod_ips == {"10.3.0.1": "default/a"}


async def test_pods_local_watches_this_node_running_pods(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"))
    fake.add(pod("mine", "default", "10.3.0.1", node="node-1"), pod("theirs", "default", "10.3.0.2", node="node-2"))
    fake.add(pod("starting", "default", None, node="node-1", phase="Pending"))
    _, index = sources.run(settings_for(fake, pods="local", pods_node="node-1"))
    await synced(index)
    (listed,) = fake.lists(PODS)
    assert listed.query["fieldSelector"] == "spec.nodeName=node-1,status.phase=Running"
    assert set(index.pods) == {"default/mine"}
    await wait_for(lambda: fake.open_watches("pods") == 1)
    assert fake.watches(PODS)[0].query["fieldSelector"] == "spec.nodeName=node-1,status.phase=Running"
    # Starting to run: arrives as ADDED. Finishing: leaves as DELETED, IP and all.
    fake.update(pod("starting", "default", "10.3.0.3", node="node-1"))
    await wait_for(lambda: "default/starting" in index.pods)
    fake.update(pod("mine", "default", "10.3.0.1", node="node-1", phase="Succeeded"))
    await wait_for(lambda: "default/mine" not in index.pods)
    assert "10.3.0.1" not in index.pod_ips
    assert index.events("Pod")[-2:] == [("ADDED", "starting"), ("DELETED", "mine")]


async def test_noendpoints_does_not_watch_endpointslices(fake: FakeKubeAPI, sources: Sources) -> None:
    fake.add(namespace("default"))
    _, index = sources.run(settings_for(fake, noendpoints=True))
    await synced(index)
    assert not fake.lists(SLICES)


# -- client configuration ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_ssl(ca: trustme.CA, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def write_kubeconfig(path: Path, contexts: dict[str, tuple[str, dict[str, Any]]], current: str) -> Path:
    """contexts: name -> (server URL, user fields)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": f"{name}-cluster", "cluster": {"server": url}} for name, (url, _) in contexts.items()],
        "users": [{"name": f"{name}-user", "user": user} for name, (_, user) in contexts.items()],
        "contexts": [
            {"name": name, "context": {"cluster": f"{name}-cluster", "user": f"{name}-user"}} for name in contexts
        ],
        "current-context": current,
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def test_kubeconfig_with_a_token_and_a_context(fake: FakeKubeAPI, sources: Sources, tmp_path: Path) -> None:
    fake.token = "s3cret"
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    kubeconfig = write_kubeconfig(
        tmp_path / "kubeconfig",
        {"elsewhere": ("http://127.0.0.1:9", {"token": "wrong"}), "test": (fake.url, {"token": "s3cret"})},
        current="elsewhere",
    )
    # The endpoint is ignored when a kubeconfig is given (CoreDNS's rule).
    settings = Settings(zones=[ZONE], endpoint="http://127.0.0.1:9", kubeconfig=("kubeconfig", "test"))
    source, index = sources.run(settings, corefile_dir=str(tmp_path))
    await synced(index)
    assert "default/web" in names(index)
    # The context's own server and token from the first request on: no 401, no retry.
    assert source.restarts.values == {}
    assert kubeconfig.name in source.credentials.description


async def test_a_wrong_token_is_retried_not_fatal(
    fake: FakeKubeAPI, sources: Sources, tmp_path: Path, client_errors: str
) -> None:
    fake.token = "right"
    fake.add(namespace("default"))
    kubeconfig = write_kubeconfig(tmp_path / "kc", {"test": (fake.url, {"token": "wrong"})}, current="test")
    source, index = sources.run(Settings(zones=[ZONE], kubeconfig=(str(kubeconfig), None)))
    await wait_for(lambda: source.restarts.get(("Service",)) >= 2)
    assert not index.synced
    # The kubeconfig is read again after a 401: a rotated token is picked up.
    write_kubeconfig(kubeconfig, {"test": (fake.url, {"token": "right"})}, current="test")
    await synced(index)


@contextlib.contextmanager
def kubernetes_log() -> Iterator[Capture]:
    """Everything the kubernetes plugin logs, whatever logging's configuration."""
    capture = Capture()
    logger = logging.getLogger("plugin.kubernetes")
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)


async def test_a_kubeconfig_whose_ca_file_is_missing_is_retried(
    ca: trustme.CA, sources: Sources, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.crt"
    async with FakeKubeAPI(ssl_context=server_ssl(ca)) as server:
        server.add(namespace("default"), service("web", "default", "10.0.0.1"))
        user: dict[str, Any] = {}
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"test": (server.url, user)}, current="test")
        config = yaml.safe_load(kubeconfig.read_text())
        config["clusters"][0]["cluster"]["certificate-authority"] = str(ca_file)
        kubeconfig.write_text(yaml.safe_dump(config))
        with kubernetes_log() as capture:
            _, index = sources.run(Settings(zones=[ZONE], kubeconfig=(str(kubeconfig), None)))
            await wait_for(lambda: any("loading kubeconfig" in message for message in capture.messages))
            assert not index.synced
            ca.cert_pem.write_to_path(str(ca_file))  # the CA appears (a mounted secret, late)
            await synced(index)
        assert "default/web" in names(index)
        await sources.close()


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("missing", "no such file"),
        ("context", "kubeconfig"),
        ("garbage", "kubeconfig"),
    ],
)
def test_bad_kubeconfig_is_a_one_line_error(tmp_path: Path, problem: str, expected: str) -> None:
    path = tmp_path / "kubeconfig"
    context = None
    if problem == "context":
        write_kubeconfig(path, {"test": ("http://127.0.0.1:9", {})}, current="test")
        context = "nope"
    elif problem == "garbage":
        path.write_text("clusters: [unclosed\n")
    with pytest.raises(ValueError, match=expected) as raised:
        kapi.api_source(Settings(zones=[ZONE], kubeconfig=(str(path), context)), Index(), None, "/")
    assert "\n" not in str(raised.value)


def test_no_configuration_outside_a_cluster_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        kapi.api_source(Settings(zones=[ZONE]), Index(), None, "/")


def test_bad_endpoint_and_tls_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="URL"):
        kapi.api_source(Settings(zones=[ZONE], endpoint="127.0.0.1:6443"), Index(), None, "/")
    tls = ("cert.pem", "key.pem", "ca.pem")
    with pytest.raises(ValueError, match=r"cert\.pem: no such file"):
        kapi.api_source(Settings(zones=[ZONE], endpoint="https://127.0.0.1:1", tls=tls), Index(), None, str(tmp_path))
    for name in tls:
        (tmp_path / name).write_text("not a PEM file\n")
    with pytest.raises(ValueError, match=r"^tls .*cert\.pem .*key\.pem .*ca\.pem: ") as raised:
        kapi.api_source(Settings(zones=[ZONE], endpoint="https://127.0.0.1:1", tls=tls), Index(), None, str(tmp_path))
    assert "\n" not in str(raised.value)


async def test_endpoint_with_mutual_tls(ca: trustme.CA, sources: Sources, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_cert = client_ca.issue_cert("coredns")
    cert, key, ca_file = tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "ca.crt"
    client_cert.cert_chain_pems[0].write_to_path(str(cert))
    client_cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    async with FakeKubeAPI(ssl_context=server_ssl(ca, client_ca)) as server:
        server.add(namespace("default"), service("web", "default", "10.0.0.1"))
        assert server.url.startswith("https://")
        settings = Settings(zones=[ZONE], endpoint=server.url, tls=("client.crt", "client.key", "ca.crt"))
        _, index = sources.run(settings, corefile_dir=str(tmp_path))
        await synced(index)
        assert "default/web" in names(index)
        await sources.close()


async def test_an_untrusted_server_certificate_is_retried_not_fatal(ca: trustme.CA, sources: Sources) -> None:
    async with FakeKubeAPI(ssl_context=server_ssl(ca)) as server:
        server.add(namespace("default"))
        source, index = sources.run(Settings(zones=[ZONE], endpoint=server.url))  # system CAs: not ours
        await wait_for(lambda: source.restarts.get(("Namespace",)) >= 2)
        assert not index.synced
        await sources.close()


async def test_in_cluster_service_account(
    ca: trustme.CA, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("pod-token")
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setattr(kapi, "SERVICE_TOKEN_FILE", str(token))
    monkeypatch.setattr(kapi, "SERVICE_CA_FILE", str(ca_file))
    async with FakeKubeAPI(ssl_context=server_ssl(ca), token="pod-token") as server:
        server.add(namespace("default"), service("web", "default", "10.0.0.1"))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        _, index = sources.run(Settings(zones=[ZONE]))
        await synced(index)
        assert "default/web" in names(index)
        await sources.close()


def in_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA, server: FakeKubeAPI, token: str
) -> Path:
    """Point the in-cluster configuration at ``server``; the token file's path."""
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text(token)
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setattr(kapi, "SERVICE_TOKEN_FILE", str(token_file))
    monkeypatch.setattr(kapi, "SERVICE_CA_FILE", str(ca_file))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", server.host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    return token_file


async def test_in_cluster_token_rotation_is_followed(
    ca: trustme.CA, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeKubeAPI(ssl_context=server_ssl(ca), token="token-1") as server:
        server.add(namespace("default"), service("web", "default", "10.0.0.1"))
        token_file = in_cluster(monkeypatch, tmp_path, ca, server, "token-1")
        _, index = sources.run(Settings(zones=[ZONE]))
        await synced(index)
        await wait_for(lambda: server.open_watches() == 3, 10)
        # The kubelet rotates the projected token: the next requests carry the new one
        # (kubernetes-asyncio alone would send the old one for up to a minute: 401s).
        token_file.write_text("token-2")
        server.token = "token-2"
        server.drop_watches()
        server.add(service("api", "default", "10.0.0.2"))
        await wait_for(lambda: "default/api" in names(index), 10)
        # A token rewritten in place with the same size and time: the 401 reads it again.
        before = token_file.stat()
        token_file.write_text("token-3")
        os.utime(token_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        server.token = "token-3"
        server.drop_watches()
        server.add(service("db", "default", "10.0.0.3"))
        await wait_for(lambda: "default/db" in names(index), 10)
        await sources.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_in_cluster_with_an_ipv6_service_host(
    ca: trustme.CA, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("::1").configure_cert(context)
    async with FakeKubeAPI(ssl_context=context, token="pod-token", host="::1") as server:
        server.add(namespace("default"), service("web", "default", "10.0.0.1"))
        in_cluster(monkeypatch, tmp_path, ca, server, "pod-token")
        source, index = sources.run(Settings(zones=[ZONE]))
        await synced(index)
        assert source.credentials.description == "in-cluster service account"
        assert "default/web" in names(index)
        await sources.close()


async def test_one_credentials_refresh_for_the_401s_of_every_kind(
    fake: FakeKubeAPI, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.token = "old"
    fake.add(namespace("default"))
    kubeconfig = write_kubeconfig(tmp_path / "kc", {"test": (fake.url, {"token": "old"})}, current="test")
    refreshes = []
    refresh = kapi.Credentials.refresh

    async def counted(self: kapi.Credentials, configuration: Any) -> None:
        refreshes.append(configuration)
        await refresh(self, configuration)

    monkeypatch.setattr(kapi.Credentials, "refresh", counted)
    source, index = sources.run(Settings(zones=[ZONE], kubeconfig=(str(kubeconfig), None)))
    await synced(index)
    await wait_for(lambda: fake.open_watches() == 3, 10)
    write_kubeconfig(kubeconfig, {"test": (fake.url, {"token": "new"})}, current="test")
    fake.token = "new"
    fake.hold()  # the three resumed watches arrive together, and all get their 401 together
    fake.drop_watches()
    await wait_for(lambda: fake.held == 3, 10)
    fake.release()
    await wait_for(lambda: fake.open_watches() == 3, 10)
    assert len(refreshes) == 1
    assert sum(source.restarts.values.values()) >= 3


async def test_rotated_client_certificates_are_used(ca: trustme.CA, sources: Sources, tmp_path: Path) -> None:
    cert, key, ca_file = tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))

    def issue(client_ca: trustme.CA) -> None:
        client_cert = client_ca.issue_cert("coredns")
        client_cert.cert_chain_pems[0].write_to_path(str(cert))
        client_cert.private_key_pem.write_to_path(str(key))

    first, second = trustme.CA(), trustme.CA()
    issue(first)
    async with FakeKubeAPI(ssl_context=server_ssl(ca, first)) as server:
        server.add(namespace("default"), service("web", "default", "10.0.0.1"))
        settings = Settings(zones=[ZONE], endpoint=server.url, tls=(str(cert), str(key), str(ca_file)))
        source, index = sources.run(settings)
        await synced(index)
        await wait_for(lambda: server.open_watches() == 3, 10)
        # The client certificate is renewed (another issuer, as the server now demands).
        issue(second)
        server.ssl_context = server_ssl(ca, second)
        await server.restart()
        server.add(service("api", "default", "10.0.0.2"))
        await wait_for(lambda: "default/api" in names(index), 20)
        assert source.generation == 1
        await sources.close()


async def test_a_list_that_hangs_times_out_and_is_retried(
    fake: FakeKubeAPI, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kapi, "LIST_READ_TIMEOUT", 0.5)
    fake.add(namespace("default"), service("web", "default", "10.0.0.1"))
    fake.hold()  # requests are accepted, never answered
    source, index = sources.run(settings_for(fake))
    await wait_for(lambda: source.restarts.get(("Service",)) >= 2, 20)
    assert not index.synced
    fake.release()
    await synced(index)
    assert "default/web" in names(index)


def test_in_cluster_without_a_token_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kapi, "SERVICE_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    with pytest.raises(ValueError, match="in-cluster configuration: Service token file does not exist"):
        kapi.api_source(Settings(zones=[ZONE]), Index(), None, "/")


@pytest.mark.parametrize(
    "document",
    [
        {"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"}, "items": []},
        {"items": [{"a": [1, {"b": "]}"}]}, {"c": None}], "metadata": {"continue": "x", "resourceVersion": "9"}},
        {"metadata": {"resourceVersion": "3"}, "items": None},
        {},
    ],
)
@pytest.mark.parametrize("indent", [None, 2])
def test_parse_list_hands_over_each_item(document: dict[str, Any], indent: int | None) -> None:
    seen: list[Any] = []
    metadata, count = kapi.parse_list(json.dumps(document, indent=indent), lambda item: seen.append(item) or 1)
    assert metadata == document.get("metadata", {})
    assert seen == (document.get("items") or [])
    assert count == len(seen)


@pytest.mark.parametrize("text", ["", "[]", '{"items": [1 2]}', '{"items": [1,', '{"a" 1}', '{"a": 1,}', "{'a': 1}"])
def test_parse_list_rejects_what_is_not_a_list(text: str) -> None:
    with pytest.raises(ValueError):
        kapi.parse_list(text, lambda item: 1)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_list_reader_reads_a_list_in_pieces_of_any_size(size: int) -> None:
    document = {
        "kind": "ServiceList",
        "metadata": {"resourceVersion": "12", "remainingItemCount": 1234567},
        "items": [
            {"metadata": {"name": "bücher", "labels": {"e": "😀"}}, "n": [1, 22, 333, -4.5e10]},
            {"t": True, "f": False, "z": None, "s": 'a "quoted" ]}, thing'},
            12345678,
            [],
        ],
        "apiVersion": "v1",
    }
    body = json.dumps(document, ensure_ascii=False, indent=1).encode()
    seen: list[Any] = []
    reader = kapi.ListReader(lambda item: seen.append(item) or 1)
    for start in range(0, len(body), size):
        reader.feed(body[start : start + size])
    assert reader.close() == document["metadata"]
    assert seen == document["items"] and reader.applied == 4


def test_list_reader_refuses_an_item_larger_than_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kapi, "MAX_PENDING", 1000)
    reader = kapi.ListReader(lambda item: 1)
    reader.feed(b'{"items": [{"a": "' + b"x" * 500)
    with pytest.raises(ValueError, match="unreadable list response"):
        reader.feed(b"x" * 600)


def test_backoff_doubles_with_jitter_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kapi, "BACKOFF_INITIAL", 0.5)
    monkeypatch.setattr(kapi, "BACKOFF_MAX", 30.0)
    backoff = kapi.Backoff()
    delays = [backoff.next() for _ in range(10)]
    for delay, base in zip(delays, [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30], strict=True):
        assert base * 0.75 <= delay <= base * 1.25
    backoff.reset()
    assert backoff.next() <= 0.5 * 1.25


def test_the_client_import_stays_lean_and_completes_on_demand() -> None:
    """api.py loads only the client machinery; anything else still imports as usual."""
    code = (
        "import sys\n"
        "import plugins.kubernetes.api\n"
        "models = [m for m in sys.modules if m.startswith('kubernetes_asyncio.client.models.')]\n"
        "assert not models, models[:3]\n"
        "assert 'kubernetes_asyncio.client.api.core_v1_api' not in sys.modules\n"
        "from kubernetes_asyncio.client import V1Pod, CoreV1Api\n"
        "import kubernetes_asyncio\n"
        "assert kubernetes_asyncio.watch.Watch and kubernetes_asyncio.__version__\n"
        "assert V1Pod(metadata=None).metadata is None and CoreV1Api\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def run_python(code: str) -> str:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


_LOG_TO_STDOUT = (
    "import logging, sys\n"
    "handler = logging.StreamHandler(sys.stdout)\n"
    "logger = logging.getLogger('plugin.kubernetes')\n"
    "logger.addHandler(handler)\n"
    "logger.setLevel(logging.DEBUG)\n"
)
_USE_THE_CLIENT = (
    "from plugins.kubernetes import api\n"
    "from plugins.kubernetes.settings import Settings\n"
    "from plugins.kubernetes.index import Index\n"
    "source = api.api_source(Settings(zones=['cluster.local.'], endpoint='http://127.0.0.1:9'), Index(), None, '/')\n"
    "import asyncio\n"
    "configuration = asyncio.run(source.credentials.configuration())\n"
    "api.ApiClient\n"
    "print('client', configuration.host)\n"
)


def test_an_earlier_full_import_is_used_as_it_is() -> None:
    out = run_python(_LOG_TO_STDOUT + "import kubernetes_asyncio\n" + _USE_THE_CLIENT)
    assert "kubernetes_asyncio was imported before the kubernetes plugin: using it whole" in out
    assert out.endswith("client http://127.0.0.1:9")


def test_an_unexpected_package_layout_falls_back_to_the_whole_import() -> None:
    code = (
        "import importlib.machinery, sys\n"
        "find = importlib.machinery.PathFinder.find_spec\n"
        "hidden = []\n"
        "def hide_models(name, path=None, target=None):  # once: from the plugin's look, not the import\n"
        "    if name == 'kubernetes_asyncio.client.models' and not hidden:\n"
        "        hidden.append(name)\n"
        "        return None\n"
        "    return find(name, path, target)\n"
        "importlib.machinery.PathFinder.find_spec = hide_models\n"
        + _LOG_TO_STDOUT
        + _USE_THE_CLIENT
        + "importlib.machinery.PathFinder.find_spec = find\n"
        # Not half-lean: no package was registered without its __init__.
        "import kubernetes_asyncio, kubernetes_asyncio.client\n"
        "assert '__getattr__' not in vars(kubernetes_asyncio), 'lean'\n"
        "assert '__getattr__' not in vars(kubernetes_asyncio.client), 'lean'\n"
        "assert 'V1Pod' in vars(kubernetes_asyncio.client)\n"
        "print('whole')\n"
    )
    out = run_python(code)
    assert "no package kubernetes_asyncio.client.models where expected: importing it whole" in out
    assert out.endswith("client http://127.0.0.1:9\nwhole")


def test_probing_a_lean_package_does_not_import_it_whole() -> None:
    code = (
        "import sys, inspect\n"
        "import plugins.kubernetes.api\n"
        "import kubernetes_asyncio.client as client\n"
        "assert not hasattr(client, '__wrapped__')\n"
        "inspect.unwrap(client)\n"
        "assert 'kubernetes_asyncio.client.models.v1_pod' not in sys.modules\n"
        "assert client.V1Pod and 'kubernetes_asyncio.client.models.v1_pod' in sys.modules\n"
        "print('ok')\n"
    )
    assert run_python(code) == "ok"


# -- end to end: DNS answers over UDP from a server whose source is the fake API ---------------

E2E_ZONES = "cluster.local in-addr.arpa"


def corefile(server: FakeKubeAPI | str, options: str = "", ready: bool = False) -> str:
    endpoint = server if isinstance(server, str) else f"endpoint {server.url}"
    return (
        f"{E2E_ZONES} {{\n bind 127.0.0.1\n"
        + (" ready 127.0.0.1:0\n" if ready else "")
        + f" kubernetes {E2E_ZONES} {{\n  {endpoint}\n  startup_timeout 0.1s\n{options} }}\n}}\n"
    )


async def answers(running: Running, name: str, rdtype: str = "A") -> list[str]:
    reply = await running.udp(name, rdtype)
    return sorted(
        rdata.to_text() for rrset in reply.answer for rdata in rrset if rrset.rdtype == reply.question[0].rdtype
    )


async def rcode(running: Running, name: str, rdtype: str = "A") -> int:
    return (await running.udp(name, rdtype)).rcode()


def kubernetes_plugin(running: Running) -> Any:
    assert running.server.config is not None
    return running.server.config.blocks[0].find("kubernetes")


async def wait_answer(running: Running, name: str, expected: list[str], rdtype: str = "A") -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        got = await answers(running, name, rdtype)
        if got == expected:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} {rdtype}: {got}, wanted {expected}")
        await asyncio.sleep(0.02)


async def wait_rcode(running: Running, name: str, expected: int, rdtype: str = "A") -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while (got := await rcode(running, name, rdtype)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name}: {dns.rcode.to_text(got)}, wanted {dns.rcode.to_text(expected)}")
        await asyncio.sleep(0.02)


def basic_cluster(server: FakeKubeAPI) -> None:
    server.add(namespace("default"), namespace("kube-system"))
    server.add(service("web", "default", "10.0.0.10"), service("kube-dns", "kube-system", "10.0.0.53"))
    server.add(service("db", "default", "None", [("pg", "TCP", 5432)]))
    server.add(endpointslice("db-1", "default", "db", [{"ip": "10.2.0.1", "hostname": "db-0"}], [("pg", "TCP", 5432)]))


async def test_e2e_watch_events_change_answers(fake: FakeKubeAPI, start_server: StartServer) -> None:
    basic_cluster(fake)
    running = await start_server(corefile(fake))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    assert await answers(running, "db.default.svc.cluster.local") == ["10.2.0.1"]
    await wait_answer(running, "10.0.0.10.in-addr.arpa", ["web.default.svc.cluster.local."], "PTR")

    fake.add(service("api", "default", "10.0.0.11"))
    await wait_answer(running, "api.default.svc.cluster.local", ["10.0.0.11"])
    fake.update(service("web", "default", "10.0.0.20"))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.20"])
    await wait_answer(running, "20.0.0.10.in-addr.arpa", ["web.default.svc.cluster.local."], "PTR")
    fake.update(
        endpointslice(
            "db-1", "default", "db", [{"ip": "10.2.0.1", "hostname": "db-0"}, {"ip": "10.2.0.2"}], [("pg", "TCP", 5432)]
        )
    )
    await wait_answer(running, "db.default.svc.cluster.local", ["10.2.0.1", "10.2.0.2"])
    fake.delete("Service", "default", "api")
    await wait_rcode(running, "api.default.svc.cluster.local", dns.rcode.NXDOMAIN)


async def test_e2e_relist_after_410_removes_a_service_deleted_while_disconnected(
    fake: FakeKubeAPI, start_server: StartServer
) -> None:
    basic_cluster(fake)
    running = await start_server(corefile(fake))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    await wait_for(lambda: fake.open_watches() == 3)
    await fake.stop()
    fake.delete("Service", "default", "web")
    fake.compact()
    # While the API server is away, the answers stay.
    assert await answers(running, "web.default.svc.cluster.local") == ["10.0.0.10"]
    await fake.start()
    await wait_rcode(running, "web.default.svc.cluster.local", dns.rcode.NXDOMAIN)
    assert await answers(running, "kube-dns.kube-system.svc.cluster.local") == ["10.0.0.53"]
    metrics = running.server.runtime.metrics
    assert metrics["coredns_kubernetes_relists_total"].get(("Service",)) >= 1  # type: ignore[union-attr]


async def test_e2e_api_restart_loses_nothing_and_resumes(fake: FakeKubeAPI, start_server: StartServer) -> None:
    basic_cluster(fake)
    running = await start_server(corefile(fake))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    await wait_for(lambda: fake.open_watches() == 3)
    resume_at = fake.rv
    await fake.stop()
    metrics = running.server.runtime.metrics
    await wait_for(lambda: metrics["coredns_kubernetes_watch_restarts_total"].get(("Service",)) >= 2)  # type: ignore[union-attr]
    assert await answers(running, "web.default.svc.cluster.local") == ["10.0.0.10"]
    assert await answers(running, "db.default.svc.cluster.local") == ["10.2.0.1"]
    await fake.restart()
    fake.add(service("api", "default", "10.0.0.11"))
    await wait_answer(running, "api.default.svc.cluster.local", ["10.0.0.11"])
    assert fake.watches(SERVICES)[-1].query["resourceVersion"] == str(resume_at)
    assert len(fake.lists(SERVICES)) == 1


async def test_e2e_bookmark_moves_the_resume_point(fake: FakeKubeAPI, start_server: StartServer) -> None:
    basic_cluster(fake)
    running = await start_server(corefile(fake))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    await wait_for(lambda: fake.open_watches() == 3)
    fake.add(pod("p", "default", "10.3.0.1"))  # an event no watch of this server sees
    fake.bookmark()
    await asyncio.sleep(0)
    fake.drop_watches()
    await wait_for(lambda: len(fake.watches(SERVICES)) == 2)
    assert fake.watches(SERVICES)[1].query["resourceVersion"] == str(fake.rv)


async def test_e2e_ready_says_503_until_the_first_sync(fake: FakeKubeAPI, start_server: StartServer) -> None:
    basic_cluster(fake)
    fake.fail(10**6, 500, path=SERVICES)
    running = await start_server(corefile(fake, ready=True))
    ready = running.server.config.blocks[0].find("ready")  # type: ignore[union-attr]
    url = f"http://{LOOPBACK}:{ready.route.port}/ready"  # type: ignore[union-attr]

    async def status() -> int:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status

    metrics = running.server.runtime.metrics
    await wait_for(lambda: metrics["coredns_kubernetes_watch_restarts_total"].get(("Service",)) >= 2)  # type: ignore[union-attr]
    assert await status() == 503
    # Before the first sync, what would be NXDOMAIN is SERVFAIL.
    assert await rcode(running, "web.default.svc.cluster.local") == dns.rcode.SERVFAIL
    fake._failures.clear()
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    assert await status() == 200


async def test_e2e_verified_pods_follow_the_pod_watch(fake: FakeKubeAPI, start_server: StartServer) -> None:
    basic_cluster(fake)
    fake.add(pod("a", "default", "10.3.0.1", node="node-1"), pod("b", "default", "10.3.0.2", node="node-2"))
    running = await start_server(corefile(fake, "  pods verified\n"))
    await wait_answer(running, "10-3-0-1.default.pod.cluster.local", ["10.3.0.1"])
    assert await answers(running, "10-3-0-2.default.pod.cluster.local") == ["10.3.0.2"]
    assert await rcode(running, "10-3-0-9.default.pod.cluster.local") == dns.rcode.NXDOMAIN
    fake.update(pod("a", "default", "10.3.0.1", node="node-1", phase="Succeeded"))  # leaves the field selection
    await wait_rcode(running, "10-3-0-1.default.pod.cluster.local", dns.rcode.NXDOMAIN)
    fake.add(pod("c", "default", "10.3.0.9", node="node-2"))
    await wait_answer(running, "10-3-0-9.default.pod.cluster.local", ["10.3.0.9"])


async def test_e2e_pods_local_holds_only_this_nodes_running_pods(fake: FakeKubeAPI, start_server: StartServer) -> None:
    basic_cluster(fake)
    fake.add(pod("mine", "default", "10.3.0.1", node="node-1"), pod("theirs", "default", "10.3.0.2", node="node-2"))
    running = await start_server(corefile(fake, "  pods local node-1\n"))
    index = kubernetes_plugin(running).index
    await wait_for(lambda: index.synced)
    assert fake.lists(PODS)[0].query["fieldSelector"] == "spec.nodeName=node-1,status.phase=Running"
    assert index.pod_ips == {"10.3.0.1": "default/mine"}
    fake.update(pod("mine", "default", "10.3.0.1", node="node-1", phase="Failed"))
    await wait_for(lambda: not index.pod_ips)


async def test_e2e_labels_and_namespace_labels(fake: FakeKubeAPI, start_server: StartServer) -> None:
    fake.add(namespace("default", {"dns": "yes"}), namespace("hidden", {"dns": "no"}))
    fake.add(service("web", "default", "10.0.0.10", labels={"expose": "true"}))
    fake.add(service("internal", "default", "10.0.0.11"))
    fake.add(service("web", "hidden", "10.0.0.12", labels={"expose": "true"}))
    options = "  labels expose=true\n  namespace_labels dns=yes\n"
    running = await start_server(corefile(fake, options))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    assert await rcode(running, "internal.default.svc.cluster.local") == dns.rcode.NXDOMAIN
    assert await rcode(running, "web.hidden.svc.cluster.local") == dns.rcode.NXDOMAIN
    fake.update(namespace("hidden", {"dns": "yes"}))
    await wait_answer(running, "web.hidden.svc.cluster.local", ["10.0.0.12"])


async def test_e2e_kubeconfig_in_the_corefile(fake: FakeKubeAPI, start_server: StartServer, tmp_path: Path) -> None:
    fake.token = "t0ken"
    basic_cluster(fake)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"test": (fake.url, {"token": "t0ken"})}, current="test")
    running = await start_server(corefile(f"kubeconfig {kubeconfig} test"))
    await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])


async def test_e2e_tls_endpoint_in_the_corefile(ca: trustme.CA, start_server: StartServer, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_cert = client_ca.issue_cert("coredns")
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    async with FakeKubeAPI(ssl_context=server_ssl(ca, client_ca)) as server:
        basic_cluster(server)
        tls = f"tls {tmp_path / 'client.crt'} {tmp_path / 'client.key'} {tmp_path / 'ca.crt'}"
        running = await start_server(corefile(f"endpoint {server.url}\n  {tls}"))
        await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
        await running.server.shutdown()


async def test_e2e_a_bad_kubeconfig_fails_the_start_with_one_line(start_server: StartServer, tmp_path: Path) -> None:
    from resolver.corefile import CorefileError

    with pytest.raises(CorefileError, match=r"kubeconfig .*missing: no such file") as raised:
        await start_server(corefile(f"kubeconfig {tmp_path / 'missing'}"))
    assert "\n" not in str(raised.value)


async def test_e2e_errors_are_logged_once_per_outage(fake: FakeKubeAPI, start_server: StartServer) -> None:
    with kubernetes_log() as capture:
        basic_cluster(fake)
        running = await start_server(corefile(fake))
        await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
        await wait_for(lambda: fake.open_watches() == 3)
        await fake.stop()
        metrics = running.server.runtime.metrics
        await wait_for(lambda: metrics["coredns_kubernetes_watch_restarts_total"].get(("Service",)) >= 4)  # type: ignore[union-attr]
        await fake.start()
        fake.add(service("api", "default", "10.0.0.11"))
        await wait_answer(running, "api.default.svc.cluster.local", ["10.0.0.11"])
    failures = [m for m in capture.messages if m.startswith("Service: list/watch failed:")]
    assert len(failures) == 1, failures
    assert "Service: list/watch recovered" in capture.messages


async def test_e2e_a_source_that_fails_is_started_again(
    fake: FakeKubeAPI, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.kubernetes import plugin as kubernetes_module

    monkeypatch.setattr(kubernetes_module, "SOURCE_RESTART_INITIAL", 0.05)
    runs = []
    run = kapi.ApiSource.run

    async def fail_first(self: kapi.ApiSource) -> None:
        runs.append(self)
        if len(runs) == 1:
            raise RuntimeError("a bug")
        await run(self)

    monkeypatch.setattr(kapi.ApiSource, "run", fail_first)
    basic_cluster(fake)
    with kubernetes_log() as capture:
        running = await start_server(corefile(fake))
        await wait_answer(running, "web.default.svc.cluster.local", ["10.0.0.10"])
    assert len(runs) == 2
    assert "the Kubernetes source failed; starting it again in 0.05s" in capture.messages


# -- the same objects through manifests and through the API give the same answers --------------

EQUIVALENCE_QUERIES = [
    ("web.default.svc.cluster.local", "A"),
    ("web.default.svc.cluster.local", "AAAA"),
    ("web.default.svc.cluster.local", "SRV"),
    ("_http._tcp.web.default.svc.cluster.local", "SRV"),
    ("db.default.svc.cluster.local", "A"),
    ("db.default.svc.cluster.local", "SRV"),
    ("db-0.db.default.svc.cluster.local", "A"),
    ("_pg._tcp.db.default.svc.cluster.local", "SRV"),
    ("ext.default.svc.cluster.local", "CNAME"),
    ("dual.default.svc.cluster.local", "A"),
    ("dual.default.svc.cluster.local", "AAAA"),
    ("nope.default.svc.cluster.local", "A"),
    ("default.svc.cluster.local", "A"),
    ("missing-ns.svc.cluster.local", "A"),
    ("kube-dns.kube-system.svc.cluster.local", "A"),
    ("10-3-0-1.default.pod.cluster.local", "A"),
    ("10-3-0-9.default.pod.cluster.local", "A"),
    ("10.0.0.0.10.in-addr.arpa", "PTR"),
    ("10.0.0.10.in-addr.arpa", "PTR"),
    ("1.0.2.10.in-addr.arpa", "PTR"),
    ("dns-version.cluster.local", "TXT"),
    ("cluster.local", "SOA"),
    ("cluster.local", "NS"),
    ("empty.default.svc.cluster.local", "A"),
    ("notready.default.svc.cluster.local", "A"),
    ("web.other.svc.cluster.local", "A"),
    ("other.svc.cluster.local", "A"),
    ("kube-system.svc.cluster.local", "A"),
    ("70.0.0.10.in-addr.arpa", "PTR"),
    ("53.0.0.10.in-addr.arpa", "PTR"),
    ("ns.dns.cluster.local", "A"),
]


def equivalence_objects() -> list[dict[str, Any]]:
    return [
        namespace("default"),
        namespace("kube-system"),
        service("web", "default", "10.0.0.10", [("http", "TCP", 80), ("", "UDP", 53)], labels={"expose": "true"}),
        endpointslice(
            "web-1",
            "default",
            "web",
            [{"ip": "10.2.0.5", "pod": "web-abc"}],
            [("http", "TCP", 80)],
            labels={"expose": "true"},
        ),
        service("kube-dns", "kube-system", "10.0.0.53", [("dns", "UDP", 53), ("dns-tcp", "TCP", 53)]),
        service("db", "default", "None", [("pg", "TCP", 5432)]),
        endpointslice(
            "db-1",
            "default",
            "db",
            [{"ip": "10.2.0.1", "hostname": "db-0"}, {"ip": "10.2.0.2"}, {"ip": "10.2.0.3", "ready": False}],
            [("pg", "TCP", 5432)],
        ),
        service("ext", "default", external_name="example.org", ports=()),
        service("dual", "default", cluster_ips=["10.0.0.30", "fd00::30"]),
        service("empty", "default", "None"),
        service("notready", "default", "None", publish_not_ready=True),
        endpointslice("notready-1", "default", "notready", [{"ip": "10.2.0.9", "ready": False}]),
        pod("web-abc", "default", "10.3.0.1"),
        namespace("other"),
        service("web", "other", "10.0.0.70"),
    ]


def reply_text(reply: dns.message.Message) -> tuple[Any, ...]:
    """The parts of a reply that must match: rcode, flags, every section sorted. The SOA
    serial is the second each index last changed, so the two sources may differ by one:
    it is left out (every other SOA field is compared)."""

    def line_of(rdata_line: str) -> str:
        fields = rdata_line.split()
        if len(fields) == 11 and fields[3] == "SOA":
            del fields[6]  # owner ttl class SOA mname rname SERIAL refresh retry expire minimum
        return " ".join(fields)

    def section(rrsets: list[Any]) -> list[str]:
        return sorted(line_of(line) for rrset in rrsets for line in rrset.to_text().splitlines())

    return (
        dns.rcode.to_text(reply.rcode()),
        dns.flags.to_text(reply.flags),
        section(reply.answer),
        section(reply.authority),
        section(reply.additional),
    )


@pytest.mark.parametrize("filters", ["", "  namespaces default other\n", "  labels expose=true\n"])
async def test_manifests_and_api_give_the_same_answers(
    fake: FakeKubeAPI, start_server: StartServer, tmp_path: Path, filters: str
) -> None:
    objects = equivalence_objects()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(yaml.safe_dump_all(objects))
    fake.add(*objects)
    options = "  pods verified\n" + filters
    from_api = await start_server(corefile(fake, options))
    from_files = await start_server(corefile(f"manifests {manifests}", options))
    await wait_for(lambda: kubernetes_plugin(from_api).index.synced, 10)
    await wait_for(lambda: kubernetes_plugin(from_files).index.synced, 10)
    rcodes = set()
    for name, rdtype in EQUIVALENCE_QUERIES:
        api_reply = reply_text(await from_api.udp(name, rdtype))
        file_reply = reply_text(await from_files.udp(name, rdtype))
        assert api_reply == file_reply, (name, rdtype)
        rcodes.add(api_reply[0])
    # The table does exercise answers, NODATA and NXDOMAIN (not two servers failing alike).
    assert rcodes == {"NOERROR", "NXDOMAIN"}
    # ns.dns is kube-dns's address whatever the filters; the filters do apply.
    assert await answers(from_api, "ns.dns.cluster.local") == ["10.0.0.53"]
    assert await answers(from_api, "web.default.svc.cluster.local") == ["10.0.0.10"]
    assert bool(await answers(from_api, "db.default.svc.cluster.local")) == ("labels" not in filters)
    assert bool(await answers(from_api, "kube-dns.kube-system.svc.cluster.local")) == (not filters)


def test_kubeapi_builders_are_valid_manifests() -> None:
    """The builders' objects carry kind and apiVersion (so they double as YAML manifests)."""
    for obj in equivalence_objects():
        assert obj["kind"] and obj["apiVersion"] and obj["metadata"]["name"]
    assert json.loads(json.dumps(equivalence_objects()))  # JSON-clean, as the API serves them
