"""forward's pool of UDP sockets (plugins/forward/udp.py): reuse within limits, one query
per socket at a time, and no socket kept after anything odd happened on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import dns.message
import dns.rcode
import pytest

import plugins.forward.matching as matching
import plugins.forward.udp as udp_module
from plugins.forward import Forward
from plugins.forward.matching import UpstreamError
from plugins.forward.udp import Datagrams
from resolver.config import load
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import Running, query_bytes, wait_for
from tests.test_forward import FAST, MakeUpstream, addresses, forward_of, serve, values
from tests.test_forward import make_upstream as make_upstream
from tests.upstreams import FakeUpstream


def pool_of(running: Running, index: int = 0) -> Datagrams:
    return forward_of(running).upstreams[index].datagrams


def ports(upstream: FakeUpstream) -> list[int]:
    """The source port of each query the upstream got over UDP, health checks left out."""
    return [query.source[1] for query in upstream.received("udp")]


def open_ports(pool: Datagrams) -> set[int]:
    return {conn.sock.getsockname()[1] for conn in pool.open}


async def test_a_socket_answers_max_uses_queries_then_a_new_port_is_used(
    start_server: StartServer, make_upstream: MakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp_module, "MAX_USES", 3)
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    for n in range(7):
        assert addresses(await running.udp(f"q{n}.example.org")) == ["192.0.2.1"]
    seen = ports(upstream)
    assert seen[0] == seen[1] == seen[2] != seen[3] == seen[4] == seen[5] != seen[6]
    assert len(set(seen)) == 3
    assert len({query.wire[:2] for query in upstream.received("udp")}) >= 6  # a new ID every time
    labels = ("forward", upstream.target, "udp")
    assert values(running, "coredns_proxy_conn_cache_misses_total") == {labels: 3}
    assert values(running, "coredns_proxy_conn_cache_hits_total") == {labels: 4}


async def test_queries_in_flight_never_share_a_socket(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstream = await make_upstream()
    upstream.hold = asyncio.Event()
    running = await serve(start_server, f"forward . {upstream.target}")
    waiting = [asyncio.ensure_future(running.udp(f"q{n}.example.org")) for n in range(5)]
    await wait_for(lambda: len(upstream.received()) == 5)
    assert len(set(ports(upstream))) == 5
    upstream.hold.set()
    assert [addresses(reply) for reply in await asyncio.gather(*waiting)] == [["192.0.2.1"]] * 5
    pool = pool_of(running)
    assert len(pool.idle) == 5 and open_ports(pool) == set(ports(upstream))
    await running.udp("again.example.org")
    assert ports(upstream)[-1] in ports(upstream)[:5]  # an idle socket, not a new one


async def test_idle_sockets_beyond_the_cap_are_closed(
    start_server: StartServer, make_upstream: MakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp_module, "MAX_IDLE", 2)
    upstream = await make_upstream()
    upstream.hold = asyncio.Event()
    running = await serve(start_server, f"forward . {upstream.target}")
    waiting = [asyncio.ensure_future(running.udp(f"q{n}.example.org")) for n in range(5)]
    await wait_for(lambda: len(upstream.received()) == 5)
    pool = pool_of(running)
    held = list(pool.open)
    upstream.hold.set()
    await asyncio.gather(*waiting)
    assert len(pool.idle) == 2 and set(pool.idle) == pool.open
    # Every socket that was busy and is not kept is closed (its descriptor too).
    assert all(conn.closed and conn.sock.fileno() == -1 for conn in held if conn not in pool.open)
    assert sum(conn.closed for conn in held) >= 3, (held, values(running, "coredns_forward_requests_total"))


@pytest.mark.parametrize("spoof", ["id", "question"])
async def test_a_socket_that_got_a_forged_reply_is_not_reused(
    start_server: StartServer, make_upstream: MakeUpstream, spoof: str
) -> None:
    upstream = await make_upstream()
    upstream.spoof_first = spoof
    running = await serve(start_server, f"forward . {upstream.target}")
    assert addresses(await running.udp("a.example.org")) == ["192.0.2.1"]
    assert not pool_of(running).open  # closed after its query, not pooled
    upstream.spoof_first = None
    assert addresses(await running.udp("b.example.org")) == ["192.0.2.1"]
    first, second = ports(upstream)
    assert first != second
    assert values(running, "corefile_resolver_forward_ignored_replies_total") == {(upstream.target, spoof): 1}


async def test_a_socket_whose_query_timed_out_is_closed(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstream = await make_upstream()
    upstream.silent = True
    running = await serve(start_server, f"forward . {upstream.target} {{\n  read_timeout 200ms\n  max_fails 0\n }}")
    assert (await running.udp("lost.example.org")).rcode() == dns.rcode.SERVFAIL
    assert not pool_of(running).open
    upstream.silent = False
    assert addresses(await running.udp("found.example.org")) == ["192.0.2.1"]
    *timed_out, answered = ports(upstream)
    assert len(timed_out) == 2 and answered not in timed_out  # two attempts, then a new socket


@pytest.mark.parametrize(("duplicate", "reason"), [(True, "late"), (False, "malformed")])
async def test_a_datagram_arriving_on_an_idle_socket_closes_it(
    start_server: StartServer, make_upstream: MakeUpstream, duplicate: bool, reason: str
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    await running.udp("example.org")
    pool = pool_of(running)
    (conn,) = pool.idle
    (received,) = upstream.received("udp")
    # The upstream answering the same query twice, or a datagram that is no DNS message.
    answer = dns.message.make_response(dns.message.from_wire(received.wire)).to_wire()
    data = answer if duplicate else b"\x00" * 5
    assert upstream._udp is not None  # the upstream's own socket: its address is the one the kernel lets in
    upstream._udp.sendto(data, received.source)
    await wait_for(lambda: conn.closed)
    assert not pool.open
    assert values(running, "corefile_resolver_forward_ignored_replies_total") == {(upstream.target, reason): 1}
    assert addresses(await running.udp("next.example.org")) == ["192.0.2.1"]
    assert ports(upstream)[1] != ports(upstream)[0]


async def test_expire_zero_gives_every_query_a_socket_of_its_own(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n  expire 0s\n }}")
    for n in range(3):
        assert addresses(await running.udp(f"q{n}.example.org")) == ["192.0.2.1"]
    assert len(set(ports(upstream))) == 3
    assert not pool_of(running).open


async def test_idle_sockets_are_closed_once_they_are_old(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n  expire 100ms\n }}")
    await running.udp("example.org")
    pool = pool_of(running)
    (conn,) = pool.open
    await wait_for(lambda: not pool.open)  # the janitor closed it, with no query to notice
    assert conn.sock.fileno() == -1 and not pool.idle


async def test_a_refused_port_closes_the_socket(start_server: StartServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    running = await serve(start_server, f"forward . 127.0.0.2:{port} {{\n  {FAST}\n }}")
    assert (await running.udp("example.org")).rcode() == dns.rcode.SERVFAIL
    assert not pool_of(running).open


async def test_health_checks_use_sockets_of_their_own(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstream = await make_upstream()
    upstream.silent = True
    running = await serve(start_server, f"forward . {upstream.target} {{\n  {FAST}\n }}")
    assert (await running.udp("example.org")).rcode() == dns.rcode.SERVFAIL
    await wait_for(lambda: len(upstream.received("udp", health=True)) >= 3)
    checks = [query.source[1] for query in upstream.received("udp", health=True)]
    assert len(set(checks)) == len(checks)
    labels = ("forward", upstream.target, "udp")
    counted = values(running, "coredns_proxy_conn_cache_misses_total").get(labels, 0)
    counted += values(running, "coredns_proxy_conn_cache_hits_total").get(labels, 0)
    assert counted == len(upstream.received("udp"))  # queries only: checks are not connection-cache traffic


async def test_stop_closes_every_socket_and_fails_the_queries_on_them(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    upstream.hold = asyncio.Event()
    waiting = [asyncio.ensure_future(running.udp(f"q{n}.example.org")) for n in range(3)]
    await wait_for(lambda: len(upstream.received()) == 3)
    pool = pool_of(running)
    sockets = [conn.sock for conn in pool.open]
    await forward_of(running).stop()
    assert all(sock.fileno() == -1 for sock in sockets) and not pool.open
    # The queries fail at once (SERVFAIL), long before the 2 s read timeout, and no new
    # socket is opened for them.
    replies = await asyncio.wait_for(asyncio.gather(*waiting), timeout=1.5)
    assert [reply.rcode() for reply in replies] == [dns.rcode.SERVFAIL] * 3
    assert not pool.open
    upstream.hold.set()


async def test_a_shorter_deadline_is_kept_while_a_longer_one_waits(make_upstream: MakeUpstream) -> None:
    """One timer serves the whole pool: a query with an earlier deadline than the one the
    timer waits for must not wait for the later one."""
    upstream = await make_upstream()
    upstream.silent = True
    config = load(f".:0 {{\n forward . {upstream.target}\n}}\n", "Corefile", Registry.default())
    (forward,) = config.blocks[0].find_all("forward")
    assert isinstance(forward, Forward)
    await forward.start()
    try:
        pool = forward.upstreams[0].datagrams
        query = query_bytes("example.org")
        slow = asyncio.ensure_future(pool.exchange(query, len(query), 30.0))
        await wait_for(lambda: len(upstream.received()) == 1)
        with pytest.raises(UpstreamError, match="i/o timeout"):
            await asyncio.wait_for(pool.exchange(query, len(query), 0.05), timeout=5)
        assert not slow.done()
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        assert not pool.open  # both sockets closed: one timed out, one given up
    finally:
        await forward.stop()


class FailingSends:
    """A pooled socket whose next ``send`` fails (as after an ICMP error the kernel kept)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, _data: bytes) -> int:
        raise OSError(111, "Connection refused")

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


async def test_a_failed_send_is_an_attempt_that_failed_on_a_socket_not_reused(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target}")
    await running.udp("a.example.org")
    pool = pool_of(running)
    (conn,) = pool.idle
    conn.sock = FailingSends(conn.sock)  # type: ignore[assignment]
    # The first attempt fails on the pooled socket, which is closed; the second gets a new one.
    assert addresses(await running.udp("b.example.org")) == ["192.0.2.1"]
    assert conn.closed and conn not in pool.open
    assert len(upstream.received("udp")) == 2 and len(set(ports(upstream))) == 2


def test_a_forked_child_draws_its_own_message_ids() -> None:
    """IDs come from a buffer of random bytes: a worker forked after its parent filled
    that buffer must not replay the parent's next IDs."""
    matching.new_id()  # the buffer is filled now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next IDs, then leave at once
        os.write(write, b"".join(matching.new_id() for _ in range(8)))
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = b"".join(matching.new_id() for _ in range(8))
    assert len(child) == 16 and child != parent
