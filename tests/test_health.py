"""The health plugin over real HTTP: /health, lameduck on shutdown, the self-check metrics."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import dns.rcode
import pytest

from plugins.health import Health, Prober, fetch
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from resolver.plugin import format_duration as go_duration
from resolver.runtime import Runtime
from resolver.server import Server
from resolver.workers import NoHTTPEndpoints
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Running, wait_for

REGISTRY = Registry(("bind", "ready", "health", "notready", "whoami"), "tests.testplugins")

SIMPLE = """
. {
    bind 127.0.0.1
    health 127.0.0.1:0
    whoami
}
"""

# The lameduck is on the first block only; the second block's route is the newest on
# the shared address, so it is the one that answers /health during the shutdown.
LAMEDUCK = """
a.example {
    bind 127.0.0.1
    health 127.0.0.1:0 {
        lameduck 1s
    }
    whoami
}
b.example {
    bind 127.0.0.1
    health 127.0.0.1:0
    whoami
}
"""


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def health_of(running: Running, block: int = 0) -> Health:
    plugin = running.server.config.blocks[block].find("health") if running.server.config else None
    assert isinstance(plugin, Health)
    return plugin


def url_of(plugin: Health) -> str:
    assert plugin.route is not None
    return f"http://{LOOPBACK}:{plugin.route.port}/health"


def probers(running: Running) -> dict[str, Prober]:
    return running.server.runtime.shared("health", dict)


async def test_health_answers_200_ok_while_serving(start_server: StartServer) -> None:
    running = await start_server(SIMPLE, registry=REGISTRY)
    assert await get(url_of(health_of(running))) == (200, "OK")
    assert (await running.udp("example.org")).rcode() == dns.rcode.NOERROR


async def test_lameduck_fails_health_but_keeps_answering_dns_then_shuts_down(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugin.health")
    running = await start_server(LAMEDUCK, registry=REGISTRY)
    first, second = health_of(running, 0), health_of(running, 1)
    url = url_of(second)
    assert url == url_of(first)  # one HTTP server for the shared address
    assert await get(url) == (200, "OK")

    loop = asyncio.get_running_loop()
    began = loop.time()
    shutdown = asyncio.create_task(running.server.shutdown())
    await wait_for(lambda: second.draining)
    assert (await get(url))[0] == 503
    reply = await running.udp("during.a.example")
    assert reply.rcode() == dns.rcode.NOERROR and reply.additional  # whoami still answers
    assert not shutdown.done()

    await asyncio.wait_for(shutdown, timeout=10)
    assert loop.time() - began >= 0.99  # the shutdown waited out the lameduck
    assert "Going into lameduck mode for 1s" in caplog.messages
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(url)  # and then the endpoint is gone


async def test_self_check_observes_its_duration(start_server: StartServer) -> None:
    running = await start_server(SIMPLE, registry=REGISTRY)
    metrics = running.server.runtime.metrics
    duration = metrics["coredns_health_request_duration_seconds"]
    failures = metrics["coredns_health_request_failures_total"]
    assert failures.get(()) == 0  # exported as 0 before anything failed
    await wait_for(lambda: duration.count(()) >= 1)
    assert failures.get(()) == 0
    text = metrics.render().decode()
    assert 'coredns_health_request_duration_seconds_bucket{le="0.00025"}' in text
    assert 'coredns_health_request_duration_seconds_bucket{le="2.5"}' in text
    assert 'le="0.5"' not in text  # CoreDNS's slim buckets, not the request-duration ones
    assert "coredns_health_request_failures_total 0.0" in text


async def test_a_failed_self_check_is_counted_and_logged(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(SIMPLE, registry=REGISTRY)
    closed = socket.socket()
    closed.bind((LOOPBACK, 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connection is refused
    (prober,) = probers(running).values()
    prober.url = f"http://{LOOPBACK}:{port}/health"
    failures = running.server.runtime.metrics["coredns_health_request_failures_total"]
    await wait_for(lambda: failures.get(()) >= 1)
    assert running.server.runtime.metrics["coredns_health_request_duration_seconds"].count(()) >= 1
    assert any(f'Local health request to "{prober.url}" failed' in message for message in caplog.messages)


async def test_an_answer_that_is_not_http_is_a_failed_self_check(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # read first, or closing would reset the connection
        writer.write(b"SSH-2.0-OpenSSH\r\n")
        writer.close()

    impostor = await asyncio.start_server(babble, LOOPBACK, 0)
    try:
        running = await start_server(SIMPLE, registry=REGISTRY)
        (prober,) = probers(running).values()
        prober.url = f"http://{LOOPBACK}:{impostor.sockets[0].getsockname()[1]}/health"
        failures = running.server.runtime.metrics["coredns_health_request_failures_total"]
        await wait_for(lambda: failures.get(()) >= 1)
        assert f'Local health request to "{prober.url}" failed: not an HTTP answer' in caplog.messages
    finally:
        impostor.close()


async def test_the_self_check_client_reads_the_status(start_server: StartServer) -> None:
    running = await start_server(SIMPLE, registry=REGISTRY)
    plugin = health_of(running)
    assert await fetch(url_of(plugin)) == 200
    plugin.draining = True
    assert await fetch(url_of(plugin)) == 503


async def test_head_answers_like_get_without_a_body(start_server: StartServer) -> None:
    running = await start_server(SIMPLE, registry=REGISTRY)
    async with aiohttp.ClientSession() as session, session.head(url_of(health_of(running))) as response:
        assert (response.status, response.headers["Content-Length"]) == (200, "2")
        assert await response.read() == b""


async def test_a_worker_that_serves_no_http_runs_no_self_check() -> None:
    """Workers after the first of -workers serve no HTTP: with ``health :0`` they do not
    even know worker 0's port, and probing port 0 failed (and warned) every second."""
    runtime = Runtime()
    runtime.http = NoHTTPEndpoints()
    config = load(SIMPLE, "Corefile", REGISTRY, default_port=0, runtime=runtime)
    server = Server(runtime)
    await server.apply(config)
    try:
        running = Running(server, REGISTRY)
        assert health_of(running).route is not None
        assert probers(running) == {}
        assert (await running.udp("example.org")).rcode() == dns.rcode.NOERROR
    finally:
        await server.shutdown()


