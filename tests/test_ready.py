"""The ready plugin over real HTTP: who is asked, what /ready says, across blocks and reloads."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from plugins.ready import Ready
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Plugin, Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Running, ipv6_loopback, wait_for
from tests.testplugins.notready import NotReady


class Laggard(NotReady):
    """A second reporting plugin, so /ready has two names to list."""

    name = "laggard"


class _Registry(Registry):
    def load(self, name: str) -> type[Plugin]:
        return Laggard if name == "laggard" else super().load(name)


REGISTRY = _Registry(("bind", "ready", "health", "notready", "laggard", "whoami"), "tests.testplugins")

BOTH = """
. {
    bind 127.0.0.1
    ready 127.0.0.1:0
    notready
    laggard
    whoami
}
"""


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def plugin(running: Running, name: str, block: int = 0) -> Plugin:
    assert running.server.config is not None
    found = running.server.config.blocks[block].find(name)
    assert found is not None
    return found


def notready(running: Running, name: str = "notready", block: int = 0) -> NotReady:
    found = plugin(running, name, block)
    assert isinstance(found, NotReady)
    return found


def ready_url(running: Running, block: int = 0) -> str:
    found = plugin(running, "ready", block)
    assert isinstance(found, Ready) and found.route is not None
    host = "[::1]" if found.address.startswith("[::1]") else LOOPBACK
    return f"http://{host}:{found.route.port}/ready"


def single(body: str) -> str:
    return f". {{\n bind 127.0.0.1\n ready 127.0.0.1:0\n {body}\n whoami\n}}\n"


async def test_lists_the_plugins_not_ready_then_says_ok(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugin.ready")
    running = await start_server(BOTH, registry=REGISTRY)
    url = ready_url(running)
    assert await get(url) == (503, "laggard,notready")
    assert 'Plugins not ready: "laggard,notready"' in caplog.messages
    await running.udp("become-ready.example")  # notready flips on this query
    assert notready(running).is_ready
    assert await get(url) == (503, "laggard")
    notready(running, "laggard").is_ready = True
    assert await get(url) == (200, "OK")


async def test_plugins_that_do_not_report_are_ignored(start_server: StartServer) -> None:
    running = await start_server(single("notready silent"), registry=REGISTRY)
    assert await get(ready_url(running)) == (200, "OK")
    assert notready(running).asked >= 1  # asked, and its None did not count as "not ready"


async def test_a_plugin_that_said_ready_is_not_asked_again(start_server: StartServer) -> None:
    running = await start_server(single("notready"), registry=REGISTRY)
    url = ready_url(running)
    checker = notready(running)
    checker.is_ready = True
    assert await get(url) == (200, "OK")
    asked = checker.asked
    checker.is_ready = False
    assert await get(url) == (200, "OK")
    assert checker.asked == asked


async def test_monitor_continuously_asks_every_time(start_server: StartServer) -> None:
    corefile = ". {\n bind 127.0.0.1\n ready 127.0.0.1:0 {\n  monitor continuously\n }\n notready\n whoami\n}\n"
    running = await start_server(corefile, registry=REGISTRY)
    url = ready_url(running)
    checker = notready(running)
    checker.is_ready = True
    assert await get(url) == (200, "OK")
    checker.is_ready = False
    assert await get(url) == (503, "notready")


async def test_every_block_with_ready_on_the_address_counts(start_server: StartServer) -> None:
    corefile = """
a.example {
    bind 127.0.0.1
    ready 127.0.0.1:0
    notready
    whoami
}
b.example {
    bind 127.0.0.1
    ready 127.0.0.1:0
    laggard
    whoami
}
c.example {
    bind 127.0.0.1
    notready
    whoami
}
"""
    running = await start_server(corefile, registry=REGISTRY)
    url = ready_url(running, 1)  # the newest route on the shared address answers
    assert url == ready_url(running, 0)
    assert await get(url) == (503, "laggard,notready")
    await running.udp("become-ready.a.example")
    assert await get(url) == (503, "laggard")
    notready(running, "laggard", 1).is_ready = True
    # c.example's notready is still not ready, but that block has no ready.
    assert not notready(running, block=2).is_ready
    assert await get(url) == (200, "OK")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_blocks_on_another_ready_address_do_not_count(start_server: StartServer) -> None:
    corefile = """
