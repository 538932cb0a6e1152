"""log: query lines in CoreDNS's formats (and JSON), filtered by names and reply class."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import Iterator

import dns.message
import pytest

from plugins.log import compile_format, go_seconds
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.dnsnames import class_text, type_text
from resolver.logs import _CoreDNSFormatter
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import LOOPBACK, Capture, frame, query_bytes, read_frame, wait_for

REGISTRY = Registry(("bind", "errors", "log", "failing", "big", "erratic", "whoami"), "tests.testplugins")


@pytest.fixture
def lines() -> Iterator[Capture]:
    logger = logging.getLogger("resolver.log")
    capture = Capture()
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(level)


def corefile(*lines: str) -> str:
    body = "\n".join(f" {line}" for line in lines)
    return f". {{\n bind 127.0.0.1\n{body}\n}}\n"


async def ask(port: int, packet: bytes, host: str = LOOPBACK) -> tuple[int, bytes]:
    """Send one UDP query from a socket of our own: (our port, the reply)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(sock, packet, (host, port))
        reply = await asyncio.wait_for(loop.sock_recv(sock, 65535), 3)
        return sock.getsockname()[1], reply


async def send_only(port: int, packet: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(packet, (LOOPBACK, port))


# -- the Common Log Format ----------------------------------------------------------------


async def test_default_line_is_corednss_common_log_format(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log", "erratic"), registry=REGISTRY)
    query = query_bytes("Example.ORG", "A", qid=4242)
    client_port, reply = await ask(running.port, query)
    (line,) = lines.messages
    expected = (
        rf'127\.0\.0\.1:{client_port} - 4242 "A IN example\.org\. udp {len(query)} false 512" '
        rf"NOERROR qr,aa,rd {len(reply)} \d+(\.\d+)?s"
    )
    assert re.fullmatch(expected, line), line
    # On stdout the line carries [INFO] and, as in CoreDNS, no "plugin/log:" prefix.
    assert _CoreDNSFormatter().format(lines.records[0]) == f"[INFO] {line}"


async def test_edns_do_bufsize_and_tcp_are_reported(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log", "erratic"), registry=REGISTRY)
    query = query_bytes("example.org", "AAAA", qid=7, use_edns=0, want_dnssec=True, payload=4096)
    await ask(running.port, query)
    assert '"AAAA IN example.org. udp' in lines.messages[0]
    assert f"udp {len(query)} true 4096" in lines.messages[0]
    reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
    writer.write(frame(query_bytes("example.org", "TXT", qid=8)))
    await read_frame(reader)
    client_port = writer.get_extra_info("sockname")[1]
    writer.close()
    assert re.match(
        rf'127\.0\.0\.1:{client_port} - 8 "TXT IN example\.org\. tcp \d+ false 65535" NOERROR', lines.messages[1]
    )


async def test_combined_adds_the_opcode_and_common_is_the_default(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log . {combined}", "erratic"), registry=REGISTRY)
    await ask(running.port, query_bytes("example.org"))
    assert lines.messages[0].endswith(' "0"')
    assert compile_format("{common}") == compile_format(
        '{remote}:{port} - {>id} "{type} {class} {name} {proto} {size} {>do} {>bufsize}" '
        "{rcode} {>rflags} {rsize} {duration}"
    )


async def test_custom_format_placeholders_metadata_and_unknown_labels(
    start_server: StartServer, lines: Capture
) -> None:
    text = "{proto} Request: {name} {type} {class} {>id} {>opcode} {local} {/pod} {/log/class} {/log/type} {nope}"
    running = await start_server(corefile(f'log . "{text}"', "failing", "erratic"), registry=REGISTRY)
    await ask(running.port, query_bytes("nx.example.org", "MX", qid=99))
    await ask(running.port, query_bytes("pod.example.org", "A", qid=100))
    await ask(running.port, query_bytes("nodata.example.org", "A", qid=101))
    assert lines.messages == [
        "udp Request: nx.example.org. MX IN 99 0 127.0.0.1 - denial NXDOMAIN {nope}",
        "udp Request: pod.example.org. A IN 100 0 127.0.0.1 default/client-7d9f success NOERROR {nope}",
        "udp Request: nodata.example.org. A IN 101 0 127.0.0.1 - denial NODATA {nope}",
    ]


def test_format_parsing_follows_corednss_replacer() -> None:
    # The nearest "{" before each "}" opens a label; a lone "}" or "{" is text.
    parts = compile_format("A } {{type}} {x")
    assert parts[0] == "A } {" and callable(parts[1]) and parts[2] == "} {x"


def test_names_of_types_and_classes_are_miekgs() -> None:
    assert [type_text(t) for t in (1, 65, 23, 65280)] == ["A", "HTTPS", "NSAP-PTR", "TYPE65280"]
    assert [class_text(c) for c in (1, 3, 4, 254, 255)] == ["IN", "CH", "HS", "NONE", "CLASS255"]


def test_duration_is_printed_like_go() -> None:
    assert go_seconds(113_000) == "0.000113s"
    assert go_seconds(12_345) == "0.000012345s"
    assert go_seconds(1_500_000_000) == "1.5s"
    assert go_seconds(2_000_000_000) == "2s"


async def test_rflags_show_what_the_client_gets(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log . {>rflags}", "erratic {", "  truncate 2", " }"), registry=REGISTRY)
    await ask(running.port, query_bytes("example.org"))
    await ask(running.port, query_bytes("example.org"))
    plain = dns.message.make_query("example.org", "A")
    plain.flags = 0  # no RD
    await ask(running.port, plain.to_wire())
    assert lines.messages == ["qr,aa,rd", "qr,aa,tc,rd", "qr,aa"]


async def test_rflags_include_tc_when_the_server_cuts_a_udp_reply(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile('log . "{>rflags} {rsize}"', "big 100"), registry=REGISTRY)
    _port, reply = await ask(running.port, query_bytes("example.org"))
    flags, rsize = lines.messages[0].split()
    assert flags == "qr,aa,tc,rd"
    assert int(rsize) > 512 >= len(reply)  # rsize is the reply before the cut, as in CoreDNS


async def test_a_query_answered_with_nothing_is_logged_as_an_error(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(
        corefile("log {", "  class error", " }", "erratic {", "  drop 1", " }"), registry=REGISTRY
    )
    await send_only(running.port, query_bytes("example.org", qid=5))
    await wait_for(lambda: len(lines.messages) == 1)
    assert re.search(r'"A IN example\.org\. udp \d+ false 512" - - 0 \d', lines.messages[0])


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_ipv6_clients_are_bracketed(start_server: StartServer, lines: Capture) -> None:
    try:
        running = await start_server(". {\n bind ::1\n log\n erratic\n}\n", registry=REGISTRY)
    except Exception as exc:  # pragma: no cover - hosts without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {exc}")
    client_port, _reply = await ask(running.port, query_bytes("example.org"), host="::1")
    assert lines.messages[0].startswith(f"[::1]:{client_port} - ")


# -- JSON -----------------------------------------------------------------------------------


async def test_json_lines_parse_and_carry_every_field(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log json", "failing", "erratic"), registry=REGISTRY)
    query = query_bytes("Pod.Example.org", "A", qid=321, use_edns=0, want_dnssec=True, payload=1232)
    client_port, reply = await ask(running.port, query)
    await ask(running.port, query_bytes("nx.example.org", "AAAA", qid=322))
    first, second = (json.loads(message) for message in lines.messages)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("time"))
    duration = first.pop("duration")
    assert isinstance(duration, float) and duration >= 0
    assert first == {
        "client": "127.0.0.1",
        "port": client_port,
        "id": 321,
        "name": "pod.example.org.",
        "type": "A",
        "class": "IN",
        "proto": "udp",
        "size": len(query),
        "do": True,
        "bufsize": 1232,
        "rcode": "NOERROR",
        "rflags": "qr,aa,rd",
        "rsize": len(reply),
        "pod": "default/client-7d9f",
    }
    assert second["rcode"] == "NXDOMAIN" and second["type"] == "AAAA" and second["do"] is False
    assert "pod" not in second


# -- which queries are logged --------------------------------------------------------------


async def test_class_filter_keeps_only_the_chosen_classes(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log . {", "  class denial", " }", "failing", "erratic"), registry=REGISTRY)
    for name in ("ok.example.org", "nx.example.org", "nodata.example.org", "boom.example.org"):
        await ask(running.port, query_bytes(name))
    assert [message.split('"')[1].split()[2] for message in lines.messages] == [
        "nx.example.org.",
        "nodata.example.org.",
    ]


async def test_error_and_success_classes(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(
        corefile("log . {name} {", "  class error", "  class success", " }", "failing", "erratic"), registry=REGISTRY
    )
    for name in ("ok.example.org", "nx.example.org", "boom.example.org", "refused.example.org"):
        await ask(running.port, query_bytes(name))
    assert lines.messages == ["ok.example.org.", "boom.example.org.", "refused.example.org."]


async def test_names_limit_logging_to_those_zones(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(corefile("log Example.org example.net. {name}", "erratic"), registry=REGISTRY)
    for name in ("example.org", "a.b.example.org", "notexample.org", "other.com", "x.example.net"):
        await ask(running.port, query_bytes(name))
    assert lines.messages == ["example.org.", "a.b.example.org.", "x.example.net."]


async def test_first_log_rule_covering_a_name_decides(start_server: StartServer, lines: Capture) -> None:
    running = await start_server(
        corefile("log example.org {name} {", "  class error", " }", 'log . "{name} second"', "failing", "erratic"),
        registry=REGISTRY,
    )
    for name in ("ok.example.org", "boom.example.org", "other.net"):
        await ask(running.port, query_bytes(name))
    # ok.example.org is covered by the first rule, whose class filter drops it.
    assert lines.messages == ["boom.example.org.", "other.net. second"]


# -- setup errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines_", "problem"),
    [
        (["log {", "  class loud", " }"], 'invalid class "loud"'),
        (["log {", "  class", " }"], "expected at least 1 argument"),
        (["log {", "  format json", " }"], 'unknown option "format"'),
        (["log a..b"], 'invalid name "a..b"'),
    ],
)
def test_bad_configuration_is_a_one_line_error(lines_: list[str], problem: str) -> None:
    with pytest.raises(CorefileError) as caught:
        load(corefile(*lines_, "erratic"), "Corefile", REGISTRY)
    assert problem in str(caught.value)
    assert str(caught.value).startswith("Corefile:3:") or str(caught.value).startswith("Corefile:4:")
