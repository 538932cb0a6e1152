"""Fixtures: servers on 127.0.0.1 with ephemeral ports.

Servers run in the test's own event loop (in-process) so tests can look at their state;
``tests/test_cli.py`` runs the real command as a subprocess for what needs a process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from resolver.config import load
from resolver.plugin import Registry
from resolver.runtime import Runtime
from resolver.server import Server
from tests.helpers import TEST_REGISTRY, Running

StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """``await start_server(corefile_text, **server_options)`` -> ``Running``.

    Keys without a port get port 0 (one ephemeral port shared by the whole Corefile);
    the Corefile should ``bind 127.0.0.1`` so nothing listens beyond loopback.
    """
    servers: list[Server] = []

    async def start(corefile: str, registry: Registry = TEST_REGISTRY, **options: Any) -> Running:
        runtime = Runtime()
        config = load(corefile, "Corefile", registry, default_port=0, runtime=runtime)
        server = Server(runtime, **options)
        await server.apply(config)
        servers.append(server)
        return Running(server, registry)

    yield start
    for server in servers:
        await server.shutdown()
