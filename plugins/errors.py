"""errors: log the errors plugins report, one line each or consolidated per period.

Syntax::

    errors [stdout] [{
        stacktrace
        consolidate DURATION REGEXP [LEVEL] [show_first]
    }]

When a plugin further down the chain answers with an error (a failed upstream, no
plugin answering), a line is logged as CoreDNS logs it::

    [ERROR] plugin/errors: 2 example.org. A: read udp 10.0.0.1:53->8.8.8.8:53: i/o timeout

that is RCODE (a number), query name, query type, and the error text.

``consolidate`` collects errors whose text matches REGEXP (searched anywhere in the
text, first matching ``consolidate`` wins): instead of a line each, DURATION after the
first of them one line ``N errors like 'REGEXP' occurred in last DURATION`` is logged at
LEVEL (``warning``, ``error`` (default), ``info`` or ``debug``). With ``show_first`` the
first error of a period is also logged on its own, and a period with only that one error
logs no summary. Counts still pending are logged when the configuration stops.

``stacktrace`` is accepted for compatibility: a plugin that raises is always logged by
the server with its traceback (CoreDNS needs the option to print a panic's stack).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.dnsnames import type_text
from resolver.logs import plugin_logger
from resolver.plugin import (
    Handler,
    Plugin,
    expect_args,
    format_duration,
    no_arguments,
    parse_duration,
    raise_unknown_option,
)
from resolver.reply import Reply
from resolver.request import Request

log = plugin_logger("errors")

LEVELS = {"warning": logging.WARNING, "error": logging.ERROR, "info": logging.INFO, "debug": logging.DEBUG}
MAX_REGEXP_LENGTH = 10000  # CoreDNS's limit on a consolidate pattern


@dataclass(slots=True)
class Pattern:
    """One ``consolidate`` line and the errors it has counted in the current period."""

    period: float  # seconds
    regexp: re.Pattern[str]
    level: int = logging.ERROR
    show_first: bool = False
    count: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def summary(self) -> str:
        return f"{self.count} errors like '{self.regexp.pattern}' occurred in last {format_duration(self.period)}"


class Errors(Plugin):
    name = "errors"

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = patterns
        self.stopped = False

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Errors:
        args = expect_args(directive, 0, 1)
        if args and args[0] != "stdout":
            raise directive.error(f'invalid log file "{args[0]}": errors are always logged to stdout')
        patterns = []
        for option in directive.children:
            if option.block:
                raise option.error("takes no block")
            if option.name in ("stacktrace", "panicRecoveryStacktrace"):  # the old name still parses
                no_arguments(option)
            elif option.name == "consolidate":
                patterns.append(_parse_consolidate(option))
            else:
                raise raise_unknown_option(directive, option)
        return cls(patterns)

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        reply = await next(req)
        if reply is None or reply.error is None:  # the whole cost of a query without error
            return reply
        self._report(req, reply.rcode, reply.error)
        return reply

    def observe(self, req: Request, reply: Reply | None, _elapsed: float) -> None:
        """What ``serve`` does with a reply, for the server's fast path (a cache hit
        answered without running the chain: ``resolver.server.fast_path``) and for the
        rest of that block's queries (``Server._answer_observed``)."""
        if reply is not None and reply.error is not None:
            self._report(req, reply.rcode, reply.error)

    def tally(self, req: Request, reply: Reply) -> Callable[[float], None] | None:
        """``observe`` for repeats of the same reply (the server's memo,
        ``resolver.memo``): nothing to do for a reply without error."""
        if reply.error is None:
            return None
        rcode, error = reply.rcode, reply.error
        return lambda _elapsed: self._report(req, rcode, error)

    async def stop(self) -> None:
        # As CoreDNS does on shutdown: log what is pending now, and every later error
        # (queries still finishing in this chain) on its own.
        self.stopped = True
        for pattern in self.patterns:
            if pattern.timer is not None:
                pattern.timer.cancel()
                self._flush(pattern)

    def _report(self, req: Request, rcode: int, error: str) -> None:
        level = logging.ERROR
        for pattern in self.patterns:
            if pattern.regexp.search(error):
                if not self.stopped:
                    pattern.count += 1
                    if pattern.count == 1:
                        loop = asyncio.get_running_loop()
                        pattern.timer = loop.call_later(pattern.period, self._flush, pattern)
                    if pattern.count > 1 or not pattern.show_first:
                        return
                level = pattern.level
                break
        log.log(level, "%d %s %s: %s", rcode, req.qname, type_text(req.qtype), error)

    @staticmethod
    def _flush(pattern: Pattern) -> None:
        pattern.timer = None
        if pattern.count > 1 or (pattern.count == 1 and not pattern.show_first):
            log.log(pattern.level, "%s", pattern.summary())
        pattern.count = 0


def _parse_consolidate(option: Directive) -> Pattern:
    args = expect_args(option, 2, 4)
    period = parse_duration(args[0], option)
    if period <= 0:
        raise option.error(f'duration must be positive, got "{args[0]}"')
    if len(args[1]) > MAX_REGEXP_LENGTH:
        raise option.error(f"regex pattern too long: {len(args[1])} > {MAX_REGEXP_LENGTH}")
    try:
        regexp = re.compile(args[1])
    except re.error as exc:
        raise option.error(f'invalid regular expression "{args[1]}": {exc}') from None
    pattern = Pattern(period, regexp)
    level_given = False
    for extra in args[2:]:
        if extra in LEVELS:
            if level_given:
                raise option.error("multiple log levels specified in consolidate")
            if pattern.show_first:
                raise option.error("log level must come before show_first in consolidate")
            pattern.level = LEVELS[extra]
            level_given = True
        elif extra == "show_first":
            if pattern.show_first:
                raise option.error("show_first given twice")
            pattern.show_first = True
        else:
            raise option.error(f'unknown option "{extra}" (use a level: {", ".join(LEVELS)}; or show_first)')
    return pattern
