"""The hosts plugin: /etc/hosts files and inline lines served as A, AAAA and PTR."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.hosts import Hosts, parse_hosts
from resolver.config import load
from resolver.corefile import CorefileError
from resolver.plugin import Registry
from tests.conftest import StartServer
from tests.helpers import Running, wait_for

REGISTRY = Registry.default()

HOSTS_FILE = """\
# a comment line
10.0.0.1    www.example.org web   # trailing comment
10.0.0.2    www.example.org
fd00::1     www.example.org
fd00::2     six.example.org
10.0.0.9    other.example.net
"""


def corefile(body: str, zones: str = ".") -> str:
    return f"{zones} {{\n    bind 127.0.0.1\n{body}\n    whoami\n}}\n"


def hosts_file(tmp_path: Path, text: str = HOSTS_FILE, name: str = "hosts") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def plugin_of(running: Running) -> Hosts:
    assert running.server.config is not None
    found = running.server.config.blocks[0].find("hosts")
    assert isinstance(found, Hosts)
    return found


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)


def is_whoami(reply: dns.message.Message) -> bool:
    """whoami (later in the chain) answered: client address in the additional section."""
    return not reply.answer and any(rrset.rdtype == dns.rdatatype.SRV for rrset in reply.additional)


async def start(start_server: StartServer, body: str, zones: str = ".") -> Running:
    return await start_server(corefile(body, zones), registry=REGISTRY)


# -- answers ------------------------------------------------------------------------------


async def test_a_aaaa_and_ptr_from_a_file(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)}")
    a = await running.udp("www.example.org", "A")
    assert a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.AA
    assert addresses(a) == ["10.0.0.1", "10.0.0.2"]
    assert a.answer[0].ttl == 3600  # CoreDNS's default
    assert addresses(await running.udp("web", "A")) == ["10.0.0.1"]  # a bare alias is a name too
    assert addresses(await running.tcp("www.example.org", "AAAA")) == ["fd00::1"]
    ptr = await running.udp("1.0.0.10.in-addr.arpa", "PTR")
    assert ptr.flags & dns.flags.AA
    assert addresses(ptr) == ["web.", "www.example.org."]
    ptr6 = await running.udp("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", "PTR")
    assert addresses(ptr6) == ["www.example.org."]


async def test_names_are_case_insensitive_and_answered_in_lower_case(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "10.0.0.1 MixedCase.Example.ORG\n")
    running = await start(start_server, f"    hosts {path}")
    reply = await running.udp("mIxEdCaSe.eXaMpLe.oRg", "A")
    assert addresses(reply) == ["10.0.0.1"]
    assert reply.answer[0].name.to_text() == "mixedcase.example.org."
    assert reply.question[0].name.to_text() == "mIxEdCaSe.eXaMpLe.oRg."  # the client's own


async def test_inline_entries_come_after_the_files(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "10.0.0.1 www.example.org\n")
    body = f"    hosts {path} {{\n        10.0.0.5 www.example.org inline.example.org\n        fd00::5 inline6\n    }}"
    running = await start(start_server, body)
    assert [r.to_text() for r in (await running.udp("www.example.org")).answer[0]] == ["10.0.0.1", "10.0.0.5"]
    assert addresses(await running.udp("inline.example.org")) == ["10.0.0.5"]
    assert addresses(await running.udp("inline6", "AAAA")) == ["fd00::5"]
    assert addresses(await running.udp("5.0.0.10.in-addr.arpa", "PTR")) == ["inline.example.org.", "www.example.org."]


async def test_known_name_without_that_type_gets_empty_noerror(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)}")
    for name, rdtype in (("www.example.org", "MX"), ("www.example.org", "TXT"), ("six.example.org", "A")):
        reply = await running.udp(name, rdtype)
        assert reply.rcode() == dns.rcode.NOERROR, (name, rdtype)
        assert reply.flags & dns.flags.AA
        assert not reply.answer and not reply.additional  # not whoami either


# -- names not in the data ----------------------------------------------------------------


async def test_unknown_name_without_fallthrough_is_servfail(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)}")
    reply = await running.udp("missing.example.org", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL  # CoreDNS: no SOA, so no NXDOMAIN
    assert (await running.udp("missing.example.org", "MX")).rcode() == dns.rcode.SERVFAIL


async def test_fallthrough_passes_unknown_names_on(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)} {{\n        fallthrough\n    }}")
    assert is_whoami(await running.udp("missing.example.org", "A"))
    assert addresses(await running.udp("www.example.org", "A")) == ["10.0.0.1", "10.0.0.2"]
    # A known name with no record of the type is still answered here, not passed on.
    assert not is_whoami(await running.udp("www.example.org", "TXT"))


async def test_fallthrough_zones_limit_which_names_go_on(start_server: StartServer, tmp_path: Path) -> None:
    body = f"    hosts {hosts_file(tmp_path)} {{\n        fallthrough example.net\n    }}"
    running = await start(start_server, body)
    assert is_whoami(await running.udp("missing.example.net", "A"))
    assert (await running.udp("missing.example.org", "A")).rcode() == dns.rcode.SERVFAIL


async def test_fallthrough_unsupported_passes_other_types_on(start_server: StartServer, tmp_path: Path) -> None:
    body = f"    hosts {hosts_file(tmp_path)} {{\n        fallthrough\n        fallthrough_unsupported\n    }}"
    running = await start(start_server, body)
    assert is_whoami(await running.udp("www.example.org", "TXT"))
    assert not is_whoami(await running.udp("six.example.org", "A"))  # A/AAAA stay NODATA


async def test_zones_restrict_what_is_served(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)} example.org")
    assert addresses(await running.udp("www.example.org")) == ["10.0.0.1", "10.0.0.2"]
    # Outside the zones: next plugin, even without fallthrough; the file's other.example.net
    # entry is not loaded at all, so its PTR goes on too.
    assert is_whoami(await running.udp("other.example.net", "A"))
    assert is_whoami(await running.udp("9.0.0.10.in-addr.arpa", "PTR"))
    # PTR for a known address needs no reverse zone among the zones.
    assert addresses(await running.udp("2.0.0.10.in-addr.arpa", "PTR")) == ["www.example.org."]


async def test_zones_default_to_the_server_block_zones(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)}", zones="example.org example.net")
    assert addresses(await running.udp("other.example.net")) == ["10.0.0.9"]
    assert (await running.udp("missing.example.org")).rcode() == dns.rcode.SERVFAIL


async def test_ptr_for_unknown_address_goes_on_without_fallthrough(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)}")
    assert is_whoami(await running.udp("77.0.0.10.in-addr.arpa", "PTR"))
    assert is_whoami(await running.udp("0.10.in-addr.arpa", "PTR"))  # not a whole address


async def test_no_reverse_disables_ptr(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)} {{\n        no_reverse\n    }}")
    assert is_whoami(await running.udp("1.0.0.10.in-addr.arpa", "PTR"))
    assert addresses(await running.udp("www.example.org")) == ["10.0.0.1", "10.0.0.2"]


async def test_ttl_applies_to_forward_and_reverse_records(start_server: StartServer, tmp_path: Path) -> None:
    running = await start(start_server, f"    hosts {hosts_file(tmp_path)} {{\n        ttl 60\n    }}")
    assert (await running.udp("www.example.org")).answer[0].ttl == 60
    assert (await running.udp("1.0.0.10.in-addr.arpa", "PTR")).answer[0].ttl == 60


async def test_wildcard_matches_one_label(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "192.168.1.10 *.example.com\n192.168.1.11 a.example.com\n")
    running = await start(start_server, f"    hosts {path} {{\n        fallthrough\n    }}")
    assert addresses(await running.udp("apps.example.com")) == ["192.168.1.10"]
    assert addresses(await running.udp("a.example.com")) == ["192.168.1.11"]  # exact wins
    assert is_whoami(await running.udp("example.com"))  # the apex is not covered
    assert is_whoami(await running.udp("deep.apps.example.com"))  # one label only
    assert addresses(await running.udp("10.1.168.192.in-addr.arpa", "PTR")) == []  # no PTR for wildcards


# -- the file over time -------------------------------------------------------------------


async def test_changed_file_is_picked_up_after_the_reload_interval(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "10.0.0.1 www.example.org\n")
    running = await start(start_server, f"    hosts {path} {{\n        reload 100ms\n        fallthrough\n    }}")
    assert addresses(await running.udp("www.example.org")) == ["10.0.0.1"]
    path.write_text("10.0.0.42 www.example.org\n10.0.0.43 new.example.org\n")
    plugin = plugin_of(running)
    await wait_for(lambda: bool(plugin.file.v4("new.example.org.")))
    assert addresses(await running.udp("www.example.org")) == ["10.0.0.42"]
    assert addresses(await running.udp("new.example.org")) == ["10.0.0.43"]


async def test_reload_zero_reads_the_file_once(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path)
    running = await start(start_server, f"    hosts {path} {{\n        reload 0\n    }}")
    plugin = plugin_of(running)
    assert plugin.reload == 0 and plugin._task is None
    assert addresses(await running.udp("www.example.org")) == ["10.0.0.1", "10.0.0.2"]
    default = await start(start_server, f"    hosts {path}")
    assert plugin_of(default).reload == 5.0 and plugin_of(default)._task is not None


async def test_file_is_read_only_when_mtime_or_size_changed(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path)
    running = await start(start_server, f"    hosts {path} {{\n        reload 0\n    }}")
    plugin = plugin_of(running)
    assert not await plugin.refresh()  # unchanged
    stamp = path.stat()
    path.write_text(HOSTS_FILE.replace("10.0.0.1 ", "10.0.0.7 "))  # same size
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same mtime
    assert not await plugin.refresh()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    assert await plugin.refresh()
    assert addresses(await running.udp("web")) == ["10.0.0.7"]


async def test_deleted_file_keeps_serving_the_last_contents(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path)
    running = await start(start_server, f"    hosts {path} {{\n        reload 0\n    }}")
    path.unlink()
    assert not await plugin_of(running).refresh()
    assert addresses(await running.udp("www.example.org")) == ["10.0.0.1", "10.0.0.2"]


async def test_bad_lines_are_skipped_with_a_warning(
    start_server: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        "garbage line here\n"
        "10.0.0.300 bad.example.org\n"
        "onlyonefield\n"
        "\x00\xff binary\n"
        f"10.0.0.8 {'x' * 64}.example.org ok.example.org\n"  # an over-long label: that name only
        "fe80::1%eth0 zoned.example.org\n"
        "::ffff:10.0.0.4 mapped.example.org\n"
        "10.0.0.3 good.example.org\n"
    )
    path = hosts_file(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="plugin.hosts"):
        running = await start(start_server, f"    hosts {path} {{\n        fallthrough\n    }}")
    assert addresses(await running.udp("good.example.org")) == ["10.0.0.3"]
    assert addresses(await running.udp("ok.example.org")) == ["10.0.0.8"]
    assert addresses(await running.udp("zoned.example.org", "AAAA")) == ["fe80::1"]
    assert addresses(await running.udp("mapped.example.org", "A")) == ["10.0.0.4"]  # as Go reads it
    assert is_whoami(await running.udp("bad.example.org"))
    assert any("skipped 4 malformed lines (first at line 1)" in r.getMessage() for r in caplog.records)


async def test_missing_file_warns_and_serves_inline_entries(
    start_server: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nope.hosts"
    with caplog.at_level(logging.WARNING, logger="plugin.hosts"):
        running = await start(start_server, f"    hosts {missing} {{\n        10.0.0.1 inline.example.org\n    }}")
    assert any(r.getMessage() == f"File does not exist: {missing}" for r in caplog.records)
    assert addresses(await running.udp("inline.example.org")) == ["10.0.0.1"]
    # Created later: read at the next check, as CoreDNS does.
    missing.write_text("10.0.0.2 late.example.org\n")
    assert await plugin_of(running).refresh()
    assert addresses(await running.udp("late.example.org")) == ["10.0.0.2"]


async def test_metrics_count_entries_and_report_the_file_mtime(start_server: StartServer, tmp_path: Path) -> None:
    path = hosts_file(tmp_path)
    running = await start(start_server, f"    hosts {path} {{\n        10.0.0.20 inline.example.org\n    }}")
    metrics = running.server.runtime.metrics
    # File: 6 name->address + 6 address->name (other.example.net too: zone "."); inline: 1 + 1.
    assert metrics["coredns_hosts_entries"].current() == {(str(path),): 14.0}  # type: ignore[union-attr]
    reloaded = metrics["coredns_hosts_reload_timestamp_seconds"].current()  # type: ignore[union-attr]
    assert reloaded == {(): path.stat().st_mtime_ns / 1e9}
    assert b'coredns_hosts_entries{hostsfile="' in metrics.render()


# -- Corefile syntax ----------------------------------------------------------------------


def test_relative_file_is_next_to_the_corefile(tmp_path: Path) -> None:
    hosts_file(tmp_path, name="example.hosts")
    config = load(". {\n hosts example.hosts\n}\n", str(tmp_path / "Corefile"), REGISTRY, default_port=0)
    plugin = config.blocks[0].find("hosts")
    assert isinstance(plugin, Hosts)
    assert plugin.path == str(tmp_path / "example.hosts")
    assert plugin.origins == ["."]


def test_defaults_and_zone_arguments(tmp_path: Path) -> None:
    text = (
        "example.org {\n hosts\n}\n"
        "example.net {\n hosts /x example.com 10.0.0.0/24 {\n fallthrough Example.COM.\n }\n}\n"
    )
    config = load(text, "Corefile", REGISTRY, default_port=0)
    first, second = (block.find("hosts") for block in config.blocks)
    assert isinstance(first, Hosts) and isinstance(second, Hosts)
    assert (first.path, first.origins, first.fall, first.ttl) == ("/etc/hosts", ["example.org."], [], 3600)
    assert second.origins == ["example.com.", "0.0.10.in-addr.arpa."]
    assert second.fall == ["example.com."]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("hosts {\n ttl 0\n}", "Corefile:3: ttl: 0 is invalid: must be between 1 and 65535"),
        ("hosts {\n ttl 65536\n}", "ttl: 65536 is invalid"),
        ("hosts {\n ttl abc\n}", 'ttl: needs a number of seconds, got "abc"'),
        ("hosts {\n ttl\n}", "ttl: needs a time in seconds"),
        ("hosts {\n reload\n}", "reload: needs a duration (zero seconds to disable)"),
        ("hosts {\n reload soon\n}", 'reload: invalid duration "soon"'),
        ("hosts {\n no_reverse now\n}", "no_reverse: expected exactly 0 arguments, got 1"),
        ("hosts {\n fallthrough\n 10.0.0.1 late.example.org\n}", 'Corefile:4: hosts: unknown option "10.0.0.1"'),
        ("hosts {\n fallthrough_unsupported\n}", "hosts: fallthrough_unsupported requires fallthrough"),
        ("hosts\n hosts", "Corefile:3: hosts: given twice in one server block"),
        ("hosts /etc/hosts bad..zone", 'hosts: invalid zone "bad..zone"'),
    ],
)
def test_corefile_errors_name_file_and_line(body: str, problem: str) -> None:
    with pytest.raises(CorefileError) as caught:
        load(f". {{\n {body}\n}}\n", "Corefile", REGISTRY, default_port=0)
    assert problem in str(caught.value)


def test_unreadable_file_is_an_error_and_a_missing_one_is_not(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CorefileError, match="unable to access hosts file"):
        load(f". {{\n hosts {tmp_path}/file/below\n}}\n", "Corefile", REGISTRY, default_port=0)  # ENOTDIR
    with caplog.at_level(logging.WARNING, logger="plugin.hosts"):
        load(f". {{\n hosts {tmp_path} {{\n not-an-address here\n }}\n}}\n", "Corefile", REGISTRY, default_port=0)
    messages = [r.getMessage() for r in caplog.records]
    assert f'Hosts file "{tmp_path}" is a directory' in messages
    assert "Corefile:3: not a hosts line (want ADDRESS NAME...), ignored: not-an-address here" in messages


# -- the parser alone ---------------------------------------------------------------------


def test_parser_reports_bad_lines_and_drops_names_outside_origins() -> None:
    table, skipped = parse_hosts(
        ["10.0.0.1 a.example.org b.other", "nonsense", "", "# c", "1.2.3 x"], ["example.org."], True
    )
    assert table.name4 == {"a.example.org.": ["10.0.0.1"]}
    assert table.reverse["1.0.0.10.in-addr.arpa."] == ["a.example.org."]
    assert skipped == [2, 5]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=20), st.booleans())
def test_parser_never_raises(lines: list[str], auto_reverse: bool) -> None:
    table, _ = parse_hosts(lines, ["."], auto_reverse)
    for name in (*table.name4, *table.name6, *table.reverse):
        assert name.endswith(".") and name == name.lower()