async def test_blocks_sharing_an_address_share_one_server_and_one_self_check(start_server: StartServer) -> None:
    running = await start_server(LAMEDUCK, registry=REGISTRY)
    first, second = health_of(running, 0), health_of(running, 1)
    assert url_of(first) == url_of(second)
    (prober,) = probers(running).values()
    assert prober.users == {first, second}
    assert await get(url_of(first)) == (200, "OK")


async def test_reload_keeps_the_endpoint_and_a_config_without_health_stops_it(start_server: StartServer) -> None:
    running = await start_server(SIMPLE, registry=REGISTRY)
    url = url_of(health_of(running))
    (prober,) = probers(running).values()
    await running.reconfigure(SIMPLE)
    assert await get(url) == (200, "OK")
    await wait_for(lambda: prober.users == {health_of(running)})  # the old instance left
    assert list(probers(running).values()) == [prober]  # the self-check carried on
    await running.reconfigure(". {\n bind 127.0.0.1\n whoami\n}\n")
    await wait_for(lambda: not probers(running))
    assert prober.task.done()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(url)


def test_defaults_are_port_8080_and_no_lameduck() -> None:
    config = load(". {\n health\n whoami\n}\n", "Corefile", REGISTRY, default_port=0)
    plugin = config.blocks[0].find("health")
    assert isinstance(plugin, Health)
    assert (plugin.address, plugin.lameduck) == (":8080", 0.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("health :1 :2", r"^Corefile:3: health: expected 0 to 1 argument, got 2$"),
        ("health 8080", r'^Corefile:3: health: invalid address "8080": missing port \(use HOST:PORT or :PORT\)$'),
        ("health localhost", r'^Corefile:3: health: invalid address "localhost"'),
        ("health :99999", r'^Corefile:3: health: invalid address ":99999": invalid port "99999"$'),
        ("health {\n lameduck\n }", r"^Corefile:4: lameduck: expected exactly 1 argument, got 0$"),
        ("health {\n lameduck soon\n }", r'^Corefile:4: lameduck: invalid duration "soon"'),
        ("health {\n lame 1s\n }", r'^Corefile:4: health: unknown option "lame"$'),
        ("health\n health :9", r"^Corefile:4: health: given twice in one server block"),
    ],
)
def test_corefile_errors_name_the_line(body: str, message: str) -> None:
    with pytest.raises(CorefileError, match=message):
        load(f". {{\n whoami\n {body}\n}}\n", "Corefile", REGISTRY, default_port=0)


def test_lameduck_accepts_go_durations() -> None:
    config = load(". {\n health :8080 {\n  lameduck 1m30s\n }\n}\n", "Corefile", REGISTRY, default_port=0)
    plugin = config.blocks[0].find("health")
    assert isinstance(plugin, Health) and plugin.lameduck == 90.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (1, "1s"), (1.5, "1.5s"), (0.25, "250ms"), (90, "1m30s"), (3600, "1h0m0s"), (0.0000015, "1.5µs")],
)
def test_durations_are_logged_the_way_go_prints_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
