"""loop: the probe that catches a server forwarding to itself, and the check at load.

Servers forward with ``relay`` (tests/testplugins/relay.py), a test-only forwarder with
forward's ``targets`` shape, so these tests do not depend on ``forward``; the last test
runs the real ``forward`` when it exists. Ports are named in the Corefiles (picked free
on 127.0.0.1) because two servers must know each other's port before either starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from dnslib import QTYPE, RCODE, DNSRecord

import plugins.loop as loop_module
from plugins.loop import Loop, probe_destination, static_problem
from resolver import wire
from resolver.config import ServerBlock, load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from resolver.request import Request
from resolver.runtime import Runtime
from resolver.server import Server
from tests.helpers import LOOPBACK, query_bytes, raw_udp, wait_for
from tests.testplugins.erratic import Erratic
from tests.testplugins.relay import Relay
from tests.testplugins.relay import Target as RelayTarget

ORDER = ("bind", "loop", "relay", "erratic", "whoami")
REGISTRY = Registry(ORDER, "tests.testplugins")
ROOT = Path(__file__).resolve().parent.parent
LOOP_LINE = re.compile(
    r'^Loop \((?P<source>127\.0\.0\.1:\d+) -> (?P<address>[^)]+)\) detected for zone "(?P<zone>[^"]+)", '
    r'see https://coredns\.io/plugins/loop#troubleshooting\. Query: "HINFO (?P<name>\d+\.\d+\.[^"]*)"$'
)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port


def corefile(port: int, *lines: str, zone: str = ".") -> str:
    body = "".join(f"    {line}\n" for line in lines)
    return f"{zone}:{port} {{\n    bind 127.0.0.1\n{body}}}\n"


class Instance:
    """A running server, with what its runtime's fatal hook was called with."""

    def __init__(self, server: Server, fatal: list[str]) -> None:
        self.server = server
        self.fatal = fatal

    @property
    def block(self) -> ServerBlock:
        assert self.server.config is not None
        return self.server.config.blocks[0]

    @property
    def loop(self) -> Loop:
        found = self.block.find("loop")
        assert isinstance(found, Loop)
        return found

    @property
    def relay(self) -> Relay:
        found = self.block.find("relay")
        assert isinstance(found, Relay)
        return found

    async def reconfigure(self, text: str) -> None:
        config = load(text, "Corefile", REGISTRY, default_port=0, runtime=self.server.runtime)
        await self.server.apply(config)


Start = Callable[[str], Awaitable[Instance]]


@pytest.fixture
async def start(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Start]:
    """``await start(corefile)``: an in-process server whose ``runtime.fatal`` records.

    In-process servers do not exit on a loop, so they need not linger before exiting.
    """
    monkeypatch.setattr(loop_module, "LINGER", 0)
    servers: list[Server] = []

    async def run(text: str) -> Instance:
        runtime = Runtime()
        fatal: list[str] = []
        runtime.fatal = fatal.append  # type: ignore[attr-defined]
        config = load(text, "Corefile", REGISTRY, default_port=0, runtime=runtime)
        server = Server(runtime)
        await server.apply(config)
        servers.append(server)
        return Instance(server, fatal)

    yield run
    for server in servers:
        await server.shutdown()


class Upstream(asyncio.DatagramProtocol):
    """A healthy resolver on 127.0.0.1: NXDOMAIN for every name, as for a random HINFO."""

    def __init__(self) -> None:
        self.questions: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = DNSRecord.parse(data)
        self.questions.append((str(query.q.qname), QTYPE[query.q.qtype]))
        reply = query.reply()
        reply.header.rcode = RCODE.NXDOMAIN
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)

    def hinfo(self) -> list[str]:
        return [name for name, qtype in self.questions if qtype == "HINFO"]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(Upstream, local_addr=(LOOPBACK, 0))
    yield protocol, transport.get_extra_info("sockname")[1]
    transport.close()


@pytest.fixture
def fatal_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="plugin.loop")
    return caplog


def fatal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "FATAL"]


# -- the probe ------------------------------------------------------------------------------


