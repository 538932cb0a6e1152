"""HTTP endpoints shared by address, and query names that must not break log lines."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import dns.message
import dns.name
import pytest

from resolver.endpoints import WILDCARD, HTTPEndpoints, bind_target
from resolver.logs import quiet_http_errors
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import raw_udp

REGISTRY = Registry.default()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_host_names_bind_ipv4_first_and_wildcards_are_one_key() -> None:
    assert bind_target("localhost", 9153) == (socket.AF_INET, "127.0.0.1")
    for wildcard in (None, "", "0.0.0.0", "::"):
        assert bind_target(wildcard, 9153)[1] == WILDCARD


async def test_rewriting_an_address_in_a_reload_reuses_the_socket(start_server: StartServer) -> None:
    port = free_port()
    running = await start_server(
        f". {{\n bind 127.0.0.1\n prometheus 127.0.0.1:{port}\n whoami\n}}\n", registry=REGISTRY
    )
    # Same socket written another way: the new configuration must not try to bind it again.
    await running.reconfigure(f". {{\n bind 127.0.0.1\n prometheus localhost:{port}\n whoami\n}}\n")
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200


async def test_an_oversized_http_request_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    endpoints = HTTPEndpoints()

    async def ok(_request: object) -> object:
        return aiohttp.web.Response(text="OK")

    route = await endpoints.add("127.0.0.1:0", "/health", ok, 8080)
    quiet_http_errors(logging.getLogger("aiohttp.server"))
    caplog.set_level(logging.WARNING, logger="aiohttp")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", route.port)
        writer.write(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 400 " in await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        await asyncio.sleep(0.1)
    finally:
        await endpoints.close()
    records = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert records, "aiohttp said nothing about the bad request"
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert any(r.getMessage().startswith("bad HTTP request: ") for r in records)


async def test_a_query_name_cannot_forge_log_lines(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n errors\n log\n}\n", registry=REGISTRY)
    caplog.set_level(logging.INFO)
    name = dns.name.Name([b"x\n[FATAL] plugin/reload: forged", b"\x00nul", b"example", b""])
    await raw_udp(running.port, dns.message.make_query(name, "A").to_wire())
    lines = [r.getMessage() for r in caplog.records if r.name in ("resolver.log", "plugin.errors")]
    assert len(lines) == 2  # one query line (log) and one error line (errors: nobody answered)
    assert all("\n" not in line and "\x00" not in line for line in lines)
    assert all("x\\010[fatal]\\032plugin/reload:\\032forged.\\000nul.example." in line for line in lines)
