"""``big N``: answers A queries with N distinct A records (about 16 octets each)."""

from __future__ import annotations

from dnslib import QTYPE, RR, A

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.plugin import Handler, Plugin, expect_args, parse_int
from resolver.reply import Reply
from resolver.request import Request


class Big(Plugin):
    name = "big"

    def __init__(self, count: int) -> None:
        self.count = count

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Big:
        return cls(parse_int(expect_args(directive, 1, 1)[0], directive, 1, 4000))

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        reply = req.reply(authoritative=True)
        for index in range(self.count):
            reply.add_answer(
                RR(req.qname, QTYPE.A, ttl=60, rdata=A(f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"))
            )
        return self.answer(reply)