async def test_two_servers_relaying_to_each_other_both_detect_the_loop(
    start: Start, fatal_log: pytest.LogCaptureFixture
) -> None:
    first_port, second_port = free_port(), free_port()
    first = await start(corefile(first_port, "loop", f"relay 127.0.0.1:{second_port}"))
    second = await start(corefile(second_port, "loop", f"relay 127.0.0.1:{first_port}"))
    await wait_for(lambda: bool(first.fatal and second.fatal), timeout=15)
    for instance, port, other in ((first, first_port, second_port), (second, second_port, first_port)):
        (message,) = instance.fatal
        match = LOOP_LINE.match(message)
        assert match, message
        assert match["address"] == f"127.0.0.1:{port}" and match["zone"] == "."
        assert message in fatal_lines(fatal_log)
        # The FATAL line is followed by one naming the relay target that leads back here.
        explanation = fatal_lines(fatal_log)[fatal_lines(fatal_log).index(message) + 1]
        assert f"forward target 127.0.0.1:{other} (Corefile:4: relay 127.0.0.1:{other}) leads back" in explanation
        assert "forward to the real upstream DNS server instead of a loopback address" in explanation


async def test_looping_probe_is_answered_not_forwarded_again_and_probing_ends(start: Start) -> None:
    first_port, second_port = free_port(), free_port()
    second = await start(corefile(second_port, f"relay 127.0.0.1:{first_port}"))  # no loop plugin here
    first = await start(corefile(first_port, "loop", f"relay 127.0.0.1:{second_port}"))
    await wait_for(lambda: bool(first.fatal), timeout=15)
    (message,) = first.fatal
    name = LOOP_LINE.match(message)["name"]  # type: ignore[index]
    # A(1) -> B -> A(2) -> B -> A(3): the third sighting is answered by loop, so B
    # relayed the probe exactly twice and the prober got its answer.
    await wait_for(lambda: first.loop._task is not None and first.loop._task.done())
    assert second.relay.relayed.count(name) == 2
    assert first.loop.detected


async def test_healthy_upstream_is_not_a_loop_and_then_loop_costs_one_check(
    start: Start, upstream: tuple[Upstream, int]
) -> None:
    resolver, upstream_port = upstream
    port = free_port()
    instance = await start(corefile(port, "loop", f"relay 127.0.0.1:{upstream_port}"))
    await wait_for(lambda: instance.loop.off)
    assert not instance.fatal
    (probe,) = resolver.hinfo()  # one probe, forwarded like any query, answered NXDOMAIN
    assert re.fullmatch(r"\d+\.\d+\.", probe)
    assert instance.loop.in_chain is False  # the core may leave it out of the chain

    class Untouchable:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"loop read req.{name} after probing ended")

    sentinel: Any = object()

    async def next_handler(req: Any) -> Any:
        return sentinel

    assert await instance.loop.serve(Untouchable(), next_handler) is sentinel  # type: ignore[arg-type]
    # The probe name, seen again now, is just another query.
    reply = dns.message.from_wire(await _ask(port, probe, "HINFO"))
    assert reply.rcode() == dns.rcode.NXDOMAIN and resolver.hinfo() == [probe, probe]


async def test_probe_uses_the_first_zone_and_the_blocks_port(start: Start, upstream: tuple[Upstream, int]) -> None:
    resolver, upstream_port = upstream
    port = free_port()
    text = f"example.org:{port} example.net:{port} {{\n bind 127.0.0.1\n loop\n relay 127.0.0.1:{upstream_port}\n}}\n"
    instance = await start(text)
    await wait_for(lambda: instance.loop.off)
    (probe,) = resolver.hinfo()
    assert re.fullmatch(r"\d+\.\d+\.example\.org\.", probe)
    assert instance.loop.address == f"127.0.0.1:{port}"


