"""bind: listen on chosen addresses and interfaces only (loopback only, here)."""

from __future__ import annotations

import dns.asyncquery
import dns.message
import pytest

from resolver.config import load
from resolver.corefile import CorefileError
from tests.conftest import StartServer
from tests.helpers import TEST_REGISTRY, ipv6_loopback, query_bytes, raw_udp


def listening(running) -> set[str]:  # type: ignore[no-untyped-def]
    return {host for host, _port in running.server.listeners}


async def test_bind_address_listens_only_there(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n whoami\n}\n")
    assert listening(running) == {"127.0.0.1"}
    assert running.server.listeners[("127.0.0.1", 0)].label == "dns://127.0.0.1:0"


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_bind_interface_uses_all_of_its_addresses(start_server: StartServer) -> None:
    running = await start_server(". {\n bind lo\n whoami\n}\n")
    assert listening(running) == {"127.0.0.1", "::1"}
    query = dns.message.make_query("example.org", "A")
    reply = await dns.asyncquery.udp(query, "::1", port=running.port, timeout=3)
    assert reply.additional[0][0].address == "::1"  # whoami saw an IPv6 client


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_except_removes_addresses(start_server: StartServer) -> None:
    running = await start_server(". {\n bind lo {\n  except ::1\n }\n whoami\n}\n")
    assert listening(running) == {"127.0.0.1"}


async def test_repeated_bind_lines_add_up(start_server: StartServer) -> None:
    running = await start_server(". {\n bind 127.0.0.1\n bind 127.0.0.2\n whoami\n}\n")
    assert listening(running) == {"127.0.0.1", "127.0.0.2"}
    assert await raw_udp(running.port, query_bytes("example.org")) is not None


def test_unknown_interface_is_a_corefile_error() -> None:
    with pytest.raises(CorefileError) as caught:
        load(". {\n bind nosuchif0\n}\n", "Corefile", TEST_REGISTRY)
    message = str(caught.value)
    assert message.startswith('Corefile:2: bind: "nosuchif0" is neither an IP address nor a network interface')
    assert "lo" in message  # it lists what exists


def test_except_everything_is_an_error() -> None:
    with pytest.raises(CorefileError, match="every address is excluded"):
        load(". {\n bind 127.0.0.1 {\n  except 127.0.0.1\n }\n}\n", "Corefile", TEST_REGISTRY)
