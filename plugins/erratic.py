"""erratic: a misbehaving authoritative server, for testing clients and chains.

Syntax::

    erratic {
        drop [AMOUNT]                 # drop every AMOUNT-th query (default 2)
        truncate [AMOUNT]             # answer every AMOUNT-th query truncated (default 2)
        delay [AMOUNT [DURATION]]     # delay every AMOUNT-th query (default 2, 100ms)
    }

Without options every query is answered. A queries get ``192.0.2.53`` and AAAA queries
``2001:db8::53`` (TTL 5) for the query name; other types get an empty NOERROR. As in
CoreDNS, queries are numbered from 1 across the plugin and the options count that number.
"""

from __future__ import annotations

import asyncio

from dnslib import AAAA, QTYPE, RR, A

from resolver.corefile import Directive
from resolver.plugin import Handler, Plugin, expect_args, parse_duration, parse_int, raise_unknown_option
from resolver.reply import Reply
from resolver.request import Request

DEFAULT_AMOUNT = 2
DEFAULT_DELAY = 0.1


class Erratic(Plugin):
    name = "erratic"

    def __init__(self, drop: int = 0, truncate: int = 0, delay: int = 0, delay_for: float = DEFAULT_DELAY) -> None:
        self.drop = drop
        self.truncate = truncate
        self.delay = delay
        self.delay_for = delay_for
        self.queries = 0

    @classmethod
    def setup(cls, directive: Directive, block: object) -> Erratic:
        if directive.args:
            raise directive.error("takes no arguments, only a block")
        options: dict[str, object] = {}
        for option in directive.children:
            if option.block:
                raise option.error("takes no block")
            if option.name in ("drop", "truncate"):
                args = expect_args(option, 0, 1)
                options[option.name] = parse_int(args[0], option, 1) if args else DEFAULT_AMOUNT
            elif option.name == "delay":
                args = expect_args(option, 0, 2)
                options["delay"] = parse_int(args[0], option, 1) if args else DEFAULT_AMOUNT
                if len(args) == 2:
                    options["delay_for"] = parse_duration(args[1], option)
            else:
                raise raise_unknown_option(directive, option)
        return cls(**options)  # type: ignore[arg-type]

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        self.queries += 1
        number = self.queries
        if self.drop and number % self.drop == 0:
            return None
        if self.delay and number % self.delay == 0:
            await asyncio.sleep(self.delay_for)
        reply = req.reply(authoritative=True)
        if self.truncate and number % self.truncate == 0:
            reply.header.tc = 1
            return self.answer(reply)
        if req.qtype == QTYPE.A:
            reply.add_answer(RR(req.name, QTYPE.A, req.qclass, 5, A("192.0.2.53")))
        elif req.qtype == QTYPE.AAAA:
            reply.add_answer(RR(req.name, QTYPE.AAAA, req.qclass, 5, AAAA("2001:db8::53")))
        return self.answer(reply)