async def test_servfail_does_not_end_probing_so_a_loop_that_forms_later_is_caught(start: Start) -> None:
    first_port, second_port = free_port(), free_port()
    first = await start(corefile(first_port, "loop", f"relay 127.0.0.1:{second_port}"))
    # Nothing listens on second_port yet: the probe's answer is SERVFAIL, probing goes on.
    await wait_for(lambda: len(first.loop.seen) >= 2)
    assert not first.loop.off and not first.fatal
    await start(corefile(second_port, f"relay 127.0.0.1:{first_port}"))
    await wait_for(lambda: bool(first.fatal), timeout=15)


async def test_every_reload_probes_again(start: Start, upstream: tuple[Upstream, int]) -> None:
    resolver, upstream_port = upstream
    first_port, second_port = free_port(), free_port()
    first = await start(corefile(first_port, "loop", f"relay 127.0.0.1:{upstream_port}"))
    await wait_for(lambda: first.loop.off)
    assert len(resolver.hinfo()) == 1 and not first.fatal
    await start(corefile(second_port, f"relay 127.0.0.1:{first_port}"))
    await first.reconfigure(corefile(first_port, "loop", f"relay 127.0.0.1:{second_port}"))
    await wait_for(lambda: bool(first.fatal), timeout=15)
    assert LOOP_LINE.match(first.fatal[0])


async def test_probe_that_is_never_answered_gives_up_after_the_window(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_module, "PROBE_WINDOW", 0.6)
    monkeypatch.setattr(loop_module, "PROBE_TIMEOUT", 0.1)
    monkeypatch.setattr(loop_module, "PROBE_RETRY", 0.05)
    instance = await start(corefile(free_port(), "loop", "erratic {\n drop 1\n }"))
    await wait_for(lambda: instance.loop.off)
    erratic = instance.block.find("erratic")
    assert isinstance(erratic, Erratic) and erratic.queries >= 2  # it kept trying, then stopped
    assert not instance.fatal


async def test_an_answer_counts_only_if_the_probe_went_through_this_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer that did not pass through this plugin came from someone else on that
    address (or from another configuration's chain) and proves nothing."""
    monkeypatch.setattr(loop_module, "PROBE_WINDOW", 0.3)
    monkeypatch.setattr(loop_module, "PROBE_RETRY", 0.01)
    block = load(corefile(5300, "loop"), "Corefile", REGISTRY).blocks[0]
    plugin = block.find("loop")
    assert isinstance(plugin, Loop)
    attempts: list[str] = []

    async def answered_elsewhere(host: str, port: int, name: str) -> int:
        attempts.append(name)
        return wire.NXDOMAIN

    monkeypatch.setattr(loop_module, "exchange", answered_elsewhere)
    await plugin._probe()
    assert len(attempts) > 1 and plugin.off  # kept trying until the window closed

    attempts.clear()
    plugin.off = False

    async def answered_through_us(host: str, port: int, name: str) -> int:
        attempts.append(name)
        plugin.seen[name] += 1  # as serve() counts it on the way through
        return wire.NXDOMAIN

    monkeypatch.setattr(loop_module, "exchange", answered_through_us)
    await plugin._probe()
    assert len(attempts) == 1 and plugin.off


async def test_port_zero_key_probes_the_port_the_server_bound(start: Start, upstream: tuple[Upstream, int]) -> None:
    resolver, upstream_port = upstream
    instance = await start(corefile(0, "loop", f"relay 127.0.0.1:{upstream_port}"))
    await wait_for(lambda: instance.loop.off)
    assert instance.block.bound_ports[0] != 0  # the kernel's port, known to the block
    assert len(resolver.hinfo()) == 1  # so the probe went out (through the relay) and came back


# -- counting, unit level ---------------------------------------------------------------------


def request(name: str, qtype: str = "HINFO", source: tuple[str, int] = ("127.0.0.1", 40000)) -> Request:
    data = DNSRecord.question(name, qtype).pack()
    return Request(data, wire.parse_question(data), source, "udp")


async def test_only_the_third_sighting_of_its_own_probe_is_a_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_module, "LINGER", 0)
    runtime = Runtime()
    fatal: list[str] = []
    runtime.fatal = fatal.append  # type: ignore[attr-defined]
    text = "example.org:5300 {\n bind 127.0.0.1\n loop\n whoami\n}\n"
    plugin = load(text, "Corefile", REGISTRY, runtime=runtime).blocks[0].find("loop")
    assert isinstance(plugin, Loop)
    probe = "12.34.example.org."
    plugin.seen[probe] = 0
    plugin.address = "127.0.0.1:5300"
    passed: list[str] = []

    async def next_handler(req: Request) -> Any:
        passed.append(req.qname)
        return None

    for other in (request("56.78.example.org."), request(probe, "A"), request("x.example.org.")):
        assert await plugin.serve(other, next_handler) is None
    for _ in range(2):
        assert await plugin.serve(request(probe.upper()), next_handler) is None  # 0x20 case too
    assert len(passed) == 5 and not fatal
    reply = await plugin.serve(request(probe, source=("127.0.0.1", 40001)), next_handler)
    assert reply is not None and reply.rcode == wire.SERVFAIL and reply.plugin == "loop"
    assert len(passed) == 5  # answered here, not passed on
    assert fatal == [
        'Loop (127.0.0.1:40001 -> 127.0.0.1:5300) detected for zone "example.org.", '
        'see https://coredns.io/plugins/loop#troubleshooting. Query: "HINFO 12.34.example.org."'
    ]
    again = await plugin.serve(request(probe), next_handler)
    assert again is not None and again.rcode == wire.SERVFAIL and len(fatal) == 1


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ("", ("127.0.0.1", 5300)),
        ("bind 0.0.0.0", ("127.0.0.1", 5300)),
        ("bind ::", ("::1", 5300)),
        ("bind ::1 127.0.0.1", ("::1", 5300)),
    ],
)
def test_probe_destination(hosts: str, expected: tuple[str, int]) -> None:
    block = load(f".:5300 {{\n {hosts}\n loop\n}}\n", "Corefile", REGISTRY).blocks[0]
    assert probe_destination(block) == expected


