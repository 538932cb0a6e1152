"""forward under upstream misbehaviour found in review: wedged or closing connections,
TC without TCP, error replies without a question, running out of sockets."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import dns.flags
import dns.rcode
import pytest

import plugins.forward.udp as udp_module
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.test_forward import FAST, MakeUpstream, serve
from tests.test_forward import make_upstream as make_upstream


async def test_a_wedged_pooled_connection_is_dropped_not_reused(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.first_per_connection = True  # answers one query per connection, then goes quiet
    running = await serve(start_server, f"forward . {upstream.target} {{\n  force_tcp\n  read_timeout 300ms\n }}")
    # Query two times out on the wedged connection, which is then closed: forward's second
    # attempt opens a new connection and is answered (reusing the wedged one would fail).
    for name in ("one.example.", "two.example.", "three.example."):
        assert (await running.udp(name)).rcode() == dns.rcode.NOERROR, name
    assert upstream.connections >= 3


async def test_an_upstream_closing_after_each_answer_loses_no_query(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.close_after_answer = True
    running = await serve(start_server, f"forward . {upstream.target} {{\n  force_tcp\n }}")
    for index in range(30):
        assert (await running.udp(f"seq{index}.example.")).rcode() == dns.rcode.NOERROR
    replies = await asyncio.gather(*(running.udp(f"burst{index}.example.") for index in range(20)))
    assert [reply.rcode() for reply in replies] == [dns.rcode.NOERROR] * 20


async def test_tc_answer_is_passed_on_when_tcp_fails(start_server: StartServer, make_upstream: MakeUpstream) -> None:
    upstream = await make_upstream()
    upstream.truncate_udp = True
    upstream.refuse_tcp()
    running = await serve(start_server, f"forward . {upstream.target}")
    reply = await running.udp("big.example.")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.TC  # the client retries over TCP itself


async def test_an_error_reply_without_a_question_is_the_answer(
    start_server: StartServer, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream()
    upstream.questionless = True
    upstream.rcode = dns.rcode.FORMERR
    running = await serve(start_server, f"forward . {upstream.target} {{\n  {FAST}\n }}")
    reply = await asyncio.wait_for(running.udp("odd.example."), timeout=1.5)  # not after a 2s read timeout
    assert reply.rcode() == dns.rcode.FORMERR
    assert reply.question[0].name.to_text() == "odd.example."  # the client still gets its question


async def test_running_out_of_sockets_is_an_upstream_error_not_a_panic(
    start_server: StartServer,
    make_upstream: MakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await make_upstream()
    running = await serve(start_server, f"forward . {upstream.target} {{\n  {FAST}\n }}")

    class NoSockets:
        AF_INET, AF_INET6, SOCK_DGRAM = udp_module.socket.AF_INET, udp_module.socket.AF_INET6, 2

        @staticmethod
        def socket(*_args: object) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(udp_module, "socket", NoSockets)
    assert (await running.udp("fd.example.")).rcode() == dns.rcode.SERVFAIL
    assert running.server.stats.panics == 0


def test_loop_refuses_real_forward_to_a_resolv_conf_naming_this_server(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# written by systemd-resolved\nnameserver 127.0.0.53\noptions edns0\n")
    with pytest.raises(CorefileError) as caught:
        load(f".:53 {{\n loop\n forward . {resolv}\n}}\n", "Corefile", Registry.default())
    message = str(caught.value)
    assert message.startswith("Corefile:2: loop: forward target 127.0.0.53:53")
    assert f"{resolv} line 2: nameserver 127.0.0.53" in message and "\n" not in message
    # Without loop nothing is checked (as in CoreDNS, where the check is loop's).
    load(f".:53 {{\n forward . {resolv}\n}}\n", "Corefile", Registry.default())
