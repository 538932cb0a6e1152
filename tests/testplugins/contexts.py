"""Uses asyncio.timeout in its first step and a ContextVar, answering TXT with what it saw.

Names starting with ``wait`` also await a short sleep inside the timeout. The TXT answer
is the ContextVar's value before this query set it ("-" when unset): a value left over
from another query would show that queries share a context.
"""

from __future__ import annotations

import asyncio
import contextvars

from dnslib import QTYPE, RR, TXT

from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

seen_name: contextvars.ContextVar[str] = contextvars.ContextVar("seen_name")


class Contexts(Plugin):
    name = "contexts"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        before = seen_name.get("-")
        seen_name.set(req.qname)
        async with asyncio.timeout(2):
            if req.qname.startswith("wait"):
                await asyncio.sleep(0.01)
        reply = req.reply()
        reply.add_answer(RR(req.name, QTYPE.TXT, rdata=TXT(before)))
        return self.answer(reply)