# -- the check at load --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "target"),
    [
        ("bind 127.0.0.1", "127.0.0.1:5300"),
        ("bind 127.0.0.1 ::1", "[::1]:5300"),
        ("", "127.0.0.53:5300"),  # listening on every address: every loopback address is us
        ("", "[::1]:5300"),
        ("", "0.0.0.0:5300"),
        ("bind 0.0.0.0", "127.0.0.2:5300"),
    ],
)
def test_load_refuses_a_target_that_is_this_server(hosts: str, target: str) -> None:
    text = f".:5300 {{\n {hosts}\n loop\n relay {target}\n}}\n"
    with pytest.raises(CorefileError) as raised:
        load(text, "Corefile", REGISTRY)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("Corefile:3: loop: forward target ")
    assert f"{target} (Corefile:4: relay {target}) is this server's own address" in message
    assert message.endswith(
        "forward to the real upstream DNS server instead of a loopback address or a server that forwards here"
    )
    assert ("listens on every address of port 5300" in message) == (not hosts)


def test_a_source_that_only_repeats_the_address_is_not_repeated() -> None:
    block = load(".:5300 {\n bind 127.0.0.1\n loop\n}\n", "Corefile", REGISTRY).blocks[0]
    for source in ("127.0.0.1:5300", "127.0.0.1", "dns://127.0.0.1:5300"):
        problem = static_problem(RelayTarget("127.0.0.1", 5300, "dns", source), block)
        assert problem.startswith("forward target 127.0.0.1:5300 is this server's own address: "), problem