a.example {
    bind 127.0.0.1
    ready 127.0.0.1:0
    notready
    whoami
}
b.example {
    bind 127.0.0.1
    ready [::1]:0
    laggard
    whoami
}
"""
    running = await start_server(corefile, registry=REGISTRY)
    assert await get(ready_url(running, 0)) == (503, "notready")
    assert await get(ready_url(running, 1)) == (503, "laggard")


async def test_reload_asks_the_new_configurations_plugins(start_server: StartServer) -> None:
    running = await start_server(single("notready"), registry=REGISTRY)
    url = ready_url(running)
    await running.udp("become-ready.example")
    old = notready(running)
    assert await get(url) == (200, "OK")

    await running.reconfigure(single("notready"))  # the same text: new, not ready instances
    new = notready(running)
    assert new is not old and ready_url(running) == url
    asked = old.asked
    assert await get(url) == (503, "notready")
    assert old.asked == asked and new.asked >= 1
    await running.udp("become-ready.example")
    assert await get(url) == (200, "OK")

    await running.reconfigure(single("laggard"))
    assert await get(url) == (503, "laggard")


async def test_says_shutting_down_during_the_lameduck(start_server: StartServer) -> None:
    corefile = """
. {
    bind 127.0.0.1
    ready 127.0.0.1:0
    health 127.0.0.1:0 {
        lameduck 1s
    }
    whoami
}
"""
    running = await start_server(corefile, registry=REGISTRY)
    url = ready_url(running)
    ready = plugin(running, "ready")
    assert isinstance(ready, Ready) and ready.board is not None
    board = ready.board
    assert await get(url) == (200, "OK")
    shutdown = asyncio.create_task(running.server.shutdown())
    await wait_for(lambda: board.shutting_down)
    assert await get(url) == (503, "Shutting down")
    await asyncio.wait_for(shutdown, timeout=10)


async def test_head_answers_and_other_paths_are_404(start_server: StartServer) -> None:
    running = await start_server(single("notready"), registry=REGISTRY)
    url = ready_url(running)
    async with aiohttp.ClientSession() as session:
        async with session.head(url) as response:
            assert (response.status, response.headers["Content-Length"]) == (503, str(len("notready")))
            assert await response.read() == b""
        async with session.get(url.replace("/ready", "/health")) as response:
            assert (response.status, await response.text()) == (404, "404 page not found\n")


def test_default_address_is_8181() -> None:
    config = load(". {\n ready\n whoami\n}\n", "Corefile", REGISTRY, default_port=0)
    found = config.blocks[0].find("ready")
    assert isinstance(found, Ready)
    assert (found.address, found.key, found.continuously) == (":8181", ":8181", False)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("ready :1 :2", r"^Corefile:3: ready: expected 0 to 1 argument, got 2$"),
        ("ready 8181", r'^Corefile:3: ready: invalid address "8181": missing port \(use HOST:PORT or :PORT\)$'),
        ("ready ::1", r'^Corefile:3: ready: invalid address "::1"'),
        ("ready {\n monitor\n }", r"^Corefile:4: monitor: expected exactly 1 argument, got 0$"),
        ("ready {\n monitor sometimes\n }", r'^Corefile:4: monitor: monitor type "sometimes" not supported'),
        ("ready {\n watch\n }", r'^Corefile:4: ready: unknown option "watch"$'),
        ("ready\n ready :9", r"^Corefile:4: ready: given twice in one server block"),
    ],
)
def test_corefile_errors_name_the_line(body: str, message: str) -> None:
    with pytest.raises(CorefileError, match=message):
        load(f". {{\n whoami\n {body}\n}}\n", "Corefile", REGISTRY, default_port=0)
