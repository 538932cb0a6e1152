"""errors: one CoreDNS-style line per reported error, or one per period when consolidated."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator

import pytest

from resolver.config import load
from resolver.corefile import CorefileError
from resolver.logs import _CoreDNSFormatter
from resolver.plugin import Registry
from resolver.plugin import format_duration as go_duration
from tests import helpers
from tests.conftest import StartServer
from tests.helpers import query_bytes, raw_udp, wait_for

REGISTRY = Registry(("bind", "errors", "log", "failing", "erratic", "whoami"), "tests.testplugins")


class Capture(helpers.Capture):
    """The log capture, plus the consolidation summaries among its records."""

    def summaries(self) -> list[logging.LogRecord]:
        return [record for record in self.records if " errors like " in record.getMessage()]


@pytest.fixture
def logged() -> Iterator[Capture]:
    logger = logging.getLogger("plugin.errors")
    capture = Capture()
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(level)


def corefile(*errors_block: str) -> str:
    errors = "errors {\n" + "".join(f"  {line}\n" for line in errors_block) + " }" if errors_block else "errors"
    return f". {{\n bind 127.0.0.1\n {errors}\n failing\n erratic\n}}\n"


async def ask(port: int, name: str, rdtype: str = "A") -> bytes:
    reply = await raw_udp(port, query_bytes(name, rdtype))
    assert reply is not None
    return reply


async def test_an_error_is_logged_as_coredns_logs_it(start_server: StartServer, logged: Capture) -> None:
    running = await start_server(corefile(), registry=REGISTRY)
    await ask(running.port, "fine.example.org")  # no error: nothing logged
    reply = await ask(running.port, "BOOM.Example.ORG", "AAAA")
    assert reply[3] & 0x0F == 2  # the client still gets the SERVFAIL
    (record,) = logged.records
    assert record.levelno == logging.ERROR
    assert (
        _CoreDNSFormatter().format(record) == "[ERROR] plugin/errors: 2 boom.example.org. AAAA: boom: boom.example.org."
    )


async def test_rcode_is_a_number_and_unknown_types_use_the_generic_name(
    start_server: StartServer, logged: Capture
) -> None:
    running = await start_server(corefile(), registry=REGISTRY)
    await ask(running.port, "refused.example.org", "TYPE65280")
    assert logged.messages == ["5 refused.example.org. TYPE65280: refused: refused.example.org."]


async def test_consolidate_counts_matching_errors_into_one_line_per_period(
    start_server: StartServer, logged: Capture
) -> None:
    running = await start_server(corefile("consolidate 300ms ^boom"), registry=REGISTRY)
    await asyncio.gather(*(ask(running.port, f"boom.{index}.example.org") for index in range(3)))
    await ask(running.port, "refused.example.org")  # does not match: logged on its own
    assert logged.messages == ["5 refused.example.org. A: refused: refused.example.org."]
    await wait_for(lambda: len(logged.summaries()) == 1)
    (summary,) = logged.summaries()
    assert summary.getMessage() == "3 errors like '^boom' occurred in last 300ms"
    assert summary.levelno == logging.ERROR
    await ask(running.port, "boom.again.example.org")  # a new period starts
    await wait_for(lambda: len(logged.summaries()) == 2)
    assert logged.summaries()[1].getMessage() == "1 errors like '^boom' occurred in last 300ms"
    assert not any(message.startswith("2 boom") for message in logged.messages)


async def test_consolidate_level_and_first_matching_pattern(start_server: StartServer, logged: Capture) -> None:
    running = await start_server(
        corefile("consolidate 300ms boom warning", "consolidate 300ms ^boom info"), registry=REGISTRY
    )
    await ask(running.port, "boom.example.org")
    await wait_for(lambda: len(logged.summaries()) == 1)
    (summary,) = logged.summaries()
    assert summary.getMessage() == "1 errors like 'boom' occurred in last 300ms"
    assert summary.levelno == logging.WARNING
    assert _CoreDNSFormatter().format(summary).startswith("[WARNING] plugin/errors: 1 errors like")


async def test_show_first_logs_the_first_error_and_summarises_only_more(
    start_server: StartServer, logged: Capture
) -> None:
    running = await start_server(
        corefile("consolidate 200ms ^boom warning show_first", "consolidate 200ms ^refused"), registry=REGISTRY
    )
    await ask(running.port, "boom.one.example.org")
    assert logged.messages == ["2 boom.one.example.org. A: boom: boom.one.example.org."]
    assert logged.records[0].levelno == logging.WARNING
    await ask(running.port, "refused.example.org")
    # The refused period started after the boom one, so once it is summarised the boom
    # period is over too: with one error it gets no summary.
    await wait_for(lambda: len(logged.summaries()) == 1)
    assert [record.getMessage() for record in logged.summaries()] == ["1 errors like '^refused' occurred in last 200ms"]
    await asyncio.gather(*(ask(running.port, f"boom.{index}.example.org") for index in range(2)))
    await wait_for(lambda: len(logged.summaries()) == 2)
    assert logged.summaries()[1].getMessage() == "2 errors like '^boom' occurred in last 200ms"
    assert sum(message.startswith("2 boom.") for message in logged.messages) == 2  # the two first ones


async def test_pending_counts_are_logged_when_the_configuration_stops(
    start_server: StartServer, logged: Capture
) -> None:
    text = corefile("consolidate 1h ^boom")
    running = await start_server(text, registry=REGISTRY)
    await ask(running.port, "boom.example.org")
    assert logged.summaries() == []
    await running.reconfigure(text)
    await wait_for(lambda: len(logged.summaries()) == 1)
    assert logged.summaries()[0].getMessage() == "1 errors like '^boom' occurred in last 1h0m0s"


async def test_stacktrace_and_stdout_are_accepted(start_server: StartServer, logged: Capture) -> None:
    running = await start_server(
        ". {\n bind 127.0.0.1\n errors stdout {\n  stacktrace\n }\n failing\n erratic\n}\n", registry=REGISTRY
    )
    await ask(running.port, "boom.example.org")
    assert len(logged.records) == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("errors /var/log/errors {\n }", 'invalid log file "/var/log/errors"'),
        ("errors {\n  consolidate 1s\n }", "expected 2 to 4 arguments"),
        ("errors {\n  consolidate soon ^x\n }", 'invalid duration "soon"'),
        ("errors {\n  consolidate 1s (\n }", 'invalid regular expression "("'),
        ("errors {\n  consolidate 1s ^x loud\n }", 'unknown option "loud"'),
        ("errors {\n  consolidate 1s ^x show_first info\n }", "log level must come before show_first"),
        ("errors {\n  consolidate 1s ^x info error\n }", "multiple log levels"),
        ("errors {\n  verbose\n }", 'unknown option "verbose"'),
        ("errors {\n  stacktrace now\n }", "takes no arguments"),
    ],
)
def test_bad_configuration_is_a_one_line_error(text: str, problem: str) -> None:
    with pytest.raises(CorefileError) as caught:
        load(f". {{\n {text}\n erratic\n}}\n", "Corefile", REGISTRY)
    assert problem in str(caught.value)
    assert re.match(r"Corefile:[23]: (errors|consolidate|stacktrace): ", str(caught.value))


def test_durations_are_printed_like_go() -> None:
    cases = {0.3: "300ms", 30: "30s", 300: "5m0s", 3600: "1h0m0s", 90: "1m30s", 1.5: "1.5s"}
    cases |= {0.0000015: "1.5µs", 1e-7: "100ns", 5400.25: "1h30m0.25s", 0: "0s"}
    assert {seconds: go_duration(seconds) for seconds in cases} == cases