def test_load_names_the_resolv_conf_line_and_the_kubelet_fix(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# generated\nsearch example.org\nnameserver 127.0.0.53:5300\n")
    with pytest.raises(CorefileError) as raised:
        load(f".:5300 {{\n loop\n relay {resolv}\n}}\n", "Corefile", REGISTRY)
    message = str(raised.value)
    assert "\n" not in message
    assert f"127.0.0.53:5300 ({resolv} line 3: nameserver 127.0.0.53:5300) is this server's own address" in message
    assert "use a resolv.conf without the loopback nameserver" in message and "kubelet's --resolv-conf" in message


@pytest.mark.parametrize(
    "text",
    [
        ".:5300 {\n bind 127.0.0.1\n loop\n relay 127.0.0.2:5300\n}\n",  # bound elsewhere: not us
        ".:5300 {\n bind 127.0.0.1\n loop\n relay 127.0.0.1:5301\n}\n",  # another port
        ".:5300 {\n loop\n relay 192.0.2.1:5300\n}\n",  # not a local address
        ".:5300 {\n bind 127.0.0.1\n relay 127.0.0.1:5300\n}\n",  # no loop: no check, as in CoreDNS
    ],
)
def test_load_accepts_targets_that_are_not_this_server(text: str) -> None:
    load(text, "Corefile", REGISTRY)


async def test_reload_into_a_self_loop_is_refused_and_the_old_config_serves(
    start: Start, upstream: tuple[Upstream, int]
) -> None:
    _resolver, upstream_port = upstream
    port = free_port()
    instance = await start(corefile(port, "loop", f"relay 127.0.0.1:{upstream_port}"))
    running = instance.server.config
    with pytest.raises(CorefileError, match="is this server's own address"):
        await instance.reconfigure(corefile(port, "loop", f"relay 127.0.0.1:{port}"))
    assert instance.server.config is running
    assert dns.message.from_wire(await _ask(port, "name.example.")).rcode() == dns.rcode.NXDOMAIN


async def _ask(port: int, name: str, rdtype: str = "A") -> bytes:
    reply = await raw_udp(port, query_bytes(name, rdtype))
    assert reply is not None
    return reply


# -- whole processes ----------------------------------------------------------------------------

#: The real CLI, with the test registry (relay instead of forward) in place of the default.
LAUNCHER = (
    "import sys\n"
    "from resolver import cli\n"
    "from resolver.plugin import Registry\n"
    f"Registry.default = classmethod(lambda cls: cls({ORDER!r}, 'tests.testplugins'))\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_pair(
    tmp_path: Path, command: list[str], directive: str, processes: list[subprocess.Popen[str]]
) -> list[tuple[int, str]]:
    """Two servers, each with ``directive`` pointing at the other; their exit codes and output."""
    ports = free_port(), free_port()
    for index, (own, other) in enumerate((ports, ports[::-1])):
        conf = tmp_path / f"Corefile{index}"
        conf.write_text(corefile(own, "loop", f"{directive} 127.0.0.1:{other}"))
        pidfile = tmp_path / f"pid{index}"
        processes.append(
            subprocess.Popen(
                [*command, "-conf", str(conf), "-pidfile", str(pidfile)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + 30
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"still running after 30 s:\n{output}")
        results.append((process.returncode, output))
    for index in range(2):
        assert not (tmp_path / f"pid{index}").exists()  # the exit still ran the cleanup
    return results


def test_two_processes_relaying_to_each_other_both_exit_1(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    results = run_pair(tmp_path, [sys.executable, "-c", LAUNCHER], "relay", processes)
    for code, output in results:
        assert code == 1, output
        assert re.search(
            r"^\[FATAL\] plugin/loop: Loop \(127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+\) detected", output, re.M
        )
        assert "[FATAL] plugin/loop: This server (127.0.0.1:" in output
        assert "Traceback" not in output


@pytest.mark.skipif(
    importlib.util.find_spec("plugins.forward") is None, reason="plugins.forward is not written yet (forward plugin)"
)
def test_two_resolver_processes_forwarding_to_each_other_both_exit_non_zero(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    try:
        importlib.import_module("plugins.forward")
    except Exception as exc:  # being written at the same time: say why this is skipped
        pytest.skip(f"plugins.forward cannot be imported: {exc!r}")
    results = run_pair(tmp_path, [sys.executable, "-m", "resolver"], "forward .", processes)
    for code, output in results:
        assert code != 0, output
        assert re.search(
            r"^\[FATAL\] plugin/loop: Loop \(127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+\) detected", output, re.M
        )
